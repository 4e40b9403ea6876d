"""The hand-off between the threads of a job: ``Prefetch``.

A job is a chain of iterators (read, prepare, encode, write...). Wrapping a
stage in ``Prefetch`` runs it on a thread of its own, a few items ahead of
the stage that consumes it, so the stages overlap:

    batches = Prefetch(store.read_runs(selection))        # a thread reads
    for batch in batches: ...                            # the caller works meanwhile

Items come out in order; an exception raised by the stage comes out, after
the items made before it, in the consumer. ``stop_all`` ends a chain: each
stage finishes the item it is making (a batch being written is committed
whole), drops what it holds, and its source is closed on its own thread.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Iterable, Iterator


class Stopped(Exception):
    """Raised in the consumer of a Prefetch that was stopped."""


class Prefetch:
    """Iterate over ``source`` on a thread, at most ``ahead`` items in advance
    (``ahead=None``: no limit). With ``seconds``, the time spent making items
    is added to ``seconds[key]``."""

    def __init__(self, source: Iterable, ahead: int | None = 1, seconds: dict | None = None, key: str = ""):
        self._source = source
        self._ahead = ahead
        self._seconds, self._key = seconds, key
        self._changed = threading.Condition()
        self._items: collections.deque = collections.deque()
        self._ended = False  # the source is exhausted or raised
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            iterator = iter(self._source)
            while True:
                started = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    break
                if self._seconds is not None:
                    self._seconds[self._key] += time.perf_counter() - started
                with self._changed:
                    while self._ahead is not None and len(self._items) >= self._ahead and not self._stopped:
                        self._changed.wait()
                    if self._stopped:
                        break
                    self._items.append(item)
                    self._changed.notify_all()
        except BaseException as exc:  # handed to the consumer, which re-raises it
            with self._changed:
                self._error = exc
        finally:
            # a generator is closed by the thread that ran it (its cursor, its own threads)
            close = getattr(self._source, "close", None)
            if close is not None:
                try:
                    close()
                except BaseException as exc:
                    with self._changed:
                        self._error = self._error or exc
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        with self._changed:
            while not self._items and not self._ended and not self._stopped:
                self._changed.wait()
            if self._stopped:
                raise Stopped("the job is stopping")
            if self._items:
                item = self._items.popleft()
                self._changed.notify_all()
                return item
            if self._error is not None:
                raise self._error
            raise StopIteration

    def check(self) -> None:
        """Re-raise the source's exception now, if it raised one (without waiting)."""
        with self._changed:
            if self._error is not None:
                raise self._error

    def stop(self) -> None:
        """Ask the thread to stop after the item it is making; returns at once."""
        with self._changed:
            self._stopped = True
            self._items.clear()
            self._changed.notify_all()

    def close(self) -> None:
        """Stop, then wait for the thread to end (its source closed)."""
        self.stop()
        self._thread.join()


def stop_all(stages: Iterable[Prefetch]) -> None:
    """Stop every stage of a chain, then wait for each: as all are stopped
    first, none waits for an item from another, and none takes a new one."""
    stages = list(stages)
    for stage in stages:
        stage.stop()
    for stage in stages:
        stage.close()

