"""Backfill: backtest_runs -> joint_embeddings, in streamed batches.

``backfill(...)`` reads the selected runs from the runtime store, embeds each
batch (unnest, encode, combine: see ``embed``) and writes it to the historical
store in its own transaction. Reading, embedding and writing overlap, each
stage on a thread of its own (``pipes.Prefetch``): the runs are fetched by
``read_runs``' thread, a reader thread cuts them into batches and does part of
each batch's work (``prepare_runs``), an encoder thread embeds the next batch
while a writer thread commits the one before (the database does most of the
reading and writing work, so the two cores are kept busy). The last batches
are smaller (``last_batch_rows``). Returns a ``BackfillSummary``.

A lost database connection is retried (``retry``): the job reconnects and
reads again only the runs not yet committed (every batch is an idempotent
upsert, so a batch whose commit was cut off is simply written again).
"""

from __future__ import annotations

import ctypes
import functools
import queue
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import duckdb
import numpy as np
import pyarrow as pa

from .embed import DEFAULT_MODEL_ID, JOINT_TYPE, Weights
from .encode import DIM
from ..models.encoders.base import Encoder
from ..errors import ConnectionLost, MetabatchError
from .pipes import Prefetch, stop_all
from .read import read_runs
from .retry import DEFAULT_RETRIES, Retries, open_for_attempt
from ..stores.base import RunSelection
from .unnest import ShapeCache
from ..urls import DatabaseURL
from .write import write_batch

DEFAULT_BATCH_ROWS = 25_000


