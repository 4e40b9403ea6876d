"""Read: the selected backtest_runs as Arrow tables of a bounded size.

Takes a store and a ``RunSelection``; yields tables of at most ``batch_rows``
runs (run_id, strategy_id, universe_id, end_date, config_json, metrics_json,
the JSON as text), streaming, so memory does not grow with the number of runs.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from .stores.base import RunSelection, Store


def read_runs(store: Store, selection: RunSelection, batch_rows: int) -> Iterator[pa.Table]:
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for batch in store.read_runs(selection):
        while batch.num_rows:
            take = min(batch.num_rows, batch_rows - pending_rows)
            pending.append(batch.slice(0, take))
            pending_rows += take
            batch = batch.slice(take)
            if pending_rows == batch_rows:
                yield pa.Table.from_batches(pending).combine_chunks()
                pending, pending_rows = [], 0
    if pending_rows:
        yield pa.Table.from_batches(pending).combine_chunks()
