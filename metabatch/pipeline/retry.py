"""Going on after a lost database connection: a server restart, a failover,
a dropped connection (``ConnectionLost``, which the stores raise).

A job runs in attempts: ``Retries.run(attempt)`` calls ``attempt(first)``
and, when it raises ``ConnectionLost``, waits (1 s, 2 s, 4 s... at most 30 s)
and calls it again, up to ``limit`` times in a row. The job decides what an
attempt redoes (a backfill resumes with the runs not yet written, an export
starts over). A connection that cannot be made on the first attempt is not
retried: that is most often a wrong URL or a stopped server, which waiting
does not fix. Any other error ends the job at once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, TypeVar

from ..errors import ConnectionLost, StoreUnreachable
from ..urls import DatabaseURL

if TYPE_CHECKING:
    from ..stores import Store

DEFAULT_RETRIES = 5
MAX_WAIT_SECONDS = 30.0

T = TypeVar("T")


def wait_seconds(retry: int) -> float:
    """The wait before the ``retry``-th retry in a row (1, 2, ...): 1 s, doubling, at most 30 s."""
    return min(MAX_WAIT_SECONDS, 2.0 ** (retry - 1))


def open_for_attempt(url: DatabaseURL, first: bool, read_only: bool = False) -> Store:
    """``open_store``; on a job's first attempt a connection that cannot be made
    is a plain StoreUnreachable (not retried), on later ones a ConnectionLost."""
    from ..stores import open_store  # here, so that the CLI imports this module cheaply

    try:
        return open_store(url, read_only=read_only)
    except ConnectionLost as exc:
        if first:
            raise StoreUnreachable(exc.message, exc.hint) from None
        raise


class Retries:
    """The retries of one job: at most ``limit`` in a row, the count starting
    over once an attempt has made progress. ``on_retry(error, retry, seconds)``
    is called before each wait (``retry``: its number in the row)."""

    def __init__(self, limit: int, on_retry: Callable[[ConnectionLost, int, float], None] | None = None):
        self.limit = limit
        self.on_retry = on_retry
        self.made = 0  # retries in all
        self.waited = 0.0  # seconds

    def describe(self) -> str:
        """For a message: ' after 2 retries (3 s)', or '' when none was made."""
        if not self.made:
            return ""
        return f" after {self.made} {'retry' if self.made == 1 else 'retries'} ({self.waited:.0f} s)"

    def run(self, attempt: Callable[[bool], T], progress: Callable[[], int] = lambda: 0) -> T:
        """``attempt(first)``'s result; raises the last ConnectionLost once ``limit``
        retries in a row have failed. ``progress()``: a number that grows as the
        job gets work done (for a backfill, the batches committed)."""
        in_a_row = 0
        first = True
        while True:
            before = progress()
            try:
                return attempt(first)
            except ConnectionLost as exc:
                if progress() > before:
                    in_a_row = 0
                if in_a_row >= self.limit:
                    raise
                in_a_row += 1
                self.made += 1
                seconds = wait_seconds(in_a_row)
                if self.on_retry is not None:
                    self.on_retry(exc, in_a_row, seconds)
                time.sleep(seconds)
                self.waited += seconds
            first = False