def first_batch_rows(batch_rows: int) -> int:
    """The first batch is smaller (the next ones double up to ``batch_rows``),
    so that encoding and then writing start sooner."""
    return max(1, batch_rows // 5)


def last_batch_rows(batch_rows: int) -> int:
    """The smallest of the last batches: at the end, the runs left are cut in
    halves down to this size, so that the last write, which nothing overlaps,
    is a short one."""
    return max(1, batch_rows // 10)


@functools.cache
def _tune_malloc() -> None:
    """Two glibc malloc settings, process-wide, done once (a no-op where libc
    has no mallopt):

    - every allocation of 1 MB or more gets its own mapping, returned to the
      OS when freed. By default glibc raises that threshold to the size of the
      biggest buffer freed so far (up to 32 MB), and then the database
      driver's multi-MB buffers, made on the fetch thread and freed on
      another, fragment that thread's arena: at 1M runs peak RSS grew by
      150 MB over the job, and with this it stays flat;
    - smaller freed memory is kept for reuse (up to 256 MB free at the top of
      a heap, which grows 64 MB at a time) instead of being handed back to the
      OS at once: memory new to the process costs the kernel a page fault and
      a zeroing per page, 11% of the job's CPU. A 200k-run job takes 30% fewer
      page faults and 6% less CPU, for 30 MB more peak RSS.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
        libc.mallopt(_M_TOP_PAD, 64 << 20)
    except (OSError, AttributeError):
        pass


# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def _one_thread_duckdb() -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that runs each query on the calling thread: the job's
    own threads and the database server already keep both cores busy, and more
    threads only add switching."""
    con = duckdb.connect()
    con.execute("SET threads = 1")
    return con


class _VectorBuffers:
    """Matrices of (batch_rows, DIM) float32 for the batches' vectors, each
    reused once the batch that filled it is written (at most three are in use:
    one being filled, one queued, one being written). New memory costs a page
    fault and a zeroing per page, which was most of combine's time."""

    def __init__(self, rows: int):
        self.rows = rows
        self.free: queue.SimpleQueue = queue.SimpleQueue()

    def take(self) -> np.ndarray:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            return np.empty((self.rows, DIM), np.float32)

    def give_back(self, buffer: np.ndarray) -> None:
        self.free.put(buffer)


@dataclass
class BackfillSummary:
    runs_read: int = 0
    written: int = 0
    skipped: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (run_id, reason)
    batches: int = 0
    retries: int = 0  # reconnections after a lost connection
    elapsed_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(
        default_factory=lambda: {"read": 0.0, "unnest": 0.0, "encode": 0.0, "combine": 0.0, "write": 0.0}
    )
    model_id: str = DEFAULT_MODEL_ID
    encoder: str = "v1"
    fitted: dict | None = None  # the fit's summary when the model was fitted on first use
    unseen_config_paths: list[str] = field(default_factory=list)  # v2: config paths the fit did not see
    already_embedded: int = 0  # --missing: selected runs left alone, having a row of the model id
    # a job sharded over a Ray cluster (``distributed``): shards, the nodes that ran
    # them, the shard tasks Ray ran again (a node lost), and per shard its summary
    shards: int = 1
    nodes: int = 1
    task_retries: int = 0
    per_shard: list[dict] = field(default_factory=list)

    @property
    def runs_per_second(self) -> float:
        return self.runs_read / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def count_already_embedded(self, selected: int) -> None:
        """--missing: of the ``selected`` runs, those not read had a row already."""
        self.already_embedded = max(0, selected - self.runs_read)

    def as_dict(self, max_rejected: int | None = None) -> dict:
        rejected = self.rejected if max_rejected is None else self.rejected[:max_rejected]
        return {
            "runs_read": self.runs_read,
            "written": self.written,
            "skipped": self.skipped,
            "rejected": len(self.rejected),
            "rejected_runs": [{"run_id": r, "reason": why} for r, why in rejected],
            "batches": self.batches,
            "retries": self.retries,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "runs_per_second": round(self.runs_per_second, 1),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "model_id": self.model_id,
            "encoder": self.encoder,
            "fitted_now": self.fitted,
            "unseen_config_paths": self.unseen_config_paths,
            "already_embedded": self.already_embedded,
            "shards": self.shards,
            "nodes": self.nodes,
            "task_retries": self.task_retries,
            **({"per_shard": self.per_shard} if self.per_shard else {}),
        }


@dataclass
class _Committed:
    """What the writer thread hands on for each batch it committed."""

    run_ids: pa.Array  # every run of the batch: written, skipped or rejected
    written: int
    skipped: int
    rejected: list[tuple[str, str]]


def backfill(
    runtime_url: DatabaseURL,
    historical_url: DatabaseURL | None = None,
    selection: RunSelection = RunSelection(),
    weights: Weights = Weights(),
    model_id: str = DEFAULT_MODEL_ID,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    on_progress: Callable[[int, int | None], None] | None = None,
    *,
    retries: int = DEFAULT_RETRIES,
    on_retry: Callable[[ConnectionLost, int, float], None] | None = None,
    weights_given: bool = False,
    encoder: Encoder | None = None,
    missing: bool = False,
    embedded: pa.Array | None = None,
    count_total: bool = True,
) -> BackfillSummary:
    """Embed the selected runs and write them; see the module docstring.

    ``missing``: only the selected runs that have no row of the model id yet
    (their run ids are read from the historical store, which may be another
    server, and skipped; or given as ``embedded``); ``summary.already_embedded``
    counts the others (the selected runs counted when the job starts, less the
    runs read). ``count_total=False``: count nothing before the first batch
    (``on_progress`` gets no total, ``already_embedded`` stays 0), as a shard
    of a sharded job does (its driver counts once for the whole job).

    ``model_id``: a registered model embeds with its own encoder and weights
    (``weights_given`` is then a usage error), any other id with v1 and
    ``weights``; the built-in v2 id is fitted on the selection on first use
    (``models.encoder_for``). ``encoder``: use this one instead.

    ``on_progress(runs_done, runs_total)`` is called after each batch is
    written (only then are the selected runs counted first). ``retries``: how
    many times in a row to reconnect after a lost connection (0: fail at
    once); ``on_retry`` is called before each wait (see ``retry.Retries``).
    Gives up with a MetabatchError that says how many runs were written.
    """
    _tune_malloc()
    started = time.perf_counter()
    historical_url = historical_url or runtime_url
    fitted = None
    if encoder is None:
        from ..models.registry import encoder_for

        encoder, fitted = encoder_for(runtime_url, historical_url, model_id, weights, weights_given, selection)
    job = _Job(runtime_url, historical_url, selection, encoder, batch_rows, on_progress, missing, count_total)
    job.embedded = embedded
    job.summary.fitted = fitted.as_dict() if fitted else None
    attempts = Retries(retries, on_retry)
    try:
        attempts.run(job.run, progress=lambda: job.summary.batches)
    except ConnectionLost as exc:
        after = attempts.describe()
        raise MetabatchError(
            f"backfill stopped{after}: {exc.message}; {job.summary.written:,} runs were written in whole batches",
            "rerun the same command to finish the job: runs already written are replaced, not duplicated"
            + ("" if retries else "; --retries N reconnects on its own"),
        ) from exc
    finally:
        job.summary.retries = attempts.made
    if job.selected is not None:
        job.summary.count_already_embedded(job.selected)
    job.summary.unseen_config_paths = sorted(getattr(encoder, "unseen_config_paths", ()))
    job.summary.elapsed_seconds = time.perf_counter() - started
    return job.summary


class _Job:
    """One backfill: its settings, the summary of the batches committed and
    their run ids, which a retry skips."""

    def __init__(self, runtime_url, historical_url, selection, encoder: Encoder, batch_rows, on_progress, missing=False, count_total=True):
        self.runtime_url, self.historical_url = runtime_url, historical_url
        self.selection, self.encoder, self.model_id = selection, encoder, encoder.model_id
        self.batch_rows, self.on_progress = batch_rows, on_progress
        self.summary = BackfillSummary(model_id=encoder.model_id, encoder=encoder.kind)
        self.shapes = ShapeCache()
        self.buffers = _VectorBuffers(batch_rows)
        self.total: int | None = None
        self.done_ids: list[pa.Array] = []  # 1M runs: about 20 MB
        self.missing, self.count_total = missing, count_total
        self.embedded: pa.Array | None = None  # --missing: the run ids that have a row already
        self.selected: int | None = None  # --missing: the runs selected when the job started

    def run(self, first: bool = True) -> None:
        """Read, embed and write the selected runs not written yet, each batch
        in its own transaction. ``first``: the job's first attempt."""
        reader_store = open_for_attempt(self.runtime_url, first)
        writer_store = None
        stages: list[Prefetch] = []
        # each thread's busy seconds (merged into the summary at the end)
        read_seconds = {"read": 0.0, "unnest": 0.0}  # the fetch and reader threads
        encode_seconds = {"unnest": 0.0, "encode": 0.0, "combine": 0.0}
        write_seconds = {"write": 0.0}
        try:
            reader_store.check_table("backtest_runs")
            embedded_of = None
            if self.missing:
                writer_store = open_for_attempt(self.historical_url, first)
                writer_store.check_table("joint_embeddings")
                if self.embedded is None and self.runtime_url.raw == self.historical_url.raw:
                    # one database: the read leaves them out itself (an anti join, no ids moved)
                    embedded_of = (JOINT_TYPE, self.model_id)
                elif self.embedded is None:
                    self.embedded = writer_store.embedded_run_ids(JOINT_TYPE, self.model_id, self.selection.shard)
            if first and self.missing and self.count_total:
                # the runs selected now; those not read by the end were embedded already
                # (the runs to read are not counted: their anti join costs as much as the read)
                self.selected = reader_store.count_runs(self.selection)
            elif self.on_progress and first and self.count_total:
                # the total is for a progress bar only: counting reads the index
                # backtest_runs_shard_run (0.1 s at 1M runs; a scan of the table without it)
                self.total = reader_store.count_runs(self.selection)
            skipped = [ids.cast(pa.string()) for ids in (self.embedded, *self.done_ids) if ids is not None and len(ids)]
            skip = pa.concat_arrays(skipped) if skipped else None
            stages.append(Prefetch(self._prepared(reader_store, skip, read_seconds, embedded_of)))
            if writer_store is None:
                # the historical store is opened while the first batch is read
                writer_store = open_for_attempt(self.historical_url, first)
                writer_store.check_table("joint_embeddings")
            if self.on_progress and first:
                self.on_progress(0, self.total)
            stages.append(Prefetch(self._embedded(stages[-1], encode_seconds)))
            stages.append(Prefetch(self._committed(stages[-1], writer_store, write_seconds)))
            for batch in stages[-1]:
                self._count(batch)
        finally:
            # On the way out (normally or not), each thread finishes the batch it
            # holds, so a batch is committed whole or not at all; then the stores close.
            stop_all(stages)
            reader_store.close()
            if writer_store is not None:
                writer_store.close()
            for seconds in (read_seconds, encode_seconds, write_seconds):
                for stage, value in seconds.items():
                    self.summary.stage_seconds[stage] += value

    def _prepared(self, store, skip: pa.Array | None, seconds: dict, embedded_of: tuple[str, str] | None = None) -> Iterator:
        """The reader thread: batches of runs with part of their work done
        (the encoder's ``prepare``), but for the runs in ``skip`` (and those with
        a row of ``embedded_of`` in the same database)."""
        con = _one_thread_duckdb()
        rows = self.batch_rows
        batches = read_runs(store, self.selection, rows, first_batch_rows(rows), last_batch_rows(rows), seconds, skip, embedded_of)
        try:
            for runs in batches:
                t0 = time.perf_counter()
                prepared = self.encoder.prepare(runs, con, self.shapes)
                seconds["unnest"] += time.perf_counter() - t0
                yield prepared
        finally:
            batches.close()  # stops the fetch thread
            con.close()

    def _embedded(self, prepared: Iterator, seconds: dict) -> Iterator:
        """The encoder thread: (run ids, EmbeddedBatch, vector buffer) per batch."""
        con = _one_thread_duckdb()
        try:
            for item in prepared:
                buffer = self.buffers.take()
                batch = self.encoder.embed(item, con, self.shapes, buffer)
                for stage, value in batch.seconds.items():
                    seconds[stage] += value
                yield item.runs.column("run_id").combine_chunks(), batch, buffer
        finally:
            con.close()

    def _committed(self, embedded: Iterator, store, seconds: dict) -> Iterator[_Committed]:
        """The writer thread: writes each batch in one transaction."""
        for run_ids, batch, buffer in embedded:
            t0 = time.perf_counter()
            written = write_batch(store, batch, self.model_id, self.selection.shard.buckets if self.selection.shard else None)
            seconds["write"] += time.perf_counter() - t0
            self.buffers.give_back(buffer)  # its rows are written: it may be filled again
            yield _Committed(run_ids, written, batch.skipped, batch.rejected)

    def _count(self, batch: _Committed) -> None:
        summary = self.summary
        summary.runs_read += len(batch.run_ids)
        summary.written += batch.written
        summary.skipped += batch.skipped
        summary.rejected.extend(batch.rejected)
        summary.batches += 1
        self.done_ids.append(batch.run_ids)
        if self.on_progress:
            self.on_progress(summary.runs_read, self.total)
