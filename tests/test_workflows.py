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

from metabatch.pipeline.backfill import backfill
from metabatch.synthetic.campaigns import campaign_runs
from metabatch.cli import main
from metabatch.workflows.cluster import cluster_runs
from metabatch.models import fit
from metabatch.snapshot import export_parquet
from metabatch.workflows.suggest import plan_suggestions, suggest
from metabatch.urls import parse_url
from helpers import store_with_runs

MODEL = "wf-v2"


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """3,000 labelled campaign runs in a DuckDB file, a fitted v2 model, its embeddings, a snapshot."""
    folder = tmp_path_factory.mktemp("workflows")
    url = parse_url(f"duckdb://{folder / 'runs.duckdb'}")
    runs, labels = campaign_runs(3000, seed=21, n_families=12, n_envs=6)
    store_with_runs(url.raw, runs)
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


def test_suggest_from_the_database(world, tmp_path, monkeypatch):
    import gc
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the temporary snapshot goes
    url = world["url"].raw
    target = world["labels"].row(11, named=True)["run_id"]
    from_db = invoke("suggest", "--runtime-url", url, "--model-id", MODEL, "--like-run", target, "--format", "json")
    from_snapshot = invoke("suggest", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--like-run", target, "--format", "json")
    assert from_db.exit_code == 0, from_db.output
    assert json.loads(from_db.output)["suggestions"] == json.loads(from_snapshot.output)["suggestions"]
    gc.collect()
    assert not list(tmp_path.glob("metabatch-space-*"))  # nothing left behind


def test_cluster_on_config_finds_the_families_and_on_env_the_environments(world):
    from sklearn.metrics import normalized_mutual_info_score

    labels = world["labels"]
    on_config = cluster_runs(MODEL, on="config", k=12, snapshot=world["snapshot"])
    joined = on_config.assignments.join(labels, on="run_id")
    assert normalized_mutual_info_score(joined["family"], joined["cluster"]) >= 0.95
    on_env = cluster_runs(MODEL, on="env", snapshot=world["snapshot"])  # k chosen by the tool
    joined = on_env.assignments.join(labels, on="run_id")
    assert on_env.chosen_by == "nested silhouette" and normalized_mutual_info_score(joined["env"], joined["cluster"]) >= 0.95
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


def page_spec(page) -> dict:
    """The Vega-Lite spec a landscape page draws."""
    return json.loads(re.search(r"const spec = (\{.*?\});\n", page.read_text(), re.S).group(1))


def drawn_points(spec: dict) -> pl.DataFrame:
    """The points a landscape's spec draws (its first layer's data)."""
    data = spec["layer"][0].get("data") or spec["data"]
    return pl.DataFrame(spec["datasets"][data["name"]])


def drawn_in_chromium(page, profile) -> int:
    """How many points headless Chromium drew on the page (the page counts Vega's marks)."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=30000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    ).stdout
    drawn = re.search(r'data-rendered-points="(\d+)"', dom)
    assert drawn, "the page drew no map: " + (re.search(r'data-render-error="([^"]*)"', dom) or [None, dom[-300:]])[1]
    return int(drawn.group(1))


@pytest.fixture(scope="module")
def pages(world, tmp_path_factory):
    """The joint slice of the 3,000 runs coloured by Sharpe, laid out by t-SNE (the
    default) and by PCA, through the command."""
    folder = tmp_path_factory.mktemp("pages")
    out = {}
    for layout in ("tsne", "pca"):
        page = folder / f"{layout}.html"
        result = invoke("landscape", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--out", str(page),
                        "--color", "annualised_sharpe", *(["--layout", layout] if layout == "pca" else []))
        assert result.exit_code == 0, result.output
        assert ("t-SNE" if layout == "tsne" else "PCA") in result.output
        out[layout] = page
    return out


@pytest.mark.parametrize("layout", ["tsne", "pca"])
def test_landscape_page_is_self_contained_and_draws_its_points(pages, layout, tmp_path):
    page = pages[layout]
    text = page.read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", text), "nothing is fetched from the network"
    assert 'data-points="3000"' in text and "model.kind" in text  # a hover field: a config path that tells families apart
    assert ("t-SNE: near runs are alike" if layout == "tsne" else "PCA: ") in text
    assert drawn_in_chromium(page, tmp_path / "profile") == 3000


def _trustworthiness(world, page, on="joint") -> float:
    from sklearn.manifold import trustworthiness

    from metabatch.workflows.space import open_space

    points = drawn_points(page_spec(page)).select("run_id", "x", "y")
    space = open_space(MODEL, snapshot=world["snapshot"])
    rows = space.runs.select("run_id").with_row_index("position").join(points, on="run_id")
    return trustworthiness(space.unit_rows(on, rows.get_column("position").to_numpy()), rows.select("x", "y").to_numpy(), n_neighbors=10)


def test_tsne_keeps_each_runs_neighbours_better_than_pca(world, pages, tmp_path, monkeypatch):
    tsne, pca = _trustworthiness(world, pages["tsne"]), _trustworthiness(world, pages["pca"])
    assert tsne >= 0.99 and tsne > pca, (tsne, pca)
    # Above TSNE_SAMPLE runs, t-SNE lays out a sample and places the others among it: as good.
    from metabatch.workflows import landscape

    monkeypatch.setattr(landscape, "TSNE_SAMPLE", 1000)
    placed = landscape.draw_landscape(MODEL, out=tmp_path / "placed.html", snapshot=world["snapshot"])
    assert placed.points == 3000 and placed.layout == "tsne"
    assert _trustworthiness(world, tmp_path / "placed.html") >= tsne - 0.01


def test_the_same_seed_draws_the_same_map(world, pages, tmp_path):
    from metabatch.workflows.landscape import draw_landscape

    again = draw_landscape(MODEL, out=tmp_path / "again.html", color="annualised_sharpe", snapshot=world["snapshot"])
    first = drawn_points(page_spec(pages["tsne"])).select("run_id", "x", "y").sort("run_id")
    assert again.layout == "tsne" and again.coordinates.sort("run_id").equals(first)


def test_a_metric_with_a_neutral_point_diverges_from_it_else_is_sequential(world, pages, tmp_path):
    from metabatch.workflows.landscape import ABOVE, BELOW, NEITHER, neutral_value

    scale = page_spec(pages["tsne"])["layer"][0]["encoding"]["color"]["scale"]
    low, mid, high = scale["domain"]
    assert mid == 0.0 and low < 0 < high and scale["range"] == [BELOW, NEITHER, ABOVE]
    sharpe = pl.read_parquet(world["snapshot"] / "runs").get_column("annualised_sharpe")
    assert low == pytest.approx(sharpe.quantile(0.01), abs=1e-9) and high == pytest.approx(sharpe.quantile(0.99), abs=1e-9)
    page = tmp_path / "vol.html"
    result = invoke("landscape", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--out", str(page),
                    "--color", "annualised_vol", "--layout", "pca")
    assert result.exit_code == 0, result.output
    assert page_spec(page)["layer"][0]["encoding"]["color"]["scale"]["scheme"] == "viridis"
    assert [neutral_value(m) for m in ("annualised_sharpe", "Sortino", "cagr", "total_return", "profit_factor")] == [0, 0, 0, 0, 1]
    assert [neutral_value(m) for m in ("max_drawdown", "annualised_vol", "hit_rate", "turnover", "n_trades")] == [None] * 5


@pytest.mark.parametrize("k", [12, 24])
def test_landscape_tells_every_cluster_apart(world, tmp_path, k):
    from metabatch.workflows.cluster import write_assignments
    from metabatch.workflows.landscape import GREY, LABELLED

    clusters = write_assignments(cluster_runs(MODEL, on="config", k=k, snapshot=world["snapshot"]), tmp_path / "clusters.parquet")
    page = tmp_path / "clusters.html"
    result = invoke("landscape", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--out", str(page),
                    "--on", "config", "--color", "cluster", "--clusters", str(clusters), "--max-points", "800",
                    *(["--layout", "pca"] if k <= LABELLED else []))  # the labels are for t-SNE's maps
    assert result.exit_code == 0, result.output
    spec = page_spec(page)
    color = spec["layer"][0]["encoding"]["color"]
    assert color["scale"]["domain"] == [str(i) for i in range(k)], "the legend in numeric order"
    colours = color["scale"]["range"]
    assert len(set(colours)) == k and GREY not in colours, "a colour of its own for each cluster"
    assert color["legend"]["symbolLimit"] == 0, "every cluster in the legend"
    points = drawn_points(spec)
    if k <= LABELLED:
        assert len(spec["layer"]) == 1
        return
    labels = pl.DataFrame(spec["datasets"][spec["layer"][1]["data"]["name"]])
    assert set(labels.get_column("color")) == {str(i) for i in range(k)}, "each cluster labelled at least once"
    on_its_cluster = labels.join(points, on=["color", "x", "y"], how="semi")
    assert on_its_cluster.height == labels.height, "each label sits on a run of its cluster"


def test_landscape_picture_and_a_stratified_sample(world, tmp_path):
    picture = tmp_path / "landscape.png"
    result = invoke(
        "landscape", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--out", str(picture),
        "--color", "strategy", "--max-points", "600", "--on", "config", "--layout", "pca",
    )
    assert result.exit_code == 0, result.output
    assert "of 3,000 (stratified by strategy)" in result.output
    data = picture.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(data[16:20], "big") > 500  # width in pixels
    wrong = invoke("landscape", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--out", str(tmp_path / "x.svg"))
    assert wrong.exit_code == 2 and ".html" in wrong.output
    no_clusters = invoke("landscape", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--out", str(tmp_path / "y.png"), "--color", "cluster")
    assert no_clusters.exit_code == 2 and "metabatch cluster" in no_clusters.output
    no_layout = invoke("landscape", "--snapshot", str(world["snapshot"]), "--model-id", MODEL, "--out", str(tmp_path / "z.png"), "--layout", "umap")
    assert no_layout.exit_code == 2 and "tsne" in no_layout.output and "pca" in no_layout.output


def test_category_order_reads_numbers_by_value():
    from metabatch.workflows.landscape import category_order

    assert category_order(["10", "2", "other", "1", "(none)", "0", "11"]) == ["0", "1", "2", "10", "11", "(none)", "other"]
    assert category_order(["US_EQ", "CRYPTO", "(none)"]) == ["CRYPTO", "US_EQ", "(none)"]


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
    from metabatch.workflows.landscape import _stratified

    rng = np.random.default_rng(3)
    frame = pl.DataFrame({"position": np.arange(900_000), "strategy_id": rng.choice(["A", "B", "C", "D"], 900_000, p=[0.5, 0.3, 0.19, 0.01])})
    sample = _stratified(frame, "strategy_id", 60_000, seed=1)
    assert 59_990 <= sample.height <= 60_000
    shares = dict(sample.group_by("strategy_id").len().iter_rows())
    expected = dict(frame.group_by("strategy_id").len().iter_rows())
    for key, count in expected.items():
        assert abs(shares[key] - count * 60_000 / 900_000) <= 1
    assert sample.get_column("position").is_sorted() and sample.get_column("position").n_unique() == sample.height


def test_a_stratified_sample_keeps_at_least_the_minimum_of_each_stratum():
    from metabatch.workflows.landscape import _stratified

    frame = pl.DataFrame({"position": np.arange(10_030), "color": ["big"] * 10_000 + ["small"] * 30})
    sample = _stratified(frame, "color", 1000, seed=2, minimum=50)
    counts = dict(sample.group_by("color").len().iter_rows())
    assert counts == {"big": 997, "small": 30}
    assert dict(_stratified(frame, "color", 1000, seed=2).group_by("color").len().iter_rows()) == {"big": 997, "small": 2}
