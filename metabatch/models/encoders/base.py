"""What every encoder shares: the interface backfill drives, the spec's
top-level split of the JSON, and the rows an embedded batch writes.

An encoder (``v1.V1Encoder``, ``v2.V2Encoder``) turns a batch of runs (an Arrow
table: run_id, strategy_id, universe_id, end_date, config_json, metrics_json,
JSON as text) into an ``EmbeddedBatch`` in two steps, so that a job can run
the first on a reader thread while the second encodes the previous batch:
``prepare(runs, con, cache)`` and ``embed(prepared, con, cache, vectors_out)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...pipeline.unnest import ShapeCache

JOINT_TYPE = "META_CONFIG_ENV_V0"
DIM = 384


class Encoder(Protocol):
    model_id: str
    kind: str  # "v1" or "v2"

    def prepare(self, runs: pa.Table, con: duckdb.DuckDBPyConnection, cache: ShapeCache) -> object:
        """The part of a batch's work a reader thread does (its own DuckDB connection)."""

    def embed(self, prepared, con: duckdb.DuckDBPyConnection, cache: ShapeCache, vectors_out: np.ndarray | None) -> "EmbeddedBatch":
        """The rows of a prepared batch; ``vectors_out``: (at least runs, DIM) float32
        memory the rows may refer to until they are written."""


@dataclass
class EmbeddedBatch:
    rows: pa.Table  # joint_type, as_of_date, entity_scope (JSON text), model_id, vector, run_id
    skipped: int
    rejected: list[tuple[str, str]]  # (run_id, reason)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: unnest, encode, combine


def split_top_level(con, texts: pa.Array, column: str):
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



def embedding_rows(
    runs: pa.Table,
    vectors: np.ndarray,
    source: np.ndarray,
    skipped_mask: np.ndarray,
    bad_reason: np.ndarray,
    model_id: str,
) -> tuple[pa.Table, int, list[tuple[str, str]]]:
    """The joint_embeddings rows of a batch, the count of skipped runs and the
    rejected (run_id, reason): runs with a reason are rejected, runs skipped
    (no branch taken) are not written, every other run is."""
    run_ids = runs.column("run_id").combine_chunks()
    rejected_mask = bad_reason != None  # noqa: E711
    write_mask = ~rejected_mask & ~skipped_mask
    skipped = int((~rejected_mask & skipped_mask).sum())
    rejected_idx = np.flatnonzero(rejected_mask)
    rejected = list(zip(run_ids.take(pa.array(rejected_idx)).to_pylist(), bad_reason[rejected_idx].tolist()))

    keep = pa.array(write_mask)
    kept = runs.filter(keep)
    vectors = vectors if write_mask.all() else vectors[write_mask]
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    vector_bytes = pa.FixedSizeBinaryArray.from_buffers(pa.binary(DIM * 4), len(vectors), [None, pa.py_buffer(vectors)])
    scope = pa.StructArray.from_arrays(
        [
            kept.column("run_id").combine_chunks(),
            kept.column("strategy_id").combine_chunks(),
            kept.column("universe_id").combine_chunks(),
            pa.array(source[write_mask], pa.string()),
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
    return rows, skipped, rejected


def _json_text(struct: pa.StructArray) -> pa.Array:
    """Each struct as a JSON object text (nulls kept as JSON null)."""
    import polars as pl

    return pl.Series(struct).struct.json_encode().to_arrow()
