"""A snapshot exported shard by shard on a Ray cluster (``ray_export``, ``export_on_ray``).

The snapshot is the one ``export_parquet`` writes (same files, same manifest),
built in the same build folder beside ``out``, which every node must see:

1. the driver holds a REPEATABLE READ transaction on the historical database
   and exports its snapshot (``PostgresStore.hold_snapshot``): every shard reads
   the embeddings as they were at that instant. In it, it counts the vectors
   per (model id, shard, dim) and makes each model's ``.npy`` files at their
   final size, so that each shard knows the rows its vectors go to;
2. each shard, one Ray task, runs the local export's ``write_files`` on its
   runs (``Layout``: its part files named ``part-s<shard>-*``, its vectors
   written into the ``.npy`` files from its first row, its index table and its
   models' env values as pieces);
3. the driver puts the index tables (``meta.arrow``) and the env values
   together in shard order, writes the models' files and the manifest, and
   swaps the folder in (``swap``), as a local export does.

A shard that Ray runs again removes its files first and writes the same rows
to the same places.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl
import pyarrow as pa

from ..pipeline.embed import DIM, JOINT_TYPE
from ..errors import BadInput, MetabatchError
from ..pipeline.retry import Retries
from ..stores.shards import Shard
from ..stores.base import EmbeddingFilter, RunSelection
from ..urls import DatabaseURL
from .embeddings import Layout, model_dir_name
from .export import ExportSummary, _publish, write_files
from .manifest import make_manifest
from .models import ModelWriter
from .swap import check_out_folder, new_build_folder, remove_leftovers
from .vectors import VectorFile


@dataclass(frozen=True)
class _ExportArgs:
    build: Path
    historical: DatabaseURL
    runtime: DatabaseURL
    flt: EmbeddingFilter
    selection: RunSelection
    snapshot_id: str
    first_rows: dict  # shard -> {(model_id, dim): first row}
    retries: int
    version: str


def _prefix(shard: Shard) -> str:
    return f"s{shard.index:03d}-"


def _remove_shard_files(build: Path, prefix: str) -> None:
    """A shard's files of an earlier attempt (not its rows in the ``.npy`` files,
    which it writes again in place)."""
    for pattern in (f"embeddings/*/part-{prefix}*", f"runs/part-{prefix}*", f"index/*/meta-{prefix.rstrip('-')}.arrow", f"models/*/env-{prefix.rstrip('-')}.parquet"):
        for path in build.glob(pattern):
            path.unlink(missing_ok=True)


def export_shard(shard: Shard, args: _ExportArgs, tracker):
    """One shard of an export, on a Ray worker: ``export.write_files`` over the
    shard's embeddings and runs; returns (its sections, retries, its task's details)."""
    from ..pipeline.distributed import _Reporter, shard_errors

    with shard_errors():
        reporter = _Reporter(tracker, shard, args.version)
        prefix = _prefix(shard)
        layout = Layout(prefix, args.first_rows.get(shard.index, {}))
        flt = dataclasses.replace(args.flt, extra={**args.flt.extra, "shard": shard})
        selection = dataclasses.replace(args.selection, shard=shard)

        def attempt(first: bool):
            _remove_shard_files(args.build, prefix)
            return write_files(args.build, args.historical, args.runtime, flt, selection, reporter.progress, first, layout, args.snapshot_id)

        attempts = Retries(args.retries)
        sections = attempts.run(attempt)
        return (sections, attempts.made), reporter.finish(sections[0]["rows"])


def export_on_ray(
    session,
    out: Path,
    historical: DatabaseURL,
    runtime: DatabaseURL,
    flt: EmbeddingFilter,
    selection: RunSelection,
    chosen: dict,
    *,
    shards: int | None = None,
    retries: int,
    on_progress: Callable | None = None,
) -> ExportSummary:
    """Export the snapshot of ``flt`` and ``selection`` to ``out`` (see the module
    docstring); ``chosen``: the manifest's selection."""
    from .. import __version__
    from ..pipeline.distributed import _shards, default_shards, run_shards
    from ..stores import open_store

    started = time.perf_counter()
    count = shards or default_shards(session.cpus())
    check_out_folder(out)
    remove_leftovers(out)
    build = new_build_folder(out)
    try:
        history = open_store(historical)
        try:
            history.check_table("joint_embeddings")
            runs_store = open_store(runtime)
            try:
                runs_store.check_table("backtest_runs")
            finally:
                runs_store.close()
            wanted = [flt.model_id] if flt.model_id is not None else [m["model_id"] for m in history.list_models()]
            models = ModelWriter(build, [row for row in map(history.read_model, wanted) if row is not None])
            snapshot_id = history.hold_snapshot()
            counts = history.count_embedding_vectors(flt, count).to_pylist()
            first_rows, totals = _place_vectors(build, counts, count, models.env_slices())
            args = _ExportArgs(build, historical, runtime, flt, selection, snapshot_id, first_rows, retries, __version__)
            total_rows = sum(c["rows"] for c in counts)
            outcomes, progress = run_shards(
                session.ray, export_shard, _shards(count), lambda shard: (args,), on_progress, total_rows, "export"
            )
        finally:
            history.release_snapshot()
            history.close()
        sections = [sections for (sections, _retries), _details in outcomes]
        embeddings = _merge_embeddings(build, [s[0] for s in sections], counts, totals)
        runs = _merge_runs([s[1] for s in sections])
        models_section = _merge_models(build, models, [s[2] for s in sections], embeddings["models"])
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    manifest = make_manifest(historical, runtime, chosen, embeddings, runs, time.perf_counter() - started, models_section)
    _publish(build, out, manifest)
    nodes = {details["node"] for _outcome, details in outcomes}
    return ExportSummary(
        path=out, embeddings=embeddings["rows"], runs=runs["rows"],
        models={m: e["rows"] for m, e in embeddings["models"].items()}, metric_columns=runs["metric_columns"],
        seconds=time.perf_counter() - started, retries=sum(r for (_s, r), _d in outcomes), manifest=manifest,
        shards=count, nodes=len(nodes), task_retries=progress.task_retries,
    )


