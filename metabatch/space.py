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
``export_parquet``), removed when the space is closed.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads

from .embed import DIM
from .errors import BadInput, MetabatchError
from .models import RegisteredModel
from .snapshot import read_manifest
from .urls import DatabaseURL, parse_url

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
    _units: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _temporary: str | None = None

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
        if branch not in (*self.slices, "joint"):
            raise BadInput(f"unknown branch `{branch}`: use joint, config, env or outcome")
        with self._lock:
            if branch not in self._units:
                start, stop = (0, DIM) if branch == "joint" else self.slices[branch]
                out = np.empty((len(self.rows), stop - start), np.float32)
                for at in range(0, len(self.rows), 65_536):  # bounded temporaries
                    block = np.asarray(self.matrix[self.rows[at : at + 65_536], start:stop], np.float32)
                    norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
                    out[at : at + len(block)] = block / np.where(norms > 0, norms, 1.0)[:, None]
                self._units[branch] = out
            return self._units[branch]

    def metric(self, name: str) -> np.ndarray:
        """A metric per run as float64, NaN where a run has none."""
        if name not in self.runs.columns:
            raise BadInput(f"no metric `{name}` in these runs", f"metrics with numbers: {', '.join(self.metric_columns) or 'none'}")
        return self.runs.get_column(name).cast(pl.Float64).fill_null(np.nan).to_numpy()

    def configs(self, run_ids: Sequence[str]) -> dict[str, dict]:
        """The configs (parsed) of some runs, read from the snapshot's runs files."""
        if not run_ids:
            return {}
        files = [str(self.folder / f) for f in self.manifest["runs"]["files"]]
        if not files:
            return {}
        wanted = pa.array(list(dict.fromkeys(run_ids)), pa.string())
        table = pads.dataset(files, format="parquet").to_table(
            columns=["run_id", "config_json"], filter=pads.field("run_id").isin(wanted)
        )
        out = {}
        for run_id, text in zip(table.column("run_id").to_pylist(), table.column("config_json").to_pylist()):
            try:
                out[run_id] = json.loads(text) if text else {}
            except ValueError:
                out[run_id] = {}
        return out

    def close(self) -> None:
        self._units.clear()
        if self._temporary:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None


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
    """The fitted model a snapshot carries for ``model_id`` (BadInput when it is v1 or unknown)."""
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
    from .query import open_snapshot

    model = snapshot_model(folder, manifest, model_id)
    data = open_snapshot(folder).model(model_id)
    if DIM not in data.matrices:
        raise BadInput(f"model `{model_id}` has no {DIM}-dim vectors in snapshot `{folder}`")
    meta = pl.from_arrow(
        data.sql(
            "SELECT run_id, strategy_id, universe_id, as_of_date, source, vector_row FROM embeddings"
            " WHERE dim = $dim AND vector_row IS NOT NULL AND run_id IS NOT NULL"
            " QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY joint_id DESC) = 1",
            {"dim": DIM},
        )
    )
    if strategy_ids:
        meta = meta.filter(pl.col("strategy_id").is_in(list(strategy_ids)))
    if start is not None:
        meta = meta.filter(pl.col("as_of_date") >= start)
    if end is not None:
        meta = meta.filter(pl.col("as_of_date") <= end)
    if meta.height == 0:
        raise BadInput(f"no embeddings of model `{model_id}` in snapshot `{folder}` for this selection", "check --strategy-id, --start, --end")
    meta = meta.sort("run_id")
    metrics, metric_columns = _metric_columns(folder, manifest)
    runs = meta.select(*RUN_COLUMNS).join(metrics, on="run_id", how="left") if metrics is not None else meta.select(*RUN_COLUMNS)
    env = _env_values(folder, manifest, model_id, meta.select("run_id"))
    return Space(
        model=model, runs=runs, matrix=data.matrices[DIM], rows=meta.get_column("vector_row").to_numpy(),
        folder=folder, manifest=manifest, env_values=env, metric_columns=metric_columns,
    )


def _metric_columns(folder: Path, manifest: dict) -> tuple[pl.DataFrame | None, list[str]]:
    """run_id and the numeric metric columns of the snapshot's runs (no JSON read)."""
    files = [str(folder / f) for f in manifest["runs"]["files"]]
    columns = [c for c in manifest["runs"].get("metric_columns", [])]
    if not files:
        return None, []
    dataset = pads.dataset(files, format="parquet")
    present = [c for c in columns if c in dataset.schema.names]
    table = dataset.to_table(columns=["run_id", *present])
    frame = pl.from_arrow(table).unique("run_id", keep="first")
    return frame.with_columns([pl.col(c).cast(pl.Float64) for c in present]), present


def _env_values(folder: Path, manifest: dict, model_id: str, run_ids: pl.DataFrame) -> pl.DataFrame:
    entry = manifest.get("models", {}).get(model_id, {})
    path = entry.get("env_values")
    if not path or not (folder / path).exists():
        return run_ids
    values = pl.read_parquet(folder / path)
    return run_ids.join(values, on="run_id", how="left")


def _from_database(model_id, historical_url, runtime_url, strategy_ids, start, end) -> Space:
    from .snapshot import export_parquet
    from .urls import resolve_urls

    historical = historical_url if isinstance(historical_url, DatabaseURL) else (parse_url(historical_url) if historical_url else None)
    runtime = runtime_url if isinstance(runtime_url, DatabaseURL) else (parse_url(runtime_url) if runtime_url else None)
    if historical is None and runtime is None:
        resolved = resolve_urls(None, None)
        historical, runtime = resolved.historical, resolved.runtime
    historical = historical or runtime
    runtime = runtime or historical
    from .models import registered

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
    space._temporary = temporary
    return space
