"""The small interface behind which PostgreSQL and DuckDB differ.

A store reads ``backtest_runs`` in Arrow batches and replaces rows of
``joint_embeddings``; everything between (unnest, encode, combine) is shared.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import pyarrow as pa

from ..errors import MetabatchError, MissingTable
from .shards import Shard
from ..urls import DatabaseURL

# Columns of backtest_runs the pipeline reads, JSON as text (start_date: the
# run's window, which fitted models of format 2 read).
RUN_COLUMNS = ("run_id", "strategy_id", "universe_id", "end_date", "config_json", "metrics_json", "start_date")
# backtest_runs rows as Arrow (what insert_runs takes; JSON as text)
RUN_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("strategy_id", pa.string()),
        ("config_json", pa.string()),
        ("start_date", pa.date32()),
        ("end_date", pa.date32()),
        ("universe_id", pa.string()),
        ("metrics_json", pa.string()),
    ]
)
# Columns of joint_embeddings the pipeline writes (run_id rides along to find old rows).
EMBEDDING_COLUMNS = ("joint_type", "as_of_date", "entity_scope", "model_id", "vector")
# Columns of stream_embeddings: joint_embeddings with entity_scope unpacked.
EMBEDDING_READ_COLUMNS = (
    "joint_id", "joint_type", "model_id", "as_of_date", "run_id", "strategy_id",
    "universe_id", "source", "vector", "created_at",
)
# Columns of stream_run_details: backtest_runs for snapshots (JSON as text).
RUN_DETAIL_COLUMNS = (
    "run_id", "strategy_id", "universe_id", "start_date", "end_date", "config_json", "metrics_json",
)


# Columns of joint_models (the registry of fitted models), as read_model returns them.
MODEL_COLUMNS = ("model_id", "encoder", "model_file", "params", "fitted_runs", "selection", "fitted_at", "content_hash")


# Columns a table must have for metabatch to use it (it may have more).
REQUIRED_COLUMNS = {
    "backtest_runs": ("run_id", "strategy_id", "config_json", "end_date", "universe_id", "metrics_json"),
    "joint_embeddings": ("joint_id", "joint_type", "as_of_date", "entity_scope", "model_id", "vector"),
    "joint_models": MODEL_COLUMNS,
}


def require_columns(url: DatabaseURL, table: str, columns: set[str]) -> None:
    """MissingTable unless ``columns`` (what the database has) covers the table's needs."""
    if not columns:
        raise MissingTable(f"table `{table}` does not exist in `{url.redacted}`", "run `metabatch migrate` first")
    missing = [c for c in REQUIRED_COLUMNS[table] if c not in columns]
    if missing:
        raise MissingTable(
            f"table `{table}` in `{url.redacted}` lacks column(s) {', '.join(missing)}",
            "it was not made by metabatch; add the columns or use another database",
        )


class ModelExists(MetabatchError):
    """``save_model`` of a model id that is registered already (without replace)."""

    def __init__(self, model_id: str):
        super().__init__(f"model `{model_id}` is already registered in joint_models", "pass --refit to replace it")
        self.model_id = model_id


def model_params(row: dict) -> tuple:
    """The INSERT parameters of a joint_models row (JSON columns as text)."""
    return (
        row["model_id"], row["encoder"], row["model_file"], json.dumps(row["params"], sort_keys=True),
        int(row["fitted_runs"]), json.dumps(row["selection"], sort_keys=True), row["content_hash"],
    )


def model_row(values) -> dict:
    """A joint_models row as read (MODEL_COLUMNS order, JSON as text; an optional
    ninth value is the params' size in bytes) as a dict with the JSON parsed."""
    row = dict(zip(MODEL_COLUMNS, values))
    row["params"] = json.loads(row["params"]) if row["params"] is not None else None
    row["selection"] = json.loads(row["selection"])
    if len(values) > len(MODEL_COLUMNS):
        row["params_bytes"] = int(values[len(MODEL_COLUMNS)])
    return row


@dataclass(frozen=True)
class RunSelection:
    """Which runs a backfill reads (the spec's rules). ``shard``: only the
    selected runs of one shard (``shards``), taken after the limit, so that
    the shards of a selection are a partition of it."""

    strategy_ids: tuple[str, ...] = ()
    start: dt.date | None = None
    end: dt.date | None = None
    limit: int | None = None
    shard: Shard | None = None


@dataclass(frozen=True)
class EmbeddingFilter:
    """Which embeddings a snapshot or a query reads.

    ``extra`` holds optional keys a store may use to read less: ``joint_type``
    (str), ``run_ids`` and ``universe_ids`` (sequences of str, matched against
    entity_scope), ``limit`` (int: only the first rows by as_of_date, joint_id).
    Readers re-apply every filter, so a store may ignore them all; but a store
    that honours ``limit`` must honour every other key too.
    """

    model_id: str | None = None
    strategy_ids: tuple[str, ...] = ()
    start: dt.date | None = None
    end: dt.date | None = None
    extra: dict = field(default_factory=dict)


class Store(Protocol):
    url: DatabaseURL

    def migrate(self, part: str) -> list[str]:
        """Apply the pending steps of ``part`` ("runtime" or "historical"); return their names."""

    def insert_runs(self, runs: pa.Table) -> int:
        """Insert runs (RUN columns plus start_date; JSON as text), skipping existing run_ids."""

    def read_runs(
        self, selection: RunSelection, skip: pa.Array | None = None, embedded: tuple[str, str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Stream the selected runs (RUN_COLUMNS, JSON as text) in record batches;
        with ``skip``, the selected runs whose run_id is not in it (a resumed
        job's runs already written: ``limit`` still picks the same runs); with
        ``embedded`` (joint_type, model_id), the selected runs that have no row
        of it in this database's joint_embeddings (``backfill --missing`` when
        both tables are in one database)."""

    def replace_embeddings(self, rows: pa.Table, joint_type: str, model_id: str, buckets=None) -> None:
        """In one transaction: delete the (joint_type, model_id) rows of the runs in
        ``rows.run_id``, then insert ``rows``. Concurrent callers must not duplicate.
        ``buckets``: the shard buckets of the runs (a sharded job's writer), or None."""

    def stream_embeddings(self, flt: EmbeddingFilter) -> Iterator[pa.RecordBatch]:
        """joint_embeddings rows (EMBEDDING_READ_COLUMNS; vector as binary, run_id,
        strategy_id, universe_id, source taken from entity_scope), filtered by
        model_id, strategy_ids and as_of_date in [start, end]; streamed."""

    def stream_run_details(self, selection: RunSelection) -> Iterator[pa.RecordBatch]:
        """backtest_runs rows (RUN_DETAIL_COLUMNS, JSON as text) of the selection,
        metrics NULL or not, ignoring ``limit``; streamed."""

    def read_model(self, model_id: str) -> dict | None:
        """The joint_models row of ``model_id`` (MODEL_COLUMNS; params and selection
        parsed from JSON), or None when it is not registered or there is no registry."""

    def list_models(self) -> list[dict]:
        """Every joint_models row but its params (MODEL_COLUMNS without params, plus
        ``params_bytes``), by model_id; [] when there is no registry."""

    def save_model(self, row: dict, joint_type: str, replace: bool) -> int:
        """In one transaction: register ``row`` (MODEL_COLUMNS but fitted_at); with
        ``replace``, first delete the model id's row and its ``joint_type``
        embeddings. Returns the embeddings deleted. MetabatchError when the id is
        registered and not ``replace``."""

    def count_embeddings(self, joint_type: str, model_id: str) -> int:
        """How many joint_embeddings rows the model id has."""

    def close(self) -> None: ...
