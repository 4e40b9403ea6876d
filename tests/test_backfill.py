"""backfill end to end on the real stores: parity with the spec, selection,
idempotency, pre-existing duplicates, two databases, bad input, crashes and
concurrency."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import signal
import subprocess
import sys
import time

import pytest

import reference_v1 as ref
from helpers import embeddings, execute, run_texts
from metabatch.pipeline.backfill import backfill, first_batch_rows
from metabatch.pipeline.embed import Weights
from metabatch.stores.migrate import migrate
from metabatch.stores import open_store
from metabatch.stores.base import RunSelection
from metabatch.urls import parse_url
from runs_data import runs_table

MODEL = "joint-meta-config-env-v1"


@pytest.fixture(params=["postgres", "duckdb"])
def store_url(request, tmp_path):
    """An empty, migrated store of each kind."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"duckdb://{tmp_path}/runs.duckdb"
    migrate(parse_url(url))
    return url


def load(url: str, table) -> None:
    store = open_store(parse_url(url))
    try:
        store.insert_runs(table)
    finally:
        store.close()


def run_backfill(url, historical=None, **kwargs):
    return backfill(parse_url(url), parse_url(historical) if historical else None, **kwargs)


def expected(url, weights=(1.0, 1.0, 1.0), run_ids=None):
    """run_id -> (vector bytes, source) or 'rejected'/'skipped', per the reference."""
    out = {}
    for run_id, (config, metrics, *_rest) in run_texts(url).items():
        if run_ids is not None and run_id not in run_ids:
            continue
        try:
            vector, source = ref.encode_run(config, metrics, weights)
        except ref.Rejected:
            out[run_id] = "rejected"
            continue
        out[run_id] = "skipped" if vector is None else (vector, source)
    return out


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.5, 2.0, 0.0), (0.0, 0.0, 1.0), (0.3, 0.7, 1.1)])
def test_vectors_match_the_spec_bit_for_bit(store_url, weights):
    load(store_url, runs_table())
    summary = run_backfill(store_url, weights=Weights(*weights), batch_rows=7)
    want = expected(store_url, weights)
    rows = embeddings(store_url)
    got = {r["run_id"]: r for r in rows}
    assert len(rows) == len(got)  # one row per run
    assert set(got) == {k for k, v in want.items() if isinstance(v, tuple)}
    texts = run_texts(store_url)
    for run_id, row in got.items():
        vector, source = want[run_id]
        assert row["vector"] == vector, run_id
        _config, _metrics, strategy_id, universe_id, end_date = texts[run_id]
        assert row["entity_scope"] == {
            "run_id": run_id, "strategy_id": strategy_id, "universe_id": universe_id, "source": source,
        }
        assert row["as_of_date"] == end_date
        assert row["joint_type"] == "META_CONFIG_ENV_V0" and row["model_id"] == MODEL
        assert row["vector_ref"] is None
    assert summary.runs_read == len(want)
    assert summary.written == len(got)
    assert summary.skipped == sum(v == "skipped" for v in want.values())
    assert {r for r, _ in summary.rejected} == {k for k, v in want.items() if v == "rejected"}


def test_reasons_name_the_run_and_the_cause(store_url):
    load(store_url, runs_table())
    summary = run_backfill(store_url)
    reasons = dict(summary.rejected)
    assert set(reasons) == {"R011", "R012", "R013", "R014"}
    assert "config_json" in reasons["R011"] and "array" in reasons["R011"]
    assert "metrics_json" in reasons["R012"] and "string" in reasons["R012"]
    assert "finite" in reasons["R013"] and "finite" in reasons["R014"]
    # the truncated huge number of R005 and the JSON-null metrics of R015 do not reject
    written = {r["run_id"] for r in embeddings(store_url)}
    assert {"R005", "R015", "R007", "R020"} <= written
    assert "R019" not in written  # SQL NULL metrics: not read


