"""Queries over the joint space: show, similar, meta_ctx_norms and sql.

Every query runs on an ``EmbeddingSet``: one model's META_CONFIG_ENV_V0
embeddings in memory, as a DuckDB table of their columns (no vectors) and one
float32 matrix per dimension. A set comes either from a snapshot folder
(``--snapshot DIR``: ``index/meta.arrow`` and the raw ``.npy`` vectors are
mapped into memory, not decoded) or from the historical database (the rows
pulled as Arrow batches with the filters pushed down, vectors copied into the
matrix batch by batch, no loop over rows). The same DuckDB queries (the
``_*_SQL`` texts below) then pick the rows for both.

``similar``: DuckDB picks the candidate rows (filters; the target run's rows
excluded; ``--candidate-limit`` = the most recent N by joint_id, as the seeds'
query had them). NumPy scores every candidate in float32 (one matrix-vector
product times the inverse norms) and keeps the rows within 1e-4 of the k-th
best score (float32 error on a 384-term cosine is below 2.3e-5); those are
scored again with float64 sums, and for the rows that can still be in the
answer the euclidean distance is computed exactly. The order is cosine
descending, euclidean ascending, then joint_id descending (the seeds' order
for ties: their candidates came newest first). Cosine is 0 when either
vector is zero, as in the seeds.

Snapshots are cached per folder in the process (``open_snapshot``), keyed by
the manifest's snapshot id, so repeated calls pay the load once and a
replaced snapshot is picked up on the next call.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ..pipeline.embed import DEFAULT_MODEL_ID, DIM, JOINT_TYPE
from ..errors import BadInput, MetabatchError

if TYPE_CHECKING:  # imported where it is used: `similar` does without DuckDB
    import duckdb
from ..resources import resource_dir
from . import MANIFEST, l2_norms, read_manifest, vector_dims, vector_matrix
from ..stores import open_store
from ..stores.base import EmbeddingFilter
from ..urls import DatabaseURL, parse_url, resolve_urls

SHOW_COLUMNS = ("as_of_date", "run_id", "strategy_id", "universe_id", "model_id", "dim", "l2_norm")
SIMILAR_COLUMNS = ("cosine", "euclidean", "run_id", "strategy_id", "universe_id", "as_of_date", "source")
META_COLUMNS = (
    "joint_id", "joint_type", "as_of_date", "run_id", "strategy_id", "universe_id", "source",
    "dim", "l2_norm", "vector_row",
)
# Rows whose float32 cosine is within this of the k-th best are rescored in float64
# (float32 error on a 384-term cosine is below 384 * 2**-24 ~ 2.3e-5).
_RESCORE_MARGIN = 1e-4
_RESCORE_BLOCK = 65_536


class DimensionMismatch(UserWarning):
    """Some candidates of ``similar`` have another dimension than the target (skipped)."""


# --------------------------------------------------------------------------
# The shared DuckDB queries, over the table ``embeddings`` of an EmbeddingSet
# (one model's META_CONFIG_ENV_V0 rows). Filters are optional clauses whose
# values are always bound parameters.


def _clauses(
    run_ids: Sequence[str] = (),
    strategy_ids: Sequence[str] = (),
    universe_ids: Sequence[str] = (),
    start: dt.date | None = None,
    end: dt.date | None = None,
) -> tuple[list[str], dict]:
    clauses, params = [], {}
    for column, name, values in (
        ("run_id", "run_ids", run_ids),
        ("strategy_id", "strategy_ids", strategy_ids),
        ("universe_id", "universe_ids", universe_ids),
    ):
        if values:
            clauses.append(f"{column} IN (SELECT unnest(${name}::VARCHAR[]))")
            params[name] = list(values)
    if start is not None:
        clauses.append("as_of_date >= $start")
        params["start"] = start
    if end is not None:
        clauses.append("as_of_date <= $end")
        params["end"] = end
    return clauses, params


def _where(clauses: list[str]) -> str:
    return (" WHERE " + " AND ".join(clauses)) if clauses else ""


_SHOW_SQL = (
    "SELECT as_of_date, run_id, strategy_id, universe_id, model_id,"
    " coalesce(dim, 0)::INTEGER AS dim, coalesce(l2_norm, 0.0) AS l2_norm FROM embeddings"
)
_SHOW_ORDER_SQL = " ORDER BY as_of_date ASC NULLS LAST, joint_id ASC"
_NORMS_SQL = "SELECT run_id, arg_max(coalesce(l2_norm, 0.0), joint_id) AS l2_norm FROM embeddings"
_NORMS_GROUP_SQL = " GROUP BY run_id ORDER BY run_id"


# --------------------------------------------------------------------------
# EmbeddingSet


class EmbeddingSet:
    """Embeddings in memory: ``meta``, their columns as Arrow (META_COLUMNS +
    model_id, no vectors), and ``matrices[dim]`` (float32; a row's vector is row
    ``vector_row``). ``similar`` picks rows with Arrow and NumPy; ``sql`` queries
    a DuckDB table ``embeddings`` of ``meta``, made on its first call."""

    def __init__(self, meta: pa.Table, matrices: dict[int, np.ndarray]):
        self.meta = meta
        self.matrices = matrices
        self.rows = meta.num_rows
        self._con = None
        self._lock = threading.Lock()
        self._by_dim: dict[int, _MatrixRows] = {}
        self._numbers: dict[str, np.ndarray] = {}
        self._batches: list[pa.RecordBatch] | None = None  # meta, batch by batch (``take``)
        self._starts: np.ndarray | None = None

    def sql(self, query: str, params: dict) -> pa.Table:
        with self._lock:
            if self._con is None:
                import duckdb

                self._con = duckdb.connect()
                # A native table: point lookups and filters run several times faster than on Arrow.
                self._con.register("mb_meta", self.meta)
                self._con.execute("CREATE TABLE embeddings AS SELECT * FROM mb_meta")
                self._con.unregister("mb_meta")
            return self._con.sql(query, params=params).to_arrow_table()

    def numbers(self, column: str) -> np.ndarray:
        """An integer column as NumPy (kept), NULL as -1 (joint_id: the smallest int64)."""
        if column not in self._numbers:
            null = np.iinfo(np.int64).min if column == "joint_id" else -1
            self._numbers[column] = pc.fill_null(self.meta.column(column), null).to_numpy()
        return self._numbers[column]

    def take(self, positions) -> pa.Table:
        """The rows of ``meta`` at ``positions``, taken from the record batch
        that holds each: a ``take`` over a table of many batches (a snapshot's
        index has one per part file) costs about 10 ms per string column."""
        if self._batches is None:
            self._batches = self.meta.to_batches()
            self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])
        positions = np.asarray(positions, np.int64)
        if not len(positions):
            return self.meta.schema.empty_table()
        chunks = np.searchsorted(self._starts, positions, side="right") - 1
        rows = [self._batches[c].slice(int(p - self._starts[c]), 1) for c, p in zip(chunks.tolist(), positions.tolist())]
        return pa.Table.from_batches(rows, schema=self.meta.schema)

    def positions_of(self, run_id: str) -> np.ndarray:
        """The positions in ``meta`` of the run's rows."""
        return np.flatnonzero(pc.fill_null(pc.equal(self.meta.column("run_id"), run_id), False).to_numpy())

    def rows_of(self, dim: int) -> _MatrixRows:
        """What ``similar`` needs per row of matrix ``dim`` (see _MatrixRows)."""
        if dim not in self._by_dim:
            n = len(self.matrices[dim])
            vector_row = self.numbers("vector_row")
            at = np.flatnonzero((self.numbers("dim") == dim) & (vector_row >= 0))
            rows = vector_row[at]
            position = np.zeros(n, dtype=np.int64)
            position[rows] = at
            joint_id = np.zeros(n, dtype=np.int64)
            joint_id[rows] = self.numbers("joint_id")[at]
            norms = np.zeros(n, dtype=np.float64)
            norms[rows] = self.meta.column("l2_norm").to_numpy()[at]
            inv = np.zeros(n, dtype=np.float32)
            np.divide(1.0, norms, out=inv, where=norms > 0, casting="unsafe")
            self._by_dim[dim] = _MatrixRows(position, joint_id, norms, inv)
        return self._by_dim[dim]

    def close(self) -> None:
        if self._con is not None:
            self._con.close()


