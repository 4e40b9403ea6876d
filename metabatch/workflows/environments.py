"""Environments of a v2 model: its env keys, a run's values of them, and env
vectors encoded from some keys only.

- ``env_keys(model)``: the keys a user may name (``--env KEY=VALUE``): the
  config paths of the env branch (``market_id``, ``assessment.assessment_horizon_days``),
  the run's window where the model learnt it is env
  (``backtest_runs.start_date``, ``.end_date``, ``.window_days``) and the env
  metrics (``regime_bull_frac``); ``resolve_key`` accepts a path's last part
  when it names one path only.
- ``window_values(runs, keys)``: the runs' values of the env window keys, as
  JSON text (a date as ``"2024-01-05"``), as ``extract_env_values`` gives the
  config paths'.
- ``json_paths(model)``: for each config env path, the JSON path that
  extracts its values from a config (``$.sleeves[*].universe_id`` when a part
  of it is a list), so that a snapshot can store every run's env values.
- ``encode_envs(model, rows, con)``: env slices (L2-normalised) encoded from
  key -> value dicts, with only those keys: two environments compared on the
  keys a user gave, and nothing else.
"""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa

import pyarrow.compute as pc

from ..models.encoders.base import split_top_level
from ..models.encoders.dates import days_of
from ..models.encoders.v2 import SLICES, WINDOW_KEYS, V2Model, encode
from ..errors import BadInput
from ..pipeline.unnest import PathLeaves, collect_config, collect_metrics

WINDOW_DAYS = WINDOW_KEYS[2]  # backtest_runs.window_days: end - start, in days


def env_keys(model: V2Model) -> dict[str, str]:
    """key -> "config", "window" or "metric", for every key of the model's env branch."""
    keys = {p: "config" for p, m in model.config_paths.items() if m.branch == "env" and (m.number or m.string or m.date)}
    keys.update({k: "window" for k, m in model.window_paths.items() if m.branch == "env"})
    keys.update({k: "metric" for k, m in model.metric_paths.items() if m.branch == "env"})
    return dict(sorted(keys.items()))


def window_keys(model: V2Model) -> list[str]:
    """The window keys of the model's env branch."""
    return [k for k, kind in env_keys(model).items() if kind == "window"]


def window_values(runs: pa.Table, keys: list[str]) -> pa.Table:
    """Per run (start_date, end_date columns), each window key's value as JSON text."""
    columns = {}
    for key in keys:
        if key == WINDOW_DAYS:
            start, end = (runs.column(c).cast(pa.date32()).cast(pa.int32()) for c in ("start_date", "end_date"))
            columns[key] = pc.cast(pc.subtract(end, start), pa.string())
        else:
            dates = runs.column(key.split(".", 1)[1]).cast(pa.date32())
            columns[key] = pc.binary_join_element_wise('"', pc.cast(dates, pa.string()), '"', "")
    return pa.table(columns)


def resolve_key(model: V2Model, key: str) -> str:
    """The env key ``key`` names (a whole path, or the last part of just one); BadInput
    listing the keys the model knows otherwise."""
    keys = env_keys(model)
    if key in keys:
        return key
    tails = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(tails) == 1:
        return tails[0]
    known = ", ".join(keys) or "none"
    if tails:
        raise BadInput(f"--env {key}: several env keys end so ({', '.join(tails)}): give the whole path", f"the model's env keys: {known}")
    raise BadInput(f"--env {key}: the model knows no env key `{key}`", f"its env keys: {known}")


