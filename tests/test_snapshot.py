"""export-parquet on real PostgreSQL (and the DuckDB store): the snapshot holds the
database's bytes, its runs and metrics, a manifest without passwords; writing is
atomic (killed or failed exports leave the previous snapshot as it was); filters
and hostile ids are inert."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import drop_database, make_database
from helpers import embeddings, execute, run_texts
from metabatch.pipeline.backfill import backfill
from metabatch.cli import main
from metabatch.pipeline.embed import JOINT_TYPE
from metabatch.errors import MetabatchError
from metabatch.stores.migrate import migrate
from metabatch.synthetic.seed import seed_runs
from metabatch.snapshot import export_parquet, read_manifest
from metabatch.urls import parse_url

MODEL = "joint-meta-config-env-v1"
N_RUNS = 2_000
ROOT = Path(__file__).resolve().parents[1]

# Rows other tools may have left in joint_embeddings, beside what backfill wrote.
# {nth(k)} is the vector of the k-th row backfill wrote, {run(k)} its run id.
def _nth(k: int) -> str:
    return f"(SELECT vector FROM joint_embeddings WHERE model_id = '{MODEL}' ORDER BY joint_id LIMIT 1 OFFSET {k})"


def _run(k: int) -> str:
    return f"(SELECT entity_scope->>'run_id' FROM joint_embeddings WHERE model_id = '{MODEL}' ORDER BY joint_id LIMIT 1 OFFSET {k})"


ODD_ROWS = f"""
INSERT INTO joint_embeddings (joint_type, as_of_date, entity_scope, model_id, vector)
 SELECT joint_type, as_of_date, entity_scope, model_id, {_nth(8)}
 FROM joint_embeddings WHERE entity_scope->>'run_id' = {_run(7)} AND model_id = '{MODEL}';
INSERT INTO joint_embeddings (joint_type, as_of_date, entity_scope, model_id, vector) VALUES
 ('{JOINT_TYPE}', '2025-02-01', '{{"run_id": "ZERO_RUN", "strategy_id": "ODD", "universe_id": null, "source": "config"}}',
  '{MODEL}', decode(repeat('00', 1536), 'hex')),
 ('{JOINT_TYPE}', '2025-02-02', '{{"run_id": "NULL_VECTOR", "strategy_id": "ODD"}}', '{MODEL}', NULL),
 ('{JOINT_TYPE}', '2025-02-03', '{{"run_id": "WIDE_RUN", "strategy_id": "ODD", "source": "config"}}',
  '{MODEL}', decode(repeat('0000803f', 768), 'hex')),
 ('{JOINT_TYPE}', '2025-02-04', '{{"strategy_id": "ODD"}}', '{MODEL}', {_nth(3)}),
 ('{JOINT_TYPE}', '2025-02-05', '{{"run_id": "TWIN_RUN", "strategy_id": "ODD", "universe_id": "U,1"}}', '{MODEL}', {_nth(4)}),
 ('OTHER_TYPE_V0', '2025-02-06', '{{"run_id": "OTHER_TYPE_RUN"}}', '{MODEL}', {_nth(6)}),
 ('{JOINT_TYPE}', '2025-02-07', '{{"run_id": "OTHER_MODEL_RUN", "strategy_id": "X"}}', 'other-model', {_nth(6)})
