"""DuckDB store: the same tables as on PostgreSQL, in one embedded file.

The tables have the same names and columns as on PostgreSQL: JSON for the
``jsonb`` columns, BLOB for the vector, a sequence for ``joint_id``, TIMESTAMP
(UTC) for ``created_at`` (a TIMESTAMPTZ would need pytz to fetch in Python).
Reads are one query with bound parameters (DuckDB is in-process), streamed as
Arrow record batches; writes stage the batch as an Arrow table and update,
delete and insert in one transaction, like the PostgreSQL store.

One file, one database instance per process. DuckDB lets a single process
open a file read-write, and a backfill opens two stores that may name the same
file (one reads runs while the other writes embeddings), so every store of a
file shares one root connection (a registry keyed by the resolved path) and
works on its own ``cursor()``; a stream reads on a cursor of its own, so
writing on another cursor while it is open is fine. Writes to one file are
serialised within the process; another process cannot open the file at all
while it is open for writing (DuckDB's file lock), so concurrent backfills
cannot duplicate rows. A read-only store opens a missing file as an error
(StoreUnreachable), not as a new empty file; a read-write store that created
a file and left it without a table removes it again on close.

JSON text: DuckDB's JSON type validates the text and stores it exactly as
given, and the store returns it unchanged; PostgreSQL's ``jsonb`` stores a
parsed value and prints it back normalised. The embedding is the same for the
same text, but these inputs are stored differently from PostgreSQL:

- duplicate keys in an object are all kept and the engine reads the first
  (``jsonb`` keeps the last): ``{"a": 1, "a": 2}`` embeds as ``{"a": 1}``
  here and as ``{"a": 2}`` from PostgreSQL. The only input whose vector
  differs between the stores;
- ``-0`` / ``-0.0`` stay negative zero (``jsonb`` has none). This never
  changes a vector: the weighted sums start from +0.0;
- numbers keep their spelling (``1e30``, ``1.10``), keys their order, the
  text its whitespace (``jsonb`` prints ``1000000000000000000000000000000``,
  ``1.10``, keys sorted by length then bytes, single spaces): the same doubles
  and the same code-point walk, so the same vector;
- ``\\u0000`` inside a string is accepted (``jsonb`` rejects it).

Runs written by ``metabatch seed`` and by the tests are the same text on both
stores, so backfill gives bit-identical vectors on both.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Iterator

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import MetabatchError, MissingTable, StoreUnreachable
from ..resources import resource_dir
from .shards import Shard, shard_condition
from ..urls import DatabaseURL
from .base import EmbeddingFilter, ModelExists, RunSelection, model_params, model_row, require_columns

_INSERTABLE_RUN_COLUMNS = (
    "run_id", "strategy_id", "config_json", "start_date", "end_date", "universe_id", "metrics_json", "created_at",
)
# Rows per streamed record batch (runs are ~1.5 KB of JSON text: ~25 MB a batch).
_READ_BATCH_ROWS = 16_384
_RUN_ID = "json_extract_string(entity_scope, '$.run_id')"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------
# One root connection per file and process


@dataclass
class _Root:
    path: str
    conn: duckdb.DuckDBPyConnection
    read_only: bool
    created: bool  # the file did not exist before this process opened it
    users: int = 0
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    cursor_lock: threading.Lock = field(default_factory=threading.Lock)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new connection to the file (readers on several threads ask at once)."""
        with self.cursor_lock:
            return self.conn.cursor()


_ROOTS: dict[str, _Root] = {}
_ROOTS_LOCK = threading.Lock()


def _resolve(path: str) -> str:
    if path == ":memory:":
        return path
    return os.path.realpath(os.path.expanduser(path))


def _acquire(path: str, read_only: bool, url: DatabaseURL) -> _Root:
    with _ROOTS_LOCK:
        root = _ROOTS.get(path)
        if root is not None:
            if root.read_only and not read_only:
                raise StoreUnreachable(
                    f"`{url.redacted}` is already open read-only in this process",
                    "close the read-only store before writing to the file",
                )
            root.users += 1
            return root
        exists = path == ":memory:" or os.path.exists(path)
        if read_only and not exists:
            raise StoreUnreachable(
                f"cannot open `{url.redacted}`: the file does not exist",
                "check the path, or create it with `metabatch migrate`; `metabatch demo` makes a sample file",
            )
        try:
            conn = duckdb.connect(path, read_only=read_only)
        except duckdb.Error as exc:
            message = _first_line(exc)
            hint = "check the path and that the file is a DuckDB database"
            if "lock" in message.lower():
                hint = "another process has the file open; DuckDB lets only one process write to a file"
            raise StoreUnreachable(f"cannot open `{url.redacted}`: {message}", hint) from None
        try:
            # Pinned so that results do not depend on the machine: timestamps are UTC.
            conn.sql("SET GLOBAL TimeZone = 'UTC'")
        except duckdb.Error:
            conn.close()
            raise
        root = _Root(path, conn, read_only, created=not exists, users=1)
        _ROOTS[path] = root
        return root


