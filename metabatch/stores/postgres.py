"""PostgreSQL store: ADBC streaming reads (COPY out) and bulk ingest (COPY in).

Reads are one query per backfill whose result ADBC streams with COPY, so
memory stays bounded; that only happens for a query without bound parameters,
so the strategy ids go into a temporary table first and the dates and limit,
which metabatch has already parsed into ``date`` and ``int``, are printed as
literals. Writes lock (joint_type, model_id), delete the old rows of the
batch's runs and COPY the new ones in, in one transaction.

A lost connection (server restart, failover, dropped connection) comes out of
every method as ``ConnectionLost``, which a job may retry (``retry``); any
other error is raised as the driver gives it.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Iterator, Sequence

import adbc_driver_manager
import adbc_driver_postgresql.dbapi as adbc
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ConnectionLost, StoreUnreachable
from ..resources import resource_dir
from ..urls import DatabaseURL
from .shards import Shard, bucket_sql, shard_condition
from .base import (
    EMBEDDING_READ_COLUMNS,
    RUN_COLUMNS,
    RUN_DETAIL_COLUMNS,
    EmbeddingFilter,
    ModelExists,
    RunSelection,
    model_params,
    model_row,
    require_columns,
)

# Bytes per record batch that ADBC hands over while streaming. The runs come in
# smaller record batches: a backfill's first (small) batch is not held back
# until 16 MB have arrived, and buffers under glibc's 1 MB mapping threshold
# (see backfill._tune_malloc) are reused from the heap, where multi-MB ones
# were new memory, a page fault per 4 kB (200k runs: 4% less CPU, median of
# 9 alternating runs).
_READ_BATCH_BYTES = 16 * 1024 * 1024
# pg_export_snapshot()'s ids (printed into SET TRANSACTION SNAPSHOT, which takes no parameter)
_SNAPSHOT_ID = re.compile(r"^[0-9A-Fa-f]+-[0-9A-Fa-f]+(-[0-9]+)?$")
_RUNS_BATCH_BYTES = 512 * 1024


def _scrub(message: str, url: DatabaseURL) -> str:
    """A driver message cut to its first line, with the raw URL and password removed."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "unknown error"
    first = first.replace(url.raw, url.redacted)
    password = re.match(r"[^:]+://[^:/@]*:([^@]*)@", url.raw)
    if password and password.group(1):
        first = first.replace(password.group(1), "***")
    return first


# A connection that is gone, or refused for a while: SQLSTATE class 08
# (connection exception), 57P01 admin shutdown, 57P02 crash shutdown, 57P03
# cannot connect now. libpq reports most of these with no SQLSTATE (ADBC then
# gives none either), so its messages, and the server's, are recognised too.
_LOST_SQLSTATES = ("57P01", "57P02", "57P03")
_LOST_MESSAGES = re.compile(
    "|".join(
        [
            r"server closed the connection unexpectedly",
            r"no connection to the server",
            r"could not (receive|send) data (from|to) server",
            r"terminating connection due to administrator command",
            r"terminating connection because of crash of another server process",
            r"the database system is (starting up|shutting down|in recovery mode|not yet accepting connections)",
            r"connection refused",
            r"connection reset by peer",
            r"broken pipe",
            r"connection timed out",
            r"timeout expired",
            r"no route to host",
            r"network is unreachable",
            r"SSL SYSCALL error",
        ]
    ),
    re.IGNORECASE,
)


def connection_lost(exc: BaseException) -> bool:
    """Whether a driver error means that the connection is gone, or refused,
    for a reason that may pass (a missing table or bad SQL does not)."""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        return sqlstate.startswith("08") or sqlstate in _LOST_SQLSTATES
    return isinstance(exc, (adbc_driver_manager.Error, OSError)) and bool(_LOST_MESSAGES.search(str(exc)))


def _lost_connections(method):
    """The method (or generator) raises ConnectionLost for a lost connection."""

    def check(self, exc: Exception) -> None:
        if connection_lost(exc):
            raise ConnectionLost(
                f"lost the connection to `{self.url.redacted}`: {_scrub(exc, self.url)}",
                "check that the server is up, then rerun",
            ) from exc

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def generator(self, *args, **kwargs):
            try:
                yield from method(self, *args, **kwargs)
            except Exception as exc:
                check(self, exc)
                raise

        return generator

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            check(self, exc)
            raise

    return wrapper


