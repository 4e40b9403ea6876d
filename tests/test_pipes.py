"""Prefetch: order, bounded look-ahead, exceptions handed to the consumer, and
a stop that lets the item in hand finish and closes the source on its thread."""

from __future__ import annotations

import threading
import time

import pytest

from metabatch.pipeline.pipes import Prefetch, Stopped, stop_all


class Source:
    """An iterator that records what it made, on which thread, and when it was closed."""

    def __init__(self, n: int, fail_at: int | None = None, seconds_each: float = 0.0):
        self.n, self.fail_at, self.seconds_each = n, fail_at, seconds_each
        self.made: list[int] = []
        self.finished: list[int] = []
        self.closed_on: str | None = None
        self.thread: str | None = None

    def __iter__(self):
        self.thread = threading.current_thread().name
        try:
            for i in range(self.n):
                if i == self.fail_at:
                    raise ValueError(f"item {i} is bad")
                self.made.append(i)
                time.sleep(self.seconds_each)
                self.finished.append(i)
                yield i
        finally:
            self.closed_on = threading.current_thread().name


def test_items_come_in_order_from_another_thread():
    source = Source(100)
    assert list(Prefetch(source, ahead=3)) == list(range(100))
    assert source.thread != threading.current_thread().name
    assert source.closed_on == source.thread


def test_at_most_ahead_items_are_made_before_they_are_taken():
    source = Source(1000)
    items = Prefetch(source, ahead=2)
    assert next(items) == 0
    time.sleep(0.2)
    # the one taken, two held, and one made that waits for room
    assert len(source.made) == 4
    items.close()
    assert source.closed_on == source.thread


def test_an_exception_comes_out_after_the_items_made_before_it():
    items = Prefetch(Source(10, fail_at=4), ahead=1)
    got = []
    with pytest.raises(ValueError, match="item 4 is bad"):
        for item in items:
            got.append(item)
    assert got == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        items.check()


def test_stop_lets_the_item_in_hand_finish_and_closes_the_source():
    source = Source(100, seconds_each=0.3)
    items = Prefetch(source, ahead=1)
    assert next(items) == 0
    time.sleep(0.1)  # item 1 is being made
    t0 = time.perf_counter()
    items.close()
    assert time.perf_counter() - t0 < 1.0
    assert source.finished[-1] == source.made[-1]  # nothing left half made
    assert len(source.made) <= 3
    assert source.closed_on == source.thread
    with pytest.raises(Stopped):
        next(items)


def test_stop_all_ends_a_chain_without_waiting_for_new_items():
    source = Source(10_000, seconds_each=0.01)
    first = Prefetch(source, ahead=1)
    second = Prefetch((x * 2 for x in first), ahead=1)
    third = Prefetch((x + 1 for x in second), ahead=1)
    assert next(third) == 1
    t0 = time.perf_counter()
    stop_all([first, second, third])
    assert time.perf_counter() - t0 < 1.0
    assert source.closed_on == source.thread
    made = len(source.made)
    time.sleep(0.1)
    assert len(source.made) == made  # nothing made after the stop


def test_unbounded_prefetch_takes_everything():
    source = Source(500)
    items = Prefetch(source, ahead=None)
    deadline = time.time() + 5
    while len(source.made) < 500 and time.time() < deadline:
        time.sleep(0.01)
    assert len(source.made) == 500
    assert list(items) == list(range(500))


def test_seconds_counts_the_time_spent_making_items():
    seconds = {"read": 0.0}
    assert list(Prefetch(Source(5, seconds_each=0.02), seconds=seconds, key="read")) == [0, 1, 2, 3, 4]
    assert seconds["read"] >= 0.09
