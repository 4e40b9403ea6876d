"""Database URLs: parsing, choosing (flag, environment, default) and redacting."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from .errors import BadURL

RUNTIME_ENV = "METABATCH_RUNTIME_URL"
HISTORICAL_ENV = "METABATCH_HISTORICAL_URL"
DEFAULT_DUCKDB_FILE = "metabatch.duckdb"


@dataclass(frozen=True)
class DatabaseURL:
    """A parsed database URL. ``str()`` and ``repr()`` never show the password."""

    raw: str
    scheme: str  # "postgresql" or "duckdb"

    @property
    def redacted(self) -> str:
        return redact(self.raw)

    @property
    def duckdb_path(self) -> str:
        """For duckdb:// URLs, the file path: what follows ``duckdb://``.

        ``duckdb:///data/runs.duckdb`` is the absolute path /data/runs.duckdb;
        ``duckdb://runs.duckdb`` is relative to the current directory.
        """
        return self.raw[len("duckdb://"):]

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"DatabaseURL({self.redacted!r})"


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    host = netloc[1] if len(netloc) == 2 else ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


def parse_url(url: str) -> DatabaseURL:
    """Validate a URL's scheme; BadURL names the URL (redacted) when it is not usable."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        return DatabaseURL(url, "postgresql")
    if scheme == "duckdb":
        if not url[len("duckdb://"):]:
            raise BadURL(f"`{redact(url)}` names no file", "write duckdb:///path/to/file.duckdb")
        return DatabaseURL(url, "duckdb")
    if "://" not in url and url.endswith((".duckdb", ".db")):
        raise BadURL(f"`{redact(url)}` is not a database URL metabatch knows", f"write duckdb://{url}")
    raise BadURL(
        f"`{redact(url)}` is not a database URL metabatch knows",
        "use postgresql://user@host:5432/dbname or duckdb:///path/to/file.duckdb",
    )


@dataclass(frozen=True)
class Resolved:
    runtime: DatabaseURL
    historical: DatabaseURL
    defaulted: bool  # neither flag nor environment named a database


def resolve_urls(runtime: str | None, historical: str | None) -> Resolved:
    """Flag, then environment variable; historical defaults to runtime; then the embedded file."""
    runtime = runtime or os.environ.get(RUNTIME_ENV) or None
    historical = historical or os.environ.get(HISTORICAL_ENV) or None
    defaulted = runtime is None and historical is None
    if defaulted:
        runtime = f"duckdb://{DEFAULT_DUCKDB_FILE}"
    runtime_url = parse_url(runtime or historical)
    historical_url = parse_url(historical) if historical else runtime_url
    return Resolved(runtime_url, historical_url, defaulted)
