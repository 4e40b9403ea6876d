"""Explain: what a fitted v2 model decided for each path, and why.

``explain_model(model)`` takes a ``models.RegisteredModel`` (v2) and returns a
Polars frame, one row per path (config paths, metrics, the run's window):
``source``, ``path``, ``branch`` (config, env, outcome, or none: gives
nothing), ``how`` the branch was set (declared in the model file, learned
from the runs, v1's names as the prior where the runs could not tell, or
``names`` for a model fitted before branches were learnt), ``kind`` (number,
date, string, list, presence), ``weight`` (the largest of its feature
groups' weights), ``why`` (the figures that decided, in words) and
``figures`` (the same as JSON). Env paths come first: they are what makes two
runs "in the same environment". A v1 model is a ``BadInput``: it learns
nothing.
"""

from __future__ import annotations

import json

import polars as pl

from .encoders.v2 import V2Model
from ..errors import BadInput

ORDER = {"env": 0, "outcome": 1, "config": 2, "none": 3}
SCHEMA = {
    "branch": pl.String, "path": pl.String, "source": pl.String, "how": pl.String, "kind": pl.String,
    "weight": pl.Float64, "why": pl.String, "figures": pl.String,
}


def explain_model(model) -> pl.DataFrame:
    """One row per path of a fitted v2 model (a ``models.RegisteredModel``; see the module docstring)."""
    if model.encoder != "v2":
        raise BadInput(f"model `{model.model_id}` is a v1 model: it embeds by the spec's fixed rules and learnt nothing to explain",
                       "fit a v2 model with `metabatch fit --joint-model-id ID`, then explain that one")
    return explain_v2(model.v2())


def explain_v2(v2: V2Model) -> pl.DataFrame:
    """``explain_model`` of the ``V2Model`` itself."""
    rows = []
    for source, paths in (("config", v2.config_paths), ("metrics", v2.metric_paths), ("window", v2.window_paths)):
        for path, m in paths.items():
            how = m.how or ("names" if v2.format < 2 else "learned")
            rows.append({
                "branch": m.branch, "path": path, "source": source, "how": how, "kind": m.kind(),
                "weight": round(m.weight(), 4) if m.branch != "none" else 0.0,
                "why": _why(m.branch, how, m.figures, source), "figures": json.dumps(m.figures, sort_keys=True),
            })
    frame = pl.DataFrame(rows, schema=SCHEMA)
    return frame.with_columns(order=pl.col("branch").replace_strict(ORDER, default=9)).sort(
        ["order", "weight", "path"], descending=[False, True, False]
    ).drop("order")


def explain_unregistered(model_id: str) -> BadInput:
    """The error for an id that is not a fitted model."""
    return BadInput(f"model `{model_id}` is not a fitted model: it embeds as v1, by the spec's fixed rules, and learnt nothing to explain",
                    "list the fitted ones with `metabatch models`")


def _why(branch: str, how: str, figures: dict, source: str) -> str:
    if how == "declared":
        return "declared in the model file"
    if how == "names":
        return "v1's name rule (fitted before branches were learnt)"
    if how == "prior":
        return "v1's names: the runs could not tell"
    if "env_evidence" in figures:
        evidence, share = figures["env_evidence"], figures["config_share"]
        if share is None:
            return f"goes with the measured environment {evidence:.2f}: not the environment"
        side = f"goes with the measured environment {evidence:.2f}, follows the configs {share:.2f}"
        if branch == "env":
            return side
        if branch == "none":
            return side + ": not the environment"
        return side + (": a setting of the config" if share >= evidence else ": not enough to be the environment")
    if "between_env" in figures:
        between, cells = figures["between_env"], figures["between_config_env"]
        text = f"{between:.0%} of its variance between environments, {cells:.0%} between (config, environment) cells"
        if branch == "env":
            return text + ": follows the environment whatever was tried"
        return text + (": follows what was tried there" if cells > between else "")
    return ""


def branch_summary(v2: V2Model, top: int = 6) -> dict[str, list[str]]:
    """Per branch, its paths with a weight, most weighty first (at most ``top``, then "+N more")."""
    frame = explain_v2(v2).filter(pl.col("weight") > 0)
    out = {}
    for branch in ("env", "outcome", "config"):
        paths = frame.filter(pl.col("branch") == branch).get_column("path").to_list()
        shown = paths[:top] + ([f"+{len(paths) - top} more"] if len(paths) > top else [])
        out[branch] = shown
    return out