@dataclass
class _MatrixRows:
    """Per row of one matrix: its position in ``meta``, its joint_id, its L2 norm
    (float64) and the inverse norm as float32 (0 for a zero vector, whose cosine is 0)."""

    position: np.ndarray
    joint_id: np.ndarray
    norms: np.ndarray
    inv: np.ndarray


def _with_model(meta: pa.Table, model_id: str) -> pa.Table:
    """The table with a constant ``model_id`` column (dictionary-encoded: no copies)."""
    model = pa.DictionaryArray.from_arrays(pa.array(np.zeros(meta.num_rows, dtype=np.int32)), pa.array([model_id]))
    return meta.append_column("model_id", model)


def _empty_set(model_id: str) -> EmbeddingSet:
    schema = pa.schema(
        [
            ("joint_id", pa.int64()), ("joint_type", pa.string()), ("as_of_date", pa.date32()),
            ("run_id", pa.string()), ("strategy_id", pa.string()), ("universe_id", pa.string()),
            ("source", pa.string()), ("dim", pa.int32()), ("l2_norm", pa.float64()), ("vector_row", pa.int64()),
        ]
    )
    return EmbeddingSet(_with_model(schema.empty_table(), model_id), {})


def set_from_batches(batches: Iterable[pa.RecordBatch], model_id: str) -> EmbeddingSet:
    """An EmbeddingSet of the model's META_CONFIG_ENV_V0 rows in stream_embeddings
    batches (vectors as binary); a loop over batches, none over rows."""
    metas: list[pa.Table] = []
    blocks: dict[int, list[np.ndarray]] = {}
    counts: dict[int, int] = {}
    for batch in batches:
        mine = pc.and_(pc.equal(batch.column("joint_type"), JOINT_TYPE), pc.equal(batch.column("model_id"), model_id))
        if pc.all(pc.fill_null(mine, False)).as_py() is not True:
            batch = batch.filter(pc.fill_null(mine, False))  # a store may ignore the filter hints
        if not batch.num_rows:
            continue
        vectors = batch.column("vector")
        dims = vector_dims(vectors)
        n = batch.num_rows
        vector_row = np.zeros(n, dtype=np.int64)
        has_row = np.zeros(n, dtype=bool)
        norms = np.zeros(n, dtype=np.float64)
        for dim in [d for d in pc.unique(dims).to_pylist() if d is not None]:
            mask = pc.fill_null(pc.equal(dims, dim), False)
            where = np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))
            matrix = np.array(vector_matrix(vectors.filter(mask), dim))  # a copy: the batch is let go
            first = counts.get(dim, 0)
            blocks.setdefault(dim, []).append(matrix)
            counts[dim] = first + len(matrix)
            vector_row[where] = np.arange(first, first + len(where))
            has_row[where] = True
            norms[where] = l2_norms(matrix)
        metas.append(
            pa.table(
                {
                    "joint_id": batch.column("joint_id"),
                    "joint_type": batch.column("joint_type"),
                    "as_of_date": batch.column("as_of_date"),
                    "run_id": batch.column("run_id"),
                    "strategy_id": batch.column("strategy_id"),
                    "universe_id": batch.column("universe_id"),
                    "source": batch.column("source"),
                    "dim": dims,
                    "l2_norm": pa.array(norms, mask=~has_row),
                    "vector_row": pa.array(vector_row, mask=~has_row),
                }
            )
        )
    if not metas:
        return _empty_set(model_id)
    meta = pa.concat_tables(metas)
    matrices = {dim: np.concatenate(parts) if len(parts) > 1 else parts[0] for dim, parts in blocks.items()}
    return EmbeddingSet(_with_model(meta, model_id), matrices)


