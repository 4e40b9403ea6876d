"""The snapshot's models: ``models/model_id=<id>/model.json`` (the joint_models
row: encoder, model file, fitted parameters, fitted on, when, hash) for every
exported model id that is registered, and, for v2 models,
``models/model_id=<id>/env.parquet``: every exported run's values of the
model's config env paths (JSON text; ``environments.json_paths``) and env
window keys (``environments.window_values``), so that ``suggest --env``
compares environments on some keys without reading configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa

from ..workflows.environments import extract_env_values, json_paths, window_keys, window_values
from ..models.registry import RegisteredModel
from .embeddings import model_dir_name


class ModelWriter:
    """Collects the registered models' files while the runs stream by."""

    def __init__(self, root: Path, registered: list[dict]):
        self.root = root
        self.models = {row["model_id"]: RegisteredModel.from_row(row) for row in registered}
        self.paths = {
            model_id: json_paths(model.v2()) for model_id, model in self.models.items() if model.encoder == "v2"
        }
        self.windows = {model_id: window_keys(self.models[model_id].v2()) for model_id in self.paths}
        self.env_parts: dict[str, list[pa.Table]] = {model_id: [] for model_id in self.paths}

    def env_slices(self) -> dict[str, tuple[int, int]]:
        """model id -> the dimensions of its env slice, for the v2 models."""
        return {model_id: tuple(self.models[model_id].slices["env"]) for model_id in self.paths}

    def add_runs(self, con: duckdb.DuckDBPyConnection, runs: pa.Table) -> None:
        """Extract the env values of a chunk of runs (run_id, config_json, start_date,
        end_date) for every v2 model."""
        for model_id, paths in self.paths.items():
            values = extract_env_values(con, runs.column("config_json").combine_chunks(), paths)
            window = window_values(runs, self.windows[model_id])
            self.env_parts[model_id].append(
                pa.table([runs.column("run_id"), *values.columns, *window.columns], names=["run_id", *values.column_names, *window.column_names])
            )

    def section(self, exported: dict, run_ids: pa.Array) -> dict:
        """Write the files of the exported model ids; returns the manifest's ``models`` section."""
        section = {}
        for model_id in sorted(set(exported) & set(self.models)):
            section[model_id] = self.write_model(model_id)
            env = self.write_env(model_id, run_ids)
            if env is not None:
                section[model_id]["env_values"] = env
        return section

    def write_model(self, model_id: str) -> dict:
        """``models/<model>/model.json``; returns its entry of the manifest's ``models``."""
        model = self.models[model_id]
        folder = self.root / "models" / model_dir_name(model_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.json").write_text(json.dumps(model.as_row(), sort_keys=True) + "\n")
        return {
            "encoder": model.encoder,
            "file": (folder / "model.json").relative_to(self.root).as_posix(),
            "content_hash": model.content_hash,
            "fitted_runs": model.fitted_runs,
        }

    def write_env(self, model_id: str, run_ids: pa.Array, name: str = "env.parquet") -> str | None:
        """The env values of the runs in ``run_ids`` (a v2 model's), as ``models/<model>/<name>``,
        in the runs files' order; returns its path in the snapshot (None: nothing to write)."""
        parts = [t for t in self.env_parts.get(model_id, []) if t.num_rows]
        if not parts:
            return None
        folder = self.root / "models" / model_dir_name(model_id)
        folder.mkdir(parents=True, exist_ok=True)
        table = pl.from_arrow(pa.concat_tables(parts)).filter(pl.col("run_id").is_in(pl.from_arrow(run_ids).implode()))
        # in the runs files' order (the same chunks, the same filter): readers line them up without a join
        table.unique("run_id", keep="first", maintain_order=True).write_parquet(folder / name, compression="zstd")
        return (folder / name).relative_to(self.root).as_posix()
