"""Hand-offs between the threads of a job: a producer thread feeds a queue,
the consumer takes items until DONE, and an exception in the producer is
re-raised in the consumer."""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterable, Iterator

DONE = object()  # end of a queue's items


def pump(source: Iterable, out: queue.Queue, stop: threading.Event, seconds: dict | None = None, key: str = "") -> None:
    """Put the items of ``source`` into ``out``, then DONE; an exception goes in as an item.

    Stops early (without DONE) once ``stop`` is set. With ``seconds``, adds the
    time spent producing items to ``seconds[key]``.
    """
    try:
        iterator = iter(source)
        while not stop.is_set():
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                break
            if seconds is not None:
                seconds[key] += time.perf_counter() - started
            out.put(item)
        else:
            return
    except BaseException as exc:  # handed to the consumer, which re-raises it
        out.put(exc)
        return
    out.put(DONE)


def consume(q: queue.Queue) -> Iterator:
    """The items ``pump`` puts into ``q``, up to DONE; re-raises a producer's exception."""
    while True:
        item = q.get()
        if item is DONE:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def discard(q: queue.Queue) -> None:
    """Empty ``q`` without waiting (to unblock a producer on the way out)."""
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
