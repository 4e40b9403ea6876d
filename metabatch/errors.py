"""Errors metabatch raises on purpose; the CLI turns them into one-line messages.

Every message says what went wrong and what to do next; none contains a
password (URLs are always shown redacted).
"""

from __future__ import annotations


class MetabatchError(Exception):
    """The job could not run (exit status 1). ``hint`` says what to do next."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __reduce__(self):
        # pickled whole (a shard's error comes back from a Ray worker), the hint included
        return (_rebuild, (type(self), self.message, self.hint, self.__dict__))


def _rebuild(cls, message, hint, state):
    error = Exception.__new__(cls)
    MetabatchError.__init__(error, message, hint)
    error.__dict__.update(state)
    return error


class StoreUnreachable(MetabatchError):
    """The database named by a URL cannot be reached or opened."""


class ConnectionLost(StoreUnreachable):
    """The connection to a database was lost, or could not be made again, for a
    reason that may pass: a server restart or failover, a dropped connection.
    A job may reconnect and go on (see ``retry``)."""


class MissingTable(MetabatchError):
    """A table the command needs does not exist, or lacks a column."""


class BadURL(MetabatchError):
    """A database URL metabatch cannot use (unknown scheme, no path)."""


class BadInput(MetabatchError):
    """A value given by the user cannot be used (a usage error: exit status 2)."""

    exit_code = 2
