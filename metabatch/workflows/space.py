"""Space: one v2 model's embeddings, with what the workflows need beside them.

``open_space(model_id, snapshot=DIR)`` (or ``historical_url=``/``runtime_url=``)
returns a ``Space``: the fitted model, one row per run (its latest embedding
of the model) with its ids, date and numeric metrics (``runs``, Polars), the
vectors (memory-mapped from the snapshot), each branch's slice normalised on
demand (``unit``), the runs' values of the model's environment keys
(``env_values``) and their configs by run id (``configs``).

From a snapshot the files are mapped or read column by column (the metrics,
not the JSON), and a ``Space`` is cached per (snapshot, model, filters) in the
process, so a warm session pays the load once. From the database, the model's
embeddings and runs are first exported to a temporary snapshot (the same
``export_parquet``), removed when the space is closed or dropped.

A model that is not v2 (a v1 id, or one fitted with ``encoder = "v1"``) is a
``BadInput`` naming v2: the workflows need its branch slices.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from ..pipeline.embed import DIM
from ..errors import BadInput, MetabatchError
from ..models.registry import RegisteredModel
from ..snapshot import read_manifest
from ..urls import DatabaseURL, parse_url

RUN_COLUMNS = ("run_id", "strategy_id", "universe_id", "as_of_date", "source")


@dataclass
class Space:
    model: RegisteredModel
    runs: pl.DataFrame  # run_id, strategy_id, universe_id, as_of_date, source, then a Float64 per numeric metric
    matrix: np.ndarray  # the model's vectors (n_all, 384), memory-mapped
    rows: np.ndarray  # runs row i is matrix row rows[i]
    folder: Path
    manifest: dict
    env_values: pl.DataFrame  # run_id (as runs), then per env key: its values (JSON text)
    metric_columns: list[str] = field(default_factory=list)
    rank: np.ndarray | None = None  # each run's rank by run_id (ties in a ranking are broken by it)
    locations: pl.DataFrame | None = None  # run_id, file, row: where each run's config is in the runs files
    env_unit: np.ndarray | None = None  # the snapshot's L2-normalised env slices (index/<model>/env.npy), by matrix row
    _units: dict = field(default_factory=dict, repr=False)
    _metrics: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _remove_temporary: weakref.finalize | None = None  # the temporary snapshot's folder, from the database

    def __len__(self) -> int:
        return self.runs.height

    @property
    def slices(self) -> dict[str, tuple[int, int]]:
        return self.model.slices

    def vectors(self, positions: np.ndarray | None = None) -> np.ndarray:
        """The joint vectors of the runs (all, or those at ``positions``), float32."""
        rows = self.rows if positions is None else self.rows[positions]
        return np.asarray(self.matrix[rows], np.float32)

    def unit(self, branch: str) -> np.ndarray:
        """The branch's slice of every run, each row L2-normalised (zero rows stay
        zero), contiguous float32; ``joint`` for the whole vector. Cached."""
        start, stop = self._window(branch)
        with self._lock:
            if branch == "env" and self.env_unit is not None and branch not in self._units:
                identity = len(self.rows) == len(self.env_unit) and bool((self.rows == np.arange(len(self.rows))).all())
                self._units[branch] = self.env_unit if identity else np.asarray(self.env_unit[self.rows])
            if branch not in self._units:
                out = np.empty((len(self.rows), stop - start), np.float32)
                for at in range(0, len(self.rows), 65_536):  # bounded temporaries
                    block = np.asarray(self.matrix[self.rows[at : at + 65_536], start:stop], np.float32)
                    norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
                    out[at : at + len(block)] = block / np.where(norms > 0, norms, 1.0)[:, None]
                self._units[branch] = out
            return self._units[branch]

    def held(self, branch: str) -> np.ndarray:
        """Per run, whether it has features in the branch (a non-zero slice), without
        keeping the slices. Cached."""
        key = ("held", branch)
        with self._lock:
            if key not in self._units:
                start, stop = self._window(branch)
                out = np.empty(len(self.rows), bool)
                for at in range(0, len(self.rows), 65_536):
                    block = np.asarray(self.matrix[self.rows[at : at + 65_536], start:stop])
                    out[at : at + len(block)] = np.abs(block).max(axis=1, initial=0) > 0
                self._units[key] = out
            return self._units[key]

    def unit_rows(self, branch: str, positions: np.ndarray) -> np.ndarray:
        """The branch's slices of the runs at ``positions``, L2-normalised (float64)."""
        start, stop = self._window(branch)
        block = np.asarray(self.matrix[self.rows[positions], start:stop], np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        return block / np.where(norms > 0, norms, 1.0)[:, None]

    def _window(self, branch: str) -> tuple[int, int]:
        if branch not in (*self.slices, "joint"):
            raise BadInput(f"unknown branch `{branch}`: use joint, config, env or outcome")
        return (0, DIM) if branch == "joint" else tuple(self.slices[branch])

    def metric(self, name: str) -> np.ndarray:
        """A metric per run as float64, NaN where a run has none."""
        if name not in self.runs.columns:
            raise BadInput(f"no metric `{name}` in these runs", f"metrics with numbers: {', '.join(self.metric_columns) or 'none'}")
        with self._lock:
            if name not in self._metrics:
                self._metrics[name] = self.runs.get_column(name).cast(pl.Float64).fill_null(np.nan).to_numpy()
            return self._metrics[name]

    def configs(self, run_ids: Sequence[str]) -> dict[str, dict]:
        """The configs (parsed) of some runs, read from the snapshot's runs files:
        only the row groups that hold them."""
        import pyarrow.parquet as pq

        wanted = list(dict.fromkeys(run_ids))
        if not wanted or self.locations is None:
            return {}
        found = self.locations.filter(pl.col("run_id").is_in(wanted))
        out = {}
        for (file,), group in found.group_by(["file"]):
            parquet = pq.ParquetFile(self.folder / self.manifest["runs"]["files"][file])
            starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
            rows = group.get_column("row").to_numpy()
            groups = np.searchsorted(starts, rows, side="right") - 1
            for g in np.unique(groups).tolist():  # a loop over the few row groups holding them
                table = parquet.read_row_group(g, columns=["run_id", "config_json"])
                for row in rows[groups == g].tolist():
                    at = row - int(starts[g])
                    run_id, text = table.column("run_id")[at].as_py(), table.column("config_json")[at].as_py()
                    try:
                        out[run_id] = json.loads(text) if text else {}
                    except ValueError:
                        out[run_id] = {}
        return out

    def close(self) -> None:
        self._units.clear()
        if self._remove_temporary is not None:
            self._remove_temporary()  # once: a finalizer does nothing when called again


_CACHE: dict[tuple, Space] = {}
_CACHE_LOCK = threading.Lock()


def open_space(
    model_id: str,
    *,
    snapshot: str | os.PathLike | None = None,
    historical_url: str | DatabaseURL | None = None,
    runtime_url: str | DatabaseURL | None = None,
    strategy_ids: Sequence[str] = (),
    start: dt.date | None = None,
    end: dt.date | None = None,
) -> Space:
    """The ``Space`` of ``model_id`` (see the module docstring); a snapshot's is cached."""
    if snapshot is None:
        return _from_database(model_id, historical_url, runtime_url, tuple(strategy_ids), start, end)
    folder = Path(snapshot).absolute()
    manifest = read_manifest(folder)
    key = (str(folder), manifest.get("snapshot_id"), model_id, tuple(strategy_ids), start, end)
    with _CACHE_LOCK:
        if key not in _CACHE:
            for old in [k for k in _CACHE if k[0] == key[0] and k[1] != key[1]]:
                _CACHE.pop(old).close()  # that snapshot was replaced
            _CACHE[key] = _load(folder, manifest, model_id, tuple(strategy_ids), start, end)
        return _CACHE[key]


def snapshot_model(folder: Path, manifest: dict, model_id: str) -> RegisteredModel:
    """The fitted model a snapshot carries for ``model_id`` (BadInput when it is v1;
    MetabatchError, exit 1 as for `similar`, when the snapshot has no such model)."""
    entry = manifest.get("models", {}).get(model_id)
    if entry is None:
        if model_id in manifest.get("embeddings", {}).get("models", {}):
            raise BadInput(
                f"model `{model_id}` is a v1 model (the snapshot carries no fitted model for it): this needs a v2 model",
                "fit one with `metabatch fit --joint-model-id ID`, backfill it and export the snapshot again",
            )
        known = ", ".join(sorted(manifest.get("embeddings", {}).get("models", {}))) or "none"
        raise MetabatchError(f"snapshot `{folder}` has no model `{model_id}` (models: {known})", "check --model-id")
    try:
        row = json.loads((folder / entry["file"]).read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise MetabatchError(f"snapshot `{folder}` is damaged: {exc}", "export it again with `metabatch export-parquet`") from None
    model = RegisteredModel.from_row({**row, "fitted_at": row.get("fitted_at")})
    if model.encoder != "v2":
        raise BadInput(f"model `{model_id}` is a {model.encoder} model: this needs a v2 model", "fit one with `metabatch fit`")
    return model


def _load(folder: Path, manifest: dict, model_id: str, strategy_ids, start, end) -> Space:
    model = snapshot_model(folder, manifest, model_id)
    entry = manifest["embeddings"]["models"].get(model_id, {})
    vectors = entry.get("vectors", {}).get(str(DIM))
    if vectors is None:
        raise BadInput(f"model `{model_id}` has no {DIM}-dim vectors in snapshot `{folder}`")
    matrix = np.load(folder / vectors["path"], mmap_mode="r")
    with pa.memory_map(str(folder / entry["meta"])) as source:
        meta = pl.from_arrow(pa.ipc.open_file(source).read_all().select(["joint_id", *RUN_COLUMNS, "dim", "vector_row"]))
    meta = meta.filter((pl.col("dim") == DIM) & pl.col("vector_row").is_not_null() & pl.col("run_id").is_not_null())
    if _has_duplicates(meta.get_column("run_id")):  # a run's latest embedding only
        meta = meta.sort("joint_id", descending=True).unique("run_id", keep="first")
    # in run_id order, not the files' (the order the database sent the rows, or a
    # sharded export's shard order): what a seeded k-means or a sample draws then
    # depends on the runs alone, so every export of the same rows answers the same
    meta = meta.sort("run_id")
    if strategy_ids:
        meta = meta.filter(pl.col("strategy_id").is_in(list(strategy_ids)))
    if start is not None:
        meta = meta.filter(pl.col("as_of_date") >= start)
    if end is not None:
        meta = meta.filter(pl.col("as_of_date") <= end)
    if meta.height == 0:
        raise BadInput(f"no embeddings of model `{model_id}` in snapshot `{folder}` for this selection", "check --strategy-id, --start, --end")
    columns, metric_columns, env_columns = _run_columns(folder, manifest, model_id)
    joined = meta.select(*RUN_COLUMNS).join(columns, on="run_id", how="left", maintain_order="left")
    runs = joined.select(*RUN_COLUMNS, *metric_columns)
    env = joined.select("run_id", *env_columns)
    locations = joined.select("run_id", "file", "row").filter(pl.col("file").is_not_null())
    env_unit = None
    if "env_unit" in entry:
        env_unit = np.load(folder / entry["env_unit"]["path"], mmap_mode="r")
    return Space(
        model=model, runs=runs, matrix=matrix, rows=meta.get_column("vector_row").to_numpy(),
        folder=folder, manifest=manifest, env_values=env, metric_columns=metric_columns,
        rank=np.arange(1, meta.height + 1, dtype=np.int64), locations=locations, env_unit=env_unit,
    )


def _has_duplicates(run_ids: pl.Series) -> bool:
    """Whether an id occurs twice: distinct 64-bit hashes say no at a tenth of
    the cost of comparing the strings, which only equal hashes need."""
    return run_ids.hash(seed=0).n_unique() < len(run_ids) and run_ids.n_unique() < len(run_ids)


def _run_columns(folder: Path, manifest: dict, model_id: str) -> tuple[pl.DataFrame, list[str], list[str]]:
    """Per run of the snapshot's runs files: run_id, the numeric metric columns
    (no JSON read), the model's env values and where the run is (``file``,
    ``row``, for ``Space.configs``); with the metric and env column names."""
    import pyarrow.parquet as pq

    columns = list(manifest["runs"].get("metric_columns", []))
    frames = []
    for index, name in enumerate(manifest["runs"]["files"]):  # a loop over the part files
        parquet = pq.ParquetFile(folder / name)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        frame = pl.from_arrow(parquet.read(columns=["run_id", *present]))
        frames.append(frame.with_columns(*(pl.col(c).cast(pl.Float64) for c in present), file=pl.lit(index, pl.Int32), row=pl.int_range(pl.len(), dtype=pl.Int64)))
    runs = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame(schema={"run_id": pl.String, "file": pl.Int32, "row": pl.Int64})
    metric_columns = [c for c in columns if c in runs.columns]
    env_columns: list[str] = []
    path = manifest.get("models", {}).get(model_id, {}).get("env_values")
    if path and (folder / path).exists():
        env = pl.read_parquet(folder / path)
        env_columns = [c for c in env.columns if c != "run_id"]
        if env.height == runs.height and env.get_column("run_id").equals(runs.get_column("run_id")):
            runs = pl.concat([runs, env.drop("run_id")], how="horizontal")  # written in the runs' order
        else:
            runs = runs.join(env, on="run_id", how="left", maintain_order="left")
    return runs, metric_columns, env_columns


def _from_database(model_id, historical_url, runtime_url, strategy_ids, start, end) -> Space:
    from ..snapshot import export_parquet
    from ..urls import resolve_urls

    historical = historical_url if isinstance(historical_url, DatabaseURL) else (parse_url(historical_url) if historical_url else None)
    runtime = runtime_url if isinstance(runtime_url, DatabaseURL) else (parse_url(runtime_url) if runtime_url else None)
    if historical is None and runtime is None:
        resolved = resolve_urls(None, None)
        historical, runtime = resolved.historical, resolved.runtime
    historical = historical or runtime
    runtime = runtime or historical
    from ..models.registry import registered

    model = registered(historical, model_id)
    if model is None:
        raise BadInput(f"model `{model_id}` is not a fitted model (a v1 id): this needs a v2 model", "fit one with `metabatch fit --joint-model-id ID`")
    model.v2()  # a v1 model file: the same message
    temporary = tempfile.mkdtemp(prefix="metabatch-space-")
    try:
        folder = Path(temporary) / "snapshot"
        export_parquet(folder, historical, runtime, model_id=model_id, strategy_id=list(strategy_ids), start=start, end=end)
        space = _load(folder, read_manifest(folder), model_id, strategy_ids, start, end)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    # the workflows return what they found and drop the space: its folder goes with
    # it (or when the process ends), if close() did not remove it before
    space._remove_temporary = weakref.finalize(space, shutil.rmtree, temporary, True)
    return space


def with_random_rank(frame: pl.DataFrame, column: str, seed: int) -> pl.DataFrame:
    """``frame`` with ``rank``: each row's rank (1, 2, ...) within its ``column``
    group, in a random order fixed by ``seed``."""
    keyed = frame.with_columns(_key=pl.Series(np.random.default_rng(seed).random(frame.height)))
    return keyed.with_columns(rank=pl.col("_key").rank("ordinal").over(column)).drop("_key")
