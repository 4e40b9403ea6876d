"""Suggest: configs to try next in an environment, from the runs tried in the most similar ones.

The meta-learning warm start (auto-sklearn's: the best configurations of the
nearest past tasks become the first candidates), with the environment as the
task. ``plan_suggestions(model_id, like_run=... | env={...}, snapshot=...)``:

1. the target environment: a run's env slice (``like_run``), or one encoded
   from the keys given (``env``: config env paths and env metrics; the runs
   are then compared on those keys alone);
2. the runs of that environment (env-slice cosine): its core is the
   ``CORE`` runs nearest the target, and the neighbourhood every run about as
   near the core as the core's own runs are (cosine to the core's centroid at
   least the core's 10th percentile minus ``ENV_MARGIN``), so that it holds
   the target's environment whatever the number of its runs, and not the next
   one; at most ``neighbours`` runs, at least ``CORE``;
3. near-duplicate configs grouped: a run joins the group of the best run whose
   config slice has a cosine of at least ``duplicate_cosine`` with its own
   (``DUPLICATE_COSINE``), so that each suggestion is a distinct config;
4. the groups ranked by their mean metric shrunk towards the neighbourhood's
   (``SHRINK`` runs' worth of prior: one lucky run does not beat a config that
   did well many times); ``minimise`` for metrics where lower is better.

Each suggestion: the config of its best run, the paths where it differs from
the target run's config (``like_run``; among the paths the model weighs, so
not seeds, notes or ignored paths), its supporting runs best first, their
number, the metric's mean and spread over them, and how similar their
environments were to the target (mean env cosine). Returns a
``SuggestionResult`` (``target`` dict, ``frame`` Polars); ``suggest`` returns
the frame.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl

from .environments import encode_envs, env_keys, parse_value, resolve_key
from ..errors import BadInput
from .space import Space, open_space

DEFAULT_METRIC = "annualised_sharpe"
DEFAULT_NEIGHBOURS = 2_000
CORE = 50
ENV_MARGIN = 0.05
DUPLICATE_COSINE = 0.9
SHRINK = 2.0


@dataclass
class SuggestionResult:
    target: dict
    frame: pl.DataFrame  # rank, config, differs, run_ids, metric, mean, std, support, env_cosine

    def as_dict(self) -> dict:
        suggestions = []
        for row in self.frame.to_dicts():
            row["config"] = json.loads(row["config"])
            suggestions.append(row)
        return {"target": self.target, "suggestions": suggestions}


def pick_metric(space: Space, metric: str | None) -> str:
    """``metric``, or annualised_sharpe, or the first Sharpe-like metric of the runs."""
    if metric:
        space.metric(metric)  # BadInput naming the metrics there are
        return metric
    if DEFAULT_METRIC in space.metric_columns:
        return DEFAULT_METRIC
    sharpe = [c for c in space.metric_columns if "sharpe" in c.lower()]
    if not sharpe:
        raise BadInput("no Sharpe-like metric in these runs: name one with --metric", f"metrics: {', '.join(space.metric_columns) or 'none'}")
    return sharpe[0]


def plan_suggestions(
    model_id: str,
    *,
    like_run: str | None = None,
    env: dict | Sequence[str] | None = None,
    snapshot: str | os.PathLike | None = None,
    historical_url=None,
    runtime_url=None,
    metric: str | None = None,
    minimise: bool = False,
    top_k: int = 5,
    strategy_id: str | Sequence[str] | None = None,
    start: dt.date | None = None,
    end: dt.date | None = None,
    neighbours: int = DEFAULT_NEIGHBOURS,
    duplicate_cosine: float = DUPLICATE_COSINE,
) -> SuggestionResult:
    """See the module docstring. ``env``: {key: value} or ["key=value", ...]."""
    if (like_run is None) == (not env):
        raise BadInput("give the target environment as --like-run RUN or as --env KEY=VALUE (one of them)")
    if top_k < 1 or neighbours < 1 or not 0 < duplicate_cosine <= 1:
        raise BadInput("--top-k and --neighbours must be >= 1, the duplicate cosine in (0, 1]")
    strategy_ids = [strategy_id] if isinstance(strategy_id, str) else list(strategy_id or [])
    space = open_space(model_id, snapshot=snapshot, historical_url=historical_url, runtime_url=runtime_url, strategy_ids=strategy_ids, start=start, end=end)
    name = pick_metric(space, metric)
    values = space.metric(name)
    sign = -1.0 if minimise else 1.0
    run_ids = space.runs.get_column("run_id")

    if like_run is not None:
        at = np.flatnonzero((run_ids == like_run).to_numpy())
        if not len(at):
            raise BadInput(f"run `{like_run}` has no embedding of model `{model_id}` in this selection", "check --like-run, --model-id and the filters")
        target_position = int(at[0])
        env_units = space.unit("env")
        if not env_units[target_position].any():
            raise BadInput(f"run `{like_run}` has no environment features (its env slice is zero)", "give the environment with --env KEY=VALUE")
        cosine = env_units @ env_units[target_position]
        target = {"like_run": like_run, "env": _run_env(space, target_position)}
        # re-centred on the nearest runs: their centroid is the environment, the target one run of it
        core = _nearest(cosine, np.isfinite(cosine), CORE, space.rank)
        centroid = env_units[core].astype(np.float64).sum(axis=0)
        cosine = env_units @ (centroid / np.linalg.norm(centroid)).astype(np.float32)
    else:
        given = _parse_env(space, env)
        cosine = _env_cosines(space, given)
        target = {"env": given}
    target.update({"model_id": model_id, "metric": name, "minimise": minimise})

    usable = np.isfinite(values) & (cosine > 0)
    if not usable.any():
        raise BadInput("no run with that metric has an environment like the target's", "check the target and --metric")
    order = _neighbourhood(cosine, usable, neighbours, space.rank)
    frame, configs = _groups(space, order, values, sign, cosine, duplicate_cosine, top_k, name, like_run)
    # the paths where each suggestion differs from the target run's config (none without one)
    target_config = configs.get(like_run, {}) if like_run is not None else None
    weighed = _weighed_paths(space)
    differs = [None if target_config is None else _differences(target_config, json.loads(c), weighed) for c in frame.get_column("config")]
    frame = frame.with_columns(pl.Series("differs", differs, dtype=pl.List(pl.String)))
    target["neighbourhood"] = {"runs": int(len(order)), "min_env_cosine": round(float(cosine[order].min()), 6)}
    return SuggestionResult(target, frame)


def suggest(model_id: str, **kwargs) -> pl.DataFrame:
    """The suggestions of ``plan_suggestions`` as a Polars DataFrame, best first."""
    return plan_suggestions(model_id, **kwargs).frame


def _parse_env(space: Space, env) -> dict:
    if isinstance(env, dict):
        items = list(env.items())
    else:
        items = []
        for text in env:
            if "=" not in text:
                raise BadInput(f"--env {text!r}: write KEY=VALUE")
            key, value = text.split("=", 1)
            items.append((key.strip(), parse_value(value)))
    model = space.model.v2()
    return {resolve_key(model, key): value for key, value in items}


def _run_env(space: Space, position: int) -> dict:
    """The target run's env values, for the output."""
    out = {}
    row = space.env_values.row(position, named=True) if space.env_values.width > 1 else {}
    for key, text in row.items():
        if key != "run_id" and text is not None:
            out[key] = parse_value(text)
    for key, kind in env_keys(space.model.v2()).items():
        if kind == "metric" and key in space.runs.columns:
            value = space.runs.get_column(key)[position]
            if value is not None:
                out[key] = value
    return out