"""


def build_database(url: str) -> str:
    """Seed N_RUNS runs, backfill them, then add ODD_ROWS (a zero vector, a NULL one,
    a 768-dim one, a row without run_id, a twin of another run's vector, another
    joint type, another model, a newer duplicate for one run)."""
    parsed = parse_url(url)
    migrate(parsed)
    seed_runs(parsed, N_RUNS, 7)
    backfill(parsed)
    execute(url, ODD_ROWS)
    return url


@pytest.fixture(scope="module")
def database():
    url = make_database("mbsnap")
    try:
        yield build_database(url)
    finally:
        drop_database(url)


@pytest.fixture(scope="module")
def snapshot(database, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("snap") / "snapshot"
    export_parquet(out, database)
    return out


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------
# Content


def test_vectors_are_the_database_bytes(database, snapshot):
    want = {r["joint_id"]: r for r in embeddings(database) if r["joint_type"] == JOINT_TYPE}
    table = pq.read_table(snapshot / "embeddings")  # hive partitions: model_id from the folder
    assert table.num_rows == len(want)
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 384)
    manifest = read_manifest(snapshot)
    npy = {m: np.load(snapshot / e["vectors"]["384"]["path"], mmap_mode="r") for m, e in manifest["embeddings"]["models"].items()}
    seen_null = seen_zero = 0
    for row in table.to_pylist():
        db = want[row["joint_id"]]
        assert row["model_id"] == db["model_id"]
        assert row["as_of_date"] == db["as_of_date"]
        assert row["run_id"] == db["run_id"]
        assert row["strategy_id"] == (db["entity_scope"] or {}).get("strategy_id")
        if db["vector"] is None:
            seen_null += 1
            assert row["vector"] is None and row["dim"] is None and row["l2_norm"] is None
            continue
        assert row["dim"] == len(db["vector"]) // 4
        if row["dim"] == 384:
            assert np.asarray(row["vector"], dtype="<f4").tobytes() == db["vector"]
            assert npy[row["model_id"]][row["vector_row"]].tobytes() == db["vector"]
        expected_norm = float(np.linalg.norm(np.frombuffer(db["vector"], "<f4").astype(np.float64)))
        assert row["l2_norm"] == pytest.approx(expected_norm, rel=1e-12, abs=0)
        seen_zero += row["l2_norm"] == 0
    assert seen_null == 1 and seen_zero == 1
    # the 768-dim vector lives in its own part and .npy, bytes intact
    wide = manifest["embeddings"]["models"][MODEL]["vectors"]["768"]
    assert np.load(snapshot / wide["path"]).tobytes() == bytes.fromhex("0000803f" * 768)


def test_other_models_are_partitions_and_other_joint_types_are_left_out(snapshot):
    manifest = read_manifest(snapshot)
    assert set(manifest["embeddings"]["models"]) == {MODEL, "other-model"}
    assert manifest["embeddings"]["models"]["other-model"]["rows"] == 1
    con = duckdb.connect()
    got = con.sql(
        f"SELECT model_id, count(*), count(DISTINCT joint_type) FROM read_parquet('{snapshot}/embeddings/*/*.parquet',"
        " hive_partitioning = true) GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert got == [(MODEL, manifest["embeddings"]["models"][MODEL]["rows"], 1), ("other-model", 1, 1)]
    # The vector column is FLOAT[384]-friendly: a cast binds, cosine works.
    (cos,) = con.sql(
        f"SELECT min(array_cosine_similarity(vector::FLOAT[384], vector::FLOAT[384])) FROM"
        f" read_parquet('{snapshot}/embeddings/*/*.parquet') WHERE dim = 384 AND l2_norm > 0"
    ).fetchall()[0]
    assert cos == pytest.approx(1.0, abs=1e-6)
    # Polars reads the folder with the model id from the path, the vector as an Array.
    frame = pl.scan_parquet(snapshot / "embeddings", hive_partitioning=True).filter(pl.col("dim") == 384).collect()
    assert frame.schema["vector"] == pl.Array(pl.Float32, 384)
    assert set(frame["model_id"].unique()) == {MODEL, "other-model"}


def test_runs_hold_the_text_and_numeric_metrics(database, snapshot):
    texts = run_texts(database)  # runs with metrics, as the database prints them
    embedded = {r["run_id"] for r in embeddings(database) if r["joint_type"] == JOINT_TYPE and r["run_id"]}
    runs = duckdb.connect().sql(
        f"SELECT * FROM read_parquet('{snapshot}/runs/*.parquet', union_by_name = true)"
    ).to_arrow_table().to_pylist()
    assert {r["run_id"] for r in runs} == embedded & _all_runs(database)
    manifest = read_manifest(snapshot)
    assert manifest["runs"]["rows"] == len(runs)
    assert {"sharpe", "max_drawdown", "n_trades"} <= set(manifest["runs"]["metric_columns"])
    assert not {"status", "converged", "lambda_buckets"} & set(manifest["runs"]["metric_columns"])  # not numbers
    for run in runs:
        config, metrics, strategy_id, universe_id, end_date = texts[run["run_id"]]
        assert (run["config_json"], run["metrics_json"]) == (config, metrics)
        assert (run["strategy_id"], run["universe_id"], run["end_date"]) == (strategy_id, universe_id, end_date)
        parsed = json.loads(metrics)
        for key in manifest["runs"]["metric_columns"]:
            value = parsed.get(key) if isinstance(parsed, dict) else None
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            assert run[key] == (float(value) if numeric else None), (run["run_id"], key)


def _all_runs(url: str) -> set[str]:
    from conftest import pg_query

    return {r[0] for r in pg_query(url, "SELECT run_id FROM backtest_runs")}


def test_manifest_says_what_when_and_from_where_without_password(database, tmp_path):
    with_password = database.replace("root@", "root:s3cret-pw@")  # trust auth ignores it
    out = tmp_path / "snap"
    summary = export_parquet(out, with_password + "?application_name=x&password=s3cret-pw")
    text = (out / "manifest.json").read_text()
    assert "s3cret" not in text
    manifest = json.loads(text)
    assert manifest["format"] == "metabatch-snapshot" and manifest["schema_version"] == 1
    assert manifest["metabatch_version"]
    assert manifest["sources"]["historical"] == database  # user@host:port/db, nothing else
    assert manifest["embeddings"]["rows"] == summary.embeddings
    assert manifest["runs"]["rows"] == summary.runs
    assert manifest["created_at"].endswith("+00:00")


# --------------------------------------------------------------------------
# Filters and hostile input


def test_filters_select_embeddings_and_their_runs(database, tmp_path):
    out = tmp_path / "snap"
    summary = export_parquet(out, database, model_id=MODEL, strategy_id=["US_EQ_CORE_LONG_EQ", "ODD"],
                             start=dt.date(2024, 1, 1), end=dt.date(2025, 6, 30))
    rows = [
        r for r in embeddings(database, MODEL)
        if r["joint_type"] == JOINT_TYPE and (r["entity_scope"] or {}).get("strategy_id") in ("US_EQ_CORE_LONG_EQ", "ODD")
        and str(r["as_of_date"]) >= "2024-01-01" and str(r["as_of_date"]) <= "2025-06-30"
    ]
    assert summary.embeddings == len(rows) > 0
    table = pq.read_table(out / "embeddings")
    assert sorted(table.column("joint_id").to_pylist()) == sorted(r["joint_id"] for r in rows)
    runs = pq.read_table(out / "runs").to_pylist()
    assert {r["run_id"] for r in runs} <= {r["run_id"] for r in rows}
    assert all(r["strategy_id"] == "US_EQ_CORE_LONG_EQ" for r in runs)


@pytest.mark.parametrize(
    "hostile",
    ["x' OR '1'='1", "'; DROP TABLE joint_embeddings; --", "US_EQ_CORE_LONG_EQ') OR ('1'='1", "$1", "\\'"],
)
def test_hostile_ids_are_inert(database, tmp_path, hostile):
    before = len(embeddings(database))
    out = tmp_path / "snap"
    result = invoke("export-parquet", "--historical-url", database, "--runtime-url", database, "--out", out,
                    "--model-id", hostile, "--strategy-id", hostile, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["embeddings"] == 0
    summary = export_parquet(tmp_path / "snap2", database, strategy_id=hostile)
    assert summary.embeddings == 0 and summary.runs == 0
    assert len(embeddings(database)) == before


# --------------------------------------------------------------------------
# Atomic replacement


def test_export_replaces_a_snapshot_and_refuses_other_folders(database, tmp_path):
    out = tmp_path / "snap"
    first = export_parquet(out, database)
    second = export_parquet(out, database, strategy_id="ODD")
    assert second.embeddings < first.embeddings
    assert read_manifest(out)["embeddings"]["rows"] == second.embeddings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]  # no build or old folders left
    foreign = tmp_path / "not-a-snapshot"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(MetabatchError, match="not a metabatch snapshot"):
        export_parquet(foreign, database)
    assert (foreign / "keep.txt").read_text() == "mine"
    result = invoke("export-parquet", "--historical-url", database, "--out", foreign)
    assert result.exit_code == 1 and "not a metabatch snapshot" in result.output


def test_failed_export_leaves_the_previous_snapshot(database, tmp_path, monkeypatch):
    from metabatch.snapshot.runs import RunWriter

    out = tmp_path / "snap"
    export_parquet(out, database)
    before = tree_digest(out)

    def broken(self, *args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(RunWriter, "write", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_parquet(out, database)
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]
    monkeypatch.undo()
    # a database without the tables: a clean error, nothing touched
    empty = make_database("mbempty")
    try:
        with pytest.raises(MetabatchError, match="joint_embeddings"):
            export_parquet(out, empty)
    finally:
        drop_database(empty)
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]


_PAUSE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import metabatch.snapshot.export as S
    from metabatch.snapshot.embeddings import EmbeddingWriter
    from metabatch.snapshot.runs import RunWriter
    out, url, marker, where = sys.argv[1:5]
    def pause(original):
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            Path(marker).write_text("paused")
            time.sleep(120)
            return result
        return wrapper
    if where == "embeddings":
        EmbeddingWriter.add = pause(EmbeddingWriter.add)
    elif where == "runs":
        RunWriter.write = pause(RunWriter.write)
    else:
        original = S.swap_in
        def swap(new, target):
            Path(marker).write_text("paused")
            time.sleep(120)
            original(new, target)
        S.swap_in = swap
    S.export_parquet(out, url)
    """
)


