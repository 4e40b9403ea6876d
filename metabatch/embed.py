"""Embed: a batch of runs -> joint embedding rows (unnest, encode, combine).

Takes an Arrow table of runs (run_id, strategy_id, universe_id, end_date,
config_json, metrics_json, the JSON as text) and returns an ``EmbeddedBatch``:
the rows to write to ``joint_embeddings`` as an Arrow table, the runs skipped
(no branch taken) and the runs rejected, each with its reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .combine import combine
from .encode import DIM, to_branch
from .unnest import RootParse, ShapeCache, TextFacts, Unnested, parse_config, text_facts, unnest_config, unnest_metrics

JOINT_TYPE = "META_CONFIG_ENV_V0"
DEFAULT_MODEL_ID = "joint-meta-config-env-v1"


@dataclass(frozen=True)
class Weights:
    config: float = 1.0
    env: float = 1.0
    outcome: float = 1.0


@dataclass
class EmbeddedBatch:
    rows: pa.Table  # joint_type, as_of_date, entity_scope (JSON text), model_id, vector, run_id
    skipped: int
    rejected: list[tuple[str, str]]  # (run_id, reason)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: unnest, encode, combine


def _top_level_objects(con, texts: pa.Array, column: str):
    """Split a JSON text column by the spec's top-level rule.

    Returns (objects, bad_reason): ``objects`` has the text where the value is a
    non-empty object and null elsewhere (a falsy value counts as ``{}``);
    ``bad_reason`` is a reason string for runs with a truthy non-object, else null.
    """
    texts = pc.cast(texts, pa.string())
    is_object = pc.fill_null(pc.starts_with(texts, "{"), False)
    objects = _null_where_not(texts, is_object)
    reasons = np.full(len(texts), None, dtype=object)
    others = np.flatnonzero(~np.asarray(is_object.to_numpy(zero_copy_only=False), bool) & np.asarray(texts.is_valid().to_numpy(zero_copy_only=False), bool))
    if len(others):
        con.register("mb_top", pa.table({"j": texts.take(pa.array(others))}))
        try:
            kinds = con.sql(
                """
                SELECT json_type(j::JSON) AS kind,
                       CASE WHEN json_type(j::JSON) IN ('ARRAY') THEN json_array_length(j::JSON) > 0
                            WHEN json_type(j::JSON) = 'VARCHAR' THEN length(json_transform(j::JSON, '"VARCHAR"')) > 0
                            WHEN json_type(j::JSON) = 'BOOLEAN' THEN json_transform(j::JSON, '"BOOLEAN"')
                            WHEN json_type(j::JSON) = 'NULL' THEN false
                            ELSE json_transform(j::JSON, '"DOUBLE"') <> 0 END AS truthy
                FROM mb_top
                """
            ).fetchall()
        finally:
            con.unregister("mb_top")
        names = {"ARRAY": "an array", "VARCHAR": "a string", "BOOLEAN": "true"}
        for i, (kind, truthy) in zip(others, kinds):  # only the runs whose JSON is not an object
            if truthy:
                reasons[i] = f"{column} is {names.get(kind, 'a number')}, not a JSON object"
    return objects, reasons


def _null_where_not(texts: pa.Array, keep: pa.BooleanArray) -> pa.Array:
    """``texts`` with null where ``keep`` is false (``keep`` has no nulls): the
    same text buffers under a new validity bitmap, not a copy of every text."""
    if texts.offset or keep.offset or keep.null_count:
        return pc.if_else(keep, texts, pa.scalar(None, texts.type))
    return pa.Array.from_buffers(texts.type, len(texts), [keep.buffers()[1], *texts.buffers()[1:]])


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
    config, config_bad = _top_level_objects(con, runs.column("config_json").combine_chunks(), "config_json")
    metrics, metrics_bad = _top_level_objects(con, runs.column("metrics_json").combine_chunks(), "metrics_json")
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
    t3 = time.perf_counter()

    run_ids = runs.column("run_id").combine_chunks()
    bad_reason = np.where(config_bad != None, config_bad, metrics_bad)  # noqa: E711 (elementwise)
    bad_reason = np.where((bad_reason == None) & joint.nonfinite, joint.reasons, bad_reason)  # noqa: E711
    rejected_mask = bad_reason != None  # noqa: E711
    write_mask = ~rejected_mask & ~joint.skipped
    skipped = int((~rejected_mask & joint.skipped).sum())
    rejected_idx = np.flatnonzero(rejected_mask)
    rejected = list(zip(run_ids.take(pa.array(rejected_idx)).to_pylist(), bad_reason[rejected_idx].tolist()))

    keep = pa.array(write_mask)
    kept = runs.filter(keep)
    vectors = joint.vectors if write_mask.all() else joint.vectors[write_mask]
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    vector_bytes = pa.FixedSizeBinaryArray.from_buffers(pa.binary(DIM * 4), len(vectors), [None, pa.py_buffer(vectors)])
    scope = pa.StructArray.from_arrays(
        [
            kept.column("run_id").combine_chunks(),
            kept.column("strategy_id").combine_chunks(),
            kept.column("universe_id").combine_chunks(),
            pa.array(joint.source[write_mask], pa.string()),
        ],
        names=["run_id", "strategy_id", "universe_id", "source"],
    )
    rows = pa.table(
        {
            "joint_type": pa.array([JOINT_TYPE] * kept.num_rows, pa.string()),
            "as_of_date": kept.column("end_date"),
            "entity_scope": _json_text(scope),
            "model_id": pa.array([model_id] * kept.num_rows, pa.string()),
            "vector": vector_bytes,
            "run_id": kept.column("run_id"),
        }
    )
    t4 = time.perf_counter()
    seconds.update(unnest=t1 - t0, encode=t2 - t1, combine=t4 - t2)
    return EmbeddedBatch(rows, skipped, rejected, seconds)


def _json_text(struct: pa.StructArray) -> pa.Array:
    """Each struct as a JSON object text (nulls kept as JSON null)."""
    import polars as pl

    return pl.Series(struct).struct.json_encode().to_arrow()
