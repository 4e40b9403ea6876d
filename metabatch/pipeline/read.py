"""Read: the selected backtest_runs as Arrow tables of a bounded size.

Takes a store and a ``RunSelection``; yields tables of at most ``batch_rows``
runs (run_id, strategy_id, universe_id, end_date, config_json, metrics_json,
the JSON as text), streaming, so memory does not grow with the number of runs.

A thread of its own fetches the store's record batches, up to half a batch
beyond the one being cut (at most a batch and a half of runs are held), so
that the database goes on sending while the caller works on a batch. That read-ahead
also shows the end of the runs before the last batches are cut: the runs left
are then cut in halves, down to ``last_rows``, because the last batch of a
pipeline is encoded and written with nothing to overlap it.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Iterator

import pyarrow as pa

from ..stores.base import RunSelection, Store


def next_batch_rows(size: int, rows_left: int, ended: bool, last_rows: int) -> int:
    """How many runs the next batch takes, at most ``size``: ``size`` while the
    end of the runs is not in sight; once it is (``ended``, ``rows_left`` runs
    left), about half of what is left, down to ``last_rows``, and then all of
    it (at most twice ``last_rows``)."""
    if not ended:
        return size
    if rows_left <= 2 * last_rows:
        return min(size, rows_left)
    return min(size, max(last_rows, (rows_left + 1) // 2))


def read_runs(
    store: Store,
    selection: RunSelection,
    batch_rows: int,
    first_rows: int | None = None,
    last_rows: int | None = None,
    seconds: dict | None = None,
    skip: pa.Array | None = None,
    embedded: tuple[str, str] | None = None,
) -> Iterator[pa.Table]:
    """``first_rows``: start with a smaller batch and double the size up to
    ``batch_rows``, so that a pipeline that waits for the first batches (the
    encoder, then the writer) starts sooner. ``last_rows``: the smallest batch
    the runs left are halved down to at the end (by default ``batch_rows``,
    which turns halving off). ``seconds``: the fetch thread adds the time it
    spends getting record batches from the store to ``seconds["read"]``.
    ``skip``: run ids not to read; ``embedded``: leave out the runs with a row
    of this (joint_type, model_id) (see ``Store.read_runs``)."""
    last_rows = batch_rows if last_rows is None else max(1, min(last_rows, batch_rows))
    runs = store.read_runs(selection, skip, embedded)
    ahead = _ReadAhead(runs, batch_rows + batch_rows // 2, seconds)
    try:
        size = min(first_rows or batch_rows, batch_rows)
        while True:
            parts = ahead.take(size, last_rows)
            if not parts:
                return
            yield pa.Table.from_batches(parts).combine_chunks()
            size = min(2 * size, batch_rows)
    finally:
        ahead.close()


class _ReadAhead:
    """A fetch thread's record batches, held until taken: at most ``limit_rows``
    runs (the fetch thread waits while that many are held).

    Not a ``pipes.Prefetch``: what it holds is bounded in runs, not in record
    batches, and ``take`` cuts a batch from what is held, sized by how many
    runs are held and whether the end is among them."""

    def __init__(self, source: Iterator[pa.RecordBatch], limit_rows: int, seconds: dict | None):
        self.source, self.limit_rows, self.seconds = source, limit_rows, seconds
        self.changed = threading.Condition()
        self.held: collections.deque[pa.RecordBatch] = collections.deque()
        self.rows = 0
        self.ended = False
        self.error: BaseException | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._fetch, daemon=True)
        self.thread.start()

    def _fetch(self) -> None:
        try:
            batches = iter(self.source)
            while True:
                with self.changed:
                    while self.rows >= self.limit_rows and not self.stopped:
                        self.changed.wait()
                    if self.stopped:
                        return
                started = time.perf_counter()
                batch = next(batches, None)
                if self.seconds is not None:
                    self.seconds["read"] += time.perf_counter() - started
                with self.changed:
                    if batch is None:
                        self.ended = True
                    elif batch.num_rows:
                        self.held.append(batch)
                        self.rows += batch.num_rows
                    self.changed.notify_all()
                if batch is None:
                    return
        except BaseException as exc:  # handed to the reader, which re-raises it
            with self.changed:
                self.error = exc
                self.changed.notify_all()
        finally:
            # the store's cursor is closed by the thread that used it
            close = getattr(self.source, "close", None)
            if close is not None:
                close()

    def take(self, size: int, last_rows: int) -> list[pa.RecordBatch]:
        """The record batches (sliced to fit) of the next batch of runs, whose
        size ``next_batch_rows`` gives from what is held now; [] at the end."""
        with self.changed:
            while self.rows < size and not self.ended and self.error is None:
                self.changed.wait()
            if self.error is not None:
                raise self.error
            want = min(self.rows, next_batch_rows(size, self.rows, self.ended, last_rows))
            parts, got = [], 0
            while got < want:
                batch = self.held.popleft()
                if got + batch.num_rows > want:
                    self.held.appendleft(batch.slice(want - got))
                    batch = batch.slice(0, want - got)
                parts.append(batch)
                got += batch.num_rows
            self.rows -= got
            self.changed.notify_all()
            return parts

    def close(self) -> None:
        """Stop the fetch thread (after the record batch it is fetching, if any)."""
        with self.changed:
            self.stopped = True
            self.changed.notify_all()
        self.thread.join()
