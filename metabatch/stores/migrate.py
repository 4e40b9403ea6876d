"""Migrate: create or upgrade the tables metabatch needs, as recorded steps.

Takes the runtime and historical URLs; applies the pending SQL steps of
``migrations/<backend>/runtime`` (backtest_runs) and ``.../historical``
(joint_embeddings), each step once, recorded in ``metabatch_migrations``.
Steps only create what is missing: user data is never dropped or rewritten.
"""

from __future__ import annotations

from . import open_store
from ..urls import DatabaseURL


def migrate(runtime_url: DatabaseURL, historical_url: DatabaseURL | None = None) -> dict[str, list[str]]:
    """Returns the steps applied, per database (redacted URL -> step names)."""
    historical_url = historical_url or runtime_url
    applied: dict[str, list[str]] = {}
    parts = [(runtime_url, "runtime"), (historical_url, "historical")]
    for url, part in parts:
        store = open_store(url)
        try:
            applied.setdefault(url.redacted, []).extend(store.migrate(part))
        finally:
            store.close()
    return applied
