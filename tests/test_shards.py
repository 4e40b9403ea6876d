"""Shards of a selection (metabatch/stores/shards.py) and `backfill --missing`, without Ray:
the bucket of a run id is the same in PostgreSQL, DuckDB and Python; the shards
of a selection are a partition of it (the limit taken first); overlapping
writers of different shards never duplicate a row; --missing embeds exactly
the runs with no row of the model id, also across two databases."""

from __future__ import annotations

import datetime as dt
import hashlib
import threading

import pyarrow as pa
import pytest
from click.testing import CliRunner

from conftest import pg_query
from helpers import embeddings, execute
from metabatch.pipeline.backfill import backfill
from metabatch.cli import main
from metabatch.stores.migrate import migrate
from metabatch.synthetic.seed import seed_runs
from metabatch.stores.shards import BUCKETS, Shard, bucket_sql, buckets_of, split_by_shard
from metabatch.stores import open_store
from metabatch.stores.base import RunSelection
from metabatch.urls import parse_url

TRICKY_IDS = ["BT_S7_00000042", "", "é", "日本-run", "quote'd", 'dq"x', "emoji😀", "a" * 64, "CR_5_0000001", " lead space"]


def python_bucket(run_id: str) -> int:
    return hashlib.md5(run_id.encode("utf-8")).digest()[0]


def test_bucket_is_the_same_in_postgres_duckdb_and_python(pg_url):
    import duckdb

    ids = TRICKY_IDS + [f"R{i:05d}" for i in range(500)]
    expected = [python_bucket(r) for r in ids]
    assert len(set(expected)) > 200  # the ids cover most buckets
    table = pa.table({"run_id": pa.array(ids, pa.string())})
    con = duckdb.connect()
    con.register("ids", table)
    in_duckdb = [row[0] for row in con.sql(f"SELECT {bucket_sql('run_id', 'duckdb')} FROM ids").fetchall()]
    values = ", ".join("(" + str(i) + ", '" + r.replace("'", "''") + "')" for i, r in enumerate(ids))
    rows = pg_query(pg_url, f"SELECT {bucket_sql('r', 'postgresql')} FROM (VALUES {values}) AS v (i, r) ORDER BY i")
    in_postgres = [row[0] for row in rows]
    assert in_duckdb == expected
    assert in_postgres == expected
    assert buckets_of(table.column("run_id")).tolist() == expected


def test_shards_cover_the_buckets_once():
    for count in (1, 2, 3, 6, 7, 256):
        owners = [s for i in range(count) for s in Shard(i, count).buckets]
        assert sorted(owners) == list(range(BUCKETS))
    with pytest.raises(ValueError):
        Shard(0, 257)
    ids = pa.array([f"R{i}" for i in range(1000)], pa.string())
    parts = split_by_shard(ids, 5)
    assert sorted(sum((p.to_pylist() for p in parts), [])) == sorted(ids.to_pylist())
    for i, part in enumerate(parts):
        assert all(python_bucket(r) % 5 == i for r in part.to_pylist())


@pytest.fixture(params=["postgres", "duckdb"])
def seeded_url(request, tmp_path):
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else f"duckdb://{tmp_path}/runs.duckdb"
    migrate(parse_url(url))
    seed_runs(parse_url(url), 600, 3)
    return url


def _read_ids(url: str, selection: RunSelection, skip=None) -> list[str]:
    store = open_store(parse_url(url))
    try:
        return [r for batch in store.read_runs(selection, skip) for r in batch.column("run_id").to_pylist()]
    finally:
        store.close()


@pytest.mark.parametrize(
    "selection",
    [
        RunSelection(),
        RunSelection(limit=137),
        RunSelection(strategy_ids=("US_EQ_CORE_LONG_EQ", "EU_EQ_VALUE"), limit=50),
        RunSelection(start=dt.date(2024, 6, 1), end=dt.date(2025, 6, 30)),
    ],
)
def test_the_shards_of_a_selection_are_a_partition_of_it(seeded_url, selection):
    whole = _read_ids(seeded_url, selection)
    assert whole  # the selection holds runs
    seen: list[str] = []
    store = open_store(parse_url(seeded_url))
    try:
        assert store.count_runs(selection) == len(whole)
        for i in range(4):
            shard = RunSelection(selection.strategy_ids, selection.start, selection.end, selection.limit, Shard(i, 4))
            ids = _read_ids(seeded_url, shard)
            assert all(python_bucket(r) % 4 == i for r in ids)
            assert store.count_runs(shard) == len(ids)
            seen += ids
    finally:
        store.close()
    assert sorted(seen) == sorted(whole)  # every run once: the limit is taken before the shard


