"""Backfill: backtest_runs -> joint_embeddings, in streamed batches.

``backfill(...)`` reads the selected runs from the runtime store, embeds each
batch (unnest, encode, combine: see ``embed``) and writes it to the historical
store in its own transaction. Reading, embedding and writing overlap: the
runs are fetched on a thread of their own (``read_runs``), a reader thread
cuts them into batches and does part of each batch's work (``prepare_runs``)
and a writer thread commits the previous batch while the main thread encodes
(the database does most of the reading and writing work, so the two cores are
kept busy). The last batches are smaller (``last_batch_rows``). Returns a
``BackfillSummary``.
"""

from __future__ import annotations

import ctypes
import functools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import duckdb
import numpy as np

from .embed import DEFAULT_MODEL_ID, EmbeddedBatch, Weights
from .encode import DIM
from .encoders.base import Encoder
from .pipes import DONE, consume, discard, pump
from .read import read_runs
from .stores import open_store
from .stores.base import RunSelection
from .unnest import ShapeCache
from .urls import DatabaseURL
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
    elapsed_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(
        default_factory=lambda: {"read": 0.0, "unnest": 0.0, "encode": 0.0, "combine": 0.0, "write": 0.0}
    )
    model_id: str = DEFAULT_MODEL_ID
    encoder: str = "v1"
    fitted: dict | None = None  # the fit's summary when the model was fitted on first use
    unseen_config_paths: list[str] = field(default_factory=list)  # v2: config paths the fit did not see

    @property
    def runs_per_second(self) -> float:
        return self.runs_read / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def as_dict(self, max_rejected: int | None = None) -> dict:
        rejected = self.rejected if max_rejected is None else self.rejected[:max_rejected]
        return {
            "runs_read": self.runs_read,
            "written": self.written,
            "skipped": self.skipped,
            "rejected": len(self.rejected),
            "rejected_runs": [{"run_id": r, "reason": why} for r, why in rejected],
            "batches": self.batches,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "runs_per_second": round(self.runs_per_second, 1),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "model_id": self.model_id,
            "encoder": self.encoder,
            "fitted_now": self.fitted,
            "unseen_config_paths": self.unseen_config_paths,
        }


def backfill(
    runtime_url: DatabaseURL,
    historical_url: DatabaseURL | None = None,
    selection: RunSelection = RunSelection(),
    weights: Weights = Weights(),
    model_id: str = DEFAULT_MODEL_ID,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    on_progress: Callable[[int, int | None], None] | None = None,
    weights_given: bool = False,
    encoder: Encoder | None = None,
) -> BackfillSummary:
    """Embed the selected runs and write them; see the module docstring.

    ``model_id``: a registered model embeds with its own encoder and weights
    (``weights_given`` is then a usage error), any other id with v1 and
    ``weights``; the built-in v2 id is fitted on the selection on first use
    (``models.encoder_for``). ``encoder``: use this one instead.
    ``on_progress(runs_done, runs_total)`` is called after each batch is
    written (only then are the selected runs counted first).
    """
    historical_url = historical_url or runtime_url
    _tune_malloc()
    summary = BackfillSummary()
    started = time.perf_counter()
    if encoder is None:
        from .models import encoder_for

        encoder, fitted = encoder_for(runtime_url, historical_url, model_id, weights, weights_given, selection)
        summary.fitted = fitted.as_dict() if fitted else None
    model_id = encoder.model_id
    summary.model_id, summary.encoder = model_id, encoder.kind
    reader_store = open_store(runtime_url)
    writer_store = None
    con = _one_thread_duckdb()
    shapes = ShapeCache()
    buffers = _VectorBuffers(batch_rows)
    stop = threading.Event()
    read_queue: queue.Queue = queue.Queue(maxsize=1)
    write_queue: queue.Queue = queue.Queue(maxsize=1)
    write_results: queue.Queue = queue.Queue()
    reader = writer = None
    reader_seconds = {"read": 0.0, "unnest": 0.0}  # the fetch and reader threads' own (merged at the end)
    try:
        # the total is for a progress bar only: counting costs a scan of the
        # runs before the first batch (3.7 s of a 50 s job at 1M runs)
        reader_store.check_table("backtest_runs")
        total = reader_store.count_runs(selection) if on_progress else None

        def read_and_prepare():
            # the reader thread also does part of each batch's work (prepare_runs)
            prepare_con = _one_thread_duckdb()
            batches = read_runs(
                reader_store, selection, batch_rows, first_batch_rows(batch_rows), last_batch_rows(batch_rows), reader_seconds
            )
            try:
                for runs in batches:
                    t0 = time.perf_counter()
                    prepared = encoder.prepare(runs, prepare_con, shapes)
                    reader_seconds["unnest"] += time.perf_counter() - t0
                    yield prepared
            finally:
                batches.close()  # stops the fetch thread
                prepare_con.close()

        reader = threading.Thread(target=pump, args=(read_and_prepare(), read_queue, stop), daemon=True)
        reader.start()
        # the historical store is opened while the first batch is read
        writer_store = open_store(historical_url)
        writer_store.check_table("joint_embeddings")
        if on_progress:
            on_progress(0, total)

        def write_loop() -> None:
            while True:
                item = write_queue.get()
                if item is DONE:
                    return
                item, buffer = item
                t0 = time.perf_counter()
                try:
                    written = write_batch(writer_store, item, model_id)
                except BaseException as exc:
                    write_results.put(exc)
                    return
                buffers.give_back(buffer)  # its rows are written: it may be filled again
                summary.stage_seconds["write"] += time.perf_counter() - t0
                write_results.put((written, item.rows.num_rows + item.skipped + len(item.rejected)))

        writer = threading.Thread(target=write_loop, daemon=True)
        writer.start()
        done = 0
        pending_writes = 0

        def collect(block: bool) -> None:
            nonlocal done, pending_writes
            while pending_writes:
                try:
                    result = write_results.get(block=block)
                except queue.Empty:
                    return
                pending_writes -= 1
                if isinstance(result, BaseException):
                    raise result
                written, runs = result
                summary.written += written
                done += runs
                if on_progress:
                    on_progress(done, total)

        for item in consume(read_queue):
            buffer = buffers.take()
            batch: EmbeddedBatch = encoder.embed(item, con, shapes, buffer)
            for stage, seconds in batch.seconds.items():
                summary.stage_seconds[stage] += seconds
            summary.runs_read += item.runs.num_rows
            summary.skipped += batch.skipped
            summary.rejected.extend(batch.rejected)
            summary.batches += 1
            collect(block=False)
            write_queue.put((batch, buffer))
            pending_writes += 1
        write_queue.put(DONE)
        collect(block=True)
        writer.join()
    finally:
        # On the way out (normally or not), let each thread finish the batch it
        # holds, so a batch is committed whole or not at all, then close.
        stop.set()
        for thread, q, sentinel in ((writer, write_queue, True), (reader, read_queue, False)):
            while thread is not None and thread.is_alive():
                discard(q)
                if sentinel:
                    try:
                        q.put_nowait(DONE)
                    except queue.Full:
                        pass
                thread.join(timeout=0.1)
        con.close()
        reader_store.close()
        if writer_store is not None:
            writer_store.close()
    for stage, seconds in reader_seconds.items():
        summary.stage_seconds[stage] += seconds
    summary.unseen_config_paths = sorted(getattr(encoder, "unseen_config_paths", ()))
    summary.elapsed_seconds = time.perf_counter() - started
    return summary