def _place_vectors(build: Path, counts: list[dict], shards: int, env_slices: dict) -> tuple[dict, dict]:
    """Make each (model id, dim)'s ``.npy`` (and a v2 model's ``env.npy``) at its
    final size; returns per shard the first row of its vectors, and the totals."""
    totals: dict[tuple[str, int], int] = {}
    first_rows: dict[int, dict] = {}
    for entry in sorted((c for c in counts if c["dim"] is not None), key=lambda c: (c["model_id"], c["dim"], c["shard"])):
        key = (entry["model_id"], int(entry["dim"]))
        first_rows.setdefault(int(entry["shard"]), {})[key] = totals.get(key, 0)
        totals[key] = totals.get(key, 0) + int(entry["rows"])
    for (model_id, dim), rows in totals.items():
        folder = build / "index" / model_dir_name(model_id)
        VectorFile.allocate(folder / f"d{dim}.npy", dim, rows)
        if dim == DIM and model_id in env_slices:
            start, stop = env_slices[model_id]
            VectorFile.allocate(folder / "env.npy", stop - start, rows)
    return first_rows, totals


def _merge_embeddings(build: Path, sections: list[dict], counts: list[dict], totals: dict) -> dict:
    """The manifest's ``embeddings`` section of the whole snapshot, its index tables
    (``meta.arrow``) put together in shard order."""
    expected = {(c["model_id"], int(c["shard"]), int(c["dim"])): int(c["rows"]) for c in counts if c["dim"] is not None}
    written = {
        (model_id, shard, int(dim)): vectors["rows"]
        for shard, section in enumerate(sections)
        for model_id, entry in section["models"].items()
        for dim, vectors in entry["vectors"].items()
    }
    for key in sorted(set(expected) | set(written)):
        if expected.get(key, 0) != written.get(key, 0):
            model_id, shard, dim = key
            # cannot happen while every shard reads the driver's snapshot
            raise MetabatchError(
                f"shard {shard + 1}/{len(sections)} exported {written.get(key, 0):,} vectors of `{model_id}` (dim {dim}),"
                f" {expected.get(key, 0):,} were counted",
                "rerun the export",
            )
    models: dict[str, dict] = {}
    metas: dict[str, list[Path]] = {}
    for shard, section in enumerate(sections):
        for model_id, entry in section["models"].items():
            merged = models.setdefault(model_id, {"rows": 0, "path": entry["path"], "files": [], "meta": entry["meta"]})
            merged["rows"] += entry["rows"]
            merged["files"] += entry["files"]
            metas.setdefault(model_id, []).append(build / entry["meta"])
            if "env_unit" in entry:
                merged["env_unit"] = {**entry["env_unit"], "rows": totals[(model_id, DIM)]}
    for model_id, merged in models.items():
        folder = build / "index" / model_dir_name(model_id)
        merged["meta"] = (folder / "meta.arrow").relative_to(build).as_posix()
        merged["vectors"] = {
            str(dim): {"path": (folder / f"d{dim}.npy").relative_to(build).as_posix(), "rows": rows}
            for (m, dim), rows in sorted(totals.items()) if m == model_id
        }
        _concat_ipc(metas[model_id], folder / "meta.arrow")
    models = dict(sorted(models.items()))
    return {"rows": sum(m["rows"] for m in models.values()), "models": models}