def test_writers_of_overlapping_shards_never_duplicate(pg_url):
    """Shards 0/2 and 0/3 share the runs of buckets 0, 6, 12...: two jobs writing
    them at once take turns per bucket, and no run gets two rows."""
    migrate(parse_url(pg_url))
    seed_runs(parse_url(pg_url), 900, 4)
    errors = []

    def job(shard):
        try:
            for _ in range(3):
                backfill(parse_url(pg_url), selection=RunSelection(shard=shard), batch_rows=40)
        except Exception as exc:  # handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(s,)) for s in (Shard(0, 2), Shard(0, 3), Shard(1, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rows = embeddings(pg_url)
    by_run = {r["run_id"] for r in rows}
    assert len(by_run) == len(rows)  # one row per run
    expected = {r for r in _read_ids(pg_url, RunSelection()) if python_bucket(r) % 2 == 0 or python_bucket(r) % 3 in (0, 1)}
    assert by_run == expected


def _rows(url: str, model: str = "joint-meta-config-env-v1") -> dict:
    rows = embeddings(url, model)
    out = {r["run_id"]: (r["vector"], r["entity_scope"], r["as_of_date"]) for r in rows}
    assert len(out) == len(rows), "duplicate rows"
    return out


def test_missing_embeds_only_the_runs_without_a_row(seeded_url):
    """After a backfill: a run whose embedding was deleted and runs added since are
    embedded; every other run is left as it was (its created_at too)."""
    url = parse_url(seeded_url)
    first = backfill(url, batch_rows=100)
    full = _rows(seeded_url)
    before = {r["run_id"]: r["created_at"] for r in embeddings(seeded_url)}
    deleted = sorted(full)[:7]
    execute(seeded_url, "DELETE FROM joint_embeddings WHERE " + " OR ".join(
        f"json_extract_string(entity_scope, '$.run_id') = '{r}'" if seeded_url.startswith("duckdb") else f"entity_scope ->> 'run_id' = '{r}'"
        for r in deleted
    ))
    seed_runs(url, 650, 3)  # 50 new runs (the first 600 are there already)
    summary = backfill(url, batch_rows=100, missing=True)
    new = set(_read_ids(seeded_url, RunSelection())) - set(full)
    assert len(new) > 40
    assert summary.runs_read == len(deleted) + len(new)
    assert summary.already_embedded == first.runs_read - len(deleted)
    after = embeddings(seeded_url)
    untouched = {r["run_id"]: r["created_at"] for r in after if r["run_id"] in before and r["run_id"] not in deleted}
    assert untouched == {k: v for k, v in before.items() if k not in deleted}
    # and the table is what a full backfill writes
    rows = _rows(seeded_url)
    execute(seeded_url, "DELETE FROM joint_embeddings")
    backfill(url, batch_rows=100)
    assert rows == _rows(seeded_url)
    # nothing left to do: nothing read, every selected run counted as embedded
    again = backfill(url, missing=True)
    assert (again.runs_read, again.already_embedded) == (0, len(rows))


def test_missing_across_two_databases_with_limit_json(pg_url):
    """The runtime and historical databases apart (no SQL join between them), the
    selection with a limit: --missing counts and skips the same runs a full
    backfill of that selection would write, and --json says how many."""
    from conftest import drop_database, make_database

    history = make_database()
    try:
        migrate(parse_url(pg_url), parse_url(history))
        seed_runs(parse_url(pg_url), 300, 9)
        runner = CliRunner()
        common = ["--runtime-url", pg_url, "--historical-url", history, "--limit", "120", "--json"]
        first = runner.invoke(main, ["backfill", *common, "--batch-size", "50"])
        assert first.exit_code == 0, first.output
        execute(history, "DELETE FROM joint_embeddings WHERE joint_id IN (SELECT joint_id FROM joint_embeddings ORDER BY joint_id LIMIT 5)")
        result = runner.invoke(main, ["backfill", *common, "--missing"])
        assert result.exit_code == 0, result.output
        import json

        summary = json.loads(result.output)
        assert (summary["runs_read"], summary["written"], summary["already_embedded"]) == (5, 5, 115)
        assert len(_rows(history)) == 120
    finally:
        drop_database(history)
