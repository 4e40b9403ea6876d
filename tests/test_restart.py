"""A PostgreSQL restart in the middle of a job, on a cluster of the tests' own
(``pg_cluster``): backfill reconnects and resumes, export starts again, and
both end as a clean run does; with the retries used up, one clear line and
exit 1; errors that are not a lost connection fail at once.

The outage starts from the job's progress callback, on the job's main
thread: the stages ahead of it are bounded, so the job cannot finish before
the server goes down.
"""

from __future__ import annotations

import json
import threading
import time

import adbc_driver_postgresql.dbapi as adbc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import pg_cluster
from helpers import embeddings, execute
from metabatch.pipeline.backfill import backfill
from metabatch.cli import main
from metabatch.errors import ConnectionLost, MetabatchError
from metabatch.stores.migrate import migrate
from metabatch.synthetic.seed import seed_runs
from metabatch.snapshot import export_parquet, read_manifest
from metabatch.stores.base import RunSelection
from metabatch.stores.postgres import connection_lost
from metabatch.urls import parse_url

N_RUNS = 4_000
BATCH = 250  # 100, 200, then 250 a batch: about 17 batches


@pytest.fixture(scope="module")
def cluster():
    reason = pg_cluster.why_not()
    if reason:
        pytest.skip(reason)
    made = pg_cluster.Cluster()
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture(scope="module")
def runs_url(cluster):
    """A database of the cluster holding N_RUNS seeded runs."""
    with adbc.connect(cluster.url(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE DATABASE restarts")
    url = cluster.url("restarts")
    migrate(parse_url(url))
    seed_runs(parse_url(url), N_RUNS, 11)
    return url


def rows_by_run(url: str) -> dict:
    """run_id -> (as_of_date, entity_scope, vector), checking there is one row per run."""
    rows = embeddings(url)
    by_run = {r["run_id"]: (r["as_of_date"], r["entity_scope"], r["vector"]) for r in rows}
    assert len(by_run) == len(rows), "duplicate rows"
    return by_run


def clean_run(url: str, **kwargs) -> tuple[dict, dict]:
    """The rows (``rows_by_run``) and the counts of a backfill with no outage."""
    execute(url, "DELETE FROM joint_embeddings")
    summary = backfill(parse_url(url), batch_rows=BATCH, **kwargs)
    assert summary.retries == 0
    return rows_by_run(url), counts(summary)


def counts(summary) -> dict:
    return {
        "runs_read": summary.runs_read, "written": summary.written, "skipped": summary.skipped,
        "rejected": sorted(summary.rejected),
    }


def outage_after(batches: int, outage):
    """An on_progress callback that calls ``outage()`` once, after ``batches`` batches."""
    state = {"calls": 0}

    def on_progress(done, total):
        state["calls"] += 1
        if state["calls"] == batches + 1:  # the first call is (0, total)
            outage()

    return on_progress


def test_backfill_reconnects_and_resumes_after_the_server_was_down(cluster, runs_url):
    want, want_counts = clean_run(runs_url)
    execute(runs_url, "DELETE FROM joint_embeddings")
    retries = []

    def down_for_a_while():
        cluster.stop()
        # back in 2.5 s: the first reconnection (after 1 s) is refused, a later one works
        threading.Timer(2.5, cluster.start).start()

    summary = backfill(
        parse_url(runs_url), batch_rows=BATCH,
        on_progress=outage_after(3, down_for_a_while),
        on_retry=lambda error, retry, seconds: retries.append((error.message, retry, seconds)),
    )
    assert rows_by_run(runs_url) == want  # same rows, same vectors, no duplicates
    assert summary.retries == len(retries) >= 2
    assert retries[0][0].startswith(f"lost the connection to `{runs_url}`")
    assert retries[1][0].startswith(f"cannot connect to `{runs_url}`")  # still down after 1 s
    assert [(retry, seconds) for _, retry, seconds in retries[:2]] == [(1, 1.0), (2, 2.0)]
    # every run is counted once, though some were read twice
    assert counts(summary) == want_counts
    assert summary.as_dict()["retries"] == summary.retries


def test_a_resumed_limit_selects_the_same_runs(cluster, runs_url):
    selection = RunSelection(limit=3_000)
    want, want_counts = clean_run(runs_url, selection=selection)
    execute(runs_url, "DELETE FROM joint_embeddings")
    summary = backfill(
        parse_url(runs_url), selection=selection, batch_rows=BATCH, on_progress=outage_after(4, cluster.restart)
    )
    assert summary.retries == 1
    assert rows_by_run(runs_url) == want
    assert counts(summary) == want_counts and summary.runs_read == 3_000


def test_giving_up_says_what_was_written_and_a_rerun_finishes(cluster, runs_url):
    want, _ = clean_run(runs_url)
    execute(runs_url, "DELETE FROM joint_embeddings")
    url = cluster.url("restarts", password="s3cret")  # trust auth: the password is never asked for
    stopped = threading.Event()

    def stop_after_two_batches():
        # the CLI runs in this process: watch the table from a thread
        while not stopped.is_set():
            with adbc.connect(runs_url, autocommit=True) as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM joint_embeddings")
                if cur.fetchall()[0][0] >= 300:
                    cluster.stop()
                    stopped.set()
                    return
            time.sleep(0.01)

    watcher = threading.Thread(target=stop_after_two_batches)
    watcher.start()
    try:
        result = CliRunner().invoke(
            main, ["backfill", "--runtime-url", url, "--batch-size", str(BATCH), "--retries", "1", "--quiet"],
            catch_exceptions=False,
        )
    finally:
        stopped.set()
        watcher.join()
    cluster.start()
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output and "s3cret" not in result.output
    written = len(embeddings(runs_url))
    assert 0 < written < len(want)
    assert f"{written:,} runs were written in whole batches" in errors[0]
    assert "after 1 retry" in errors[0] and "rerun the same command" in errors[0]
    assert "retry 1 of 1 in 1 s" in result.stderr
    rerun = CliRunner().invoke(main, ["backfill", "--runtime-url", url, "--json"], catch_exceptions=False)
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(rerun.output)["retries"] == 0
    assert rows_by_run(runs_url) == want


def test_export_starts_again_and_keeps_the_old_snapshot_until_the_new_one_is_complete(cluster, runs_url, tmp_path, monkeypatch):
    import metabatch.stores.postgres as postgres

    # small record batches, so the embeddings are still streaming when the server goes down
    monkeypatch.setattr(postgres, "_READ_BATCH_BYTES", 64 * 1024)
    clean_run(runs_url)
    clean = export_parquet(tmp_path / "clean", runs_url)
    out = tmp_path / "snap"
    export_parquet(out, runs_url, strategy_id="none such")  # an (empty) previous snapshot
    before = read_manifest(out)["snapshot_id"]
    seen = []

    def restart_once(done):
        if not seen:
            assert read_manifest(out)["snapshot_id"] == before
            cluster.restart()
        seen.append(done)

    summary = export_parquet(out, runs_url, on_progress=restart_once)
    assert summary.retries == 1 and summary.as_dict()["retries"] == 1
    assert read_manifest(out)["snapshot_id"] != before
    assert summary.embeddings == clean.embeddings and summary.runs == clean.runs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "snap"]  # the first try's build folder is gone
    assert snapshot_content(out) == snapshot_content(tmp_path / "clean")


def snapshot_content(folder) -> dict:
    """Every file's content (tables as Python rows, whatever their record batches),
    and the manifest's sections but its id, time and seconds."""
    content = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.suffix == ".parquet":
            content[name] = pq.read_table(path).to_pylist()
        elif path.suffix == ".arrow":
            content[name] = pa.ipc.open_file(path).read_all().to_pylist()
        elif path.suffix == ".npy":
            content[name] = np.load(path).tobytes()
        elif path.name == "manifest.json":
            manifest = read_manifest(folder)
            content[name] = {k: v for k, v in manifest.items() if k not in ("snapshot_id", "created_at", "export_seconds")}
    return content


def test_export_gives_up_with_the_old_snapshot_in_place(cluster, runs_url, tmp_path, monkeypatch):
    import metabatch.stores.postgres as postgres

    monkeypatch.setattr(postgres, "_READ_BATCH_BYTES", 64 * 1024)
    out = tmp_path / "snap"
    export_parquet(out, runs_url)
    before = read_manifest(out)["snapshot_id"]
    try:
        with pytest.raises(MetabatchError) as caught:
            export_parquet(out, runs_url, retries=0, on_progress=lambda done: cluster.stop())
        message = str(caught.value)
        assert message.startswith("export stopped: lost the connection to `postgresql://root@127.0.0.1:")
        assert f"the snapshot at `{out}` is unchanged" in message and "--retries N" in message
        # the first connection is not retried: a wrong URL or a stopped server is said at once
        result = CliRunner().invoke(
            main, ["export-parquet", "--historical-url", runs_url, "--out", str(out)], catch_exceptions=False
        )
        assert result.exit_code == 1
        assert "cannot connect" in result.stderr and "retry" not in result.stderr
    finally:
        cluster.start()
    assert read_manifest(out)["snapshot_id"] == before
    assert [p.name for p in tmp_path.iterdir()] == ["snap"]


def test_only_a_lost_connection_counts_as_one(cluster, runs_url):
    with adbc.connect(runs_url) as conn:
        for sql in ("SELECT * FROM no_such_table", "SELEC 1", "SELECT 1/0"):
            with pytest.raises(Exception) as caught:
                with conn.cursor() as cur:
                    cur.execute(sql)
                    cur.fetchall()
            assert not connection_lost(caught.value), sql
            conn.rollback()
        with adbc.connect(runs_url, autocommit=True) as admin, admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = 'restarts' AND pid <> pg_backend_pid()"
            )
            cur.fetchall()
        with pytest.raises(Exception) as caught:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchall()
        assert connection_lost(caught.value)


def test_a_missing_table_fails_at_once_with_retries_left(cluster, runs_url):
    with adbc.connect(cluster.url(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE DATABASE empty")
    started = time.perf_counter()
    with pytest.raises(MetabatchError, match="metabatch migrate") as caught:
        backfill(parse_url(cluster.url("empty")), retries=5)
    assert not isinstance(caught.value, ConnectionLost)
    assert time.perf_counter() - started < 5
