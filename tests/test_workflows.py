"""The workflows over a v2 model as a quant uses them: suggest, cluster,
landscape, on a real snapshot (DuckDB file) and from the databases, the page
checked in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from metabatch.backfill import backfill
from metabatch.campaigns import campaign_runs
from metabatch.cli import main
from metabatch.cluster import cluster_runs
from metabatch.migrate import migrate
from metabatch.models import fit
from metabatch.snapshot import export_parquet
from metabatch.stores import open_store
from metabatch.suggest import plan_suggestions, suggest
from metabatch.urls import parse_url

MODEL = "wf-v2"


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """3,000 labelled campaign runs in a DuckDB file, a fitted v2 model, its embeddings, a snapshot."""
    folder = tmp_path_factory.mktemp("workflows")
    url = parse_url(f"duckdb://{folder / 'runs.duckdb'}")
    migrate(url)
    runs, labels = campaign_runs(3000, seed=21, n_families=12, n_envs=6)
    store = open_store(url)
    try:
        store.insert_runs(runs)
    finally:
        store.close()
    fit(url, url, MODEL)
    backfill(url, model_id=MODEL)
    backfill(url)  # v1 embeddings beside them
    snapshot = folder / "snapshot"
    export_parquet(snapshot, url, url)
    skill = labels.group_by("family", "env").agg(pl.col("skill").first())
    return {"url": url, "snapshot": snapshot, "labels": labels, "skill": skill, "folder": folder}


def _family_of(world, run_ids: list[str]) -> int:
    labels = world["labels"].filter(pl.col("run_id").is_in(run_ids))
    return int(labels.get_column("family").mode().sort()[0])


def test_suggest_like_a_run_gives_distinct_good_configs_of_its_environment(world):
    labels = world["labels"]
    target = labels.row(7, named=True)
    result = plan_suggestions(MODEL, like_run=target["run_id"], snapshot=world["snapshot"], top_k=5)
    frame = result.frame
    assert frame.height == 5 and frame.get_column("rank").to_list() == [1, 2, 3, 4, 5]
    families = [_family_of(world, ids) for ids in frame.get_column("run_ids").to_list()]
    assert len(set(families)) == 5, "each suggestion is a distinct config"
    envs = labels.filter(pl.col("run_id").is_in(frame.get_column("run_ids").explode().to_list())).get_column("env").unique().to_list()
    assert envs == [target["env"]], "supported by runs of the target's environment"
    skills = world["skill"].filter(pl.col("env") == target["env"]).sort("skill", descending=True)
    best = skills.get_column("skill")[0]
    top1 = skills.filter(pl.col("family") == families[0]).get_column("skill")[0]
    assert best - top1 <= 0.5, "the first suggestion is (near) the best family there"
    # supporting runs best first, their stats as stated
    for row in frame.iter_rows(named=True):
        values = pl.read_parquet(world["snapshot"] / "runs").filter(pl.col("run_id").is_in(row["run_ids"])).select("run_id", "annualised_sharpe")
        by_id = dict(values.iter_rows())
        ordered = [by_id[r] for r in row["run_ids"]]
        assert ordered == sorted(ordered, reverse=True) and row["support"] == len(ordered)
        assert abs(row["mean"] - float(np.mean(ordered))) < 1e-9
    assert frame.get_column("differs").to_list()[0] is not None


def test_suggest_minimise_ranks_the_other_way(world):
    target = world["labels"].row(3, named=True)["run_id"]
    best = suggest(MODEL, like_run=target, snapshot=world["snapshot"], top_k=3)
    worst = suggest(MODEL, like_run=target, snapshot=world["snapshot"], top_k=3, minimise=True)
    assert best.get_column("mean")[0] > worst.get_column("mean")[0]


def test_suggest_by_env_keys_compares_those_keys_alone(world):
    runs = pl.read_parquet(world["snapshot"] / "runs")
    row = runs.row(0, named=True)
    config = json.loads(row["config_json"])
    result = invoke(
        "suggest", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--format", "json",
        "--env", f"market_id={config['market_id']}", "--env", f"universe_id={config['universe_id']}",
        "--env", f"assessment_horizon_days={config['assessment']['assessment_horizon_days']}",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["target"]["env"]["assessment.assessment_horizon_days"] == config["assessment"]["assessment_horizon_days"]
    supporting = [r for s in out["suggestions"] for r in s["run_ids"]]
    held = [json.loads(c) for c in runs.filter(pl.col("run_id").is_in(supporting)).get_column("config_json").to_list()]
    assert all(c["market_id"] == config["market_id"] and c["universe_id"] == config["universe_id"] for c in held)
    assert all(s["env_cosine"] > 0.999 for s in out["suggestions"])


def test_suggest_errors_are_clear(world):
    snap = str(world["snapshot"])
    unknown = invoke("suggest", "--snapshot", snap, "--model-id", MODEL, "--env", "colour=red")
    assert unknown.exit_code == 2 and "market_id" in unknown.output and "colour" in unknown.output
    v1 = invoke("suggest", "--snapshot", snap, "--model-id", "joint-meta-config-env-v1", "--like-run", "CR_21_0000001")
    assert v1.exit_code == 2 and "v2" in v1.output
    nowhere = invoke("suggest", "--snapshot", snap, "--model-id", "nope", "--like-run", "CR_21_0000001")
    assert nowhere.exit_code == 1 and "no model `nope`" in nowhere.output
    empty = invoke("suggest", "--snapshot", snap, "--model-id", MODEL, "--like-run", "CR_21_0000001", "--strategy-id", "NO_SUCH")
    assert empty.exit_code == 2 and "no embeddings" in empty.output
    both = invoke("suggest", "--snapshot", snap, "--model-id", MODEL)
    assert both.exit_code == 2 and "--like-run" in both.output


def test_suggest_from_the_database(world):
    url = world["url"].raw
    target = world["labels"].row(11, named=True)["run_id"]
    from_db = invoke("suggest", "--runtime-url", url, "--model-id", MODEL, "--like-run", target, "--format", "json")
    from_snapshot = invoke("suggest", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--like-run", target, "--format", "json")
    assert from_db.exit_code == 0, from_db.output
    assert json.loads(from_db.output)["suggestions"] == json.loads(from_snapshot.output)["suggestions"]


def test_cluster_on_config_finds_the_families_and_on_env_the_environments(world):
    from sklearn.metrics import normalized_mutual_info_score

    labels = world["labels"]
    on_config = cluster_runs(MODEL, on="config", k=12, snapshot=world["snapshot"])
    joined = on_config.assignments.join(labels, on="run_id")
    assert normalized_mutual_info_score(joined["family"], joined["cluster"]) >= 0.95
    on_env = cluster_runs(MODEL, on="env", snapshot=world["snapshot"])  # k chosen by the tool
    joined = on_env.assignments.join(labels, on="run_id")
    assert on_env.chosen_by == "silhouette" and normalized_mutual_info_score(joined["env"], joined["cluster"]) >= 0.95
    again = cluster_runs(MODEL, on="config", k=12, snapshot=world["snapshot"])
    assert again.assignments.equals(on_config.assignments), "the same seed gives the same clusters"
    summary = on_config.summary
    assert summary.get_column("size").sum() == 3000
    assert summary.get_column("sets_apart").str.len_chars().min() > 0
    assert set(summary.columns) >= {"cluster", "size", "mean", "std", "representative", "strategies", "universes", "sets_apart"}


def test_cluster_into_the_snapshot_is_a_view_in_sql(world, tmp_path):
    snapshot = tmp_path / "snap"
    shutil.copytree(world["snapshot"], snapshot)
    result = invoke("cluster", "--snapshot", str(snapshot), "--model-id", MODEL, "--on", "config", "--k", "12")
    assert result.exit_code == 0, result.output
    assert "12 clusters of 3,000 runs" in result.output and "sets" in result.output
    counted = invoke("sql", "--snapshot", str(snapshot), "--format", "csv", "SELECT model_id, \"on\", count(*) AS n, count(DISTINCT cluster) AS k FROM clusters GROUP BY ALL")
    assert counted.exit_code == 0, counted.output
    assert counted.output.splitlines()[1] == f"{MODEL},config,3000,12"
    out = tmp_path / "c.parquet"
    written = invoke("cluster", "--snapshot", str(snapshot), "--model-id", MODEL, "--on", "env", "--k", "6", "--out", str(out), "--format", "json")
    assert written.exit_code == 0 and json.loads(written.output)["k"] == 6
    assert pl.read_parquet(out).columns[:3] == ["run_id", "cluster", "distance"]


def test_cluster_errors_are_clear(world):
    v1 = invoke("cluster", "--snapshot", str(world["snapshot"]), "--model-id", "joint-meta-config-env-v1")
    assert v1.exit_code == 2 and "v2" in v1.output
    bad = invoke("cluster", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--on", "everything")
    assert bad.exit_code == 2 and "--on" in bad.output


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_landscape_page_is_self_contained_and_draws_its_points(world, tmp_path):
    page = tmp_path / "landscape.html"
    result = invoke("landscape", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--out", str(page), "--color", "annualised_sharpe")
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", text), "nothing is fetched from the network"
    assert 'data-points="3000"' in text and "model.kind" in text  # a hover field: a config path that tells families apart
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    ).stdout
    drawn = re.search(r'data-rendered-points="(\d+)"', dom)
    assert drawn, "the page drew no map: " + (re.search(r'data-render-error="([^"]*)"', dom) or [None, dom[-300:]])[1]
    assert int(drawn.group(1)) == 3000


def test_landscape_picture_and_a_stratified_sample(world, tmp_path):
    picture = tmp_path / "landscape.png"
    result = invoke(
        "landscape", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--out", str(picture),
        "--color", "strategy", "--max-points", "600", "--on", "config",
    )
    assert result.exit_code == 0, result.output
    assert "of 3,000 (stratified by strategy)" in result.output
    data = picture.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(data[16:20], "big") > 500  # width in pixels
    wrong = invoke("landscape", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--out", str(tmp_path / "x.svg"))
    assert wrong.exit_code == 2 and ".html" in wrong.output
    no_clusters = invoke("landscape", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--out", str(tmp_path / "y.png"), "--color", "cluster")
    assert no_clusters.exit_code == 2 and "metabatch cluster" in no_clusters.output


@pytest.mark.parametrize("where", ["snapshot", "database"])
def test_similar_on_one_branch(world, where):
    labels = world["labels"]
    target = labels.row(5, named=True)
    source = ["--snapshot", str(world["snapshot"])] if where == "snapshot" else ["--runtime-url", world["url"].raw]
    by_env = invoke("similar", *source, "--model-id", MODEL, "--run-id", target["run_id"], "--branch", "env", "--top-k", "20", "--format", "json")
    assert by_env.exit_code == 0, by_env.output
    ids = [r["run_id"] for r in json.loads(by_env.output)]
    assert set(labels.filter(pl.col("run_id").is_in(ids)).get_column("env")) == {target["env"]}
    by_config = invoke("similar", *source, "--model-id", MODEL, "--run-id", target["run_id"], "--branch", "config", "--top-k", "20", "--format", "json")
    ids = [r["run_id"] for r in json.loads(by_config.output)]
    assert set(labels.filter(pl.col("run_id").is_in(ids)).get_column("family")) == {target["family"]}
    v1 = invoke("similar", *source, "--model-id", "joint-meta-config-env-v1", "--run-id", target["run_id"], "--branch", "env")
    assert v1.exit_code == 2 and "needs a v2 model" in v1.output
    unknown = invoke("similar", *source, "--model-id", MODEL, "--run-id", target["run_id"], "--branch", "everything")
    assert unknown.exit_code == 2 and "--branch" in unknown.output


def test_a_stratified_sample_keeps_each_stratum_in_proportion():
    from metabatch.landscape import _stratified

    rng = np.random.default_rng(3)
    frame = pl.DataFrame({"position": np.arange(900_000), "strategy_id": rng.choice(["A", "B", "C", "D"], 900_000, p=[0.5, 0.3, 0.19, 0.01])})
    sample = _stratified(frame, "strategy_id", 60_000, seed=1)
    assert 59_990 <= sample.height <= 60_000
    shares = dict(sample.group_by("strategy_id").len().iter_rows())
    expected = dict(frame.group_by("strategy_id").len().iter_rows())
    for key, count in expected.items():
        assert abs(shares[key] - count * 60_000 / 900_000) <= 1
    assert sample.get_column("position").is_sorted() and sample.get_column("position").n_unique() == sample.height