def _concat_ipc(pieces: list[Path], target: Path) -> None:
    """Arrow IPC files, one after the other, as one file (record batches kept)."""
    writer = sink = None
    try:
        for piece in pieces:
            with pa.memory_map(str(piece)) as source:
                reader = pa.ipc.open_file(source)
                if writer is None:
                    sink = pa.OSFile(str(target), "wb")
                    writer = pa.ipc.new_file(sink, reader.schema)
                for i in range(reader.num_record_batches):
                    writer.write_batch(reader.get_batch(i))
            piece.unlink()
    finally:
        if writer is not None:
            writer.close()
        if sink is not None:
            sink.close()


def _merge_runs(sections: list[dict]) -> dict:
    return {
        "rows": sum(s["rows"] for s in sections),
        "files": [f for s in sections for f in s["files"]],
        "metric_columns": sorted({c for s in sections for c in s["metric_columns"]}),
    }


def _merge_models(build: Path, models: ModelWriter, sections: list[dict], exported: dict) -> dict:
    """The models' files (``model.json``, a v2 model's ``env.parquet`` from the
    shards' pieces, in shard order: the runs files' order)."""
    section = {}
    for model_id in sorted(set(exported) & set(models.models)):
        section[model_id] = models.write_model(model_id)
        pieces = [build / s[model_id]["env_piece"] for s in sections if s.get(model_id, {}).get("env_piece")]
        if pieces:
            target = build / "models" / model_dir_name(model_id) / "env.parquet"
            pl.concat([pl.read_parquet(p) for p in pieces], how="diagonal_relaxed").write_parquet(target, compression="zstd")
            for piece in pieces:
                piece.unlink()
            section[model_id]["env_values"] = target.relative_to(build).as_posix()
    return section


def snapshot_filter(model_id, strategy_ids, start, end) -> tuple[EmbeddingFilter, RunSelection, dict]:
    """The filter, run selection and manifest selection of an export (as ``export_parquet``)."""
    flt = EmbeddingFilter(model_id, strategy_ids, start, end, extra={"joint_type": JOINT_TYPE})
    chosen = {
        "model_id": model_id, "strategy_ids": list(strategy_ids),
        "start": start.isoformat() if start else None, "end": end.isoformat() if end else None,
    }
    return flt, RunSelection(strategy_ids, start, end), chosen


def ray_export(
    out,
    historical_url: DatabaseURL,
    runtime_url: DatabaseURL | None = None,
    *,
    model_id: str | None = None,
    strategy_id=None,
    start=None,
    end=None,
    on_progress: Callable | None = None,
    retries: int | None = None,
    address: str = "auto",
    shards: int | None = None,
):
    """``snapshot.export_parquet`` sharded over the Ray cluster at ``address``
    (``snapshot.sharded``): the same snapshot. ``out`` must be a folder every
    node of the cluster sees (a shared file system)."""
    from ..pipeline.distributed import RaySession, check_shards, check_stores
    from ..pipeline.retry import DEFAULT_RETRIES
    from .export import _ids

    runtime_url = runtime_url or historical_url
    check_shards(shards)
    check_stores(runtime_url, historical_url)
    if start and end and start > end:
        raise BadInput(f"--start {start} is after --end {end}")
    flt, selection, chosen = snapshot_filter(model_id, _ids(strategy_id), start, end)
    with RaySession(address) as session:
        return export_on_ray(
            session, Path(out).absolute(), historical_url, runtime_url, flt, selection, chosen, shards=shards,
            retries=DEFAULT_RETRIES if retries is None else retries, on_progress=on_progress,
        )


__all__ = ["ray_export", "export_on_ray", "export_shard", "snapshot_filter"]
