"""read_runs: batch sizes, order, the fetch thread, and the halved last batches."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from metabatch.pipeline.read import next_batch_rows, read_runs
from metabatch.stores.base import RunSelection


class ListStore:
    """A store whose runs are record batches held in memory (read_runs' only need)."""

    def __init__(self, batches: list[pa.RecordBatch], fail_after: int | None = None):
        self.batches = batches
        self.fail_after = fail_after
        self.closed = threading.Event()
        self.fetched = 0

    def read_runs(self, selection, skip=None, embedded=None):
        try:
            for batch in self.batches:
                if self.fail_after is not None and self.fetched == self.fail_after:
                    raise RuntimeError("connection lost")
                self.fetched += 1
                yield batch
        finally:
            self.closed.set()


def record_batches(total: int, rows_each: int) -> list[pa.RecordBatch]:
    ids = [f"R{i:07d}" for i in range(total)]
    return [pa.record_batch({"run_id": ids[i : i + rows_each]}) for i in range(0, total, rows_each)]


def schedule(total: int, batch: int, first: int, last: int) -> list[int]:
    """The sizes next_batch_rows gives when the end is in sight from the start."""
    sizes, size, left = [], first, total
    while left:
        take = min(left, next_batch_rows(size, left, True, last))
        sizes.append(take)
        left -= take
        size = min(2 * size, batch)
    return sizes


@given(
    total=st.integers(1, 200_000),
    batch=st.integers(100, 30_000),
    first_part=st.integers(1, 10),
    last_part=st.integers(1, 20),
)
def test_the_sizes_cover_every_run_and_keep_within_the_batch_size(total, batch, first_part, last_part):
    first, last = max(1, batch // first_part), max(1, batch // last_part)
    sizes = schedule(total, batch, first, last)
    assert sum(sizes) == total
    assert all(0 < s <= batch for s in sizes)
    assert sizes[-1] <= max(2 * last, first)  # the last batch is a small one
    # past the first batches, the sizes only shrink
    tail = sizes[next((i for i, s in enumerate(sizes) if s < min(batch, first * 2 ** i)), len(sizes)) :]
    assert tail == sorted(tail, reverse=True)


def test_halving_stops_at_last_rows_and_is_off_when_last_rows_is_the_batch_size():
    assert schedule(100_000, 25_000, 25_000, 2_500) == [25_000, 25_000, 25_000, 12_500, 6_250, 3_125, 3_125]
    assert schedule(100_000, 25_000, 25_000, 25_000) == [25_000] * 4
    assert schedule(60_000, 25_000, 25_000, 25_000) == [25_000, 25_000, 10_000]
    assert next_batch_rows(25_000, 1_000_000, False, 2_500) == 25_000  # end not in sight


def test_read_runs_halves_the_last_batches_once_the_end_is_fetched():
    # batches of 10,000: the fetch thread holds up to 15,000 runs ahead
    store = ListStore(record_batches(40_000, 1_000))
    seconds = {"read": 0.0}
    batches = read_runs(store, RunSelection(), 10_000, first_rows=1_000, last_rows=1_000, seconds=seconds)
    tables = []
    while True:
        time.sleep(0.1)  # the fetch thread catches up: it holds all it may
        table = next(batches, None)
        if table is None:
            break
        tables.append(table)
    sizes = [t.num_rows for t in tables]
    # the end shows once the last 5,000 runs are all that is held: they are halved
    assert sizes == [1_000, 2_000, 4_000, 8_000, 10_000, 10_000, 2_500, 1_250, 1_250]
    ids = [i for t in tables for i in t.column("run_id").to_pylist()]
    assert ids == [f"R{i:07d}" for i in range(40_000)]  # every run once, in order
    assert store.closed.is_set()
    assert seconds["read"] > 0  # the fetch thread's time


def test_the_fetch_thread_holds_at_most_a_batch_and_a_half_ahead():
    store = ListStore(record_batches(100_000, 500))
    batches = read_runs(store, RunSelection(), 2_000)
    next(batches)
    time.sleep(0.2)
    assert store.fetched * 500 <= 2_000 + 3_000 + 500  # the batch taken, 1.5 batches held, one being added
    batches.close()


def test_read_runs_hands_on_a_fetch_error_and_closes_the_source():
    store = ListStore(record_batches(10_000, 1_000), fail_after=4)
    with pytest.raises(RuntimeError, match="connection lost"):
        list(read_runs(store, RunSelection(), 2_000))
    assert store.closed.wait(2)


def test_closing_read_runs_early_stops_the_fetch_thread_and_closes_the_source():
    store = ListStore(record_batches(200_000, 500))  # far more than the fetch thread holds ahead
    batches = read_runs(store, RunSelection(), 1_000)
    next(batches)
    batches.close()
    assert store.closed.wait(2)
