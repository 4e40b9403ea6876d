"""Shards: the selected runs split by a hash of run_id, for jobs run on a cluster.

A run's **bucket** is the first byte of the MD5 of its run_id (0-255), which
PostgreSQL and DuckDB compute the same way from the run_id's UTF-8 bytes
(``bucket_sql``; ``buckets_of`` does it in-process with DuckDB). Shard ``i``
of ``n`` holds the runs whose bucket is ``i`` modulo ``n``: a run is always in
the same shard for a given ``n``, whatever else the table holds, so

- a shard's runs and its embeddings are found in either database with the
  same condition (``Shard.buckets``), even when the runtime and historical
  databases are different servers;
- writers lock per bucket (``stores.postgres``): two shards of one job never
  wait for each other, and two overlapping jobs (with any shard counts) take
  turns on the buckets they share, so they cannot duplicate a row.

At most ``BUCKETS`` shards: beyond that, shards would be empty. With a shard
count that does not divide 256, shards differ in size by one bucket in
``256 // n`` (at most 2% for 6 shards, 5% for 12).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import duckdb

BUCKETS = 256


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count <= BUCKETS)."""

    index: int
    count: int

    def __post_init__(self):
        if not (1 <= self.count <= BUCKETS and 0 <= self.index < self.count):
            raise ValueError(f"shard {self.index} of {self.count}: need 0 <= index < count <= {BUCKETS}")

    @property
    def buckets(self) -> tuple[int, ...]:
        """The buckets (0-255) whose runs this shard holds."""
        return tuple(range(self.index, BUCKETS, self.count))

    def __str__(self) -> str:
        return f"{self.index + 1}/{self.count}"


def bucket_sql(column: str, dialect: str) -> str:
    """SQL for the bucket (0-255) of the text expression ``column`` (an identifier
    or expression metabatch builds, never user text): the first byte of its MD5.
    ``dialect``: "postgresql" or "duckdb". The PostgreSQL form is the expression
    of the index ``backtest_runs_shard_run`` (migration 0003), so a shard's runs
    are read through it."""
    if dialect == "postgresql":
        return f"(('x' || substr(md5({column}), 1, 2))::bit(8)::int)"
    if dialect == "duckdb":
        return f"(('0x' || substr(md5({column}), 1, 2))::INTEGER)"
    raise ValueError(f"unknown SQL dialect {dialect!r}")


def shard_condition(shard: Shard, column: str, dialect: str) -> str:
    """A SQL condition: the row's ``column`` (a run id) is in ``shard``. The
    buckets are integers metabatch made, printed as literals."""
    buckets = ", ".join(str(b) for b in shard.buckets)
    return f"{bucket_sql(column, dialect)} IN ({buckets})"


def buckets_of(run_ids: pa.Array | pa.ChunkedArray, con: "duckdb.DuckDBPyConnection | None" = None) -> np.ndarray:
    """The bucket of each run id (int16), computed by DuckDB over the column."""
    import duckdb

    own = con is None
    con = con or duckdb.connect()
    try:
        con.register("mb_bucket_ids", pa.table({"run_id": run_ids}))
        try:
            out = con.sql(f"SELECT {bucket_sql('run_id', 'duckdb')}::SMALLINT AS b FROM mb_bucket_ids").to_arrow_table()
        finally:
            con.unregister("mb_bucket_ids")
        return np.asarray(out.column("b").to_numpy(), np.int16)
    finally:
        if own:
            con.close()


def split_by_shard(run_ids: pa.Array, count: int) -> list[pa.Array]:
    """``run_ids`` split into the ``count`` shards they belong to."""
    if not len(run_ids):
        return [run_ids] * count
    shard_of = buckets_of(run_ids) % count
    order = np.argsort(shard_of, kind="stable")
    edges = np.searchsorted(shard_of[order], np.arange(count + 1))
    taken = run_ids.take(pa.array(order))
    return [taken.slice(int(edges[i]), int(edges[i + 1] - edges[i])) for i in range(count)]
