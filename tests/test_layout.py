"""The package's layout: no import cycles, and the public API where it was.

The modules are grouped by area (pipeline, models, stores, snapshot,
workflows, synthetic); the names users import from (`metabatch.similar`,
`from metabatch.backfill import backfill`, ...) must keep working.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import metabatch

PACKAGE = Path(metabatch.__file__).parent


def _module_imports() -> dict[str, set[str]]:
    """module -> the metabatch modules it imports when it is imported (module level, TYPE_CHECKING aside)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = (path, is_package)
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            edges |= {target for target in targets if target in modules and target != name}
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = _module_imports()
    assert len(graph) > 50  # the walk found the package
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_folders_group_the_modules_by_area():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists())
    assert top == [
        "__init__.py", "__main__.py", "cli.py", "errors.py", "models", "pipeline", "resources.py",
        "snapshot", "stores", "synthetic", "urls.py", "workflows",
    ]


@pytest.mark.parametrize(
    "old, new",
    [(f"metabatch.{old}", f"metabatch.{new}") for old, new in sorted(metabatch._MOVED.items())]
    + [("metabatch.unnest.paths", "metabatch.pipeline.unnest.paths"), ("metabatch.encoders.v2", "metabatch.models.encoders.v2")],
)
def test_a_module_imports_from_its_old_path_as_the_same_module(old, new):
    moved = importlib.import_module(old)
    assert moved is importlib.import_module(new)
    assert moved.__name__ == new and moved.__spec__.name == new  # its own spec, not the alias's


def test_the_public_api_is_where_it_was():
    # in a fresh interpreter: the top-level names are functions there until a module shadows them
    code = (
        "import metabatch\n"
        "from metabatch.backfill import backfill\n"
        "from metabatch.models import fit, registered, list_models\n"
        "from metabatch.modelfile import load_model_file\n"
        "from metabatch.embed import Weights, embed_batch\n"
        "from metabatch import query\n"
        "names = ['export_parquet', 'show', 'similar', 'meta_ctx_norms', 'sql', 'plan_suggestions',"
        " 'cluster_runs', 'draw_landscape']\n"
        "assert all(callable(getattr(metabatch, n)) for n in names)\n"
        "assert backfill.__module__ == 'metabatch.pipeline.backfill' and fit.__module__ == 'metabatch.models.registry'\n"
        "assert query.__name__ == 'metabatch.snapshot.query'\n"
        "import metabatch.models.fitting\n"
        "from metabatch.models import fit as again\n"
        "assert again is fit  # the function, not the module fitting\n"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    fresh = subprocess.run([sys.executable, "-c", "import metabatch; print(metabatch.suggest.__module__)"],
                           capture_output=True, text=True)
    assert fresh.stdout.strip() == "metabatch.workflows.suggest", fresh.stderr
    cli = subprocess.run([sys.executable, "-m", "metabatch", "--help"], capture_output=True, text=True)
    assert cli.returncode == 0 and "backfill" in cli.stdout
