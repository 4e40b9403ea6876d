"""Shared fixtures: real PostgreSQL databases made and dropped per test session/test."""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the whole session, on the loopback address only: a
    head node with no CPU (the GCS, the driver's tracker) and three nodes of one
    CPU each, which run the shards. The test process is its driver. Shut down
    (every Ray process ended) at the end of the session."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    previous = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node and the GCS on 127.0.0.1
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        import logging

        ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
        yield cluster
    finally:
        session = cluster.head_node.get_session_dir_path() if cluster.head_node else None
        ray.shutdown()
        cluster.shutdown()
        if session:
            left = _processes_naming(os.path.basename(session))
            shutil.rmtree(session, ignore_errors=True)  # the logs of this session's Ray processes
        if previous is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = previous
        if session:
            assert not left, f"Ray processes left behind: {left}"


def _processes_naming(text: str, seconds: float = 10.0) -> list[int]:
    """The processes whose command line holds ``text`` (a Ray session's name:
    every process of the session has it), once those that are ending are gone."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit() and int(pid) != os.getpid():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if text.encode() in f.read():
                            found.append(int(pid))
                except OSError:
                    pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
