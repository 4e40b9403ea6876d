"""Read: the selected backtest_runs as Arrow tables of a bounded size.

Takes a store and a ``RunSelection``; yields tables of at most ``batch_rows``
runs (run_id, strategy_id, universe_id, end_date, config_json, metrics_json,
the JSON as text), streaming, so memory does not grow with the number of runs.

A thread of its own fetches the store's record batches, a bounded number
ahead, so that the database goes on sending while the caller works on a
batch. That read-ahead also shows the end of the runs before the last batches
are cut: the runs left are then cut in halves, down to ``last_rows``, because
the last batch of a pipeline is encoded and written with nothing to overlap it.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Iterator

import pyarrow as pa

from .pipes import DONE, discard, pump
from .stores.base import RunSelection, Store

# Record batches fetched ahead of the caller (a PostgreSQL store sends 4 MB
# ones, about 3,000 runs each).
FETCH_AHEAD_BATCHES = 16


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
) -> Iterator[pa.Table]:
    """``first_rows``: start with a smaller batch and double the size up to
    ``batch_rows``, so that a pipeline that waits for the first batches (the
    encoder, then the writer) starts sooner. ``last_rows``: the smallest batch
    the runs left are halved down to at the end (by default ``batch_rows``,
    which turns halving off)."""
    last_rows = batch_rows if last_rows is None else max(1, min(last_rows, batch_rows))
    fetched: queue.Queue = queue.Queue(maxsize=FETCH_AHEAD_BATCHES)
    stop = threading.Event()
    source = store.read_runs(selection)
    fetcher = threading.Thread(target=_fetch, args=(source, fetched, stop), daemon=True)
    fetcher.start()
    try:
        buffered: collections.deque[pa.RecordBatch] = collections.deque()
        buffered_rows = 0
        ended = False
        size = min(first_rows or batch_rows, batch_rows)

        def take(block: bool) -> bool:
            """Move one fetched record batch to ``buffered``; False if none was waiting."""
            nonlocal buffered_rows, ended
            try:
                item = fetched.get(block=block)
            except queue.Empty:
                return False
            if item is DONE:
                ended = True
            elif isinstance(item, BaseException):
                raise item
            elif item.num_rows:
                buffered.append(item)
                buffered_rows += item.num_rows
            return True

        while True:
            # what has arrived, up to a batch beyond this one: enough to see the end coming
            while not ended and buffered_rows < size + batch_rows and take(block=False):
                pass
            while not ended and buffered_rows < size:
                take(block=True)
            if not buffered_rows:
                return
            want = min(buffered_rows, next_batch_rows(size, buffered_rows, ended, last_rows))
            parts, got = [], 0
            while got < want:
                batch = buffered.popleft()
                if got + batch.num_rows > want:
                    buffered.appendleft(batch.slice(want - got))
                    batch = batch.slice(0, want - got)
                parts.append(batch)
                got += batch.num_rows
            buffered_rows -= got
            yield pa.Table.from_batches(parts).combine_chunks()
            size = min(2 * size, batch_rows)
    finally:
        stop.set()
        while fetcher.is_alive():
            discard(fetched)  # a fetcher blocked on a full queue sees stop
            fetcher.join(timeout=0.05)


def _fetch(source: Iterator[pa.RecordBatch], out: queue.Queue, stop: threading.Event) -> None:
    """The fetch thread: the store's record batches into ``out``; the store's
    cursor is closed by this thread, the one that used it."""
    try:
        pump(source, out, stop)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