def _quietly(close) -> None:
    """Call ``close`` on the way out of an error, which its own error must not hide
    (a rollback on a lost connection fails too)."""
    try:
        close()
    except Exception:
        pass


def json_array(texts: pa.Array) -> pa.Array:
    """Text as Arrow's JSON extension type, which ADBC sends as jsonb."""
    return pa.ExtensionArray.from_storage(pa.json_(), texts.cast(pa.string()))


def _plain_column(column: pa.ChunkedArray) -> pa.Array:
    """A text column as one plain string array."""
    column = column.combine_chunks()
    return (column.storage if isinstance(column, pa.ExtensionArray) else column).cast(pa.string())


def _plain(batch: pa.RecordBatch) -> pa.RecordBatch:
    """JSON columns (Arrow's json extension type) as plain strings."""
    columns = [c.storage if isinstance(c, pa.ExtensionArray) else c for c in batch.columns]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


# Rows per record batch handed to COPY: ADBC builds each record batch's COPY
# data in one buffer before sending it, so a whole batch (25k rows, 45 MB)
# meant 45 MB of new memory per write, and the server waited for all of it.
_COPY_CHUNK_ROWS = 2048


def _in_chunks(table: pa.Table) -> pa.Table:
    return pa.Table.from_batches(table.to_batches(max_chunksize=_COPY_CHUNK_ROWS), schema=table.schema)


def _one_row(**values) -> pa.RecordBatch:
    """Bind parameters as Arrow (ADBC binds a record batch as given): a Python
    list of 25k run ids would be made into Python strings and back."""
    columns = [v if isinstance(v, pa.Array) else pa.array([v], pa.string()) for v in values.values()]
    return pa.RecordBatch.from_arrays(columns, names=list(values))


def _as_one_list(values: pa.Array) -> pa.Array:
    """A column as a single list value (one row), for an array parameter."""
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)