def test_selection_rules(store_url):
    load(store_url, runs_table())
    summary = run_backfill(
        store_url,
        selection=RunSelection(strategy_ids=("US_EQ", "EU_EQ"), start=dt.date(2025, 4, 30), end=dt.date(2025, 7, 31)),
    )
    assert {r["run_id"] for r in embeddings(store_url)} == {"R002", "R003", "R004", "R005"}
    assert summary.runs_read == 4
    # --limit keeps the first N by end_date DESC, run_id DESC
    execute(store_url, "DELETE FROM joint_embeddings")
    run_backfill(store_url, selection=RunSelection(limit=3))
    assert {r["run_id"] for r in embeddings(store_url)} == {"R020", "R018", "R017"}  # R019 has SQL NULL metrics


def test_rerun_is_idempotent_and_keeps_other_rows(store_url):
    load(store_url, runs_table())
    run_backfill(store_url, model_id="other-model")
    run_backfill(store_url, batch_rows=5)
    first = embeddings(store_url)
    run_backfill(store_url, batch_rows=3)
    second = embeddings(store_url)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "created_at"} for r in rows]  # noqa: E731
    assert strip(first) == strip(second)
    per_model = {}
    for r in second:
        per_model.setdefault(r["model_id"], []).append(r["run_id"])
    assert sorted(per_model["other-model"]) == sorted(per_model[MODEL])
    assert len(set(per_model[MODEL])) == len(per_model[MODEL])


def test_preexisting_tables_with_duplicates(pg_url):
    # tables made by another tool: no metabatch index, duplicates for one run, other models
    execute(pg_url, """
        CREATE TABLE backtest_runs (run_id varchar(64) PRIMARY KEY, strategy_id varchar(64), config_json jsonb,
            start_date date, end_date date, universe_id varchar(64), metrics_json jsonb, created_at timestamptz DEFAULT now());
        CREATE TABLE joint_embeddings (joint_id bigserial PRIMARY KEY, joint_type varchar(32), as_of_date date,
            entity_scope jsonb, model_id varchar(64), vector bytea, vector_ref text, created_at timestamptz DEFAULT now());
        INSERT INTO backtest_runs (run_id, strategy_id, config_json, end_date, metrics_json)
            VALUES ('A', 'S', '{"market_id": "US"}', '2025-01-02', '{"sharpe": 1}'),
                   ('B', 'S', '{"x": 1}', '2025-01-03', '{"sharpe": 2}');
        INSERT INTO joint_embeddings (joint_type, model_id, entity_scope, vector) VALUES
            ('META_CONFIG_ENV_V0', 'joint-meta-config-env-v1', '{"run_id": "A"}', '\\x00'),
            ('META_CONFIG_ENV_V0', 'joint-meta-config-env-v1', '{"run_id": "A"}', '\\x01'),
            ('META_CONFIG_ENV_V0', 'joint-meta-config-env-v1', '{"run_id": "A"}', '\\x02'),
            ('META_CONFIG_ENV_V0', 'old-model', '{"run_id": "A"}', '\\x03'),
            ('META_CONFIG_ENV_V0', 'joint-meta-config-env-v1', '{"run_id": "Z"}', '\\x04');
    """)
    before = embeddings(pg_url)
    migrate(parse_url(pg_url))
    migrate(parse_url(pg_url))
    assert embeddings(pg_url) == before  # migrate never touches data
    run_backfill(pg_url)
    after = embeddings(pg_url)
    ours = [r for r in after if r["model_id"] == MODEL and r["run_id"] in ("A", "B")]
    assert sorted(r["run_id"] for r in ours) == ["A", "B"]
    assert min(r["joint_id"] for r in before if r["run_id"] == "A" and r["model_id"] == MODEL) in {
        r["joint_id"] for r in ours
    }
    untouched = [r for r in before if r["model_id"] == "old-model" or r["run_id"] == "Z"]
    assert [r for r in after if r["model_id"] == "old-model" or r["run_id"] == "Z"] == untouched


