"""Jobs sharded over a Ray cluster (`--ray`), on the session's local cluster of
three one-CPU nodes (conftest's ``ray_cluster``) against the real PostgreSQL:
a Ray backfill writes what a local one writes (v1, v2, rejected runs); a node
lost in the middle of a backfill costs a shard run again, never a duplicate;
`fit --ray` registers the local fit's model; `export-parquet --ray` gives a
snapshot that answers as the local one; `--missing` with --ray; the usage
errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import adbc_driver_postgresql.dbapi as adbc
import pytest
from click.testing import CliRunner

from conftest import drop_database, make_database
from helpers import embeddings, execute
from metabatch.pipeline.backfill import backfill
from metabatch.cli import main
from metabatch.stores.migrate import migrate
from metabatch.models import fit
from metabatch.synthetic.seed import seed_runs
from metabatch.stores import open_store
from metabatch.urls import parse_url
from runs_data import runs_table

pytest.importorskip("ray")

V1 = "joint-meta-config-env-v1"
V2 = "ray-v2"
N_RUNS = 1500


def _make(seed_kind: str = "campaigns") -> str:
    """A database with N_RUNS seeded runs and the hand-written tricky runs (some rejected)."""
    url = make_database("mbray")
    migrate(parse_url(url))
    seed_runs(parse_url(url), N_RUNS, 5, kind=seed_kind)
    store = open_store(parse_url(url))
    try:
        store.insert_runs(runs_table())
    finally:
        store.close()
    return url


@pytest.fixture(scope="module")
def twin_databases():
    """Two databases holding the same runs: one for local jobs, one for Ray jobs."""
    local, on_ray = _make(), _make()
    try:
        yield local, on_ray
    finally:
        drop_database(local)
        drop_database(on_ray)


def rows_by_run(url: str, model: str) -> dict:
    """run_id -> (vector, entity_scope, as_of_date), checking one row per run."""
    rows = embeddings(url, model)
    out = {r["run_id"]: (r["vector"], r["entity_scope"], r["as_of_date"]) for r in rows}
    assert len(out) == len(rows), "duplicate rows"
    return out


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result


def test_fit_backfill_and_export_on_ray_equal_the_local_jobs(ray_cluster, twin_databases, tmp_path):
    local, on_ray = twin_databases
    # fit: the merged shard samples are the local sample, so the same model
    local_fit = fit(parse_url(local), parse_url(local), V2)
    result = invoke("fit", "--runtime-url", on_ray, "--ray", "auto", "--shards", "5", "--joint-model-id", V2, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["content_hash"] == local_fit.content_hash

    # backfill, v1 and v2: the same rows, the same rejected runs
    for model in (V1, V2):
        want = backfill(parse_url(local), model_id=model, batch_rows=200)
        result = invoke("backfill", "--runtime-url", on_ray, "--ray", "--shards", "7", "--batch-size", "90", "--joint-model-id", model, "--json")
        assert result.exit_code == 0, result.output
        got = json.loads(result.output)
        assert rows_by_run(on_ray, model) == rows_by_run(local, model)
        assert len(rows_by_run(local, model)) > N_RUNS * 0.9
        assert (got["shards"], got["nodes"], got["task_retries"]) == (7, 3, 0)
        assert [s["shard"] for s in got["per_shard"]] == list(range(7))
        assert (got["runs_read"], got["written"], got["skipped"]) == (want.runs_read, want.written, want.skipped)
        # bad input in some shards: every rejected run named, with the local job's reason
        rejected = {r["run_id"]: r["reason"] for r in got["rejected_runs"]}
        assert rejected == dict(want.rejected)
        assert len({_bucket(r) % 7 for r in rejected}) >= 2  # from several shards (R011 in shard 4, R012 in 0)

    # export: the snapshot answers as the local one's
    import metabatch
    from metabatch.workflows.cluster import cluster_runs
    from metabatch.workflows.landscape import draw_landscape
    from metabatch.snapshot import export_parquet
    from metabatch.workflows.suggest import suggest

    here, there = tmp_path / "local", tmp_path / "ray"
    export_parquet(here, local, local)
    result = invoke("export-parquet", "--historical-url", local, "--runtime-url", local, "--out", str(there), "--ray", "auto", "--shards", "4", "--json")
    assert result.exit_code == 0, result.output
    exported = json.loads(result.output)
    assert (exported["shards"], exported["embeddings"]) == (4, len(rows_by_run(local, V1)) + len(rows_by_run(local, V2)))
    run = sorted(rows_by_run(local, V2))[17]
    for model in (V1, V2):
        assert metabatch.show(snapshot=here, model_id=model, limit=0).equals(metabatch.show(snapshot=there, model_id=model, limit=0))
        assert metabatch.similar(run, snapshot=here, model_id=model, top_k=25).equals(metabatch.similar(run, snapshot=there, model_id=model, top_k=25))
    query = (
        "SELECT e.model_id, e.run_id, e.l2_norm, e.vector[1:8] AS head, r.annualised_sharpe, r.config_json"
        " FROM embeddings e JOIN runs r USING (run_id) ORDER BY e.model_id, e.run_id"
    )
    assert metabatch.sql(query, here).equals(metabatch.sql(query, there))
    assert suggest(V2, like_run=run, snapshot=here, top_k=5).equals(suggest(V2, like_run=run, snapshot=there, top_k=5))
    a, b = (cluster_runs(V2, on="config", k=8, snapshot=s) for s in (here, there))
    assert a.assignments.equals(b.assignments) and a.summary.equals(b.summary)
    pages = []
    for snapshot in (here, there):
        out = tmp_path / f"{snapshot.name}.html"
        draw_landscape(V2, out=out, snapshot=snapshot, max_points=400)
        pages.append(out.read_bytes())
    assert pages[0] == pages[1]
    manifests = [json.loads((s / "manifest.json").read_text()) for s in (here, there)]
    assert manifests[0]["runs"]["metric_columns"] == manifests[1]["runs"]["metric_columns"]
    assert not list(tmp_path.glob("ray.tmp-*"))  # the build folder was swapped in


def _bucket(run_id: str) -> int:
    import hashlib

    return hashlib.md5(run_id.encode("utf-8")).digest()[0]


def test_missing_on_ray(ray_cluster, twin_databases):
    """--missing --ray: the deleted run and the new runs are embedded, per shard;
    the others are counted as already embedded (runs that never get a row,
    rejected or with no branch, are read again)."""
    local, on_ray = twin_databases
    first = backfill(parse_url(on_ray), model_id=V1, batch_rows=300)
    unwritten = first.runs_read - first.written  # rejected or skipped: never have a row, read again
    before = rows_by_run(on_ray, V1)
    gone = sorted(before)[3]
    execute(on_ray, f"DELETE FROM joint_embeddings WHERE model_id = '{V1}' AND entity_scope ->> 'run_id' = '{gone}'")
    seed_runs(parse_url(on_ray), N_RUNS + 40, 5, kind="campaigns")
    result = invoke("backfill", "--runtime-url", on_ray, "--ray", "auto", "--shards", "3", "--missing", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert (got["runs_read"], got["written"], got["already_embedded"]) == (41 + unwritten, 41, len(before) - 1)
    after = rows_by_run(on_ray, V1)
    assert after[gone] == before[gone] and len(after) == len(before) + 40
    execute(on_ray, f"DELETE FROM joint_embeddings WHERE model_id = '{V1}'")
    backfill(parse_url(on_ray), model_id=V1)
    assert rows_by_run(on_ray, V1) == after


def test_a_node_lost_in_the_middle_costs_a_shard_again_and_no_duplicate(ray_cluster):
    """A run of shard 0 is locked by the test (as another writer would), so shard
    0 waits at its first write while the other shards finish; then its node is
    removed. Ray runs shard 0 again on another node; the job ends with exactly
    the rows of a clean run, and no run ever has two rows."""
    import ray

    from metabatch.pipeline.distributed import ray_backfill

    url = _make("sleeves")
    clean = _make("sleeves")
    stop, worst = threading.Event(), [0]
    try:
        backfill(parse_url(clean), batch_rows=60)
        want = rows_by_run(clean, V1)

        def watch():  # the most rows any one run had at any moment
            with adbc.connect(url, autocommit=True) as conn, conn.cursor() as cur:
                while not stop.is_set():
                    cur.execute("SELECT count(*) - count(DISTINCT entity_scope ->> 'run_id') FROM joint_embeddings")
                    worst[0] = max(worst[0], cur.fetchall()[0][0])
                    time.sleep(0.02)

        holder = adbc.connect(url, autocommit=True)
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(hashtext($1), 0)", (f"metabatch:META_CONFIG_ENV_V0:{V1}",))
            cur.fetchall()
        states: list = []
        outcome: dict = {}

        def job():
            try:
                outcome["summary"] = ray_backfill(parse_url(url), shards=6, batch_rows=60, on_progress=states.append)
            except BaseException as exc:  # handed to the test
                outcome["error"] = exc

        watcher, runner = threading.Thread(target=watch), threading.Thread(target=job)
        watcher.start()
        runner.start()
        shard0 = _wait(states, lambda s: s.shards.get(0, {}).get("attempt") == 1 and sum(e["finished"] for e in s.shards.values()) == 5)
        lost = shard0.shards[0]["node"]
        assert lost != ray.get_runtime_context().get_node_id()  # not the head node (no CPU)
        node = next(n for n in ray_cluster.list_all_nodes() if n.node_id == lost)
        ray_cluster.remove_node(node, allow_graceful=False)
        _wait(states, lambda s: s.shards.get(0, {}).get("attempt") == 2)
        holder.close()  # the lock is free: shard 0's second attempt writes
        runner.join(timeout=120)
        stop.set()
        watcher.join()
        assert "error" not in outcome, outcome.get("error")
        summary = outcome["summary"]
        assert summary.task_retries == 1
        assert rows_by_run(url, V1) == want
        assert worst[0] == 0
    finally:
        stop.set()
        ray_cluster.add_node(num_cpus=1)  # three nodes again for the tests after
        ray_cluster.wait_for_nodes()
        drop_database(url)
        drop_database(clean)


def _wait(states: list, condition, seconds: float = 90.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if states and condition(states[-1]):
            return states[-1]
        time.sleep(0.05)
    raise AssertionError(f"timed out; last progress: {states[-1] if states else None}")


def test_usage_errors(ray_cluster, tmp_path, pg_url, monkeypatch):
    duck = f"duckdb://{tmp_path}/runs.duckdb"
    migrate(parse_url(duck))
    result = invoke("backfill", "--runtime-url", duck, "--ray", "auto")
    assert result.exit_code == 2 and "--ray needs PostgreSQL" in result.output and "DuckDB" in result.output
    result = invoke("backfill", "--runtime-url", pg_url, "--shards", "4")
    assert result.exit_code == 2 and "--shards needs --ray" in result.output
    result = invoke("export-parquet", "--runtime-url", pg_url, "--out", str(tmp_path / "s"), "--ray", "--shards", "300")
    assert result.exit_code == 2
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    result = invoke("fit", "--runtime-url", pg_url, "--ray", "auto")
    assert result.exit_code == 2 and "pip install 'metabatch[ray]'" in result.output


def test_an_unreachable_cluster_is_one_line(pg_url):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "metabatch", "backfill", "--runtime-url", pg_url, "--ray", "127.0.0.1:9"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "cannot reach the Ray cluster at `127.0.0.1:9`" in done.stderr
    assert time.monotonic() - started < 30
