"""The small interface behind which PostgreSQL and DuckDB differ.

A store reads ``backtest_runs`` in Arrow batches and replaces rows of
``joint_embeddings``; everything between (unnest, encode, combine) is shared.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import pyarrow as pa

from ..urls import DatabaseURL

# Columns of backtest_runs the pipeline reads, JSON as text.
RUN_COLUMNS = ("run_id", "strategy_id", "universe_id", "end_date", "config_json", "metrics_json")
# Columns of joint_embeddings the pipeline writes (run_id rides along to find old rows).
EMBEDDING_COLUMNS = ("joint_type", "as_of_date", "entity_scope", "model_id", "vector")


@dataclass(frozen=True)
class RunSelection:
    """Which runs a backfill reads (the spec's rules)."""

    strategy_ids: tuple[str, ...] = ()
    start: dt.date | None = None
    end: dt.date | None = None
    limit: int | None = None


@dataclass(frozen=True)
class EmbeddingFilter:
    """Which embeddings a snapshot or a query reads."""

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

    def read_runs(self, selection: RunSelection) -> Iterator[pa.RecordBatch]:
        """Stream the selected runs (RUN_COLUMNS, JSON as text) in record batches."""

    def replace_embeddings(self, rows: pa.Table, joint_type: str, model_id: str) -> None:
        """In one transaction: delete the (joint_type, model_id) rows of the runs in
        ``rows.run_id``, then insert ``rows``. Concurrent callers must not duplicate."""

    def close(self) -> None: ...