def set_from_database(url: DatabaseURL, flt: EmbeddingFilter) -> EmbeddingSet:
    """The embeddings ``flt`` selects (model_id required), pulled from the historical store as Arrow."""
    store = open_store(url, read_only=True)
    try:
        store.check_table("joint_embeddings")
        extra = {"joint_type": JOINT_TYPE, **(flt.extra or {})}
        flt = EmbeddingFilter(flt.model_id, flt.strategy_ids, flt.start, flt.end, extra)
        return set_from_batches(store.stream_embeddings(flt), flt.model_id)
    finally:
        store.close()


# --------------------------------------------------------------------------
# Snapshots, cached per folder


class Snapshot:
    """A snapshot folder opened for queries; models are loaded on first use."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.snapshot_id = manifest.get("snapshot_id")
        self._models: dict[str, EmbeddingSet] = {}
        self._lock = threading.Lock()

    def model(self, model_id: str, branch: str = "joint") -> EmbeddingSet:
        """The model's embeddings; ``branch``: the slice of one branch (v2 models)."""
        with self._lock:
            if model_id not in self._models:
                self._models[model_id] = self._load(model_id)
            if branch == "joint":
                return self._models[model_id]
            key = f"{model_id}\x00{branch}"
            if key not in self._models:
                window = _branch_window(self._slices(model_id, branch), branch)
                self._models[key] = branch_set(self._models[model_id], window)
            return self._models[key]

    def _slices(self, model_id: str, branch: str) -> dict:
        from ..workflows.space import snapshot_model

        try:
            return snapshot_model(self.path, self.manifest, model_id).slices
        except BadInput:
            raise BadInput(
                f"--branch {branch} needs a v2 model: `{model_id}` is a v1 model (its vector has no branch slices)",
                "use --branch joint, or a model fitted with `metabatch fit`",
            ) from None

    def _load(self, model_id: str) -> EmbeddingSet:
        entry = self.manifest["embeddings"]["models"].get(model_id)
        if entry is None:
            return _empty_set(model_id)
        try:
            with pa.memory_map(str(self.path / entry["meta"])) as source:
                meta = pa.ipc.open_file(source).read_all()
            matrices = {}
            for dim, info in entry["vectors"].items():
                matrix = np.load(self.path / info["path"], mmap_mode="r")
                if matrix.shape != (info["rows"], int(dim)) or matrix.dtype != np.dtype("<f4"):
                    raise ValueError(f"{info['path']} holds {matrix.shape} {matrix.dtype}, the manifest says ({info['rows']}, {dim}) float32")
                matrices[int(dim)] = matrix
            if meta.num_rows != entry["rows"]:
                raise ValueError(f"{entry['meta']} holds {meta.num_rows} rows, the manifest says {entry['rows']}")
            return EmbeddingSet(_with_model(meta.select(list(META_COLUMNS)), model_id), matrices)
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            raise MetabatchError(
                f"snapshot `{self.path}` is damaged: {str(exc).splitlines()[0]}",
                "export it again with `metabatch export-parquet`",
            ) from None


BRANCHES = ("joint", "config", "env", "outcome")


def _branch_window(slices: dict | None, branch: str) -> tuple[int, int] | None:
    """The dimensions of ``branch`` (None for the whole vector)."""
    if branch == "joint":
        return None
    return tuple(slices[branch])


def _registered_slices(url: DatabaseURL, model_id: str, branch: str) -> dict | None:
    """The branch slices of a registered v2 model (BadInput naming v2 otherwise)."""
    if branch == "joint":
        return None
    from ..models.registry import registered

    model = registered(url, model_id)
    if model is None or model.encoder != "v2":
        raise BadInput(
            f"--branch {branch} needs a v2 model: `{model_id}` is a v1 model (its vector has no branch slices)",
            "use --branch joint, or a model fitted with `metabatch fit`",
        )
    return model.slices


def branch_set(data: EmbeddingSet, window: tuple[int, int] | None) -> EmbeddingSet:
    """The same embeddings with only the dimensions ``window`` of their vectors
    (and the norms of those), so that every query compares one branch alone."""
    if window is None:
        return data
    start, stop = window
    meta = data.meta
    if DIM not in data.matrices:
        return EmbeddingSet(meta, {})
    matrix = np.ascontiguousarray(data.matrices[DIM][:, start:stop])
    norms = l2_norms(matrix)
    rows = pc.fill_null(meta.column("vector_row"), 0).to_numpy()
    is_full = pc.fill_null(pc.equal(meta.column("dim"), DIM), False)
    new_norms = pa.array(np.where(np.asarray(is_full), norms[rows] if len(norms) else 0.0, np.nan), mask=~np.asarray(is_full))
    meta = meta.set_column(meta.schema.get_field_index("l2_norm"), "l2_norm", new_norms)
    return EmbeddingSet(meta, {DIM: matrix})


