"""Snapshots: joint_embeddings and the runs they came from, as Parquet for DuckDB.

``export_parquet(out, ...)`` streams the selected META_CONFIG_ENV_V0 embeddings
(historical store) and their runs (runtime store) into a folder::

    DIR/manifest.json                          what, when, from where, row counts
    DIR/embeddings/model_id=<id>/part-00000.parquet ...
    DIR/runs/part-00000.parquet ...
    DIR/index/model_id=<id>/d384.npy           the vectors again, raw float32
    DIR/index/model_id=<id>/meta.arrow         the other embedding columns, Arrow IPC

- ``embeddings``: joint_id, joint_type, as_of_date, run_id, strategy_id,
  universe_id, source (from entity_scope), dim, l2_norm (float64), created_at,
  ``vector`` as FixedSizeList<float32>[384] (DuckDB reads FLOAT[], castable to
  FLOAT[384]; Polars reads Array(Float32, 384)) and ``vector_row``, the row of
  the vector in the model's ``.npy``. Hive-partitioned by model id (the folder
  value is percent-encoded; DuckDB, Polars and PyArrow decode it), so
  ``model_id`` comes from the path. A NULL vector, or one whose byte length is
  not a multiple of 4, has vector, dim, l2_norm and vector_row NULL; a vector
  of another dimension than 384 has its dim and norm, a NULL ``vector`` (the
  column has one type) and its bytes in ``index/.../d<dim>.npy``.
- ``runs``: run_id, strategy_id, universe_id, start_date, end_date,
  config_json and metrics_json (JSON text, exactly as the database prints
  it), then one DOUBLE column per top-level metric key that is a number in
  some run: keys made of ``a-z0-9_`` (starting with a letter or ``_``) that
  are not one of the columns above; a run whose value is not a number has
  NULL there. Only runs that have an exported embedding are written. A part
  file holds the metric columns known when it was written: read the folder
  with ``union_by_name`` (DuckDB) or ``missing_columns="insert"`` (Polars).
- ``index``: what ``similar`` and ``show`` load, in forms that map into memory
  without decoding: one ``.npy`` per (model id, dim), the vectors' bytes
  exactly as in ``joint_embeddings`` (little-endian float32) behind a 128-byte
  NumPy header (``numpy.load(path, mmap_mode="r")``), and ``meta.arrow``, the
  Parquet columns but the vector, as one uncompressed Arrow record batch. So
  the first ``similar`` of a process costs little more than reading the vector
  bytes (decoding the Parquet list column takes seconds at 1M rows, and its
  strings a good part of a second).

Writing is atomic: the snapshot is built in ``DIR.tmp-<pid>-<uuid>`` beside
``DIR`` and swapped in at the end (``renameat2(RENAME_EXCHANGE)`` where the
kernel has it, else two renames), so a killed or failed export leaves the
previous snapshot as it was; leftovers of killed exports are removed by the
next export to the same folder. Data files are not fsynced: the swap protects
against a killed process, not against losing power.

Reads and writes overlap: a reader thread per store keeps the database
streaming (COPY) while a writer thread per output converts and writes.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import json
import os
import queue
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import quote, urlsplit, urlunsplit

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.lib import format as npy

from . import __version__
from .embed import DIM, JOINT_TYPE
from .errors import BadInput, MetabatchError
from .pipes import DONE, consume, discard, pump
from .stores import open_store
from .stores.base import EmbeddingFilter, RunSelection
from .urls import DatabaseURL, parse_url

SCHEMA_VERSION = 1
FORMAT = "metabatch-snapshot"
MANIFEST = "manifest.json"
# Rows per Parquet row group and per part file of embeddings, and per runs part file.
EMBEDDING_GROUP_ROWS = 65_536
EMBEDDING_PART_ROWS = 262_144
RUNS_CHUNK_ROWS = 131_072
RUN_BASE_COLUMNS = ("run_id", "strategy_id", "universe_id", "start_date", "end_date", "config_json", "metrics_json")
_METRIC_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_NUMERIC_JSON = ("BIGINT", "UBIGINT", "DOUBLE", "HUGEINT")


_VECTOR_TYPE = pa.list_(pa.field("element", pa.float32(), nullable=False), DIM)
EMBEDDING_SCHEMA = pa.schema(
    [
        ("joint_id", pa.int64()),
        ("joint_type", pa.string()),
        ("as_of_date", pa.date32()),
        ("run_id", pa.string()),
        ("strategy_id", pa.string()),
        ("universe_id", pa.string()),
        ("source", pa.string()),
        ("dim", pa.int32()),
        ("l2_norm", pa.float64()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("vector", _VECTOR_TYPE),
        ("vector_row", pa.int64()),
    ]
)


def model_dir_name(model_id: str) -> str:
    """The hive folder of a model id (percent-encoded, so any id is one safe folder name)."""
    return "model_id=" + quote(model_id, safe="")


def describe_url(url: DatabaseURL) -> str:
    """A URL fit for the manifest: no password, no query string (which may hold one)."""
    if url.scheme == "duckdb":
        return "duckdb://" + str(Path(url.duckdb_path).resolve())
    parts = urlsplit(url.raw)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, user + host, parts.path, "", ""))


@dataclass
class ExportSummary:
    path: Path
    embeddings: int = 0
    runs: int = 0
    models: dict[str, int] = field(default_factory=dict)
    metric_columns: list[str] = field(default_factory=list)
    seconds: float = 0.0
    manifest: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "path": str(self.path),
            "embeddings": self.embeddings,
            "runs": self.runs,
            "models": self.models,
            "metric_columns": self.metric_columns,
            "seconds": round(self.seconds, 3),
        }


# --------------------------------------------------------------------------
# Raw vector files


class _VectorFile:
    """A (rows, dim) little-endian float32 ``.npy`` file written by appending
    rows; ``close`` writes the row count into its header.

    NumPy's header leaves room for the row count to grow, so the header
    written at close has the length of the first one (128 bytes) and the rows
    stay where they are; ``numpy.load(path, mmap_mode="r")`` reads the file.
    """

    def __init__(self, path: Path, dim: int):
        self.path, self.dim, self.rows = path, dim, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "wb")
        self._write_header()
        self.data_offset = self.file.tell()

    def _write_header(self) -> None:
        header = npy.header_data_from_array_1_0(np.empty((0, self.dim), dtype="<f4"))
        header["shape"] = (self.rows, self.dim)
        npy.write_array_header_1_0(self.file, header)

    def append(self, matrix: np.ndarray) -> int:
        """Write the rows; returns the row index of the first one."""
        first = self.rows
        if len(matrix):
            self.file.write(memoryview(np.ascontiguousarray(matrix, dtype="<f4")).cast("B"))
        self.rows += len(matrix)
        return first

    def close(self) -> None:
        self.file.seek(0)
        self._write_header()
        if self.file.tell() != self.data_offset:  # NumPy's room for the row count ran out
            raise ValueError(f"the .npy header of {self.path} changed length")
        self.file.close()


# --------------------------------------------------------------------------
# Embeddings: binary vectors -> dim, norm, float32 matrix


def vector_matrix(vectors: pa.Array, dim: int) -> np.ndarray:
    """The (n, dim) float32 view of a binary array whose values are all dim*4 bytes long."""
    vectors = vectors.combine_chunks() if isinstance(vectors, pa.ChunkedArray) else vectors
    n = len(vectors)
    if n == 0:
        return np.empty((0, dim), dtype="<f4")
    offsets_type = np.int64 if pa.types.is_large_binary(vectors.type) else np.int32
    offsets = np.frombuffer(vectors.buffers()[1], dtype=offsets_type, count=n + 1, offset=vectors.offset * np.dtype(offsets_type).itemsize)
    start = int(offsets[0])
    if vectors.null_count or int(offsets[-1]) - start != n * dim * 4:
        raise ValueError("vectors are not all of one length")
    data = np.frombuffer(vectors.buffers()[2], dtype=np.uint8, count=n * dim * 4, offset=start)
    return data.view("<f4").reshape(n, dim)


def vector_dims(vectors: pa.Array) -> pa.Array:
    """dim per vector: byte length / 4, NULL when NULL or not a multiple of 4."""
    lengths = pc.binary_length(vectors)
    whole = pc.equal(pc.bit_wise_and(lengths, 3), 0)
    return pc.if_else(whole, pc.cast(pc.divide(lengths, 4), pa.int32()), pa.scalar(None, pa.int32()))


def l2_norms(matrix: np.ndarray) -> np.ndarray:
    """Row norms in float64 (the float32 values, squared and summed in double)."""
    return np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64))


class _PartSink(threading.Thread):
    """Writes embeddings part files (and appends their index rows) on a thread of
    its own, so converting the next batch overlaps with Parquet encoding.

    Polars writes the part files: it encodes the FixedSizeList vector column
    about 3x cheaper than PyArrow (measured: 0.38 s vs 1.0 s of CPU per 250k
    rows), the largest CPU cost of an export after the database read.
    """

    def __init__(self):
        super().__init__(daemon=True)
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.index: dict[Path, tuple[pa.OSFile, pa.ipc.RecordBatchFileWriter]] = {}

    def run(self) -> None:
        import polars as pl

        while True:
            item = self.queue.get()
            if item is DONE:
                break
            if self.error is not None:
                continue  # keep draining so the producer never blocks
            parquet_path, index_path, table = item
            try:
                parquet_path.parent.mkdir(parents=True, exist_ok=True)
                # zstd for the vectors too: ~90% of their components are the zero
                # padding of short branches, so they shrink ~15x and write faster.
                pl.from_arrow(table, rechunk=False).write_parquet(
                    parquet_path, compression="zstd", compression_level=1, row_group_size=EMBEDDING_GROUP_ROWS
                )
                meta = table.drop_columns(["vector"])
                if index_path not in self.index:
                    index_path.parent.mkdir(parents=True, exist_ok=True)
                    sink = pa.OSFile(str(index_path), "wb")
                    self.index[index_path] = (sink, pa.ipc.new_file(sink, meta.schema))
                self.index[index_path][1].write_table(meta, max_chunksize=max(meta.num_rows, 1))
            except BaseException as exc:
                self.error = exc
        for sink, writer in self.index.values():
            try:
                writer.close()
                sink.close()
            except BaseException as exc:
                self.error = self.error or exc

    def put(self, parquet_path: Path, index_path: Path, table: pa.Table) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((parquet_path, index_path, table))

    def finish(self) -> None:
        self.queue.put(DONE)
        self.join()
        if self.error is not None:
            raise self.error


@dataclass
class _ModelFiles:
    """What one model id writes: Parquet part files, one .npy per dim, the index table."""

    folder: str
    vectors: dict[int, _VectorFile] = field(default_factory=dict)
    parts: list[Path] = field(default_factory=list)
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    rows: int = 0


class _EmbeddingWriter:
    """Turns stream_embeddings batches into the snapshot's embeddings and index files."""

    def __init__(self, root: Path):
        self.root = root
        self.models: dict[str, _ModelFiles] = {}
        self.run_ids: list[pa.Array] = []
        self.sink = _PartSink()
        self.sink.start()

    def _files(self, model_id: str) -> _ModelFiles:
        if model_id not in self.models:
            self.models[model_id] = _ModelFiles(model_dir_name(model_id))
        return self.models[model_id]

    def _vector_file(self, model_id: str, dim: int) -> _VectorFile:
        files = self._files(model_id)
        if dim not in files.vectors:
            files.vectors[dim] = _VectorFile(self.root / "index" / model_dir_name(model_id) / f"d{dim}.npy", dim)
        return files.vectors[dim]

    def add(self, batch: pa.RecordBatch) -> None:
        table = pa.Table.from_batches([batch])
        models = table.column("model_id")
        distinct = pc.unique(models).to_pylist()
        for model_id in distinct:
            rows = table if len(distinct) == 1 else table.filter(pc.equal(models, model_id))
            self._add_model(model_id, rows)

    def _add_model(self, model_id: str, table: pa.Table) -> None:
        files = self._files(model_id)
        n = table.num_rows
        vectors = table.column("vector").combine_chunks()
        dims = vector_dims(vectors)
        if dims.null_count == 0 and pc.all(pc.equal(dims, DIM)).as_py():
            # The usual batch: every vector has DIM components.
            matrix = vector_matrix(vectors, DIM)
            first = self._vector_file(model_id, DIM).append(matrix)
            norms = pa.array(l2_norms(matrix))
            vector_row = pa.array(np.arange(first, first + n, dtype=np.int64))
            parquet_vector = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), type=_VECTOR_TYPE)
        else:
            # Vectors of other dims go to their own .npy (Parquet's column is FLOAT[DIM]:
            # NULL there); NULL vectors and byte lengths that are not a multiple of 4 have
            # no vector at all.
            dim_values = np.asarray(pc.fill_null(dims, -1).to_numpy(zero_copy_only=False))
            norm_values = np.zeros(n)
            row_values = np.zeros(n, dtype=np.int64)
            full = np.zeros((n, DIM), dtype="<f4")
            for dim in sorted(set(dim_values.tolist()) - {-1}):
                where = np.flatnonzero(dim_values == dim)
                matrix = vector_matrix(vectors.take(pa.array(where)), dim)
                first = self._vector_file(model_id, dim).append(matrix)
                norm_values[where] = l2_norms(matrix)
                row_values[where] = np.arange(first, first + len(where))
                if dim == DIM:
                    full[where] = matrix
            has = dim_values >= 0
            norms = pa.array(norm_values, mask=~has)
            vector_row = pa.array(row_values, mask=~has)
            parquet_vector = pa.FixedSizeListArray.from_arrays(
                pa.array(full.reshape(-1)), type=_VECTOR_TYPE, mask=pa.array(dim_values != DIM)
            )
        out = pa.table(
            [
                table.column("joint_id"), table.column("joint_type"), table.column("as_of_date"),
                table.column("run_id"), table.column("strategy_id"), table.column("universe_id"),
                table.column("source"), dims, norms,
                table.column("created_at").cast(pa.timestamp("us", tz="UTC")), parquet_vector, vector_row,
            ],
            schema=EMBEDDING_SCHEMA,
        )
        files.pending.append(out)
        files.pending_rows += n
        files.rows += n
        self.run_ids.append(table.column("run_id").combine_chunks())
        if files.pending_rows >= EMBEDDING_PART_ROWS:
            self._flush(files)

    def _flush(self, files: _ModelFiles) -> None:
        if files.pending_rows:
            path = self.root / "embeddings" / files.folder / f"part-{len(files.parts):05d}.parquet"
            files.parts.append(path)
            self.sink.put(path, self.root / "index" / files.folder / "meta.arrow", pa.concat_tables(files.pending))
            files.pending, files.pending_rows = [], 0

    def close(self, root: Path) -> dict:
        """Flush and close every file; returns the manifest's ``embeddings`` section."""
        for files in self.models.values():
            self._flush(files)
        self.sink.finish()
        models: dict[str, dict] = {}
        for model_id, files in sorted(self.models.items()):
            for vector_file in files.vectors.values():
                vector_file.close()
            models[model_id] = {
                "rows": files.rows,
                "path": f"embeddings/{files.folder}",
                "files": [path.relative_to(root).as_posix() for path in files.parts],
                "meta": f"index/{files.folder}/meta.arrow",
                "vectors": {
                    str(dim): {"path": v.path.relative_to(root).as_posix(), "rows": v.rows}
                    for dim, v in sorted(files.vectors.items())
                },
            }
        return {"rows": sum(m["rows"] for m in models.values()), "models": models}

    def abort(self) -> None:
        if self.sink.is_alive():
            self.sink.error = self.sink.error or RuntimeError("export stopped")
            try:
                self.sink.finish()
            except BaseException:
                pass
        for files in self.models.values():
            for vector_file in files.vectors.values():
                try:
                    vector_file.file.close()
                except Exception:
                    pass


