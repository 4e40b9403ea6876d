"""Shared fixtures: real PostgreSQL databases made and dropped per test session/test."""

from __future__ import annotations

import os
import uuid

import adbc_driver_postgresql.dbapi as adbc
import duckdb
import polars
import pyarrow
import pytest

PG_SERVER = os.environ.get("METABATCH_TEST_PG", "postgresql://root@127.0.0.1:5432")


def pytest_report_header(config):
    return [f"duckdb {duckdb.__version__}, polars {polars.__version__}, pyarrow {pyarrow.__version__}, postgres {PG_SERVER}"]


def _admin():
    return adbc.connect(f"{PG_SERVER}/postgres", autocommit=True)


def make_database(prefix: str = "mbtest") -> str:
    """Create an empty database; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _admin() as conn, conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_SERVER}/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with _admin() as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database for one test."""
    url = make_database()
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture(scope="session")
def pg_session_url():
    """One empty PostgreSQL database shared by a whole test session (read-mostly tests)."""
    url = make_database("mbsession")
    try:
        yield url
    finally:
        drop_database(url)


def pg_query(url: str, sql: str, params=None) -> list[tuple]:
    """Run one statement on a database and return its rows (committed)."""
    with adbc.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        try:
            return cur.fetchall()
        except Exception:
            return []
