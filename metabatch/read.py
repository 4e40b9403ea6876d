"""Read: the selected backtest_runs as Arrow tables of a bounded size.

Takes a store and a ``RunSelection``; yields tables of at most ``batch_rows``
runs (run_id, strategy_id, universe_id, end_date, config_json, metrics_json,
the JSON as text), streaming, so memory does not grow with the number of runs.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from .stores.base import RunSelection, Store


def read_runs(store: Store, selection: RunSelection, batch_rows: int, first_rows: int | None = None) -> Iterator[pa.Table]:
    """``first_rows``: start with a smaller batch and double the size up to
    ``batch_rows``, so that a pipeline that waits for the first batches (the
    encoder, then the writer) starts sooner."""
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    size = min(first_rows or batch_rows, batch_rows)
    for batch in store.read_runs(selection):
        while batch.num_rows:
            take = min(batch.num_rows, size - pending_rows)
            pending.append(batch.slice(0, take))
            pending_rows += take
            batch = batch.slice(take)
            if pending_rows == size:
                yield pa.Table.from_batches(pending).combine_chunks()
                pending, pending_rows, size = [], 0, min(2 * size, batch_rows)
    if pending_rows:
        yield pa.Table.from_batches(pending).combine_chunks()