def _env_cosines(space: Space, given: dict) -> np.ndarray:
    """Each run's env cosine to the given environment, on the given keys alone:
    the runs' distinct value combinations are encoded like the target."""
    model = space.model.v2()
    kinds = env_keys(model)
    columns = {}
    for key in given:
        if kinds[key] in ("config", "window"):
            if key not in space.env_values.columns:
                raise BadInput(f"this snapshot has no values of the env key `{key}`", "export the snapshot again with this metabatch")
            columns[key] = space.env_values.get_column(key)
        else:
            columns[key] = space.runs.get_column(key).cast(pl.String) if key in space.runs.columns else pl.Series(key, [None] * len(space), pl.String)
    table = pl.DataFrame(columns)
    combos = table.unique(maintain_order=True)
    rows = [{k: parse_value(v) for k, v in combo.items() if v is not None} for combo in combos.iter_rows(named=True)]
    vectors = encode_envs(model, [given, *rows])
    cos = vectors[1:] @ vectors[0]
    index = table.join(combos.with_row_index("combo"), on=list(columns), how="left", nulls_equal=True).get_column("combo").to_numpy()
    return cos[index].astype(np.float64)


def _neighbourhood(cosine: np.ndarray, usable: np.ndarray, limit: int, rank: np.ndarray) -> np.ndarray:
    """The runs about as near the target as its ``CORE`` nearest (see the module docstring)."""
    nearest = _nearest(cosine, usable, max(limit, CORE), rank)
    core = cosine[nearest[:CORE]]
    threshold = np.quantile(core, 0.1) - ENV_MARGIN
    held = nearest[cosine[nearest] >= threshold]
    return held[: max(limit, CORE)] if len(held) >= CORE else nearest[:CORE]