def _release(root: _Root) -> None:
    with _ROOTS_LOCK:
        root.users -= 1
        if root.users > 0:
            return
        del _ROOTS[root.path]
        empty = False
        if root.created and not root.read_only:
            try:
                (count,) = root.conn.sql("SELECT count(*) FROM duckdb_tables() WHERE NOT temporary").fetchall()[0]
                empty = count == 0
            except duckdb.Error:
                empty = False
        try:
            root.conn.close()
        except duckdb.Error:
            pass
        if empty:
            # A command that failed before making a table leaves no stray file behind.
            for name in (root.path, root.path + ".wal"):
                try:
                    os.remove(name)
                except OSError:
                    pass


# --------------------------------------------------------------------------
# The store


def _plain_text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A JSON/text column as plain strings (Arrow's json extension type unwrapped)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.ExtensionArray):
        column = column.storage
    return column.cast(pa.string())


class DuckDBStore:
    def __init__(self, url: DatabaseURL, read_only: bool = False):
        self.url = url
        self.read_only = read_only
        self.path = _resolve(url.duckdb_path)
        self._root = _acquire(self.path, read_only, url)
        try:
            self.conn = self._root.cursor()
        except duckdb.Error as exc:
            _release(self._root)
            raise StoreUnreachable(f"cannot open `{url.redacted}`: {_first_line(exc)}") from None
        self._closed = False

    def _error(self, what: str, exc: BaseException, hint: str | None = None) -> MetabatchError:
        return MetabatchError(f"{what} in `{self.url.redacted}` failed: {_first_line(exc)}", hint)

    # -- schema

    def migrate(self, part: str) -> list[str]:
        steps = sorted((resource_dir("migrations") / "duckdb" / part).glob("*.sql"))
        if self.read_only:
            raise StoreUnreachable(f"`{self.url.redacted}` is open read-only", "migrate needs a writable file")
        applied = []
        cur = self.conn
        with self._root.write_lock:
            try:
                cur.sql(
                    "CREATE TABLE IF NOT EXISTS metabatch_migrations ("
                    " name VARCHAR PRIMARY KEY,"
                    " applied_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'))"
                )
                done = {row[0] for row in cur.sql("SELECT name FROM metabatch_migrations").fetchall()}
                for step in steps:
                    name = f"{part}/{step.stem}"
                    if name in done:
                        continue
                    cur.begin()  # each step and its record: one transaction
                    try:
                        cur.sql(step.read_text())
                        cur.sql("INSERT INTO metabatch_migrations (name) VALUES (?)", params=[name])
                        cur.commit()
                    except BaseException:
                        cur.rollback()
                        raise
                    applied.append(name)
            except duckdb.Error as exc:
                raise self._error("migrate", exc) from None
        self.check_table("backtest_runs" if part == "runtime" else "joint_embeddings")
        return applied

    def check_table(self, table: str) -> None:
        """MissingTable unless ``table`` exists with the columns metabatch uses."""
        columns = self._columns(table)
        if not columns and self._root.created and self._no_tables():
            raise MissingTable(
                f"`{self.url.redacted}` does not exist (no such DuckDB file)",
                "check the path, or create the tables with `metabatch migrate`; `metabatch demo` makes a sample file",
            )
        require_columns(self.url, table, columns)

    def _columns(self, table: str) -> set[str]:
        rows = self.conn.sql(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_catalog = current_database() AND table_schema = current_schema() AND table_name = ?",
            params=[table],
        ).fetchall()
        return {row[0] for row in rows}

    def _no_tables(self) -> bool:
        (count,) = self.conn.sql("SELECT count(*) FROM duckdb_tables() WHERE NOT temporary").fetchall()[0]
        return count == 0

    # -- runs

    def insert_runs(self, runs: pa.Table) -> int:
        """Insert runs (JSON as plain strings or Arrow JSON), skipping existing run_ids."""
        columns = [c for c in runs.column_names if c in _INSERTABLE_RUN_COLUMNS]
        stage = runs.select(columns)
        for name in ("config_json", "metrics_json"):
            if name in columns:
                stage = stage.set_column(stage.schema.get_field_index(name), name, _plain_text(stage.column(name)))
        if pc.count_distinct(stage.column("run_id")).as_py() < stage.num_rows:
            # A run_id twice in one call is inserted once (the first), as on PostgreSQL.
            # Done here rather than with DISTINCT ON, which would lose the rows' order.
            stage = pl.from_arrow(stage).unique(subset="run_id", keep="first", maintain_order=True).to_arrow()
        listed = ", ".join(columns)
        self.check_table("backtest_runs")
        cur = self.conn
        with self._root.write_lock:
            cur.register("mb_seed_stage", stage)
            try:
                # In the given order, so that reads (and joint_ids) follow it: ON CONFLICT
                # DO NOTHING would shuffle the rows, an anti-join keeps them in order.
                (inserted,) = cur.sql(
                    f"INSERT INTO backtest_runs ({listed})"
                    f" SELECT {listed} FROM mb_seed_stage"
                    " WHERE run_id NOT IN (SELECT run_id FROM backtest_runs)"
                ).fetchall()[0]
            except duckdb.ConversionException as exc:
                raise self._error("inserting runs", exc, "config_json and metrics_json must be JSON text") from None
            except duckdb.Error as exc:
                raise self._error("inserting runs", exc) from None
            finally:
                cur.unregister("mb_seed_stage")
        return int(inserted)

    def _where(self, selection: RunSelection, metrics_required: bool) -> tuple[str, list]:
        where, params = [], []
        if metrics_required:
            where.append("metrics_json IS NOT NULL")
        if selection.strategy_ids:
            where.append("strategy_id IN (SELECT unnest(?::VARCHAR[]))")
            params.append(list(selection.strategy_ids))
        if selection.start is not None:
            where.append("end_date >= ?")
            params.append(selection.start)
        if selection.end is not None:
            where.append("end_date <= ?")
            params.append(selection.end)
        return (" WHERE " + " AND ".join(where) if where else ""), params

    def count_runs(self, selection: RunSelection) -> int:
        self.check_table("backtest_runs")
        query, params = self._selected_query(selection, "run_id")
        (count,) = self.conn.sql(f"SELECT count(*) FROM ({query}) AS selected", params=params or None).fetchall()[0]
        return int(count)

    def _selected_query(self, selection: RunSelection, columns: str) -> tuple[str, list]:
        """The query of the selected runs (the limit, then the shard) and its parameters."""
        where, params = self._where(selection, metrics_required=True)
        query = f"SELECT {columns} FROM backtest_runs{where}"
        if selection.limit is not None:
            query += " ORDER BY end_date DESC, run_id DESC LIMIT ?"
            params.append(int(selection.limit))
        if selection.shard is not None:
            query = f"SELECT * FROM ({query}) AS limited WHERE {shard_condition(selection.shard, 'run_id', 'duckdb')}"
        return query, params

    def _stream(self, query: str, params: list, tables: dict | None = None) -> Iterator[pa.RecordBatch]:
        """The query's rows in record batches, read on a cursor of its own
        (on which the Arrow ``tables`` are registered by name)."""
        cur = self._root.cursor()
        try:
            for name, table in (tables or {}).items():
                cur.register(name, table)
            reader = cur.sql(query, params=params or None).to_arrow_reader(_READ_BATCH_ROWS)
            for batch in reader:
                if batch.num_rows:
                    yield batch
        finally:
            cur.close()

    def read_runs(
        self, selection: RunSelection, skip: pa.Array | None = None, embedded: tuple[str, str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        self.check_table("backtest_runs")
        query, params = self._selected_query(
            selection,
            "run_id, strategy_id, universe_id, end_date,"
            " CAST(config_json AS VARCHAR) AS config_json, CAST(metrics_json AS VARCHAR) AS metrics_json, start_date",
        )
        left_out, tables = [], {}
        if skip is not None and len(skip):
            left_out.append("NOT EXISTS (SELECT 1 FROM mb_skip_runs s WHERE s.run_id = selected.run_id)")
            tables["mb_skip_runs"] = pa.table({"run_id": skip.cast(pa.string())})
        if embedded is not None:
            left_out.append(
                "NOT EXISTS (SELECT 1 FROM joint_embeddings j WHERE j.joint_type = ? AND j.model_id = ?"
                f" AND {_RUN_ID.replace('entity_scope', 'j.entity_scope')} = selected.run_id)"
            )
            params = [*params, *embedded]
        if left_out:
            query = f"SELECT * FROM ({query}) AS selected WHERE " + " AND ".join(left_out)
        return self._stream(query, params, tables)

    def stream_run_details(self, selection: RunSelection) -> Iterator[pa.RecordBatch]:
        self.check_table("backtest_runs")
        where, params = self._where(selection, metrics_required=False)
        if selection.shard is not None:
            where += (" AND " if where else " WHERE ") + shard_condition(selection.shard, "run_id", "duckdb")
        query = (
            "SELECT run_id, strategy_id, universe_id, start_date, end_date,"
            " CAST(config_json AS VARCHAR) AS config_json, CAST(metrics_json AS VARCHAR) AS metrics_json"
            f" FROM backtest_runs{where}"
        )
        return self._stream(query, params)

    # -- embeddings

    def replace_embeddings(self, rows: pa.Table, joint_type: str, model_id: str, buckets=None) -> None:
        """Upsert one batch: a run's existing row is updated in place (its joint_id
        stays), its duplicates are deleted, and new runs are inserted. (``buckets``:
        unused; one process writes a file, its writes one at a time.)"""
        stage = pa.table(
            {
                "run_id": _plain_text(rows.column("run_id")),
                "as_of_date": rows.column("as_of_date"),
                "entity_scope": _plain_text(rows.column("entity_scope")),
                "vector": rows.column("vector"),
            }
        )
        cur = self.conn
        keys = [joint_type, model_id]
        with self._root.write_lock:
            cur.register("mb_rows", stage)
            try:
                cur.begin()
                try:
                    cur.sql(
                        "CREATE OR REPLACE TEMP TABLE mb_existing AS"
                        f" SELECT {_RUN_ID} AS run_id, min(joint_id) AS keep_id, count(*) AS n"
                        " FROM joint_embeddings WHERE joint_type = ? AND model_id = ?"
                        f" AND {_RUN_ID} IN (SELECT run_id FROM mb_rows) GROUP BY 1",
                        params=keys,
                    )
                    cur.sql(
                        "UPDATE joint_embeddings AS j SET as_of_date = s.as_of_date, entity_scope = s.entity_scope,"
                        " vector = s.vector, vector_ref = NULL, created_at = now() AT TIME ZONE 'UTC'"
                        " FROM (SELECT e.keep_id, r.as_of_date, r.entity_scope, r.vector"
                        "       FROM mb_existing e JOIN mb_rows r USING (run_id)) AS s"
                        " WHERE j.joint_id = s.keep_id"
                    )
                    cur.sql(
                        "DELETE FROM joint_embeddings WHERE joint_type = ? AND model_id = ?"
                        f" AND {_RUN_ID} IN (SELECT run_id FROM mb_existing WHERE n > 1)"
                        " AND joint_id NOT IN (SELECT keep_id FROM mb_existing)",
                        params=keys,
                    )
                    cur.sql(
                        "INSERT INTO joint_embeddings (joint_type, as_of_date, entity_scope, model_id, vector)"
                        " SELECT ?, as_of_date, entity_scope, ?, vector FROM mb_rows"
                        " WHERE run_id NOT IN (SELECT run_id FROM mb_existing)",
                        params=keys,
                    )
                    cur.sql("DROP TABLE mb_existing")
                    cur.commit()
                except BaseException:
                    cur.rollback()
                    raise
            except duckdb.Error as exc:
                raise self._error("writing joint_embeddings", exc) from None
            finally:
                cur.unregister("mb_rows")

    def stream_embeddings(self, flt: EmbeddingFilter) -> Iterator[pa.RecordBatch]:
        """See Store.stream_embeddings. ``flt.extra`` may also hold ``joint_type``,
        ``run_ids``, ``universe_ids`` and ``limit`` (first rows by as_of_date, joint_id)."""
        self.check_table("joint_embeddings")
        extra = flt.extra or {}
        where, params = [], []
        if extra.get("joint_type") is not None:
            where.append("joint_type = ?")
            params.append(extra["joint_type"])
        if flt.model_id is not None:
            where.append("model_id = ?")
            params.append(flt.model_id)
        for key, values in (
            ("strategy_id", flt.strategy_ids),
            ("run_id", extra.get("run_ids") or ()),
            ("universe_id", extra.get("universe_ids") or ()),
        ):
            if values:
                where.append(f"json_extract_string(entity_scope, '$.{key}') IN (SELECT unnest(?::VARCHAR[]))")
                params.append(list(values))
        if flt.start is not None:
            where.append("as_of_date >= ?")
            params.append(flt.start)
        if flt.end is not None:
            where.append("as_of_date <= ?")
            params.append(flt.end)
        if extra.get("shard") is not None:
            where.append(shard_condition(extra["shard"], _RUN_ID, "duckdb"))
        query = (
            "SELECT joint_id, joint_type, model_id, as_of_date,"
            " json_extract_string(entity_scope, '$.run_id') AS run_id,"
            " json_extract_string(entity_scope, '$.strategy_id') AS strategy_id,"
            " json_extract_string(entity_scope, '$.universe_id') AS universe_id,"
            " json_extract_string(entity_scope, '$.source') AS source,"
            # As on PostgreSQL (timestamptz): an instant in UTC.
            " vector, created_at AT TIME ZONE 'UTC' AS created_at"
            " FROM joint_embeddings" + (" WHERE " + " AND ".join(where) if where else "")
        )
        if extra.get("limit") is not None:
            query += " ORDER BY as_of_date, joint_id LIMIT ?"
            params.append(int(extra["limit"]))
        return self._stream(query, params)

    # -- the model registry

    def read_model(self, model_id: str) -> dict | None:
        if not self._columns("joint_models"):
            return None
        self.check_table("joint_models")
        found = self.conn.sql(
            "SELECT model_id, encoder, model_file, CAST(params AS VARCHAR), fitted_runs, CAST(selection AS VARCHAR),"
            " fitted_at, content_hash FROM joint_models WHERE model_id = ?",
            params=[model_id],
        ).fetchall()
        return model_row(found[0]) if found else None

    def list_models(self) -> list[dict]:
        if not self._columns("joint_models"):
            return []
        self.check_table("joint_models")
        found = self.conn.sql(
            "SELECT model_id, encoder, model_file, NULL, fitted_runs, CAST(selection AS VARCHAR), fitted_at,"
            " content_hash, octet_length(encode(CAST(params AS VARCHAR))) FROM joint_models ORDER BY model_id"
        ).fetchall()
        return [model_row(row) for row in found]

    def save_model(self, row: dict, joint_type: str, replace: bool) -> int:
        if self.read_only:
            raise StoreUnreachable(f"`{self.url.redacted}` is open read-only", "registering a model needs a writable file")
        self.check_table("joint_models")
        cur = self.conn
        with self._root.write_lock:
            try:
                cur.begin()
                try:
                    deleted = 0
                    if replace:
                        (deleted,) = cur.sql(
                            "DELETE FROM joint_embeddings WHERE joint_type = ? AND model_id = ?",
                            params=[joint_type, row["model_id"]],
                        ).fetchall()[0]
                        cur.sql("DELETE FROM joint_models WHERE model_id = ?", params=[row["model_id"]])
                    (exists,) = cur.sql("SELECT count(*) FROM joint_models WHERE model_id = ?", params=[row["model_id"]]).fetchall()[0]
                    if exists:
                        raise ModelExists(row["model_id"])
                    cur.sql(
                        "INSERT INTO joint_models (model_id, encoder, model_file, params, fitted_runs, selection, content_hash)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        params=list(model_params(row)),
                    )
                    cur.commit()
                except BaseException:
                    cur.rollback()
                    raise
            except duckdb.Error as exc:
                raise self._error("registering the model", exc) from None
        return int(deleted)

    def embedded_run_ids(self, joint_type: str, model_id: str, shard: Shard | None = None) -> pa.Array:
        """The run ids that have a (joint_type, model_id) row (a run with two rows: twice)."""
        self.check_table("joint_embeddings")
        where = f" AND {shard_condition(shard, _RUN_ID, 'duckdb')}" if shard is not None else ""
        found = self.conn.sql(
            f"SELECT {_RUN_ID} AS run_id FROM joint_embeddings"
            f" WHERE joint_type = ? AND model_id = ? AND {_RUN_ID} IS NOT NULL{where}",
            params=[joint_type, model_id],
        ).to_arrow_table()
        return _plain_text(found.column("run_id"))

    def count_embeddings(self, joint_type: str, model_id: str) -> int:
        self.check_table("joint_embeddings")
        (count,) = self.conn.sql(
            "SELECT count(*) FROM joint_embeddings WHERE joint_type = ? AND model_id = ?", params=[joint_type, model_id]
        ).fetchall()[0]
        return int(count)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.conn.close()
        except duckdb.Error:
            pass
        _release(self._root)
