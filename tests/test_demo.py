"""`metabatch demo` in a fresh folder: every step's output checked, twice."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from metabatch.cli import main
from metabatch.synthetic.demo import DB_FILE, LANDSCAPE, SNAPSHOT_DIR, V1, V2, run_demo

RUNS = 2_000


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run (shared: it takes a few seconds) and what it printed."""
    directory = tmp_path_factory.mktemp("demo") / "here"
    lines: list[str] = []
    result = run_demo(RUNS, directory, echo=lines.append)
    return directory, result, lines


def count(path, sql: str) -> int:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.sql(sql).fetchall()[0][0]
    finally:
        con.close()


def test_rows_written(demo):
    directory, result, _lines = demo
    assert result.database == directory / DB_FILE
    assert result.runs_seeded == RUNS
    assert count(result.database, "SELECT count(*) FROM backtest_runs") == RUNS
    embedded = count(result.database, f"SELECT count(*) FROM joint_embeddings WHERE model_id = '{V1}'")
    with_metrics = count(result.database, "SELECT count(*) FROM backtest_runs WHERE metrics_json IS NOT NULL")
    assert embedded == result.written == with_metrics - result.skipped - result.rejected
    assert embedded > 0.9 * RUNS
    assert count(result.database, f"SELECT count(DISTINCT json_extract_string(entity_scope, '$.run_id')) FROM joint_embeddings WHERE model_id = '{V1}'") == embedded
    assert count(result.database, f"SELECT count(*) FROM joint_embeddings WHERE model_id = '{V2}'") == result.written_v2 == RUNS
    assert count(result.database, f"SELECT count(*) FROM joint_models WHERE model_id = '{V2}'") == 1


def test_snapshot_readable(demo):
    directory, result, _lines = demo
    assert result.snapshot == directory / SNAPSHOT_DIR
    embeddings = pq.read_table(result.snapshot / "embeddings")
    assert embeddings.num_rows == result.snapshot_rows == result.written + result.written_v2
    vectors = np.stack(embeddings.column("vector").to_numpy(zero_copy_only=False))
    assert vectors.shape == (result.snapshot_rows, 384) and np.isfinite(vectors).all()
    runs = pq.read_table(result.snapshot / "runs")
    assert runs.num_rows == result.written_v2


def test_show_rows_neighbours_and_sql_answer(demo):
    _directory, result, lines = demo
    assert len(result.shown) == 5
    assert [r["as_of_date"] for r in result.shown] == sorted(r["as_of_date"] for r in result.shown)
    assert result.query_run_id in {r["run_id"] for r in result.shown}
    neighbours = result.neighbours
    assert len(neighbours) == 10
    ids = [r["run_id"] for r in neighbours]
    assert len(set(ids)) == 10 and result.query_run_id not in ids
    cosines = [r["cosine"] for r in neighbours]
    assert cosines == sorted(cosines, reverse=True) and all(-1 <= c <= 1 for c in cosines)
    # the SQL answer: the neighbour with the best Sharpe, from the snapshot's runs
    assert len(result.sql_answer) == 1
    best = result.sql_answer[0]
    assert best["run_id"] in ids
    runs = pq.read_table(result.snapshot / "runs").to_pylist()
    sharpe = {r["run_id"]: r["annualised_sharpe"] for r in runs if r["run_id"] in ids}
    assert best["annualised_sharpe"] == max(v for v in sharpe.values() if v is not None)
    text = "\n".join(lines)
    assert result.query_run_id in text and best["run_id"] in text


def test_prints_each_step_with_its_time_and_the_files(demo):
    _directory, result, lines = demo
    text = "\n".join(lines)
    for name in ("migrate", "seed", "backfill", "v2", "snapshot", "show", "similar", "sql", "suggest", "cluster", "landscape"):
        assert any(name in line and line.rstrip().split()[2].endswith("s") for line in lines if line.startswith("[")), name
        assert name in result.step_seconds
    assert str(result.database) in text and str(result.snapshot) in text and str(result.landscape) in text


def test_ends_with_suggestions_clusters_and_a_landscape_page(demo):
    directory, result, lines = demo
    assert len(result.suggestions) == 3 and all(s["support"] >= 1 for s in result.suggestions)
    assert result.clusters >= 2 and (result.snapshot / "clusters").is_dir()
    page = result.landscape.read_text()
    assert result.landscape == directory / LANDSCAPE and f'data-points="{RUNS}"' in page
    assert "t-SNE: near runs are alike" in page and "(t-SNE of the configs) coloured by cluster" in "\n".join(lines)


def test_twice_replaces_only_its_own_files(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    first = run_demo(300, tmp_path, echo=lambda line: None)
    second = run_demo(200, tmp_path, echo=lambda line: None)
    assert second.runs_seeded == 200  # a fresh file, not the 300 runs of the first
    assert count(second.database, "SELECT count(*) FROM backtest_runs") == 200
    assert pq.read_table(second.snapshot / "embeddings").num_rows == second.written + second.written_v2 < first.written + first.written_v2
    assert other.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([DB_FILE, SNAPSHOT_DIR, LANDSCAPE, "notes.txt"])


def test_same_size_same_answers(demo, tmp_path):
    _directory, first, _lines = demo
    again = run_demo(RUNS, tmp_path, echo=lambda line: None)
    assert again.query_run_id == first.query_run_id
    assert [r["run_id"] for r in again.neighbours] == [r["run_id"] for r in first.neighbours]
    assert again.sql_answer == first.sql_answer


def test_a_foreign_folder_named_like_the_snapshot_is_kept(tmp_path):
    foreign = tmp_path / SNAPSHOT_DIR
    foreign.mkdir()
    (foreign / "data.csv").write_text("a,b\n")
    with pytest.raises(Exception, match="not a metabatch snapshot"):
        run_demo(100, tmp_path, echo=lambda line: None)
    assert (foreign / "data.csv").read_text() == "a,b\n"


def test_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["demo", "--runs", "300"], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    assert (tmp_path / "metabatch-demo" / DB_FILE).is_file()
    assert "[1/" in result.output and "database:" in result.output