_SNAPSHOTS: dict[Path, Snapshot] = {}
_SNAPSHOTS_LOCK = threading.Lock()


def open_snapshot(path: str | os.PathLike | Snapshot) -> Snapshot:
    """The snapshot at ``path``, from the process cache while its manifest is unchanged."""
    if isinstance(path, Snapshot):
        return path
    folder = Path(path).absolute()
    if not (folder / MANIFEST).exists() and not folder.is_dir():
        raise MetabatchError(f"snapshot folder `{folder}` does not exist", "write one with `metabatch export-parquet --out DIR`")
    manifest = read_manifest(folder)
    with _SNAPSHOTS_LOCK:
        cached = _SNAPSHOTS.get(folder)
        if cached is not None and cached.snapshot_id == manifest.get("snapshot_id"):
            return cached
        snapshot = Snapshot(folder, manifest)
        _SNAPSHOTS[folder] = snapshot
        return snapshot


# --------------------------------------------------------------------------
# Arguments


def _ids(value, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    values = list(value)
    for v in values:
        if not isinstance(v, str):
            raise BadInput(f"{name} must be strings, got {v!r}")
    return values


def _date(value, name: str) -> dt.date | None:
    if value is None or (isinstance(value, dt.date) and not isinstance(value, dt.datetime)):
        return value
    if isinstance(value, dt.datetime):
        return value.date()
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise BadInput(f"{name} {value!r} is not a date like 2025-12-31") from None


def _range(start, end, as_of=None) -> tuple[dt.date | None, dt.date | None]:
    start, end, as_of = _date(start, "start"), _date(end, "end"), _date(as_of, "as_of")
    if as_of is not None:
        if start is not None or end is not None:
            raise BadInput("use either --as-of or --start/--end, not both")
        return as_of, as_of
    if start and end and start > end:
        raise BadInput(f"--start {start} is after --end {end}")
    return start, end


def _historical(url) -> DatabaseURL:
    if url is None:
        return resolve_urls(None, None).historical
    return url if isinstance(url, DatabaseURL) else parse_url(str(url))


# --------------------------------------------------------------------------
# show


def show(
    *,
    snapshot: str | os.PathLike | Snapshot | None = None,
    historical_url: str | DatabaseURL | None = None,
    as_of: dt.date | str | None = None,
    start: dt.date | str | None = None,
    end: dt.date | str | None = None,
    run_id: str | Sequence[str] | None = None,
    strategy_id: str | Sequence[str] | None = None,
    universe_id: str | Sequence[str] | None = None,
    model_id: str = DEFAULT_MODEL_ID,
    limit: int | None = 1000,
) -> pl.DataFrame:
    """The embeddings of ``model_id`` matching the filters, as the seeds' ``show`` lists
    them: SHOW_COLUMNS, ordered by as_of_date then joint_id, at most ``limit`` rows
    (0 or None: all). A NULL vector shows dim 0 and norm 0.0, as the seeds did."""
    start, end = _range(start, end, as_of)
    run_ids, strategy_ids, universe_ids = _ids(run_id, "run_id"), _ids(strategy_id, "strategy_id"), _ids(universe_id, "universe_id")
    if limit is not None and limit < 0:
        raise BadInput(f"--limit must be >= 0, got {limit}")
    limit = limit or None
    if snapshot is not None:
        data = open_snapshot(snapshot).model(model_id)
    else:
        extra = {"run_ids": run_ids, "universe_ids": universe_ids}
        if limit is not None:
            extra["limit"] = limit
        data = set_from_database(_historical(historical_url), EmbeddingFilter(model_id, tuple(strategy_ids), start, end, extra))
    clauses, params = _clauses(run_ids, strategy_ids, universe_ids, start, end)
    query = _SHOW_SQL + _where(clauses) + _SHOW_ORDER_SQL + (f" LIMIT {int(limit)}" if limit is not None else "")
    return pl.from_arrow(data.sql(query, params)).with_columns(pl.col("model_id").cast(pl.String))


# --------------------------------------------------------------------------
# similar


@dataclass
class _Scored:
    vector_rows: np.ndarray
    cosine: np.ndarray
    euclidean: np.ndarray


def _dots64(matrix: np.ndarray, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """matrix[rows] @ q summed in float64 (q holds float32 values, so every product is exact)."""
    q32 = q.astype(np.float32)
    out = np.empty(len(rows))
    for i in range(0, len(rows), _RESCORE_BLOCK):  # blocks keep the gathered copy small
        out[i:i + _RESCORE_BLOCK] = np.einsum("ij,j->i", matrix[rows[i:i + _RESCORE_BLOCK]], q32, dtype=np.float64)
    return out


def _euclidean(matrix: np.ndarray, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = np.empty(len(rows))
    for i in range(0, len(rows), _RESCORE_BLOCK):
        diff = np.asarray(matrix[rows[i:i + _RESCORE_BLOCK]], dtype=np.float64) - q
        out[i:i + _RESCORE_BLOCK] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def _top(data: EmbeddingSet, dim: int, rows: np.ndarray, q: np.ndarray, k: int) -> _Scored:
    """The k best of matrix[rows] for q, exactly ordered (see the module docstring)."""
    matrix = data.matrices[dim]
    by_row = data.rows_of(dim)
    joint_id, norms, inv = by_row.joint_id, by_row.norms, by_row.inv
    n_all = len(matrix)
    q_norm = float(np.sqrt(q @ q))
    # Score in float32: one pass over the whole matrix when most rows are candidates
    # (non-candidates get -inf), else over the gathered candidate rows.
    whole = len(rows) > n_all // 4
    if q_norm == 0:
        # Every cosine is 0 (the spec's rule): the order is by euclidean distance, the candidate's norm.
        score = -(norms if whole else norms[rows])
        margin = 0.0
    else:
        q32 = q.astype(np.float32)
        if whole:
            score = matrix @ q32
            score *= inv
        else:
            score = (matrix[rows] @ q32) * inv[rows]
        score *= np.float32(1.0 / q_norm)
        score[np.isnan(score)] = -np.inf
        margin = _RESCORE_MARGIN
    if whole:
        keep = np.zeros(n_all, dtype=bool)
        keep[rows] = True
        score[~keep] = -np.inf
    n = len(score)  # k <= len(rows) <= n
    kth = score[np.argpartition(score, n - k)[n - k:]].min()
    near = np.flatnonzero(score >= kth - margin)  # every row if kth is -inf (NaN scores)
    near = near[keep[near]] if whole else rows[near]
    # Exact cosines (float64) for the rows near the k-th, then euclidean distances
    # only for the rows that can still be in the answer (ties on the k-th cosine).
    if q_norm == 0:
        cos = np.zeros(len(near))
    else:
        cos = _dots64(matrix, near, q)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where(norms[near] > 0, cos / (norms[near] * q_norm), 0.0)
    rank = np.where(np.isnan(cos), -np.inf, cos)  # a vector with NaN ranks last
    if len(near) > k:
        final = rank >= np.partition(rank, len(rank) - k)[len(rank) - k]
        near, cos, rank = near[final], cos[final], rank[final]
    euc = _euclidean(matrix, near, q)
    order = np.lexsort((-joint_id[near], euc, -rank))[:k]
    return _Scored(near[order], cos[order], euc[order])


def _target(data: EmbeddingSet, run_id: str, model_id: str) -> tuple[np.ndarray, int]:
    """The target's vector (float64; its latest embedding) and its dim."""
    at = data.positions_of(run_id)
    if not len(at):
        raise MetabatchError(
            f"run `{run_id}` has no {JOINT_TYPE} embedding for model `{model_id}`",
            "check the run id and --model-id (`metabatch show --run-id ID` lists a run's embeddings)",
        )
    latest = data.take([at[np.argmax(data.numbers("joint_id")[at])]])
    latest = latest.select(["joint_id", "dim", "vector_row"]).to_pylist()[0]
    if latest["vector_row"] is None or latest["dim"] is None:
        raise MetabatchError(
            f"the embedding of run `{run_id}` (joint_id {latest['joint_id']}) has no usable vector",
            "backfill the run again",
        )
    dim = int(latest["dim"])
    return np.asarray(data.matrices[dim][latest["vector_row"]], dtype=np.float64), dim


def _candidates(
    data: EmbeddingSet, run_id: str, strategy_ids: Sequence[str], start: dt.date | None, end: dt.date | None,
    candidate_limit: int | None,
) -> np.ndarray:
    """The positions in ``data.meta`` of the candidates: a run id other than the
    target's, the filters, then the ``candidate_limit`` most recent by joint_id
    (as the seeds' query had them)."""
    meta = data.meta
    keep = pc.is_valid(meta.column("run_id"))  # a NULL run_id is no candidate (the seeds compared `run_id <> target`)
    if strategy_ids:
        keep = pc.and_(keep, pc.is_in(meta.column("strategy_id"), value_set=pa.array(strategy_ids, pa.string())))
    if start is not None:
        keep = pc.and_(keep, pc.greater_equal(meta.column("as_of_date"), pa.scalar(start, pa.date32())))
    if end is not None:
        keep = pc.and_(keep, pc.less_equal(meta.column("as_of_date"), pa.scalar(end, pa.date32())))
    keep = pc.fill_null(keep, False).to_numpy()
    keep[data.positions_of(run_id)] = False
    at = np.flatnonzero(keep)
    if candidate_limit is not None and len(at) > candidate_limit:
        joint_id = data.numbers("joint_id")[at]
        at = np.sort(at[np.argpartition(joint_id, len(at) - candidate_limit)[len(at) - candidate_limit:]])
    return at


def similar(
    run_id: str,
    *,
    snapshot: str | os.PathLike | Snapshot | None = None,
    historical_url: str | DatabaseURL | None = None,
    model_id: str = DEFAULT_MODEL_ID,
    strategy_id: str | Sequence[str] | None = None,
    start: dt.date | str | None = None,
    end: dt.date | str | None = None,
    top_k: int = 10,
    candidate_limit: int | None = None,
    branch: str = "joint",
) -> pl.DataFrame:
    """The ``top_k`` runs closest to ``run_id`` (its latest embedding of ``model_id``),
    as SIMILAR_COLUMNS, ordered by cosine descending then euclidean ascending.

    ``branch``: ``joint`` (the whole vector) or, for a v2 model, ``config``,
    ``env`` or ``outcome``: that branch's slice alone (BadInput naming v2 on a
    v1 model).
    Candidates: embeddings of ``model_id`` other than the target run's, of the
    given strategies and as_of_date range; ``candidate_limit`` keeps the N most
    recent by joint_id (None: all). Candidates of another dimension are skipped
    with a DimensionMismatch warning; an unknown run raises MetabatchError.
    """
    if not isinstance(run_id, str) or not run_id:
        raise BadInput("run_id must be a non-empty string")
    if top_k < 1:
        raise BadInput(f"--top-k must be >= 1, got {top_k}")
    if candidate_limit is not None and candidate_limit < 1:
        raise BadInput(f"--candidate-limit must be >= 1, got {candidate_limit}")
    start, end = _range(start, end)
    strategy_ids = _ids(strategy_id, "strategy_id")
    if branch not in BRANCHES:
        raise BadInput(f"--branch {branch!r}: use one of {', '.join(BRANCHES)}")
    if snapshot is not None:
        target_set = data = open_snapshot(snapshot).model(model_id, branch)
    else:
        url = _historical(historical_url)
        window = _branch_window(_registered_slices(url, model_id, branch), branch)
        target_set = branch_set(set_from_database(url, EmbeddingFilter(model_id, extra={"run_ids": [run_id]})), window)
        data = branch_set(set_from_database(url, EmbeddingFilter(model_id, tuple(strategy_ids), start, end)), window)
    q, dim = _target(target_set, run_id, model_id)
    at = _candidates(data, run_id, strategy_ids, start, end, candidate_limit)
    rows = data.numbers("vector_row")[at]
    dims = data.numbers("dim")[at]
    same = dims == dim
    other = int(np.count_nonzero((dims != dim) & (dims >= 0)))
    without = int(np.count_nonzero(dims < 0))
    if other or without:
        parts = [f"{other} of another dimension than {dim}"] if other else []
        parts += [f"{without} without a usable vector"] if without else []
        warnings.warn(f"similar: skipped {other + without} candidate(s): {', '.join(parts)}", DimensionMismatch, stacklevel=2)
    rows = rows[same]
    if not len(rows):
        return _similar_frame(data, dim, _Scored(np.empty(0, np.int64), np.empty(0), np.empty(0)))
    return _similar_frame(data, dim, _top(data, dim, rows, q, min(top_k, len(rows))))


def _similar_frame(data: EmbeddingSet, dim: int, scored: _Scored) -> pl.DataFrame:
    positions = data.rows_of(dim).position[scored.vector_rows] if len(scored.vector_rows) else np.empty(0, np.int64)
    picked = data.take(positions)
    return pl.DataFrame(
        {
            "cosine": pl.Series(scored.cosine, dtype=pl.Float64),
            "euclidean": pl.Series(scored.euclidean, dtype=pl.Float64),
            "run_id": pl.from_arrow(picked.column("run_id")).cast(pl.String),
            "strategy_id": pl.from_arrow(picked.column("strategy_id")).cast(pl.String),
            "universe_id": pl.from_arrow(picked.column("universe_id")).cast(pl.String),
            "as_of_date": pl.from_arrow(picked.column("as_of_date")).cast(pl.Date),
            "source": pl.from_arrow(picked.column("source")).cast(pl.String),
        }
    )


# --------------------------------------------------------------------------
# meta_ctx_norms


def meta_ctx_norms(
    strategy_id: str,
    model_id: str = DEFAULT_MODEL_ID,
    *,
    snapshot: str | os.PathLike | Snapshot | None = None,
    historical_url: str | DatabaseURL | None = None,
    run_id: str | Sequence[str] | None = None,
    start: dt.date | str | None = None,
    end: dt.date | str | None = None,
) -> dict[str, float]:
    """``{run_id: l2_norm}`` of the strategy's runs (each run's latest embedding of
    ``model_id``): the ``meta_ctx_norm`` a Meta-Orchestrator adds to each sleeve
    evaluation. ``run_id`` restricts it to some runs."""
    if not isinstance(strategy_id, str):
        raise BadInput("strategy_id must be a string")
    start, end = _range(start, end)
    run_ids = _ids(run_id, "run_id")
    if snapshot is not None:
        data = open_snapshot(snapshot).model(model_id)
    else:
        data = set_from_database(
            _historical(historical_url),
            EmbeddingFilter(model_id, (strategy_id,), start, end, {"run_ids": run_ids}),
        )
    clauses, params = _clauses(run_ids, [strategy_id], (), start, end)
    table = data.sql(_NORMS_SQL + _where(["run_id IS NOT NULL", *clauses]) + _NORMS_GROUP_SQL, params)
    return dict(zip(table.column("run_id").to_pylist(), table.column("l2_norm").to_pylist()))


# --------------------------------------------------------------------------
# sql


_DENIED_STATEMENTS = {"COPY", "EXPORT", "ATTACH", "DETACH", "INSTALL", "LOAD", "COPY_DATABASE", "UPDATE_EXTENSIONS"}
_GLOB_CHARACTERS = set("*?[]{}")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect_snapshot(snapshot: str | os.PathLike | Snapshot) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views ``embeddings`` and ``runs`` over
    the snapshot and the macros of ``sql/``; file access is limited to the snapshot
    folder, and statements that write files are refused by ``run_sql``."""
    snap = open_snapshot(snapshot)
    folder = snap.path.resolve()
    if _GLOB_CHARACTERS & set(str(folder)):
        raise MetabatchError(f"the snapshot path `{folder}` contains glob characters (*?[]{{}})", "move or rename the folder")
    manifest = snap.manifest
    import duckdb

    con = duckdb.connect()
    files = [str(folder / f) for m in manifest["embeddings"]["models"].values() for f in m["files"]]
    if files:
        file_list = "[" + ", ".join(_quote(f) for f in files) + "]"
        con.execute(
            # FLOAT[384] (an ARRAY): array_cosine_similarity & co. bind directly. (DuckDB's
            # list_* distance functions also choke on the NULL vectors of a Parquet list.)
            "CREATE VIEW embeddings AS SELECT joint_id, joint_type, model_id, as_of_date, run_id, strategy_id,"
            f" universe_id, source, dim, l2_norm, CAST(vector AS FLOAT[{DIM}]) AS vector, created_at"
            f" FROM read_parquet({file_list}, hive_partitioning = true, hive_types = {{'model_id': VARCHAR}},"
            " union_by_name = true)"
        )
    else:
        con.execute(
            "CREATE VIEW embeddings AS SELECT NULL::BIGINT AS joint_id, NULL::VARCHAR AS joint_type,"
            " NULL::VARCHAR AS model_id, NULL::DATE AS as_of_date, NULL::VARCHAR AS run_id,"
            " NULL::VARCHAR AS strategy_id, NULL::VARCHAR AS universe_id, NULL::VARCHAR AS source,"
            f" NULL::INTEGER AS dim, NULL::DOUBLE AS l2_norm, NULL::FLOAT[{DIM}] AS vector,"
            " NULL::TIMESTAMPTZ AS created_at WHERE false"
        )
    run_files = [str(folder / f) for f in manifest["runs"]["files"]]
    if run_files:
        file_list = "[" + ", ".join(_quote(f) for f in run_files) + "]"
        con.execute(f"CREATE VIEW runs AS SELECT * FROM read_parquet({file_list}, union_by_name = true)")
    else:
        con.execute(
            "CREATE VIEW runs AS SELECT NULL::VARCHAR AS run_id, NULL::VARCHAR AS strategy_id,"
            " NULL::VARCHAR AS universe_id, NULL::DATE AS start_date, NULL::DATE AS end_date,"
            " NULL::VARCHAR AS config_json, NULL::VARCHAR AS metrics_json WHERE false"
        )
    # clusters/<model>/<on>.parquet, written into the snapshot by `metabatch cluster`
    cluster_files = sorted(str(f) for f in folder.glob("clusters/*/*.parquet"))
    if cluster_files:
        file_list = "[" + ", ".join(_quote(f) for f in cluster_files) + "]"
        con.execute(f"CREATE VIEW clusters AS SELECT * FROM read_parquet({file_list}, union_by_name = true)")
    else:
        con.execute(
            "CREATE VIEW clusters AS SELECT NULL::VARCHAR AS run_id, NULL::BIGINT AS cluster, NULL::DOUBLE AS distance,"
            ' NULL::VARCHAR AS model_id, NULL::VARCHAR AS "on" WHERE false'
        )
    for path in sorted(resource_dir("sql").glob("*.sql")):
        for statement in con.extract_statements(path.read_text()):
            con.execute(statement)
    # From here on, only the snapshot folder can be read, and the setting is locked.
    con.execute(f"SET allowed_directories = [{_quote(str(folder) + os.sep)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def run_sql(con: duckdb.DuckDBPyConnection, query: str) -> pl.DataFrame:
    """Run the statements of ``query``; the last one's result as a DataFrame."""
    import duckdb

    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise BadInput(f"SQL: {str(exc).strip().splitlines()[0]}") from None
    if not statements:
        raise BadInput("no SQL statement given")
    for statement in statements:
        kind = str(statement.type).rsplit(".", 1)[-1].upper()
        if kind in _DENIED_STATEMENTS:
            raise MetabatchError(
                f"`{kind}` statements are not allowed: the snapshot is opened read-only",
                "use --format csv or json and redirect the output to write a file",
            )
    try:
        for statement in statements[:-1]:
            con.execute(statement)
        relation = con.sql(statements[-1].query)
        if relation is None:
            return pl.DataFrame()
        return _as_polars_types(relation).pl()
    except duckdb.Error as exc:
        raise MetabatchError(f"SQL: {str(exc).strip().splitlines()[0]}", "check the query; `metabatch sql --help` lists the views and macros") from None


# DuckDB types Polars holds as they are. A value of any other type (INTERVAL, UNION,
# BLOB, BIT, BIGNUM, UHUGEINT, VARIANT, GEOMETRY, TIME WITH TIME ZONE, ...) comes as
# DuckDB's text of it: Polars cannot import some (INTERVAL, UNION), overflows UHUGEINT,
# and cannot write others (BLOB) as JSON. Checked on polars 2.1 / duckdb 2.0.
_POLARS_TYPE_IDS = frozenset({
    "boolean", "tinyint", "smallint", "integer", "bigint", "hugeint", "utinyint", "usmallint",
    "uinteger", "ubigint", "float", "double", "decimal", "varchar", "uuid", "enum", "null",
    "date", "time", "time_ns", "timestamp", "timestamp_s", "timestamp_ms", "timestamp_ns",
    "timestamp with time zone",
})


def _polars_type(kind):
    """``kind`` (a DuckDB type) with every part Polars cannot hold or print made VARCHAR,
    and a MAP's keys VARCHAR (JSON objects have text keys); None when nothing changes."""
    import duckdb

    children = dict(kind.children) if kind.id in ("list", "array", "map", "struct") else {}
    if kind.id in ("list", "array"):
        child = _polars_type(children["child"])
        if child is None:
            return None
        return duckdb.list_type(child) if kind.id == "list" else duckdb.array_type(child, children["size"])
    if kind.id == "map":
        key, value = children["key"], children["value"]
        new_key = None if key.id == "varchar" else duckdb.sqltype("VARCHAR")
        new_value = _polars_type(value)
        if new_key is None and new_value is None:
            return None
        return duckdb.map_type(new_key or key, new_value or value)
    if kind.id == "struct":
        fields = {name: _polars_type(field) for name, field in kind.children}
        if all(f is None for f in fields.values()):
            return None
        return duckdb.struct_type({name: fields[name] or field for name, field in kind.children})
    return None if kind.id in _POLARS_TYPE_IDS else duckdb.sqltype("VARCHAR")


def _as_polars_types(relation):
    """``relation`` with the columns Polars cannot hold cast as ``_polars_type`` says."""
    targets = [_polars_type(kind) for kind in relation.types]
    if all(t is None for t in targets):
        return relation
    columns = [
        f"#{i}" if target is None else f"CAST(#{i} AS {target})"
        for i, target in enumerate(targets, start=1)
    ]
    return relation.project(", ".join(f'{c} AS "{name.replace(chr(34), chr(34) * 2)}"' for c, name in zip(columns, relation.columns)))


def sql(query: str, snapshot: str | os.PathLike | Snapshot) -> pl.DataFrame:
    """Run DuckDB SQL over a snapshot (views ``embeddings`` and ``runs``, the macros of
    ``sql/``), read-only; returns the last statement's result."""
    con = connect_snapshot(snapshot)
    try:
        return run_sql(con, query)
    finally:
        con.close()


# --------------------------------------------------------------------------
# Output


def format_frame(frame: pl.DataFrame, fmt: str, float_decimals: int | None = 6) -> str:
    """The frame as CSV (header, empty fields for NULL; a list, array, struct or map
    as its JSON text, as ``json`` writes it), an aligned table (the same JSON text, cut
    short), or JSON rows."""
    if fmt == "csv":
        frame = frame.with_columns([json_text(frame.get_column(c)) for c, t in frame.schema.items() if t.is_nested()])
        return frame.write_csv(float_precision=float_decimals, date_format="%Y-%m-%d", null_value="")
    if fmt == "json":
        return frame.write_json() + "\n"
    if fmt == "table":
        return _aligned(frame, float_decimals)
    raise BadInput(f"unknown format {fmt!r}: use csv, table or json")


_CELL_WIDTH = 60


def json_text(series: pl.Series) -> pl.Series:
    """A nested column's values as JSON text, NULL kept (Polars writes JSON only for
    structs: each value is wrapped in one, ``{"v":...}``, and unwrapped)."""
    wrapped = pl.struct(pl.col("v")).struct.json_encode().str.strip_prefix('{"v":').str.strip_suffix("}")
    text = pl.DataFrame({"v": series}).select(pl.when(pl.col("v").is_not_null()).then(wrapped)).to_series()
    return text.alias(series.name)


def _fixed(series: pl.Series, decimals: int) -> pl.Series:
    """Floats as text with a fixed number of decimals (as in the CSV), NULL kept."""
    text = series.to_frame().write_csv(float_precision=decimals, include_header=False, null_value="\x00")
    out = pl.Series(series.name, text.splitlines(), dtype=pl.String)
    return out.replace("\x00", None)


def _aligned(frame: pl.DataFrame, float_decimals: int | None) -> str:
    """An aligned text table: numbers right-aligned, NULL as an empty cell."""
    if not frame.width:
        return "(no columns)\n"
    cells = []
    for name, dtype in frame.schema.items():
        series = frame.get_column(name)
        if dtype.is_float() and float_decimals is not None:
            series = _fixed(series, float_decimals)
        elif dtype.is_nested():
            series = json_text(series)
        elif dtype == pl.Object:
            series = pl.Series(name, [None if v is None else str(v) for v in series.to_list()], dtype=pl.String)
        else:
            series = series.cast(pl.String)
        # A terminal table shows the start of long cells (JSON text); CSV and JSON show all.
        long = series.str.len_chars() > _CELL_WIDTH
        series = pl.select(
            pl.when(pl.lit(long)).then(pl.lit(series).str.slice(0, _CELL_WIDTH - 1) + "…").otherwise(pl.lit(series))
        ).to_series().alias(name)
        cells.append(series.fill_null(""))
    text = pl.DataFrame(cells)
    widths = {c: max(len(c), text.get_column(c).str.len_chars().max() or 0) for c in text.columns}
    numeric = {c for c, t in frame.schema.items() if t.is_numeric()}
    header = "  ".join(c.rjust(widths[c]) if c in numeric else c.ljust(widths[c]) for c in text.columns)
    rule = "  ".join("-" * widths[c] for c in text.columns)
    lines = text.select(
        pl.concat_str(
            [(pl.col(c).str.pad_start(widths[c]) if c in numeric else pl.col(c).str.pad_end(widths[c])) for c in text.columns],
            separator="  ",
        )
        .str.strip_chars_end()
        .alias("line")
    ).get_column("line")
    body = "\n".join(lines.to_list())
    footer = f"({frame.height} row{'' if frame.height == 1 else 's'})"
    return "\n".join(part for part in (header.rstrip(), rule, body, footer) if part) + "\n"
