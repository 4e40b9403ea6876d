"""metabatch: columnar batch engine for Meta Config+Env joint embeddings.

Python API (the CLI wraps these; the first three from their modules,
``metabatch.stores.migrate``, ``metabatch.pipeline.backfill`` and
``metabatch.pipeline.embed``, the others from here):
    migrate(runtime_url, historical_url)
    backfill(runtime_url, historical_url, selection, weights, model_id, batch_rows, retries=)
    embed_batch(runs_table, weights, model_id)
    export_parquet(out, historical_url, runtime_url, model_id=, strategy_id=, start=, end=, retries=)
    show(snapshot=, as_of=, start=, end=, run_id=, strategy_id=, universe_id=, model_id=, limit=)
    similar(run_id, snapshot=, model_id=, strategy_id=, start=, end=, top_k=, candidate_limit=)
    meta_ctx_norms(strategy_id, model_id, snapshot=, run_id=, start=, end=)
    sql(query, snapshot)
    models.fit(runtime_url, historical_url, model_id, spec, selection, refit=)   fitted (v2) models
    suggest(model_id, like_run= | env=, snapshot=, metric=, top_k=, ...)      Polars DataFrames
    cluster_runs(model_id, on=, k=, snapshot=, seed=, ...)                   .assignments, .summary
    draw_landscape(model_id, out=, color=, on=, layout=, snapshot=, ...)     .coordinates
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


_LAZY = {
    "export_parquet": "snapshot",
    "show": "snapshot.query",
    "similar": "snapshot.query",
    "meta_ctx_norms": "snapshot.query",
    "sql": "snapshot.query",
    "suggest": "workflows.suggest",
    "plan_suggestions": "workflows.suggest",
    "cluster_runs": "workflows.cluster",
    "draw_landscape": "workflows.landscape",
}


def __getattr__(name):
    """Import the query and snapshot functions on first use: `import metabatch` stays cheap."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _MOVED:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'metabatch' has no attribute {name!r}")


# Where the modules lived before they were grouped by area: `metabatch.backfill`,
# `from metabatch.suggest import suggest` and the like keep working.
_MOVED = {
    "backfill": "pipeline.backfill", "combine": "pipeline.combine", "distributed": "pipeline.distributed",
    "embed": "pipeline.embed", "encode": "pipeline.encode", "pipes": "pipeline.pipes", "read": "pipeline.read",
    "retry": "pipeline.retry", "unnest": "pipeline.unnest", "write": "pipeline.write",
    "branches": "models.branches", "encoders": "models.encoders", "explain": "models.explain",
    "fit": "models.fitting", "groups": "models.groups", "kmeans": "models.kmeans", "modelfile": "models.modelfile",
    "migrate": "stores.migrate", "shards": "stores.shards", "query": "snapshot.query",
    "cluster": "workflows.cluster", "environments": "workflows.environments", "landscape": "workflows.landscape",
    "space": "workflows.space", "suggest": "workflows.suggest",
    "campaigns": "synthetic.campaigns", "demo": "synthetic.demo", "seed": "synthetic.seed", "shapes": "synthetic.shapes",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `metabatch.<old>` (and what is under it) as the module at its new place."""

    _own_specs: dict = {}

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(__name__ + ".")
        head = old.partition(".")[0]
        if old == fullname or head not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        old = spec.name.removeprefix(__name__ + ".")
        head, _, rest = old.partition(".")
        module = importlib.import_module(".".join(filter(None, (__name__, _MOVED[head], rest))))
        self._own_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # the import system gave the module the alias's spec: give it back its own
        module.__spec__ = self._own_specs.pop(module.__spec__.name)


sys.meta_path.insert(0, _MovedModules())