def test_two_databases(pg_url):
    from conftest import drop_database, make_database

    historical = make_database()
    try:
        migrate(parse_url(pg_url), parse_url(historical))
        load(pg_url, runs_table())
        summary = run_backfill(pg_url, historical)
        assert summary.written == len(embeddings(historical)) > 0
        execute(pg_url, "SELECT 1")
        with pytest.raises(Exception):
            embeddings(pg_url)  # the runtime database has no joint_embeddings
    finally:
        drop_database(historical)


def _seed_many(url: str, n: int) -> None:
    import pyarrow as pa

    table = pa.table(
        {
            "run_id": [f"K{i:06d}" for i in range(n)],
            "strategy_id": ["S"] * n,
            "config_json": [f'{{"market_id": "M{i % 7}", "x": {i}, "l": [1, 2, {{"a": "b{i % 5}"}}]}}' for i in range(n)],
            "start_date": pa.array([dt.date(2024, 1, 1)] * n, pa.date32()),
            "end_date": pa.array([dt.date(2025, 1, 1) + dt.timedelta(days=i % 300) for i in range(n)], pa.date32()),
            "universe_id": ["U"] * n,
            "metrics_json": [f'{{"sharpe": {i % 9}}}' for i in range(n)],
        }
    )
    load(url, table)


def _cli(url, *args):
    env = {**os.environ, "METABATCH_RUNTIME_URL": url}
    return subprocess.Popen(
        [sys.executable, "-m", "metabatch", "backfill", "--quiet", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def test_killed_backfill_leaves_whole_batches_and_rerun_finishes(pg_url):
    migrate(parse_url(pg_url))
    n, batch = 60_000, 2_000
    _seed_many(pg_url, n)
    proc = _cli(pg_url, "--batch-size", str(batch))
    deadline = time.time() + 120
    count = 0
    while time.time() < deadline:
        count = len(embeddings(pg_url))
        if count >= 2 * batch or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    count = len(embeddings(pg_url))
    sizes = [first_batch_rows(batch)]
    while sizes[-1] < batch:
        sizes.append(min(2 * sizes[-1], batch))
    ends = set(itertools.accumulate(sizes))
    whole = count in ends or (count > max(ends) and (count - max(ends)) % batch == 0)
    assert count == 0 or whole  # whole batches only
    assert count < n, "the backfill finished before it could be killed; make the data bigger"
    rerun = _cli(pg_url, "--batch-size", str(batch))
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    rows = embeddings(pg_url)
    assert len(rows) == n and len({r["run_id"] for r in rows}) == n


def test_concurrent_backfills_do_not_duplicate(pg_url):
    migrate(parse_url(pg_url))
    _seed_many(pg_url, 20_000)
    first = _cli(pg_url, "--batch-size", "1000")
    second = _cli(pg_url, "--batch-size", "1500", "--start", "2025-03-01")
    for proc in (first, second):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    rows = embeddings(pg_url)
    assert len(rows) == 20_000 and len({r["run_id"] for r in rows}) == 20_000


def test_read_runs_skips_the_runs_given_and_keeps_the_limit(store_url):
    # a resumed backfill reads the runs it has not written: the same selection, --limit included
    import pyarrow as pa

    load(store_url, runs_table())
    store = open_store(parse_url(store_url))
    try:
        def read(selection, skip=None):
            return [r for b in store.read_runs(selection, skip) for r in b.column("run_id").to_pylist()]

        top = read(RunSelection(limit=5))
        assert len(top) == 5
        assert sorted(read(RunSelection(limit=5), pa.array(top[:2]))) == sorted(top[2:])
        everything = read(RunSelection())
        assert sorted(read(RunSelection(), pa.array(everything[::2]))) == sorted(everything[1::2])
        assert read(RunSelection(), pa.array(everything)) == []
    finally:
        store.close()