@pytest.mark.parametrize("where", ["embeddings", "runs", "swap"])
def test_killed_export_leaves_the_previous_snapshot_intact(database, tmp_path, where):
    out = tmp_path / "snap"
    export_parquet(out, database, strategy_id="ODD")
    before = tree_digest(out)
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _PAUSE, str(out), database, str(marker), where], cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None, "the export ended before pausing"
            assert time.time() < deadline
            time.sleep(0.05)
        builds = [p for p in tmp_path.iterdir() if p.name.startswith("snap.tmp-")]
        assert len(builds) == 1 and any(builds[0].rglob("*.parquet")) or where == "embeddings"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert tree_digest(out) == before
    assert invoke("show", "--snapshot", out, "--strategy-id", "ODD").exit_code == 0
    # the next export removes the dead build folder and replaces the snapshot
    export_parquet(out, database, strategy_id="ODD")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker", "snap"]


# --------------------------------------------------------------------------
# The DuckDB store goes through the same Store interface


def test_export_from_a_duckdb_file(tmp_path):
    url = f"duckdb://{tmp_path}/runs.duckdb"
    parsed = parse_url(url)
    migrate(parsed)
    seed_runs(parsed, 300, 3)
    backfill(parsed)
    out = tmp_path / "snap"
    summary = export_parquet(out, url)
    want = {r["joint_id"]: r["vector"] for r in embeddings(url)}
    table = pq.read_table(out / "embeddings")
    assert summary.embeddings == len(want) == table.num_rows > 0
    for joint_id, vector in zip(table.column("joint_id").to_pylist(), table.column("vector").to_pylist()):
        assert np.asarray(vector, dtype="<f4").tobytes() == want[joint_id]
    assert summary.runs == len(want)
    assert read_manifest(out)["sources"]["historical"] == f"duckdb://{tmp_path}/runs.duckdb"


