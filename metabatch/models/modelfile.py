"""Model files: the TOML a user writes to say how a fitted (v2) model reads runs.

``parse_model_file(text)`` / ``load_model_file(path)`` return a ``ModelSpec``;
every key is optional (defaults below). A file that cannot be used (not TOML,
an unknown key, a wrong type, a bad glob) is a ``BadInput`` naming the key::

    encoder = "v2"
    [paths]
    ignore = []           # config paths that say nothing about a run
    config = []           # paths declared "what was tried" (config paths, or the run's window)
    env = []              # paths declared "where it was tried" (config paths, or the run's window)
    env_metrics = []      # metrics_json keys declared to describe the environment
    outcome_metrics = []  # metrics_json keys declared to be outcomes
    [weights]
    config = 1.0
    env = 1.0
    outcome = 1.0

A pattern is an ``fnmatch`` glob on a leaf's dotted path with list indices
dropped (``engine.weights`` matches ``engine.weights[3]``); a pattern that
matches an object matches everything under it (``engine`` matches
``engine.weights``). ``env_metrics`` and ``outcome_metrics`` are matched
against the top-level keys of ``metrics_json``; ``config`` and ``env`` also
against the run's own window (``backtest_runs.start_date``, ``.end_date``,
``.window_days``). A path declared in the file keeps the branch the file
gives it; every other path's branch is learnt by ``fit`` from the runs
(``metabatch.models.branches``), with v1's names (``PRIOR_ENV``,
``PRIOR_ENV_METRICS``) as the prior where the runs cannot tell.
"""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput

# v1's rule for the env branch: the names a fitted model's branches fall back on
PRIOR_ENV = ("*market_id*", "*universe_id*", "*assessment_strategy_id*", "*assessment_horizon_days*")
PRIOR_ENV_METRICS = ("regime_*", "stab_*", "fragility_*", "*coverage*")
ENCODERS = ("v1", "v2")
BRANCHES = ("config", "env", "outcome")
DECLARATIONS = ("ignore", "config", "env", "env_metrics", "outcome_metrics")

_KEYS = {
    "": {"encoder", "paths", "weights"},
    "paths": set(DECLARATIONS),
    "weights": set(BRANCHES),
}


@dataclass(frozen=True)
class ModelSpec:
    """What a model file says (the defaults when it says nothing)."""

    encoder: str = "v2"
    ignore: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    env_metrics: tuple[str, ...] = ()
    weights: dict = field(default_factory=lambda: {b: 1.0 for b in BRANCHES})
    text: str = ""  # the file as written ("" for the defaults)
    config: tuple[str, ...] = ()
    outcome_metrics: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {
            "encoder": self.encoder,
            "paths": {key: list(getattr(self, key)) for key in DECLARATIONS},
            "weights": dict(self.weights),
        }

    def declared_config_branch(self, path: str) -> str | None:
        """The branch the file declares for a config path or window key (None: learnt)."""
        if matches(path, self.env):
            return "env"
        if matches(path, self.config):
            return "config"
        return None

    def declared_metric_branch(self, key: str) -> str | None:
        """The branch the file declares for a metrics_json key (None: learnt)."""
        if matches(key, self.env_metrics):
            return "env"
        if matches(key, self.outcome_metrics):
            return "outcome"
        return None


def parse_model_file(text: str, name: str = "the model file") -> ModelSpec:
    """A ``ModelSpec`` from TOML text; BadInput naming the key when it cannot be used."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{name} is not valid TOML: {exc}") from None
    for section, allowed in _KEYS.items():
        table = data if not section else data.get(section, {})
        if section and not isinstance(table, dict):
            raise BadInput(f"{name}: `{section}` must be a table ([{section}])")
        for key in table:
            if key not in allowed:
                where = f"{section}.{key}" if section else key
                known = ", ".join(sorted(f"{section}.{k}" if section else k for k in allowed))
                raise BadInput(f"{name}: unknown key `{where}` (known here: {known})")
    encoder = data.get("encoder", "v2")
    if encoder not in ENCODERS:
        raise BadInput(f"{name}: `encoder` must be one of {', '.join(map(repr, ENCODERS))}, not {encoder!r}")
    paths = data.get("paths", {})
    patterns = {key: _patterns(paths, key, name) for key in DECLARATIONS}
    weights = {}
    for branch in BRANCHES:
        value = data.get("weights", {}).get(branch, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise BadInput(f"{name}: `weights.{branch}` must be a finite number >= 0, not {value!r}")
        weights[branch] = float(value)
    if not any(w > 0 for w in weights.values()):
        raise BadInput(f"{name}: at least one of `weights.config`, `weights.env`, `weights.outcome` must be > 0")
    return ModelSpec(encoder, patterns["ignore"], patterns["env"], patterns["env_metrics"], weights, text, patterns["config"], patterns["outcome_metrics"])


def load_model_file(path: str | Path) -> ModelSpec:
    """``parse_model_file`` of a file; BadInput when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"cannot read the model file `{path}`: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise BadInput(f"the model file `{path}` is not UTF-8 text") from None
    return parse_model_file(text, f"model file `{path}`")


def _patterns(paths: dict, key: str, name: str) -> tuple[str, ...]:
    value = paths.get(key, [])
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadInput(f"{name}: `paths.{key}` must be a list of strings (globs)")
    for pattern in value:
        problem = glob_problem(pattern)
        if problem:
            raise BadInput(f"{name}: `paths.{key}` has a bad glob {pattern!r}: {problem}")
    return tuple(value)


def glob_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable glob, or None. fnmatch takes anything, but
    an empty pattern or an unclosed ``[`` would silently match nothing."""
    if not pattern.strip():
        return "it is empty"
    depth = 0
    for char in pattern:
        if char == "[":
            if depth:
                return "a `[` inside a `[...]` set"
            depth = 1
        elif char == "]" and depth:
            depth = 0
    if depth:
        return "a `[` is not closed"
    return None


def matches(path: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``path`` (dotted, no list indices) or an object above it matches a pattern."""
    if not patterns:
        return False
    prefixes = [path[:m.start()] for m in re.finditer(r"\.", path)] + [path]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)
