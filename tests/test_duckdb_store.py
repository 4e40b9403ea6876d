"""DuckDBStore on real files: migrations, runs in and out, embeddings replaced,
one file shared by two stores, read-only opening."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading

import duckdb
import pyarrow as pa
import pytest

from helpers import embeddings, execute
from metabatch.errors import MissingTable, StoreUnreachable
from metabatch.stores.migrate import migrate
from metabatch.stores import open_store
from metabatch.stores.base import EMBEDDING_READ_COLUMNS, RUN_COLUMNS, RUN_DETAIL_COLUMNS, EmbeddingFilter, RunSelection
from metabatch.urls import parse_url
from runs_data import runs_table

JOINT_TYPE = "META_CONFIG_ENV_V0"
MODEL = "joint-meta-config-env-v1"


@pytest.fixture
def url(tmp_path):
    """A migrated, empty DuckDB file."""
    u = f"duckdb://{tmp_path}/store.duckdb"
    migrate(parse_url(u))
    return u


def opened(url, read_only=False):
    return open_store(parse_url(url), read_only=read_only)


def read_all(batches) -> pa.Table:
    batches = list(batches)
    return pa.Table.from_batches(batches) if batches else None


def embedding_rows(run_ids, seed: int = 0) -> pa.Table:
    """Rows as write_batch hands them to replace_embeddings."""
    n = len(run_ids)
    vectors = b"".join(bytes([(seed + i) % 256]) * 1536 for i in range(n))
    return pa.table(
        {
            "joint_type": [JOINT_TYPE] * n,
            "as_of_date": pa.array([dt.date(2025, 1, 1) + dt.timedelta(days=i) for i in range(n)], pa.date32()),
            "entity_scope": [
                json.dumps({"run_id": r, "strategy_id": "S", "universe_id": None, "source": "config"}) for r in run_ids
            ],
            "model_id": [MODEL] * n,
            "vector": pa.FixedSizeBinaryArray.from_buffers(pa.binary(1536), n, [None, pa.py_buffer(vectors)]),
            "run_id": list(run_ids),
        }
    )


def many_runs(n: int, prefix: str = "K") -> pa.Table:
    return pa.table(
        {
            "run_id": [f"{prefix}{i:06d}" for i in range(n)],
            "strategy_id": [f"S{i % 3}" for i in range(n)],
            "config_json": [f'{{"market_id": "M{i % 7}", "x": {i}}}' for i in range(n)],
            "start_date": pa.array([dt.date(2024, 1, 1)] * n, pa.date32()),
            "end_date": pa.array([dt.date(2025, 1, 1) + dt.timedelta(days=i % 300) for i in range(n)], pa.date32()),
            "universe_id": ["U"] * n,
            "metrics_json": [f'{{"sharpe": {i % 9}}}' for i in range(n)],
        }
    )


# -- migrations


def test_migrate_twice_records_each_step_once(tmp_path):
    url = parse_url(f"duckdb://{tmp_path}/m.duckdb")
    first = migrate(url)
    assert first == {url.redacted: ["runtime/0001_backtest_runs", "historical/0001_joint_embeddings", "historical/0002_joint_models"]}
    assert migrate(url) == {url.redacted: []}
    con = duckdb.connect(str(tmp_path / "m.duckdb"))
    try:
        names = [r[0] for r in con.sql("SELECT name FROM metabatch_migrations ORDER BY name").fetchall()]
        columns = {
            (r[0], r[1]): r[2]
            for r in con.sql(
                "SELECT table_name, column_name, data_type FROM information_schema.columns"
                " WHERE table_name IN ('backtest_runs', 'joint_embeddings')"
            ).fetchall()
        }
    finally:
        con.close()
    assert names == ["historical/0001_joint_embeddings", "historical/0002_joint_models", "runtime/0001_backtest_runs"]
    assert columns[("backtest_runs", "config_json")] == "JSON"
    assert columns[("backtest_runs", "metrics_json")] == "JSON"
    assert columns[("joint_embeddings", "entity_scope")] == "JSON"
    assert columns[("joint_embeddings", "vector")] == "BLOB"
    assert {c for t, c in columns if t == "joint_embeddings"} == {
        "joint_id", "joint_type", "as_of_date", "entity_scope", "model_id", "vector", "vector_ref", "created_at",
    }


def test_migrate_keeps_existing_data(url):
    store = opened(url)
    try:
        store.insert_runs(runs_table())
    finally:
        store.close()
    migrate(parse_url(url))
    store = opened(url)
    try:
        assert store.count_runs(RunSelection()) == 19
    finally:
        store.close()


def test_tables_missing_and_foreign_tables(tmp_path):
    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.sql("CREATE TABLE joint_embeddings (joint_id BIGINT, vector BLOB)")
    con.close()
    store = opened(f"duckdb://{path}")
    try:
        with pytest.raises(MissingTable, match="`backtest_runs` does not exist"):
            store.check_table("backtest_runs")
        with pytest.raises(MissingTable, match="lacks column"):
            store.check_table("joint_embeddings")
    finally:
        store.close()


# -- runs


def test_insert_runs_skips_existing_and_keeps_the_text(url):
    texts = ['{"b":  1.10, "a": 1e30,"a": 2}', '{"x": -0.0, "y": [1, {"z": null}]}', "null"]
    table = pa.table(
        {
            "run_id": ["A", "B", "C"],
            "strategy_id": ["S", "S", "T"],
            "config_json": pa.array(texts, pa.large_string()),
            "start_date": pa.array([dt.date(2024, 1, 1)] * 3, pa.date32()),
            "end_date": pa.array([dt.date(2025, 1, 1)] * 3, pa.date32()),
            "universe_id": [None, "U", "U"],
            # Arrow's JSON extension type is taken too (the PostgreSQL store sends it)
            "metrics_json": pa.ExtensionArray.from_storage(pa.json_(), pa.array(['{"sharpe": 1}', None, "{}"])),
        }
    )
    store = opened(url)
    try:
        assert store.insert_runs(table) == 3
        assert store.insert_runs(table) == 0
        twice = pa.concat_tables([table.slice(2), table.slice(2)]).cast(table.schema)
        assert store.insert_runs(twice.set_column(0, "run_id", pa.array(["D", "D"]))) == 1
        got = read_all(store.read_runs(RunSelection()))
    finally:
        store.close()
    assert got.column_names == list(RUN_COLUMNS)
    assert got.schema.field("config_json").type == pa.string()
    rows = {r["run_id"]: r for r in got.to_pylist()}
    assert set(rows) == {"A", "C", "D"}  # B has SQL NULL metrics
    assert rows["A"]["config_json"] == texts[0]  # exactly as given: spacing, 1.10, both "a" keys
    assert rows["C"]["config_json"] == "null" and rows["C"]["metrics_json"] == "{}"


def test_runs_are_read_in_the_order_they_were_inserted(url):
    # Reads without --limit follow the file's order, and so do the joint_ids a backfill
    # gives: seeding the same runs twice gives the same ids.
    table = many_runs(5_000)
    table = table.take(pa.array(list(range(4_999, -1, -2)) + list(range(0, 5_000, 2))))
    store = opened(url)
    try:
        store.insert_runs(table.slice(0, 1_000))
        store.insert_runs(table)
        got = read_all(store.read_runs(RunSelection())).column("run_id").to_pylist()
    finally:
        store.close()
    assert got == table.column("run_id").to_pylist()


def test_insert_rejects_text_that_is_not_json(url):
    table = many_runs(2).set_column(2, "config_json", pa.array(['{"a": 1}', "{nope"]))
    store = opened(url)
    try:
        with pytest.raises(Exception, match="JSON"):
            store.insert_runs(table)
        assert store.count_runs(RunSelection()) == 0  # all or nothing
    finally:
        store.close()


def test_selection_rules(url):
    store = opened(url)
    try:
        store.insert_runs(runs_table())

        def ids(**kwargs):
            selection = RunSelection(**kwargs)
            table = read_all(store.read_runs(selection))
            got = table.column("run_id").to_pylist() if table is not None else []
            assert store.count_runs(selection) == len(got)
            return got

        everything = ids()
        assert "R019" not in everything and "R015" in everything  # SQL NULL vs JSON null metrics
        assert len(everything) == 19
        assert set(ids(strategy_ids=("US_EQ", "EU_EQ"))) == {f"R00{i}" for i in range(1, 7)}
        assert set(ids(start=dt.date(2025, 4, 30), end=dt.date(2025, 7, 31))) == {"R002", "R003", "R004", "R005"}
        assert set(ids(strategy_ids=("EU_EQ",), end=dt.date(2025, 6, 30))) == {"R004"}
        assert ids(limit=3) == ["R020", "R018", "R017"]  # end_date DESC, run_id DESC
        assert ids(limit=0) == []
        assert ids(strategy_ids=("nope",)) == []
        details = read_all(store.stream_run_details(RunSelection(strategy_ids=("FX",), limit=1)))
    finally:
        store.close()
    assert details.column_names == list(RUN_DETAIL_COLUMNS)
    assert "R019" in details.column("run_id").to_pylist()  # metrics NULL or not, limit ignored
    assert details.num_rows == 14


def test_read_runs_streams_in_batches(url):
    store = opened(url)
    try:
        store.insert_runs(many_runs(40_000))
        batches = list(store.read_runs(RunSelection()))
    finally:
        store.close()
    assert len(batches) > 1 and sum(b.num_rows for b in batches) == 40_000


def test_read_runs_makes_batches_of_the_asked_sizes(url):
    from metabatch.pipeline.read import read_runs

    store = opened(url)
    try:
        store.insert_runs(many_runs(2_500))
        sizes = [t.num_rows for t in read_runs(store, RunSelection(), 1_000, first_rows=200)]
        plain = [t.num_rows for t in read_runs(store, RunSelection(), 1_000)]
        ids = [i for t in read_runs(store, RunSelection(), 1_000, first_rows=200) for i in t.column("run_id").to_pylist()]
    finally:
        store.close()
    assert sizes == [200, 400, 800, 1_000, 100]
    assert plain == [1_000, 1_000, 500]
    assert len(ids) == len(set(ids)) == 2_500


def test_read_runs_halves_the_last_batches_of_a_real_store(url):
    import time

    from metabatch.pipeline.read import read_runs

    store = opened(url)
    try:
        store.insert_runs(many_runs(40_000))
        batches = read_runs(store, RunSelection(), 10_000, first_rows=1_000, last_rows=1_000)
        tables = []
        while True:
            time.sleep(0.1)  # the fetch thread holds all it may before each cut
            table = next(batches, None)
            if table is None:
                break
            tables.append(table)
    finally:
        store.close()
    sizes = [t.num_rows for t in tables]
    ids = [i for t in tables for i in t.column("run_id").to_pylist()]
    assert len(ids) == len(set(ids)) == 40_000
    assert sizes[:5] == [1_000, 2_000, 4_000, 8_000, 10_000]
    assert max(sizes) <= 10_000
    assert sizes[4:] == sorted(sizes[4:], reverse=True)
    assert sizes[-1] <= 2_000  # without halving the last batch would hold the 5,000 left


# -- embeddings


def test_replace_embeddings_is_idempotent_and_keeps_joint_ids(url):
    store = opened(url)
    try:
        store.replace_embeddings(embedding_rows(["A", "B"]), JOINT_TYPE, MODEL)
        store.replace_embeddings(embedding_rows(["A"]), JOINT_TYPE, "other-model")
        first = {r["run_id"]: r for r in embeddings(url, MODEL)}
        store.replace_embeddings(embedding_rows(["B", "C"], seed=7), JOINT_TYPE, MODEL)
        second = {r["run_id"]: r for r in embeddings(url, MODEL)}
    finally:
        store.close()
    assert sorted(second) == ["A", "B", "C"]
    assert second["A"] == first["A"]  # untouched
    assert second["B"]["joint_id"] == first["B"]["joint_id"]  # updated in place
    assert second["B"]["vector"] == bytes([7]) * 1536 != first["B"]["vector"]
    assert second["C"]["joint_id"] > max(r["joint_id"] for r in first.values())
    assert [r["run_id"] for r in embeddings(url, "other-model")] == ["A"]
    assert all(r["vector_ref"] is None and r["created_at"] is not None for r in second.values())


def test_replace_embeddings_removes_duplicates_made_elsewhere(url):
    execute(url, f"""
        INSERT INTO joint_embeddings (joint_type, model_id, entity_scope, vector) VALUES
            ('{JOINT_TYPE}', '{MODEL}', '{{"run_id": "A"}}', '\\x00'::BLOB),
            ('{JOINT_TYPE}', '{MODEL}', '{{"run_id": "A"}}', '\\x01'::BLOB),
            ('{JOINT_TYPE}', 'old-model', '{{"run_id": "A"}}', '\\x02'::BLOB)
    """)
    before = embeddings(url)
    store = opened(url)
    try:
        store.replace_embeddings(embedding_rows(["A"]), JOINT_TYPE, MODEL)
    finally:
        store.close()
    after = embeddings(url)
    ours = [r for r in after if r["model_id"] == MODEL]
    assert [r["joint_id"] for r in ours] == [before[0]["joint_id"]]
    assert [r for r in after if r["model_id"] == "old-model"] == [before[2]]


def test_stream_embeddings_unpacks_entity_scope(url):
    store = opened(url)
    try:
        store.replace_embeddings(embedding_rows(["A", "B", "C"]), JOINT_TYPE, MODEL)
        store.replace_embeddings(embedding_rows(["A"]), JOINT_TYPE, "other-model")
        table = read_all(store.stream_embeddings(EmbeddingFilter(model_id=MODEL, start=dt.date(2025, 1, 2))))
        none = list(store.stream_embeddings(EmbeddingFilter(strategy_ids=("nope",))))
    finally:
        store.close()
    assert table.column_names == list(EMBEDDING_READ_COLUMNS)
    assert sorted(table.column("run_id").to_pylist()) == ["B", "C"]
    row = table.to_pylist()[0]
    assert row["strategy_id"] == "S" and row["universe_id"] is None and row["source"] == "config"
    assert table.schema.field("vector").type == pa.binary() and len(row["vector"]) == 1536
    assert table.schema.field("created_at").type.tz is not None  # an instant, as timestamptz
    assert none == []


# -- one file, several stores


def test_two_stores_on_one_file_read_while_writing(url):
    reader, writer = opened(url), opened(url)
    try:
        reader.insert_runs(many_runs(30_000))
        done = []

        def write_all():
            for batch in reader.read_runs(RunSelection()):
                writer.replace_embeddings(embedding_rows(batch.column("run_id").to_pylist()), JOINT_TYPE, MODEL)
                done.append(batch.num_rows)

        thread = threading.Thread(target=write_all)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        reader.close()
        writer.close()
    assert sum(done) == 30_000
    assert len(embeddings(url)) == 30_000


def test_relative_path_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    migrate(parse_url("duckdb://rel.duckdb"))
    assert (tmp_path / "rel.duckdb").exists()


# -- read-only


def test_read_only_on_a_missing_file_is_an_error_and_creates_nothing(tmp_path):
    path = tmp_path / "missing.duckdb"
    with pytest.raises(StoreUnreachable, match=f"duckdb://{path}") as info:
        opened(f"duckdb://{path}", read_only=True)
    assert "does not exist" in str(info.value)
    assert not path.exists()


def test_read_only_store_reads_and_refuses_writes(url):
    store = opened(url)
    try:
        store.insert_runs(runs_table())
    finally:
        store.close()
    store = opened(url, read_only=True)
    try:
        assert store.count_runs(RunSelection()) == 19
        with pytest.raises(StoreUnreachable, match="read-only"):
            opened(url)  # a writer while the file is open read-only in this process
        with pytest.raises(Exception):
            store.insert_runs(many_runs(1))
    finally:
        store.close()
    opened(url).close()  # once closed, it opens for writing again


def test_a_writer_that_made_no_table_leaves_no_file(tmp_path):
    path = tmp_path / "stray.duckdb"
    store = opened(f"duckdb://{path}")
    with pytest.raises(MissingTable, match="does not exist"):
        store.check_table("joint_embeddings")
    store.close()
    assert not path.exists() and not os.path.exists(f"{path}.wal")


def test_a_file_that_is_not_duckdb(tmp_path):
    path = tmp_path / "notes.duckdb"
    path.write_text("hello")
    with pytest.raises(StoreUnreachable, match="notes.duckdb"):
        opened(f"duckdb://{path}")
    assert path.read_text() == "hello"


# -- the same results as PostgreSQL


def test_same_results_as_postgresql(pg_url, tmp_path):
    from metabatch.snapshot import query
    from metabatch.pipeline.backfill import backfill
    from metabatch.synthetic.seed import seed_runs

    urls = {"postgres": parse_url(pg_url), "duckdb": parse_url(f"duckdb://{tmp_path}/same.duckdb")}
    got = {}
    for name, u in urls.items():
        migrate(u)
        assert seed_runs(u, 3_000, 11) == 3_000
        summary = backfill(u, batch_rows=1_000)
        rows = embeddings(u.raw)
        got[name] = {
            "summary": (summary.runs_read, summary.written, summary.skipped, sorted(summary.rejected)),
            "rows": {r["run_id"]: (r["vector"], r["entity_scope"], r["as_of_date"]) for r in rows},
            "show": sorted(map(tuple, query.show(historical_url=u, limit=0).rows())),
            "similar": query.similar("BT_S11_00000007", historical_url=u, top_k=10).rows(),
        }
    assert got["duckdb"]["summary"] == got["postgres"]["summary"]
    assert got["duckdb"]["rows"] == got["postgres"]["rows"]  # bit-identical vectors
    assert got["duckdb"]["show"] == got["postgres"]["show"]
    assert got["duckdb"]["similar"] == got["postgres"]["similar"]