# --------------------------------------------------------------------------
# Runs: JSON text kept, top-level numeric metrics as columns


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


class _RunWriter:
    """Runs part files; metric columns grow as new numeric keys appear.

    ``prepare`` (JSON -> metric columns) runs as chunks arrive; ``write`` needs
    the exported run ids, known once the embeddings are done.
    """

    def __init__(self, root: Path):
        self.root = root
        self.con = duckdb.connect()
        self.con.execute("SET threads = 1")  # the other core serves the database and the embeddings
        self.keys: list[str] = []  # numeric metric keys known so far
        self.files: list[str] = []
        self.rows = 0

    def prepare(self, runs: pa.Table) -> pa.Table:
        candidates = metric_keys(self.con, runs)
        new = [k for k in candidates if k not in self.keys]
        metrics = extract_metrics(self.con, runs, sorted(set(self.keys) | set(new)))
        for k in new:
            if metrics.column(k).null_count < runs.num_rows:
                self.keys.append(k)
        keys = sorted(self.keys)
        base = runs.select(list(RUN_BASE_COLUMNS))
        return pa.table([*base.columns, *(metrics.column(k) for k in keys)], names=[*RUN_BASE_COLUMNS, *keys])

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        path = self.root / "runs" / f"part-{len(self.files):05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            table, path, compression="zstd", row_group_size=65_536,
            use_dictionary=["strategy_id", "universe_id"],
            write_statistics=["run_id", "strategy_id", "universe_id", "start_date", "end_date", *table.column_names[7:]],
        )
        self.files.append(path.relative_to(self.root).as_posix())
        self.rows += table.num_rows

    def close(self) -> dict:
        self.con.close()
        return {"rows": self.rows, "files": self.files, "metric_columns": sorted(self.keys)}


