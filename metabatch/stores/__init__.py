"""Stores: where backtest_runs are read and joint_embeddings written."""

from __future__ import annotations

from ..urls import DatabaseURL
from .base import EMBEDDING_COLUMNS, RUN_COLUMNS, RunSelection, Store


def open_store(url: DatabaseURL, read_only: bool = False) -> Store:
    """A store for the URL's scheme (postgresql:// or duckdb://)."""
    if url.scheme == "postgresql":
        from .postgres import PostgresStore

        return PostgresStore(url)
    from .duckdb_store import DuckDBStore

    return DuckDBStore(url, read_only=read_only)


__all__ = ["open_store", "Store", "RunSelection", "RUN_COLUMNS", "EMBEDDING_COLUMNS"]
