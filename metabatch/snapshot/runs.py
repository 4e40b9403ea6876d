"""The snapshot's runs: ``runs/part-*.parquet``, the JSON text kept as the
database prints it and the top-level numeric metrics as DOUBLE columns.

Only runs with an exported embedding are written, and those are known once
the embeddings are done: ``RunWriter.prepared`` extracts the metrics while the
embeddings are exported (on a thread of its own), ``RunWriter.write`` writes
the prepared chunks afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Runs per prepared chunk and part file.
RUNS_CHUNK_ROWS = 131_072
RUN_GROUP_ROWS = 8_192
RUN_BASE_COLUMNS = ("run_id", "strategy_id", "universe_id", "start_date", "end_date", "config_json", "metrics_json")
_METRIC_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_NUMERIC_JSON = ("BIGINT", "UBIGINT", "DOUBLE", "HUGEINT")


def metric_keys(con: duckdb.DuckDBPyConnection, runs: pa.Table) -> list[str]:
    """Top-level keys of metrics_json objects that can be metric columns (names only)."""
    con.register("mb_runs", runs)
    try:
        rows = con.sql(
            "SELECT DISTINCT k FROM (SELECT unnest(json_keys(metrics_json)) AS k"
            " FROM mb_runs WHERE starts_with(metrics_json, '{'))"
        ).fetchall()
    finally:
        con.unregister("mb_runs")
    names = {k for (k,) in rows if _METRIC_KEY.match(k) and k not in RUN_BASE_COLUMNS}
    return sorted(names)


def extract_metrics(con: duckdb.DuckDBPyConnection, runs: pa.Table, keys: Sequence[str]) -> pa.Table:
    """One DOUBLE column per key: the value where it is a JSON number, else NULL."""
    if not keys:
        return pa.table({})
    # keys match _METRIC_KEY (a-z, 0-9, _), so they are safe inside the JSON structure and as names.
    structure = "{" + ",".join(f'"{k}":"JSON"' for k in keys) + "}"
    select = ", ".join(
        f"CASE WHEN json_type(s.\"{k}\") IN {_NUMERIC_JSON!r} THEN TRY_CAST(s.\"{k}\"::VARCHAR AS DOUBLE) END AS \"{k}\""
        for k in keys
    )
    con.register("mb_runs", runs.select(["metrics_json"]))
    try:
        return con.sql(
            f"SELECT {select} FROM (SELECT json_transform("
            f"CASE WHEN starts_with(metrics_json, '{{') THEN metrics_json END, '{structure}') AS s FROM mb_runs)"
        ).to_arrow_table()
    finally:
        con.unregister("mb_runs")


class RunWriter:
    """Runs part files; metric columns grow as new numeric keys appear."""

    def __init__(self, root: Path, on_chunk=None, prefix: str = ""):
        self.root = root
        self.prefix = prefix  # of the part files' names (a shard's, in a sharded export)
        self.on_chunk = on_chunk  # called with (con, runs) for each chunk: the models' env values
        self.keys: list[str] = []  # numeric metric keys known so far
        self.files: list[str] = []
        self.rows = 0

    def prepared(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.Table]:
        """``batches`` (stream_run_details) in chunks of about RUNS_CHUNK_ROWS
        runs, with their metric columns."""
        con = duckdb.connect()
        con.execute("SET threads = 1")  # the other core serves the database and the embeddings
        try:
            pending: list[pa.RecordBatch] = []
            rows = 0
            for batch in batches:
                pending.append(batch)
                rows += batch.num_rows
                if rows >= RUNS_CHUNK_ROWS:
                    yield self._prepare(con, pa.Table.from_batches(pending))
                    pending, rows = [], 0
            if pending:
                yield self._prepare(con, pa.Table.from_batches(pending))
        finally:
            con.close()

    def _prepare(self, con: duckdb.DuckDBPyConnection, runs: pa.Table) -> pa.Table:
        if self.on_chunk is not None:
            self.on_chunk(con, runs)
        candidates = metric_keys(con, runs)
        new = [k for k in candidates if k not in self.keys]
        metrics = extract_metrics(con, runs, sorted(set(self.keys) | set(new)))
        for k in new:
            if metrics.column(k).null_count < runs.num_rows:
                self.keys.append(k)
        keys = sorted(self.keys)
        base = runs.select(list(RUN_BASE_COLUMNS))
        return pa.table([*base.columns, *(metrics.column(k) for k in keys)], names=[*RUN_BASE_COLUMNS, *keys])

    def write(self, table: pa.Table, run_ids: pa.Array) -> None:
        """Write the runs of a prepared chunk whose run_id is in ``run_ids``, as one part file."""
        keep = pc.is_in(table.column("run_id"), value_set=run_ids)
        if not pc.all(keep).as_py():
            table = table.filter(keep)
        if not table.num_rows:
            return
        path = self.root / "runs" / f"part-{self.prefix}{len(self.files):05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            # small row groups: a config is read by its row (suggest, cluster) without decoding 65k others
            table, path, compression="zstd", row_group_size=RUN_GROUP_ROWS,
            use_dictionary=["strategy_id", "universe_id"],
            write_statistics=["run_id", "strategy_id", "universe_id", "start_date", "end_date", *table.column_names[7:]],
        )
        self.files.append(path.relative_to(self.root).as_posix())
        self.rows += table.num_rows

    def section(self) -> dict:
        """The manifest's ``runs`` section."""
        return {"rows": self.rows, "files": self.files, "metric_columns": sorted(self.keys)}