def test_runs_waiting_for_the_embeddings_are_bounded(tmp_path, monkeypatch):
    """While the embeddings are exported, at most PREPARED_RUN_CHUNKS chunks of
    runs wait in memory: past that the runs' stream waits (peak memory does not
    grow with the number of runs); the snapshot is complete all the same."""
    import metabatch.snapshot.export as export_module
    import metabatch.snapshot.runs as runs_module
    import metabatch.stores.postgres as postgres
    from metabatch.snapshot.embeddings import EmbeddingWriter
    from metabatch.snapshot.runs import RunWriter

    monkeypatch.setattr(runs_module, "RUNS_CHUNK_ROWS", 64)
    monkeypatch.setattr(postgres, "_READ_BATCH_BYTES", 16 * 1024)  # record batches of a few dozen rows
    url = make_database("mbsnapbound")
    try:
        parsed = parse_url(url)
        migrate(parsed)
        seed_runs(parsed, 600, 5)
        backfill(parsed)
        events = []
        add, prepare, write = EmbeddingWriter.add, RunWriter._prepare, RunWriter.write

        def slow_add(self, batch):
            time.sleep(0.02)  # the embeddings take longer than the runs
            return add(self, batch)

        def counted_prepare(self, con, runs):
            events.append("prepared")
            return prepare(self, con, runs)

        def counted_write(self, table, run_ids):
            events.append("written")
            return write(self, table, run_ids)

        monkeypatch.setattr(EmbeddingWriter, "add", slow_add)
        monkeypatch.setattr(RunWriter, "_prepare", counted_prepare)
        monkeypatch.setattr(RunWriter, "write", counted_write)
        summary = export_parquet(tmp_path / "snap", url)
        embedded = {r["run_id"] for r in embeddings(url)}
    finally:
        drop_database(url)
    chunks = events.count("prepared")
    assert chunks >= 600 // 64 // 2
    ahead = events.index("written")  # chunks prepared before the embeddings were done
    # the queue, the chunk the thread holds while it waits, and one the first write frees
    assert ahead <= export_module.PREPARED_RUN_CHUNKS + 2 < chunks
    runs = pq.read_table(tmp_path / "snap" / "runs", columns=["run_id"]).column("run_id").to_pylist()
    assert set(runs) == embedded and len(runs) == summary.runs
