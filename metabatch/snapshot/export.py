"""``export_parquet``: the selected embeddings and their runs, read from the
stores and written as a snapshot (see the package docstring for its files).

Reads and writes overlap, each stage on a thread of its own
(``pipes.Prefetch``): the embeddings are read from the historical store,
converted (``EmbeddingWriter``) and written as Parquet (``write_parts``)
while the runs are read from the runtime store and their metrics extracted
(``RunWriter.prepared``, at most ``PREPARED_RUN_CHUNKS`` chunks ahead); the
runs are written once the embeddings are done, since only runs with an
exported embedding go in.

A lost database connection is retried (``retry``) by starting the export
again in a new build folder; the snapshot at ``out`` is only replaced once a
new one is complete.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..pipeline.embed import JOINT_TYPE
from ..errors import BadInput, ConnectionLost, MetabatchError
from ..pipeline.pipes import Prefetch, stop_all
from ..pipeline.retry import DEFAULT_RETRIES, Retries, open_for_attempt
from ..stores.base import EmbeddingFilter, RunSelection
from ..urls import DatabaseURL, parse_url
from .embeddings import EmbeddingWriter, Layout, embedding_parts, write_parts
from .manifest import make_manifest, write_manifest
from .models import ModelWriter
from .runs import RunWriter
from .swap import check_out_folder, new_build_folder, remove_leftovers, swap_in


# Chunks of prepared runs (``runs.RUNS_CHUNK_ROWS`` runs each) held while the
# embeddings are exported.
PREPARED_RUN_CHUNKS = 3


@dataclass
class ExportSummary:
    path: Path
    embeddings: int = 0
    runs: int = 0
    models: dict[str, int] = field(default_factory=dict)
    metric_columns: list[str] = field(default_factory=list)
    seconds: float = 0.0
    retries: int = 0  # restarts after a lost connection
    manifest: dict = field(default_factory=dict)
    shards: int = 1  # an export sharded over a Ray cluster: shards, nodes, shard tasks run again
    nodes: int = 1
    task_retries: int = 0

    def as_dict(self) -> dict:
        return {
            "path": str(self.path),
            "embeddings": self.embeddings,
            "runs": self.runs,
            "models": self.models,
            "metric_columns": self.metric_columns,
            "seconds": round(self.seconds, 3),
            "retries": self.retries,
            "shards": self.shards,
            "nodes": self.nodes,
            "task_retries": self.task_retries,
        }


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
    retries: int = DEFAULT_RETRIES,
    on_retry: Callable[[ConnectionLost, int, float], None] | None = None,
) -> ExportSummary:
    """Write a snapshot of the selected META_CONFIG_ENV_V0 embeddings (all model
    ids unless ``model_id``) and their runs to ``out``, replacing the snapshot
    there only once the new one is complete.

    ``on_progress(embeddings_written)`` is called as embeddings are written.
    ``retries``: how many times in a row to start again after a lost
    connection (0: fail at once); ``on_retry`` is called before each wait
    (see ``retry.Retries``).
    """
    started = time.perf_counter()
    historical = _as_url(historical_url)
    runtime = _as_url(runtime_url) if runtime_url is not None else historical
    strategy_ids = _ids(strategy_id)
    if start and end and start > end:
        raise BadInput(f"--start {start} is after --end {end}")
    out = Path(out).absolute()
    check_out_folder(out)
    remove_leftovers(out)
    flt = EmbeddingFilter(model_id, strategy_ids, start, end, extra={"joint_type": JOINT_TYPE})
    selection = RunSelection(strategy_ids, start, end)

    def attempt(first: bool) -> tuple[Path, tuple[dict, dict, dict]]:
        build = new_build_folder(out)
        try:
            return build, write_files(build, historical, runtime, flt, selection, on_progress, first)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise

    attempts = Retries(retries, on_retry)
    try:
        build, (emb_section, runs_section, models_section) = attempts.run(attempt)
    except ConnectionLost as exc:
        raise _gave_up(exc, attempts, out) from exc
    chosen = {
        "model_id": model_id,
        "strategy_ids": list(strategy_ids),
        "start": start.isoformat() if start else None,
        "end": end.isoformat() if end else None,
    }
    manifest = make_manifest(
        historical, runtime, chosen, emb_section, runs_section, time.perf_counter() - started, models_section
    )
    _publish(build, out, manifest)
    return ExportSummary(
        path=out,
        embeddings=emb_section["rows"],
        runs=runs_section["rows"],
        models={m: e["rows"] for m, e in emb_section["models"].items()},
        metric_columns=runs_section["metric_columns"],
        seconds=time.perf_counter() - started,
        retries=attempts.made,
        manifest=manifest,
    )


def _gave_up(exc: ConnectionLost, attempts: Retries, out: Path) -> MetabatchError:
    """The one-line error of an export whose retries ran out."""
    kept = f"the snapshot at `{out}` is unchanged" if out.exists() else f"nothing was written to `{out}`"
    return MetabatchError(
        f"export stopped{attempts.describe()}: {exc.message}; {kept}",
        "rerun the same command to export" + ("" if attempts.limit else "; --retries N reconnects on its own"),
    )


def _publish(build: Path, out: Path, manifest: dict) -> None:
    """Write the manifest into the finished ``build`` folder and swap it in at ``out``."""
    try:
        write_manifest(build, manifest)
        swap_in(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def write_files(
    build: Path,
    historical: DatabaseURL,
    runtime: DatabaseURL,
    flt: EmbeddingFilter,
    selection: RunSelection,
    on_progress: Callable[[int], None] | None,
    first: bool,
    layout: Layout = Layout(),
    snapshot_id: str | None = None,
) -> tuple[dict, dict, dict]:
    """Write the embeddings, index, runs and models files into ``build``; returns
    the manifest's ``embeddings``, ``runs`` and ``models`` sections. ``first``: the export's
    first attempt (see ``open_for_attempt``).

    A shard of a sharded export (``snapshot.sharded``) passes its ``layout``, the
    historical database's exported ``snapshot_id`` it reads in, and ``flt`` and
    ``selection`` of its shard; its ``models`` section names the env values it
    wrote per model (``env_piece``), and the driver writes the models' files."""
    stores = []
    stages: list[Prefetch] = []
    emb_writer = EmbeddingWriter(build, layout)
    try:
        emb_store = open_for_attempt(historical, first, read_only=True)
        stores.append(emb_store)
        run_store = open_for_attempt(runtime, first, read_only=True)
        stores.append(run_store)
        emb_store.check_table("joint_embeddings")
        run_store.check_table("backtest_runs")
        wanted = [flt.model_id] if flt.model_id is not None else [m["model_id"] for m in emb_store.list_models()]
        model_writer = ModelWriter(build, [row for row in map(emb_store.read_model, wanted) if row is not None])
        if snapshot_id is not None:
            emb_store.read_in_snapshot(snapshot_id)
        emb_writer.env_slices = model_writer.env_slices()
        run_writer = RunWriter(build, model_writer.add_runs, layout.prefix)

        def stage(source, ahead):
            stages.append(Prefetch(source, ahead))
            return stages[-1]

        embedding_batches = stage(emb_store.stream_embeddings(flt), 4)
        run_batches = stage(run_store.stream_run_details(selection), 8)
        # up to PREPARED_RUN_CHUNKS chunks of runs wait for the embeddings to be done
        # (the database keeps streaming meanwhile); past that, the runs' stream waits:
        # memory stays bounded however many runs there are
        prepared_runs = stage(run_writer.prepared(run_batches), PREPARED_RUN_CHUNKS)
        parts = stage(embedding_parts(emb_writer, embedding_batches), 2)
        done = 0
        for rows in stage(write_parts(parts), 1):
            prepared_runs.check()  # a failed read of the runs fails the export now
            done += rows
            if on_progress and rows:
                on_progress(done)
        run_ids = emb_writer.run_id_set()
        for table in prepared_runs:
            run_writer.write(table, run_ids)
        embeddings = emb_writer.section()
        if layout.sharded:
            name = f"env-{layout.prefix.rstrip('-')}.parquet"
            pieces = {m: model_writer.write_env(m, run_ids, name) for m in sorted(set(embeddings["models"]) & set(model_writer.models))}
            return embeddings, run_writer.section(), {m: {"env_piece": path} for m, path in pieces.items()}
        return embeddings, run_writer.section(), model_writer.section(embeddings["models"], run_ids)
    except BaseException:
        stop_all(stages)
        emb_writer.abort()
        raise
    finally:
        # every stage has ended (its database stream closed) before the stores close
        stop_all(stages)
        for store in stores:
            store.close()