def _nearest(cosine: np.ndarray, usable: np.ndarray, count: int, rank: np.ndarray) -> np.ndarray:
    """Positions of the ``count`` usable runs most like the target, ties at the
    edge kept, nearest first (ties by run_id: ``rank``)."""
    candidates = np.flatnonzero(usable)
    if len(candidates) > count:
        kth = np.partition(cosine[candidates], len(candidates) - count)[len(candidates) - count]
        candidates = candidates[cosine[candidates] >= kth - 1e-6]
    return candidates[np.lexsort((rank[candidates], -cosine[candidates]))]


def _groups(space: Space, order: np.ndarray, values, sign, cosine, threshold: float, top_k: int, metric: str, also: str | None):
    """The suggestions as a frame, and the configs read (their best runs' and ``also``'s)."""
    start, stop = space.slices["config"]
    block = space.vectors(order)[:, start:stop].astype(np.float64)
    norms = np.linalg.norm(block, axis=1)
    block /= np.where(norms > 0, norms, 1.0)[:, None]
    scores = sign * values[order]
    by_score = np.lexsort((np.arange(len(order)), -scores))
    group = np.full(len(order), -1)
    leaders = []
    for i in by_score:  # a loop over groups: each leader takes every near duplicate left
        if group[i] >= 0:
            continue
        near = (block @ block[i] >= threshold) & (group < 0)
        group[near] = len(leaders)
        leaders.append(i)
    prior = float(scores.mean())
    stats = []
    for g, leader in enumerate(leaders):
        members = np.flatnonzero(group == g)
        members = members[np.lexsort((members, -scores[members]))]
        member_scores = scores[members]
        shrunk = (member_scores.sum() + SHRINK * prior) / (len(members) + SHRINK)
        stats.append((shrunk, g, leader, members))
    stats.sort(key=lambda s: (-s[0], s[1]))
    chosen = stats[:top_k]
    run_ids = space.runs.get_column("run_id")  # gathered by position: 1M ids as Python objects cost 80 ms
    best_runs = run_ids.gather([int(order[s[2]]) for s in chosen]).to_list()
    configs = space.configs(best_runs + ([also] if also else []))
    rows = []
    for rank, (shrunk, _, leader, members) in enumerate(chosen, start=1):
        positions = order[members]
        member_values = values[positions]
        rows.append(
            {
                "rank": rank,
                "config": json.dumps(configs.get(best_runs[rank - 1], {}), sort_keys=True),
                "run_ids": run_ids.gather(positions).to_list(),
                "metric": metric,
                "mean": float(member_values.mean()),
                "std": float(member_values.std(ddof=1)) if len(members) > 1 else 0.0,
                "support": int(len(members)),
                "env_cosine": float(cosine[positions].mean()),
                "score": float(sign * shrunk),
            }
        )
    schema = {
        "rank": pl.Int64, "config": pl.String, "run_ids": pl.List(pl.String), "metric": pl.String, "mean": pl.Float64,
        "std": pl.Float64, "support": pl.Int64, "env_cosine": pl.Float64, "score": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema), configs


def _flat(value, path: str = "") -> dict:
    """Leaves of a JSON value by path (list indices kept: [0], [1], ...)."""
    out = {}
    if isinstance(value, dict):
        for key, child in value.items():
            out.update(_flat(child, f"{path}.{key}" if path else key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out.update(_flat(child, f"{path}[{i}]"))
        if not value:
            out[path] = []
    else:
        out[path] = value
    return out


def _weighed_paths(space: Space) -> set[str]:
    """The config paths the model gives a weight (noise and ignored paths have none)."""
    weighed = set()
    for path, m in space.model.v2().config_paths.items():
        if m.branch == "config" and m.weight() > 0:
            weighed.add(path)
    return weighed


def _differences(target: dict, config: dict, weighed: set[str]) -> list[str]:
    """The paths, among those the model weighs, where ``config`` differs from
    ``target`` (added, removed or changed; list indices kept)."""
    a, b = _flat(target), _flat(config)
    changed = (p for p in a.keys() | b.keys() if a.get(p, _MISSING) != b.get(p, _MISSING))
    return sorted(p for p in changed if re.sub(r"\[\d+\]", "", p) in weighed)


_MISSING = object()
