"""Embed: a batch of runs -> joint embedding rows (unnest, encode, combine).

Takes an Arrow table of runs (run_id, strategy_id, universe_id, end_date,
config_json, metrics_json, the JSON as text) and returns an ``EmbeddedBatch``:
the rows to write to ``joint_embeddings`` as an Arrow table, the runs skipped
(no branch taken) and the runs rejected, each with its reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from .combine import combine
from .encode import DIM, to_branch
from ..models.encoders.base import JOINT_TYPE, EmbeddedBatch, embedding_rows, split_top_level  # noqa: F401 (JOINT_TYPE is imported from here)
from .unnest import RootParse, ShapeCache, TextFacts, Unnested, parse_config, text_facts, unnest_config, unnest_metrics

DEFAULT_MODEL_ID = "joint-meta-config-env-v1"


@dataclass(frozen=True)
class Weights:
    config: float = 1.0
    env: float = 1.0
    outcome: float = 1.0


@dataclass
class PreparedRuns:
    """A batch of runs with part of the work done: the JSON split by the spec's
    top-level rule (see ``_top_level_objects``), the ``TextFacts`` of the config
    objects, their first DuckDB parse with the structure cached so far
    (``parse_config``, None on a job's first batch) and the outcome leaves (the
    metrics, a small parse). ``prepare_runs`` makes it; a job's reader thread
    calls it, beside the encoding of the previous batch."""

    runs: pa.Table
    config: pa.Array
    config_bad: np.ndarray
    config_facts: TextFacts
    config_parsed: RootParse | None
    metrics_bad: np.ndarray
    outcome: Unnested


def prepare_runs(
    runs: pa.Table, con: duckdb.DuckDBPyConnection | None = None, cache: ShapeCache | None = None
) -> PreparedRuns:
    """See ``PreparedRuns``. ``con``: a DuckDB connection this thread may use;
    ``cache``: the job's ``ShapeCache`` (its metrics part is updated here; its
    config part only read, for the configs' first parse)."""
    con = con or duckdb.connect()
    config, config_bad = split_top_level(con, runs.column("config_json").combine_chunks(), "config_json")
    metrics, metrics_bad = split_top_level(con, runs.column("metrics_json").combine_chunks(), "metrics_json")
    outcome = unnest_metrics(con, metrics, DIM, cache, text_facts(metrics))
    parsed = parse_config(con, config, cache) if cache is not None else None
    return PreparedRuns(runs, config, config_bad, text_facts(config), parsed, metrics_bad, outcome)


def embed_batch(
    runs: pa.Table | PreparedRuns,
    weights: Weights = Weights(),
    model_id: str = DEFAULT_MODEL_ID,
    con: duckdb.DuckDBPyConnection | None = None,
    cache: ShapeCache | None = None,
    vectors_out: np.ndarray | None = None,
) -> EmbeddedBatch:
    """Encode a batch of runs into joint embedding rows (see the module docstring).

    ``cache``: pass one ``ShapeCache`` to every batch of a job so that later
    batches reuse the JSON structure learnt from earlier ones. ``runs`` may
    come from ``prepare_runs``. ``vectors_out``: a float32 array of at least
    (runs, DIM) for the vectors; the batch's rows may refer to it, so it must
    not be reused before they are written.
    """
    con = con or duckdb.connect()
    seconds = {}
    t0 = time.perf_counter()
    prepared = runs if isinstance(runs, PreparedRuns) else prepare_runs(runs, con, cache)
    runs = prepared.runs
    n = runs.num_rows
    config_bad, metrics_bad = prepared.config_bad, prepared.metrics_bad
    cfg = unnest_config(con, prepared.config, DIM, cache, prepared.config_facts, prepared.config_parsed)
    out = prepared.outcome
    t1 = time.perf_counter()
    branches = {
        "config": to_branch(cfg.leaves["config"], cfg.counts["config"]),
        "env": to_branch(cfg.leaves["env"], cfg.counts["env"]),
        "outcome": to_branch(out.leaves["outcome"], out.counts["outcome"]),
    }
    t2 = time.perf_counter()
    weight_of = {"config": weights.config, "env": weights.env, "outcome": weights.outcome}
    joint = combine(branches, weight_of, None if vectors_out is None else vectors_out[:n])

    bad_reason = np.where(config_bad != None, config_bad, metrics_bad)  # noqa: E711 (elementwise)
    bad_reason = np.where((bad_reason == None) & joint.nonfinite, joint.reasons, bad_reason)  # noqa: E711
    rows, skipped, rejected = embedding_rows(runs, joint.vectors, joint.source, joint.skipped, bad_reason, model_id)
    t4 = time.perf_counter()
    seconds.update(unnest=t1 - t0, encode=t2 - t1, combine=t4 - t2)
    return EmbeddedBatch(rows, skipped, rejected, seconds)