class PostgresStore:
    def __init__(self, url: DatabaseURL):
        self.url = url
        try:
            self.conn = adbc.connect(url.raw)
        except Exception as exc:  # the driver raises several types; all mean "cannot connect"
            error = ConnectionLost if connection_lost(exc) else StoreUnreachable
            raise error(
                f"cannot connect to `{url.redacted}`: {_scrub(exc, url)}",
                "check the URL and that the server is running",
            ) from None

    # -- schema

    @_lost_connections
    def migrate(self, part: str) -> list[str]:
        steps = sorted((resource_dir("migrations") / "postgres" / part).glob("*.sql"))
        applied = []
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('metabatch:migrate'))")
            cur.fetchall()
            cur.execute(
                "CREATE TABLE IF NOT EXISTS metabatch_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur.execute("SELECT name FROM metabatch_migrations")
            done = {row[0] for row in cur.fetchall()}
            for step in steps:
                name = f"{part}/{step.stem}"
                if name in done:
                    continue
                cur.execute(step.read_text())
                cur.execute("INSERT INTO metabatch_migrations (name) VALUES ($1)", (name,))
                applied.append(name)
        self.conn.commit()
        self.check_table("backtest_runs" if part == "runtime" else "joint_embeddings")
        return applied

    @_lost_connections
    def check_table(self, table: str) -> None:
        """MissingTable unless ``table`` exists with the columns metabatch uses."""
        require_columns(self.url, table, self._columns(table))

    def _columns(self, table: str) -> set[str]:
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = $1",
                (table,),
            )
            columns = {row[0] for row in cur.fetchall()}
        self.conn.commit()
        return columns

    # -- runs

    @_lost_connections
    def insert_runs(self, runs: pa.Table) -> int:
        runs = runs.set_column(runs.schema.get_field_index("config_json"), "config_json", json_array(runs.column("config_json").combine_chunks()))
        runs = runs.set_column(runs.schema.get_field_index("metrics_json"), "metrics_json", json_array(runs.column("metrics_json").combine_chunks()))
        with self.conn.cursor() as cur:
            cur.adbc_ingest("metabatch_seed_stage", _in_chunks(runs), mode="replace", temporary=True)
            columns = ", ".join(runs.column_names)
            cur.execute(
                f"INSERT INTO backtest_runs ({columns}) SELECT {columns} FROM metabatch_seed_stage"
                " ON CONFLICT (run_id) DO NOTHING"
            )
            inserted = cur.rowcount
            cur.execute("DROP TABLE metabatch_seed_stage")
        self.conn.commit()
        return inserted

    @_lost_connections
    def count_runs(self, selection: RunSelection) -> int:
        if selection.limit is None:
            query = self._runs_query(selection, "count(*)")
        else:
            query = f"SELECT count(*) FROM ({self._runs_query(selection, 'run_id')}) AS selected"
        with self.conn.cursor() as cur:
            cur.execute(query)
            (count,) = cur.fetchall()[0]
        self.conn.commit()
        return int(count)

    @_lost_connections
    def _runs_query(
        self, selection: RunSelection, columns: str, skip: pa.Array | None = None, embedded: tuple[str, str] | None = None
    ) -> str:
        """The param-free query for the selection (strategy ids and the run ids
        to ``skip`` go to temp tables). The shard is taken after the limit; with
        no limit its condition is the expression of ``backtest_runs_shard_run``,
        so that a shard reads its runs through that index. ``embedded``:
        (joint_type, model_id) whose rows in this database's joint_embeddings
        leave their runs out, as ``skip`` does."""
        self.check_table("backtest_runs")
        where = ["metrics_json IS NOT NULL"]
        with self.conn.cursor() as cur:
            if selection.strategy_ids:
                ids = pa.table({"strategy_id": pa.array(list(selection.strategy_ids), pa.string())})
                cur.adbc_ingest("metabatch_strategy_filter", ids, mode="replace", temporary=True)
                where.append("strategy_id IN (SELECT strategy_id FROM metabatch_strategy_filter)")
            if embedded is not None:
                key = pa.table({"joint_type": [embedded[0]], "model_id": [embedded[1]]})
                cur.adbc_ingest("metabatch_missing_of", key, mode="replace", temporary=True)
        self.conn.commit()
        # Dates and the limit are Python date/int values parsed by metabatch, never raw text.
        if selection.start is not None:
            where.append(f"end_date >= DATE '{selection.start.isoformat()}'")
        if selection.end is not None:
            where.append(f"end_date <= DATE '{selection.end.isoformat()}'")
        if selection.shard is not None and selection.limit is None:
            where.append(shard_condition(selection.shard, "run_id", "postgresql"))
        query = f"SELECT {columns} FROM backtest_runs WHERE {' AND '.join(where)}"
        if selection.limit is not None:
            query += f" ORDER BY end_date DESC, run_id DESC LIMIT {int(selection.limit)}"
            if selection.shard is not None:
                query = f"SELECT * FROM ({query}) AS limited WHERE {shard_condition(selection.shard, 'run_id', 'postgresql')}"
        # NOT EXISTS, an anti join (NOT IN rescans its list per row once it outgrows work_mem)
        left_out = []
        if skip is not None and len(skip):
            self._load_skip(skip)
            left_out.append("NOT EXISTS (SELECT 1 FROM metabatch_skip_runs s WHERE s.run_id = {0}.run_id)")
        if embedded is not None:
            left_out.append(
                "NOT EXISTS (SELECT 1 FROM joint_embeddings j WHERE j.joint_type = (SELECT joint_type FROM metabatch_missing_of)"
                " AND j.model_id = (SELECT model_id FROM metabatch_missing_of) AND (j.entity_scope ->> 'run_id') = {0}.run_id)"
            )
        if left_out and selection.limit is not None:
            # after the limit: the same runs are selected
            query = f"SELECT * FROM ({query}) AS selected WHERE " + " AND ".join(c.format("selected") for c in left_out)
        elif left_out:
            # the run ids left first, from the index backtest_runs_shard_run alone (under
            # --missing most runs are left out), then only their rows
            inner = f"SELECT r.run_id FROM backtest_runs r WHERE {' AND '.join(where)} AND " + " AND ".join(c.format("r") for c in left_out)
            query = f"SELECT {columns} FROM backtest_runs WHERE run_id IN ({inner})"
        return query

    def _load_skip(self, skip: pa.Array) -> None:
        """The run ids of ``skip`` into the temp table metabatch_skip_runs (once per array)."""
        if getattr(self, "_skip_loaded", None) is skip:
            return
        with self.conn.cursor() as cur:
            skipped = pa.table({"run_id": skip.cast(pa.string())})
            cur.adbc_ingest("metabatch_skip_runs", _in_chunks(skipped), mode="replace", temporary=True)
            cur.execute("ANALYZE metabatch_skip_runs")
        self.conn.commit()
        self._skip_loaded = skip

    @_lost_connections
    def read_runs(
        self, selection: RunSelection, skip: pa.Array | None = None, embedded: tuple[str, str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        query = self._runs_query(selection, ", ".join(RUN_COLUMNS), skip, embedded)
        yield from self._stream(query, RUN_COLUMNS, _RUNS_BATCH_BYTES)

    # -- embeddings

    @_lost_connections
    def replace_embeddings(self, rows: pa.Table, joint_type: str, model_id: str, buckets: Sequence[int] | None = None) -> None:
        """Upsert one batch: a run's existing row is updated in place (its joint_id
        stays), its duplicates are deleted, and new runs are COPied in.

        ``buckets``: the shard buckets (``shards``) the batch's runs are in, for
        the writer of a shard; None for a job over every bucket."""
        run_ids = rows.column("run_id").combine_chunks()
        try:
            with self.conn.cursor() as cur:
                # Two writers of the same runs must not both insert a run: one writer per
                # (joint_type, model_id) at a time, or, for the shards of a sharded job,
                # one per (joint_type, model_id, bucket), under the model id's lock taken
                # shared. The shards of a job then never wait for each other, two sharded
                # jobs take turns on the buckets they share (locked in ascending order: no
                # deadlock), and a job over every bucket, or a refit, excludes them all.
                key = f"metabatch:{joint_type}:{model_id}"
                if buckets is None:
                    cur.execute("SELECT pg_advisory_xact_lock(hashtext($1))", (key,))
                    cur.fetchall()
                else:
                    cur.execute("SELECT pg_advisory_xact_lock_shared(hashtext($1))", (key,))
                    cur.fetchall()
                    cur.execute(
                        "SELECT count(pg_advisory_xact_lock(hashtext($1), b)) FROM unnest($2::int[]) AS b",
                        _one_row(key=key, buckets=_as_one_list(pa.array(sorted(set(buckets)), pa.int32()))),
                    )
                    cur.fetchall()
                # One index probe per run id (a nested loop by construction): with
                # `= ANY($3)` the planner, trusting stale statistics of a table that
                # was empty, scanned every row of the model and filtered it, which
                # grew with the table (1-2 s per batch at 1M rows).
                cur.execute(
                    "SELECT r.run_id, x.first_id, x.n FROM unnest($3::text[]) AS r (run_id) CROSS JOIN LATERAL"
                    " (SELECT min(j.joint_id) AS first_id, count(*) AS n FROM joint_embeddings j"
                    "  WHERE j.joint_type = $1 AND j.model_id = $2 AND (j.entity_scope ->> 'run_id') = r.run_id) x"
                    " WHERE x.n > 0",
                    _one_row(joint_type=joint_type, model_id=model_id, run_ids=_as_one_list(run_ids.cast(pa.string()))),
                )
                existing = cur.fetch_arrow_table()
                if existing.num_rows:
                    kept = pa.array(existing.column(1).combine_chunks(), pa.int64())
                    is_existing = pc.is_in(run_ids, value_set=existing.column(0).combine_chunks())
                    old = rows.filter(is_existing)
                    keep_ids = pc.take(kept, pc.index_in(old.column("run_id"), value_set=existing.column(0).combine_chunks()))
                    stage = pa.table(
                        {
                            "joint_id": keep_ids,
                            "as_of_date": old.column("as_of_date"),
                            "entity_scope": json_array(old.column("entity_scope").combine_chunks()),
                            "vector": old.column("vector"),
                        }
                    )
                    cur.adbc_ingest("metabatch_upsert_stage", _in_chunks(stage), mode="replace", temporary=True)
                    cur.execute(
                        "UPDATE joint_embeddings j SET as_of_date = s.as_of_date, entity_scope = s.entity_scope,"
                        " vector = s.vector, vector_ref = NULL, created_at = now()"
                        " FROM metabatch_upsert_stage s WHERE j.joint_id = s.joint_id"
                    )
                    duplicated = existing.filter(pc.greater(existing.column(2), 1))
                    if duplicated.num_rows:
                        cur.execute(
                            "DELETE FROM joint_embeddings WHERE joint_type = $1 AND model_id = $2"
                            " AND (entity_scope ->> 'run_id') = ANY($3) AND NOT joint_id = ANY($4)",
                            _one_row(
                                joint_type=joint_type,
                                model_id=model_id,
                                run_ids=_as_one_list(duplicated.column(0).combine_chunks().cast(pa.string())),
                                keep_ids=_as_one_list(duplicated.column(1).combine_chunks().cast(pa.int64())),
                            ),
                        )
                    rows = rows.filter(pc.invert(is_existing))
                if rows.num_rows:
                    table = rows.drop_columns(["run_id"])
                    index = table.schema.get_field_index("entity_scope")
                    table = table.set_column(index, "entity_scope", json_array(table.column(index).combine_chunks()))
                    cur.adbc_ingest("joint_embeddings", _in_chunks(table), mode="append")
            self.conn.commit()
        except BaseException:
            _quietly(self.conn.rollback)
            raise

    # -- snapshots and queries (param-free queries, so that ADBC streams them)

    @staticmethod
    def _values_filter(name: str, column: str, values, tables: dict) -> str:
        """A condition ``column IN (values)``, the values held in a temp table (never in
        the SQL text) that ``_stream`` loads from ``tables`` before the query."""
        table = f"metabatch_q_{name}"
        tables[table] = pa.table({"v": pa.array([str(v) for v in values], pa.string())})
        return f"{column} IN (SELECT v FROM {table})"

    def read_in_snapshot(self, snapshot_id: str) -> None:
        """From now on, streams read in a REPEATABLE READ transaction on the exported
        snapshot ``snapshot_id`` (``hold_snapshot``): every shard of a job reads the
        database as it was at one instant."""
        if not _SNAPSHOT_ID.match(snapshot_id):
            raise ValueError(f"not a snapshot id: {snapshot_id!r}")
        self.snapshot_id = snapshot_id

    @_lost_connections
    def hold_snapshot(self) -> str:
        """Open a REPEATABLE READ transaction on this connection and export its snapshot;
        returns its id. The transaction stays open (and the snapshot importable) until
        ``release_snapshot`` or ``close``."""
        with self.conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur.execute("SELECT pg_export_snapshot()")
            (snapshot_id,) = cur.fetchall()[0]
        return snapshot_id

    def release_snapshot(self) -> None:
        _quietly(self.conn.rollback)

    @_lost_connections
    def _stream(self, query: str, columns, batch_bytes: int | None = None, tables: dict | None = None) -> Iterator[pa.RecordBatch]:
        """The query's non-empty record batches (about ``batch_bytes`` each, by default
        ``_READ_BATCH_BYTES``), in a transaction rolled back at the end, on the
        snapshot of ``read_in_snapshot`` if any. ``tables``: temp tables (name ->
        Arrow table) loaded in that transaction first (rows it wrote itself are
        the only ones a transaction on an older snapshot sees)."""
        cur = self.conn.cursor()
        try:
            if getattr(self, "snapshot_id", None):
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cur.execute(f"SET TRANSACTION SNAPSHOT '{self.snapshot_id}'")
            for name, table in (tables or {}).items():
                cur.adbc_ingest(name, table, mode="replace", temporary=True)
            cur.adbc_statement.set_options(**{"adbc.postgresql.batch_size_hint_bytes": str(batch_bytes or _READ_BATCH_BYTES)})
            cur.execute(query)
            for batch in cur.fetch_record_batch():
                if batch.num_rows:
                    yield _plain(batch.select(list(columns)))
        except BaseException:
            _quietly(cur.close)
            _quietly(self.conn.rollback)
            raise
        cur.close()
        self.conn.rollback()

    def _embeddings_where(self, flt: EmbeddingFilter, tables: dict) -> list[str]:
        """The conditions of ``flt`` on joint_embeddings (its value lists into ``tables``)."""
        extra = flt.extra or {}
        where = []
        if extra.get("joint_type") is not None:
            where.append(self._values_filter("joint_type", "joint_type", [extra["joint_type"]], tables))
        if flt.model_id is not None:
            where.append(self._values_filter("model", "model_id", [flt.model_id], tables))
        for key, name, values in (
            ("strategy_id", "strategy", flt.strategy_ids),
            ("run_id", "run", extra.get("run_ids") or ()),
            ("universe_id", "universe", extra.get("universe_ids") or ()),
        ):
            if values:
                where.append(self._values_filter(name, f"(entity_scope ->> '{key}')", values, tables))
        # Dates and the limit are date/int values parsed by metabatch, never raw text.
        if flt.start is not None:
            where.append(f"as_of_date >= DATE '{flt.start.isoformat()}'")
        if flt.end is not None:
            where.append(f"as_of_date <= DATE '{flt.end.isoformat()}'")
        if extra.get("shard") is not None:
            where.append(shard_condition(extra["shard"], "(entity_scope ->> 'run_id')", "postgresql"))
        return where

    @_lost_connections
    def count_embedding_vectors(self, flt: EmbeddingFilter, shards: int) -> pa.Table:
        """Per (model_id, shard of ``shards``, dim) the rows of ``flt`` whose vector has
        that dim (a byte length that is a multiple of 4: ``snapshot.vectors.vector_dims``;
        NULL for the others); model_id, shard, dim, rows. Read in the transaction of
        ``hold_snapshot`` (so it checks no table: that would end the transaction)."""
        tables: dict = {}
        where = self._embeddings_where(flt, tables)
        bucket = bucket_sql("(entity_scope ->> 'run_id')", "postgresql")
        with self.conn.cursor() as cur:
            for name, table in tables.items():
                cur.adbc_ingest(name, table, mode="replace", temporary=True)
            cur.execute(
                f"SELECT model_id::text AS model_id, ({bucket} % {int(shards)}) AS shard,"
                " (CASE WHEN octet_length(vector) % 4 = 0 THEN octet_length(vector) / 4 END)::int AS dim,"
                " count(*) AS rows FROM joint_embeddings"
                + (" WHERE " + " AND ".join(where) if where else "")
                + " GROUP BY 1, 2, 3"
            )
            return cur.fetch_arrow_table()

    @_lost_connections
    def stream_embeddings(self, flt: EmbeddingFilter) -> Iterator[pa.RecordBatch]:
        """See Store.stream_embeddings. ``flt.extra`` may also hold ``joint_type``,
        ``run_ids``, ``universe_ids`` and ``limit`` (first rows by as_of_date, joint_id)."""
        self.check_table("joint_embeddings")
        extra = flt.extra or {}
        tables: dict = {}
        where = self._embeddings_where(flt, tables)
        query = (
            "SELECT joint_id, joint_type, model_id, as_of_date,"
            " entity_scope ->> 'run_id' AS run_id, entity_scope ->> 'strategy_id' AS strategy_id,"
            " entity_scope ->> 'universe_id' AS universe_id, entity_scope ->> 'source' AS source,"
            " vector, created_at FROM joint_embeddings"
        )
        if where:
            query += " WHERE " + " AND ".join(where)
        if extra.get("limit") is not None:
            query += f" ORDER BY as_of_date, joint_id LIMIT {int(extra['limit'])}"
        return self._stream(query, EMBEDDING_READ_COLUMNS, tables=tables)

    @_lost_connections
    def stream_run_details(self, selection: RunSelection) -> Iterator[pa.RecordBatch]:
        self.check_table("backtest_runs")
        where = []
        tables: dict = {}
        if selection.strategy_ids:
            where.append(self._values_filter("strategy", "strategy_id", selection.strategy_ids, tables))
        if selection.start is not None:
            where.append(f"end_date >= DATE '{selection.start.isoformat()}'")
        if selection.end is not None:
            where.append(f"end_date <= DATE '{selection.end.isoformat()}'")
        if selection.shard is not None:
            where.append(shard_condition(selection.shard, "run_id", "postgresql"))
        query = f"SELECT {', '.join(RUN_DETAIL_COLUMNS)} FROM backtest_runs"
        if where:
            query += " WHERE " + " AND ".join(where)
        return self._stream(query, RUN_DETAIL_COLUMNS, tables=tables)

    # -- the model registry

    def read_model(self, model_id: str) -> dict | None:
        if not self._columns("joint_models"):
            return None
        self.check_table("joint_models")
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT model_id, encoder, model_file, params::text, fitted_runs, selection::text, fitted_at, content_hash"
                " FROM joint_models WHERE model_id = $1",
                (model_id,),
            )
            found = cur.fetchall()
        self.conn.commit()
        return model_row(found[0]) if found else None

    def list_models(self) -> list[dict]:
        if not self._columns("joint_models"):
            return []
        self.check_table("joint_models")
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT model_id, encoder, model_file, NULL, fitted_runs, selection::text, fitted_at, content_hash,"
                " octet_length(params::text) FROM joint_models ORDER BY model_id"
            )
            found = cur.fetchall()
        self.conn.commit()
        return [model_row(row) for row in found]

    def save_model(self, row: dict, joint_type: str, replace: bool) -> int:
        self.check_table("joint_models")
        try:
            with self.conn.cursor() as cur:
                # the backfills of the model id take the same lock: none writes while it is refitted
                cur.execute("SELECT pg_advisory_xact_lock(hashtext($1))", (f"metabatch:{joint_type}:{row['model_id']}",))
                cur.fetchall()
                deleted = 0
                if replace:
                    cur.execute(
                        "WITH gone AS (DELETE FROM joint_embeddings WHERE joint_type = $1 AND model_id = $2 RETURNING 1)"
                        " SELECT count(*) FROM gone",
                        (joint_type, row["model_id"]),
                    )
                    deleted = int(cur.fetchall()[0][0])
                    cur.execute("DELETE FROM joint_models WHERE model_id = $1", (row["model_id"],))
                cur.execute("SELECT count(*) FROM joint_models WHERE model_id = $1", (row["model_id"],))
                if cur.fetchall()[0][0]:
                    raise ModelExists(row["model_id"])
                cur.execute(
                    "INSERT INTO joint_models (model_id, encoder, model_file, params, fitted_runs, selection, content_hash)"
                    " VALUES ($1, $2, $3, $4::jsonb, $5, $6::jsonb, $7)",
                    model_params(row),
                )
            self.conn.commit()
            return deleted
        except BaseException:
            self.conn.rollback()
            raise

    @_lost_connections
    def embedded_run_ids(self, joint_type: str, model_id: str, shard: Shard | None = None) -> pa.Array:
        """The run ids that have a (joint_type, model_id) row (a run with two rows: twice)."""
        self.check_table("joint_embeddings")
        where = ""
        if shard is not None:
            where = " AND " + shard_condition(shard, "(entity_scope ->> 'run_id')", "postgresql")
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT entity_scope ->> 'run_id' AS run_id FROM joint_embeddings"
                f" WHERE joint_type = $1 AND model_id = $2 AND (entity_scope ->> 'run_id') IS NOT NULL{where}",
                (joint_type, model_id),
            )
            found = cur.fetch_arrow_table()
        self.conn.commit()
        return _plain_column(found.column("run_id"))

    def count_embeddings(self, joint_type: str, model_id: str) -> int:
        self.check_table("joint_embeddings")
        with self.conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM joint_embeddings WHERE joint_type = $1 AND model_id = $2", (joint_type, model_id))
            (count,) = cur.fetchall()[0]
        self.conn.commit()
        return int(count)

    def close(self) -> None:
        try:
            self.conn.close()
        except adbc_driver_manager.Error:
            pass