# --------------------------------------------------------------------------
# Threads: a reader per store, a writer per output


class _Worker(threading.Thread):
    def __init__(self, target: Callable[[], object]):
        super().__init__(daemon=True)
        self._target_fn = target
        self.result = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._target_fn()
        except BaseException as exc:
            self.error = exc


# --------------------------------------------------------------------------
# Atomic swap


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def swap_in(new: Path, out: Path) -> None:
    """Put the folder ``new`` at ``out``, replacing what is there; the old one is removed."""
    if not out.exists():
        os.replace(new, out)
        return
    if _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old snapshot
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(out: Path) -> None:
    """Remove the build folders of exports to ``out`` that were killed."""
    pattern = re.compile(re.escape(out.name) + r"\.(tmp|old)-(\d+)-[0-9a-f]+$")
    for sibling in out.parent.iterdir():
        match = pattern.match(sibling.name)
        if match and sibling.is_dir() and not _pid_alive(int(match.group(2))):
            shutil.rmtree(sibling, ignore_errors=True)


def check_out_folder(out: Path) -> None:
    """Refuse to replace a folder that is not a snapshot (a typo must not delete data)."""
    if out.exists():
        if not out.is_dir():
            raise MetabatchError(f"`{out}` exists and is not a folder", "choose another --out")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise MetabatchError(
                f"`{out}` exists and is not a metabatch snapshot (no {MANIFEST})",
                "choose another --out, or empty the folder first",
            )
    elif not out.parent.is_dir():
        raise MetabatchError(f"the folder `{out.parent}` does not exist", "create it first")