def parse_value(text: str):
    """A --env value: JSON where it parses (21, true, ["a"]), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def json_paths(model: V2Model) -> dict[str, str]:
    """config env path -> a DuckDB JSON path for its values (lists as [*])."""
    return {path: json_path(model, path) for path, kind in env_keys(model).items() if kind == "config"}


def json_path(model: V2Model, path: str) -> str:
    """The DuckDB JSON path that extracts a config path's values: ``$."a"[*]."b"``
    where the model saw ``a`` as a list (its values then come as one JSON array)."""
    lists = model.list_paths()
    parts = path.split(".")
    pointer = "$"
    for i, part in enumerate(parts):
        pointer += "." + json.dumps(part)
        if ".".join(parts[: i + 1]) in lists and i < len(parts) - 1:
            pointer += "[*]"
    return pointer


def extract_env_values(con: duckdb.DuckDBPyConnection, configs: pa.Array, paths: dict[str, str]) -> pa.Table:
    """Per config text, each env path's value as JSON text (null when absent)."""
    if not paths:
        return pa.table({})
    con.register("mb_env_configs", pa.table({"c": configs.cast(pa.string())}))
    try:
        select = ", ".join(
            f"json_extract(CASE WHEN starts_with(c, '{{') THEN c END, ${i + 1})::VARCHAR AS \"k{i}\"" for i in range(len(paths))
        )
        table = con.sql(f"SELECT {select} FROM mb_env_configs", params=list(paths.values())).to_arrow_table()
    finally:
        con.unregister("mb_env_configs")
    return pa.table(list(table.columns), names=list(paths))


def _config_of(values: dict, lists: set[str]) -> dict:
    config: dict = {}
    for path, value in values.items():
        parts = path.split(".")
        node = config
        # walk down; below a list part, the values become a list of objects
        for i, part in enumerate(parts[:-1]):
            prefix = ".".join(parts[: i + 1])
            if prefix in lists and isinstance(value, list):
                rest = ".".join(parts[i + 1 :])
                node[part] = [_config_of({rest: v}, lists) for v in value]
                break
            node = node.setdefault(part, {})
        else:
            node[parts[-1]] = value
    return config


def encode_envs(model: V2Model, rows: list[dict], con: duckdb.DuckDBPyConnection | None = None) -> np.ndarray:
    """Env slices (len(rows), width), L2-normalised, of key -> value dicts (config
    env paths, window keys and env metrics), each encoded with only its keys."""
    con = con or duckdb.connect()
    keys = sorted({k for row in rows for k in row})
    kinds = env_keys(model)
    lists = model.list_paths()
    only = V2Model(
        {"config": 0.0, "env": 1.0, "outcome": 0.0},
        {k: model.config_paths[k] for k in keys if kinds.get(k) == "config"},
        {k: model.metric_paths[k] for k in keys if kinds.get(k) == "metric"},
        model.patterns,
        slices=model.slices,
        format=model.format,
        window_paths={k: model.window_paths[k] for k in keys if kinds.get(k) == "window"},
    )
    configs = [json.dumps(_config_of({k: v for k, v in row.items() if kinds.get(k) == "config"}, lists)) for row in rows]
    metrics = [json.dumps({k: v for k, v in row.items() if kinds.get(k) == "metric"}) for row in rows]
    config_objects, _ = split_top_level(con, pa.array(configs, pa.string()), "config_json")
    metric_objects, _ = split_top_level(con, pa.array(metrics, pa.string()), "metrics_json")
    window = _window_leaves(con, rows, [k for k in keys if kinds.get(k) == "window"])
    encoded = encode(only, collect_config(con, config_objects), collect_metrics(con, metric_objects), len(rows), window=window, con=con)
    start, stop = model.slices["env"]
    block = encoded.vectors[:, start:stop].astype(np.float64)
    norms = np.linalg.norm(block, axis=1)
    return (block / np.where(norms > 0, norms, 1.0)[:, None]).astype(np.float32)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _window_leaves(con: duckdb.DuckDBPyConnection, rows: list[dict], keys: list[str]) -> PathLeaves:
    """The window keys' values of key -> value dicts as leaves (dates as days)."""
    leaves = PathLeaves()
    for key in keys:
        at = [i for i, row in enumerate(rows) if row.get(key) is not None]
        if not at:
            continue
        texts = [str(rows[i][key]) for i in at]
        days = np.array([_number(t) for t in texts]) if key == WINDOW_DAYS else days_of(con, pa.array(texts, pa.string()))
        if not np.isfinite(days).all():
            bad = texts[int(np.flatnonzero(~np.isfinite(days))[0])]
            kind = "a number of days" if key == WINDOW_DAYS else "a date (YYYY-MM-DD)"
            raise BadInput(f"--env {key}={bad}: not {kind}")
        leaves.add_numbers(key, np.asarray(at, np.int64), days, False)
    return leaves


__all__ = ["env_keys", "window_keys", "window_values", "resolve_key", "parse_value", "json_paths", "extract_env_values", "encode_envs", "SLICES"]