# --------------------------------------------------------------------------
# Export


def _as_url(url) -> DatabaseURL:
    return url if isinstance(url, DatabaseURL) else parse_url(str(url))


def _ids(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def export_parquet(
    out: str | os.PathLike,
    historical_url: str | DatabaseURL,
    runtime_url: str | DatabaseURL | None = None,
    *,
    model_id: str | None = None,
    strategy_id: str | Sequence[str] | None = None,
    start: dt.date | None = None,
    end: dt.date | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ExportSummary:
    """Write a snapshot of the selected META_CONFIG_ENV_V0 embeddings (all model
    ids unless ``model_id``) and their runs to ``out``; see the module docstring.

    ``on_progress(embeddings_written)`` is called as embeddings are written.
    """
    started = time.perf_counter()
    historical = _as_url(historical_url)
    runtime = _as_url(runtime_url) if runtime_url is not None else historical
    strategy_ids = _ids(strategy_id)
    if start and end and start > end:
        raise BadInput(f"--start {start} is after --end {end}")
    out = Path(out).absolute()
    check_out_folder(out)
    _remove_leftovers(out)
    build = out.with_name(f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    build.mkdir()
    stop = threading.Event()
    stores = []
    readers: list[threading.Thread] = []
    workers: list[_Worker] = []
    sources: list = []
    emb_q: queue.Queue = queue.Queue(maxsize=4)
    run_q: queue.Queue = queue.Queue(maxsize=8)
    emb_writer = _EmbeddingWriter(build)
    try:
        emb_store = open_store(historical, read_only=True)
        stores.append(emb_store)
        run_store = open_store(runtime, read_only=True)
        stores.append(run_store)
        emb_store.check_table("joint_embeddings")
        run_store.check_table("backtest_runs")

        flt = EmbeddingFilter(model_id, strategy_ids, start, end, extra={"joint_type": JOINT_TYPE})
        emb_ids_ready = threading.Event()

        def write_embeddings():
            done = 0
            for batch in consume(emb_q):
                emb_writer.add(batch)
                done += batch.num_rows
                if on_progress:
                    on_progress(done)
            section = emb_writer.close(build)
            emb_ids_ready.set()
            return section

        def write_runs():
            # Only runs with an exported embedding are written, so chunks are
            # prepared as they arrive and written once the embeddings are done
            # (the database keeps streaming meanwhile).
            writer = _RunWriter(build)
            prepared: list[pa.Table] = []
            pending: list[pa.RecordBatch] = []
            pending_rows = 0
            value_set = None

            def write_prepared():
                nonlocal value_set
                if value_set is None:
                    ids = [a for a in emb_writer.run_ids if len(a)]
                    value_set = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
                while prepared:
                    table = prepared.pop(0)
                    keep = pc.is_in(table.column("run_id"), value_set=value_set)
                    writer.write(table if pc.all(keep).as_py() else table.filter(keep))

            def prepare():
                nonlocal pending, pending_rows
                if pending:
                    prepared.append(writer.prepare(pa.Table.from_batches(pending)))
                    pending, pending_rows = [], 0

            done = False
            while not done:
                try:
                    item = run_q.get(timeout=0.1)
                except queue.Empty:
                    item = None
                if item is DONE:
                    done = True
                elif isinstance(item, BaseException):
                    raise item
                elif item is not None:
                    pending.append(item)
                    pending_rows += item.num_rows
                    if pending_rows >= RUNS_CHUNK_ROWS:
                        prepare()
                if stop.is_set():
                    raise RuntimeError("export stopped")
                if prepared and emb_ids_ready.is_set():
                    write_prepared()  # as soon as the run ids are known, while the read goes on
            prepare()
            while not emb_ids_ready.wait(0.1):
                if stop.is_set():
                    raise RuntimeError("export stopped")
            write_prepared()
            return writer.close()

        sources = [emb_store.stream_embeddings(flt), run_store.stream_run_details(RunSelection(strategy_ids, start, end))]
        readers = [
            threading.Thread(target=pump, args=(sources[0], emb_q, stop), daemon=True),
            threading.Thread(target=pump, args=(sources[1], run_q, stop), daemon=True),
        ]
        workers = [_Worker(write_embeddings), _Worker(write_runs)]
        for thread in (*readers, *workers):
            thread.start()
        while any(w.is_alive() for w in workers):
            failed = [w.error for w in workers if w.error is not None]
            if failed:
                raise failed[0]
            workers[0].join(0.05) if workers[0].is_alive() else workers[1].join(0.05)
        for worker in workers:
            if worker.error is not None:
                raise worker.error
        emb_section, runs_section = workers[0].result, workers[1].result
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "metabatch_version": __version__,
            "snapshot_id": uuid.uuid4().hex,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "sources": {"historical": describe_url(historical), "runtime": describe_url(runtime)},
            "selection": {
                "joint_type": JOINT_TYPE,
                "model_id": model_id,
                "strategy_ids": list(strategy_ids),
                "start": start.isoformat() if start else None,
                "end": end.isoformat() if end else None,
            },
            "embeddings": emb_section,
            "runs": runs_section,
            "export_seconds": round(time.perf_counter() - started, 3),
        }
        (build / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        swap_in(build, out)
    except BaseException:
        _stop_threads(stop, readers, workers, sources, (emb_q, run_q))
        emb_writer.abort()
        shutil.rmtree(build, ignore_errors=True)
        raise
    finally:
        _stop_threads(stop, readers, workers, sources, (emb_q, run_q))
        for store in stores:
            store.close()
    return ExportSummary(
        path=out,
        embeddings=emb_section["rows"],
        runs=runs_section["rows"],
        models={m: e["rows"] for m, e in emb_section["models"].items()},
        metric_columns=runs_section["metric_columns"],
        seconds=time.perf_counter() - started,
        manifest=manifest,
    )


def _stop_threads(stop: threading.Event, readers, workers, sources, queues) -> None:
    """Stop readers and writers and close the database streams (idempotent).

    Readers stop at their next batch; writers get an end marker. Streams are
    closed only once no thread uses them, before their stores are closed.
    """
    stop.set()
    for thread in readers:
        while thread.is_alive():
            for q in queues:
                discard(q)
            thread.join(0.05)
    for thread in workers:
        while thread.is_alive():
            for q in queues:
                discard(q)
                try:
                    q.put_nowait(DONE)
                except queue.Full:
                    pass
            thread.join(0.05)
    for source in sources:
        close = getattr(source, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                pass




def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the snapshot at ``path`` (MetabatchError when it is not one)."""
    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise MetabatchError(
            f"`{folder}` is not a metabatch snapshot (no {MANIFEST})",
            "write one with `metabatch export-parquet --out DIR`",
        ) from None
    except (OSError, ValueError) as exc:
        raise MetabatchError(f"cannot read the manifest of `{folder}`: {exc}", "export the snapshot again") from None
    if manifest.get("format") != FORMAT:
        raise MetabatchError(f"`{folder}` is not a metabatch snapshot", "export it again with `metabatch export-parquet`")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise MetabatchError(
            f"snapshot `{folder}` has schema version {manifest.get('schema_version')}, this metabatch reads {SCHEMA_VERSION}",
            "export it again with this version of metabatch",
        )
    return manifest
