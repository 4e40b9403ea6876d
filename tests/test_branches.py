"""Learnt branches (issue 17): v2 learns from the runs which paths say what was
tried (config), where (env) and how it went (outcome); dates are numbers; the
run's own window counts; environments nest; `models --explain` says why; and
models fitted before all this embed as they did."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import normalized_mutual_info_score

from helpers import embeddings, store_with_runs
from metabatch.pipeline.backfill import backfill
from metabatch.cli import main
from metabatch.workflows.cluster import cluster_runs
from metabatch.models.encoders.v2 import SLICES, V2Encoder, V2Model
from metabatch.models.fitting import fit_model
from metabatch.models.modelfile import ModelSpec, parse_model_file
from metabatch.models import content_hash, registered
from metabatch.models import fit as fit_and_register
from metabatch.synthetic.seed import SCHEMA
from metabatch.synthetic.shapes import labelled_runs
from metabatch.snapshot import export_parquet
from metabatch.stores import open_store
from metabatch.workflows.suggest import plan_suggestions
from metabatch.urls import parse_url
from reference_v2 import encode_run

FIXTURE = Path(__file__).parent / "fixtures" / "v2-format1.json"


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _embed(model: V2Model, runs: pa.Table) -> dict[str, bytes]:
    con = duckdb.connect()
    encoder = V2Encoder(model, "t")
    batch = encoder.embed(encoder.prepare(runs, con, None), con, None)
    scope = [json.loads(s)["run_id"] for s in batch.rows.column("entity_scope").to_pylist()]
    return dict(zip(scope, batch.rows.column("vector").to_pylist()))


def _runs(configs: list[dict], metrics: list[dict], starts=None, ends=None) -> pa.Table:
    n = len(configs)
    return pa.table(
        {
            "run_id": [f"R{i:05d}" for i in range(n)],
            "strategy_id": ["S"] * n,
            "config_json": [json.dumps(c) for c in configs],
            "start_date": pa.array(starts or [None] * n, pa.date32()),
            "end_date": pa.array(ends or [None] * n, pa.date32()),
            "universe_id": ["U"] * n,
            "metrics_json": [json.dumps(m) for m in metrics],
        },
        schema=SCHEMA,
    )


# --------------------------------------------------------------------------
# typed values: dates are numbers


@pytest.fixture(scope="module")
def dated_model() -> V2Model:
    """A date path declared env, its dates over three years, a config key beside it."""
    rng = np.random.default_rng(0)
    days = rng.integers(0, 3 * 365, 400)
    configs = [{"window": {"start": (dt.date(2020, 1, 1) + dt.timedelta(days=int(d))).isoformat()}, "kind": str(rng.choice(["a", "b"]))} for d in days]
    metrics = [{"sharpe": float(rng.normal())} for _ in days]
    return fit_model(_runs(configs, metrics), parse_model_file('[paths]\nenv = ["window"]\n'))


def _env_slice(model: V2Model, texts: list[str]) -> np.ndarray:
    vectors = _embed(model, _runs([{"window": {"start": t}, "kind": "a"} for t in texts], [{"sharpe": 0.0}] * len(texts)))
    start, stop = SLICES["env"]
    out = np.array([np.frombuffer(vectors[f"R{i:05d}"], "<f4")[start:stop] for i in range(len(texts))], np.float64)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


FORMATS = [
    lambda t: t.date().isoformat(),
    lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ"),
    lambda t: t.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
    lambda t: t.strftime("%Y-%m-%d %H:%M"),
]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.datetimes(min_value=dt.datetime(2020, 1, 10), max_value=dt.datetime(2022, 6, 1)), st.sampled_from(range(len(FORMATS))))
def test_a_date_and_the_day_after_land_near_each_other(dated_model, when, form):
    text = FORMATS[form]
    a, b, far = _env_slice(dated_model, [text(when), text(when + dt.timedelta(days=1)), text(when + dt.timedelta(days=300))])
    assert a @ b > 0.95  # a day apart: near, not a token only equal strings share
    assert a @ b > a @ far + 0.2


def test_date_paths_are_read_as_dates_and_match_the_reference(dated_model):
    m = dated_model.config_paths["window.start"]
    assert m.kind() == "date" and m.date is not None and m.string is None and m.how == "declared" and m.branch == "env"
    params = json.loads(json.dumps(dated_model.params()))
    configs = [{"window": {"start": t}, "kind": "b"} for t in ("2021-03-04", "2021-03-04T12:30:00Z", "2021-03-04 12:30+02:00", "not a date", "2021-02-30")]
    got = _embed(dated_model, _runs(configs, [{"sharpe": 1.0}] * len(configs)))
    for i, config in enumerate(configs):
        assert got[f"R{i:05d}"] == encode_run(params, config, {"sharpe": 1.0})[0]


# --------------------------------------------------------------------------
# learnt branches


@pytest.fixture(scope="module")
def catalog_model() -> tuple[V2Model, pa.Table]:
    runs, _ = labelled_runs("catalog", 3000, seed=3)
    return fit_model(runs, ModelSpec()), runs


def test_ids_that_follow_the_config_are_config_and_the_window_is_env(catalog_model):
    """Runs shaped like the reference's: universe_id, portfolio_id and
    assessment_strategy_id derive from strategy and horizon (config, whatever
    v1's names say); the window rolls across every sleeve (env); the over-run
    figures follow the environment, the returns follow sleeve and environment."""
    model, _ = catalog_model
    branch = {p: m.branch for p, m in {**model.config_paths, **model.metric_paths, **model.window_paths}.items()}
    for path in ("universe_id", "portfolio_id", "assessment_strategy_id", "assessment_horizon_days", "sleeve_id", "strategy_id"):
        assert branch[path] == "config", path
    for path in ("start_date", "end_date", "backtest_runs.start_date", "backtest_runs.end_date", "market_id"):
        assert branch[path] == "env", path
    for key in ("regime_risk_score_mean_over_run", "stab_risk_score_mean_over_run", "lambda_score_coverage_over_run"):
        assert branch[key] == "env", key
    for key in ("annualised_sharpe", "cumulative_return", "max_drawdown"):
        assert branch[key] == "outcome", key
    assert model.config_paths["start_date"].kind() == "date"
    assert all(m.how == "learned" for m in model.config_paths.values())
    figures = model.config_paths["universe_id"].figures  # the why is stored with the model
    assert figures["group"] == "string" and figures["env_evidence"] - (figures["config_share"] or 0.0) < 0.2
    assert model.config_paths["start_date"].figures["env_evidence"] - model.config_paths["start_date"].figures["config_share"] >= 0.2


def test_an_env_looking_id_that_follows_the_strategy_is_config():
    runs, _ = labelled_runs("follows_strategy", 3000, seed=4)
    model = fit_model(runs, ModelSpec())
    assert model.config_paths["universe_id"].branch == "config"
    assert model.config_paths["market_id"].branch == "env"
    assert model.config_paths["assessment.assessment_horizon_days"].branch == "env"
    assert model.config_paths["submitted_by.host"].branch == "config" and model.config_paths["submitted_by.host"].weight() == 0
    assert model.window_paths["backtest_runs.start_date"].branch == "none"  # windows drawn at random: not where


def _renamed(runs: pa.Table, old: str, new: str) -> pa.Table:
    configs = []
    for text in runs.column("config_json").to_pylist():
        config = json.loads(text)
        config[new] = config.pop(old)
        configs.append(json.dumps(config))
    return runs.set_column(runs.schema.get_field_index("config_json"), "config_json", pa.array(configs, pa.string()))


@pytest.fixture(scope="module")
def renamed_runs() -> tuple[pa.Table, V2Model]:
    runs, _ = labelled_runs("renamed", 2500, seed=5)
    return runs, fit_model(runs, ModelSpec())


def test_the_renamed_shape_has_an_env_key_and_a_config_key(renamed_runs):
    _, model = renamed_runs
    assert model.config_paths["venue"].branch == "env" and model.config_paths["rebalance"].branch == "config"


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.sampled_from(["venue", "rebalance"]), st.text("abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12))
def test_a_renamed_key_keeps_its_learned_branch(renamed_runs, key, name):
    runs, model = renamed_runs
    new = "zz_" + name
    again = fit_model(_renamed(runs, key, new), ModelSpec())
    assert again.config_paths[new].branch == model.config_paths[key].branch


@pytest.fixture(scope="module")
def small_campaign() -> pa.Table:
    runs, _ = labelled_runs("nested", 900, seed=6)
    return runs


PATHS = ["market_id", "universe_id", "rebalance", "risk.vol_target", "seed", "submitted_at"]
METRICS = ["annualised_sharpe", "regime_bull_frac", "stab_mean", "hit_rate"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.sampled_from(PATHS), st.sampled_from(["config", "env"]), st.sampled_from(METRICS), st.sampled_from(["env_metrics", "outcome_metrics"]))
def test_a_path_declared_in_the_model_file_is_never_moved(small_campaign, path, branch, metric, kind):
    spec = parse_model_file(f"[paths]\n{branch} = [{json.dumps(path)}]\n{kind} = [{json.dumps(metric)}]\n")
    model = fit_model(small_campaign, spec)
    declared = model.config_paths[path]
    assert (declared.branch, declared.how) == (branch, "declared")
    assert (model.metric_paths[metric].branch, model.metric_paths[metric].how) == ("env" if kind == "env_metrics" else "outcome", "declared")


@pytest.fixture(params=["duckdb", "postgres"])
def catalog_store(request, tmp_path, pg_url):
    url = f"duckdb://{tmp_path / 'catalog.duckdb'}" if request.param == "duckdb" else pg_url
    runs, _ = labelled_runs("catalog", 1500, seed=7)
    store_with_runs(url, runs)
    return url


def test_the_same_model_from_postgresql_and_duckdb(tmp_path, pg_url):
    runs, _ = labelled_runs("catalog", 1500, seed=7)
    duck = f"duckdb://{tmp_path / 'same.duckdb'}"
    hashes = {}
    for url in (duck, pg_url):
        store_with_runs(url, runs)
        done = invoke("fit", "--runtime-url", url, "--joint-model-id", "learnt", "--json")
        assert done.exit_code == 0, done.output
        summary = json.loads(done.output)
        hashes[url] = summary["content_hash"]
        assert "start_date" in summary["branches"]["env"] and "universe_id" not in summary["branches"]["env"]
    assert hashes[duck] == hashes[pg_url]
    model = registered(parse_url(pg_url), "learnt").v2()
    assert model.format == 2 and model.window_paths["backtest_runs.start_date"].branch == "env"


def test_fit_prints_the_branches_and_explain_says_why(catalog_store, tmp_path):
    fitted = invoke("fit", "--runtime-url", catalog_store, "--joint-model-id", "learnt")
    assert fitted.exit_code == 0, fitted.output
    assert "env (where it was tried):" in fitted.output and "models --explain learnt" in fitted.output
    table = invoke("models", "--runtime-url", catalog_store, "--explain", "learnt")
    assert table.exit_code == 0, table.output
    assert "same environment" in table.output
    universe = next(line for line in table.output.splitlines() if " universe_id " in f" {line} ")
    assert universe.split()[:1] == ["config"] and "learned" in universe
    as_json = json.loads(invoke("models", "--runtime-url", catalog_store, "--explain", "learnt", "--format", "json").output)
    rows = {r["path"]: r for r in as_json["paths"]}
    assert rows["universe_id"]["why"].endswith("not the environment") or "a setting of the config" in rows["universe_id"]["why"]
    assert "goes with the measured environment" in rows["start_date"]["why"] and "follows the configs" in rows["start_date"]["why"]
    assert rows["start_date"]["branch"] == "env" and rows["start_date"]["kind"] == "date"
    assert rows["backtest_runs.start_date"]["source"] == "window"
    assert set(rows["start_date"]["figures"]) == {"group", "env_evidence", "config_share"}
    assert rows["annualised_sharpe"]["branch"] == "outcome" and "between_env" in rows["annualised_sharpe"]["figures"]
    # a declaration overrides the learnt branch, and says so
    override = tmp_path / "override.toml"
    override.write_text('[paths]\nconfig = ["market_id"]\n')
    refit = invoke("fit", "--runtime-url", catalog_store, "--joint-model-id", "learnt", "--refit", "--model-file", str(override), "--quiet")
    assert refit.exit_code == 0, refit.output
    rows = {r["path"]: r for r in json.loads(invoke("models", "--runtime-url", catalog_store, "--explain", "learnt", "--format", "json").output)["paths"]}
    assert (rows["market_id"]["branch"], rows["market_id"]["how"]) == ("config", "declared")


def test_explain_on_a_v1_id_is_a_clear_usage_error(catalog_store, tmp_path):
    for model_id in ("joint-meta-config-env-v1", "never-fitted"):
        done = invoke("models", "--runtime-url", catalog_store, "--explain", model_id)
        assert done.exit_code == 2 and "v1" in done.output and "Traceback" not in done.output
    model_file = tmp_path / "v1.toml"
    model_file.write_text('encoder = "v1"\n')
    assert invoke("fit", "--runtime-url", catalog_store, "--joint-model-id", "old-style", "--model-file", str(model_file)).exit_code == 0
    done = invoke("models", "--runtime-url", catalog_store, "--explain", "old-style")
    assert done.exit_code == 2 and "v1 model" in done.output


# --------------------------------------------------------------------------
# models fitted before learnt branches


def test_a_model_fitted_before_embeds_bit_for_bit_as_it_did(tmp_path, pg_url):
    """A format-1 model (fitted by the code before learnt branches, stored as a
    fixture with the vectors it gave) keeps its parameters, its hash and its vectors."""
    fixture = json.loads(FIXTURE.read_text())
    params = fixture["params"]
    model = V2Model.from_params(params)
    assert model.format == 1 and model.params() == params
    rows = fixture["runs"]
    runs = pa.table(
        {c: ([dt.date.fromisoformat(r[c]) if r[c] else None for r in rows] if c.endswith("_date") else [r[c] for r in rows]) for c in SCHEMA.names},
        schema=SCHEMA,
    )
    want = {run_id: base64.b64decode(v) for run_id, v in fixture["vectors"].items()}
    assert _embed(model, runs) == want
    for url in (f"duckdb://{tmp_path / 'old.duckdb'}", pg_url):
        store_with_runs(url, runs)
        store = open_store(parse_url(url))
        try:
            row = {"model_id": "old-v2", "encoder": "v2", "model_file": "", "params": params, "fitted_runs": 800, "selection": {}}
            row["content_hash"] = content_hash("v2", "", params)
            store.save_model(row, "META_CONFIG_ENV_V0", replace=False)
        finally:
            store.close()
        assert invoke("backfill", "--runtime-url", url, "--joint-model-id", "old-v2", "--quiet").exit_code == 0
        written = {r["run_id"]: r["vector"] for r in embeddings(url, "old-v2")}
        assert written == want, url


# --------------------------------------------------------------------------
# environments nested in markets; suggest in the target's environment


@pytest.fixture(scope="module")
def nested_world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nested")
    url = f"duckdb://{folder / 'runs.duckdb'}"
    runs, labels = labelled_runs("nested", 6000, seed=8)
    store_with_runs(url, runs)
    fit_and_register(parse_url(url), parse_url(url), "nested-v2")
    backfill(parse_url(url), model_id="nested-v2")
    snapshot = folder / "snapshot"
    export_parquet(snapshot, parse_url(url), parse_url(url))
    return {"snapshot": snapshot, "labels": labels}


def test_cluster_on_env_finds_the_markets_and_their_periods(nested_world):
    result = cluster_runs("nested-v2", on="env", snapshot=nested_world["snapshot"])
    joined = result.assignments.join(nested_world["labels"], on="run_id")
    assert result.chosen_by == "nested silhouette" and result.coarse_k == 3 and result.k == 8
    assert normalized_mutual_info_score(joined["env"], joined["cluster"]) > 0.9
    assert normalized_mutual_info_score(joined["market"], joined["coarse"]) > 0.9
    shown = invoke("cluster", "--snapshot", str(nested_world["snapshot"]), "--model-id", "nested-v2", "--on", "env", "--quiet")
    assert shown.exit_code == 0, shown.output
    assert "3 coarse" in shown.output and "8 environments at the finest level" in shown.output


def test_suggest_keeps_to_the_targets_market_and_period(nested_world):
    labels = nested_world["labels"]
    env_of = dict(zip(labels["run_id"].to_list(), labels["env"].to_list()))
    for target in labels["run_id"].to_list()[:10]:
        found = plan_suggestions("nested-v2", like_run=target, snapshot=nested_world["snapshot"], top_k=5)
        supporting = [r for ids in found.frame["run_ids"].to_list() for r in ids]
        same = np.mean([env_of[r] == env_of[target] for r in supporting])
        assert same > 0.95, target
    # the window is an env key a user can name: runs of that period come first
    start = labels.filter(labels["env"] == 0)["run_id"][0]
    found = plan_suggestions("nested-v2", like_run=start, snapshot=nested_world["snapshot"], top_k=3)
    assert "backtest_runs.start_date" in found.target["env"]
    by_keys = plan_suggestions("nested-v2", env={"backtest_runs.start_date": found.target["env"]["backtest_runs.start_date"],
                                                 "market_id": found.target["env"]["market_id"]}, snapshot=nested_world["snapshot"], top_k=3)
    supporting = [r for ids in by_keys.frame["run_ids"].to_list() for r in ids]
    assert np.mean([env_of[r] == 0 for r in supporting]) > 0.9


def test_a_window_value_that_is_not_a_date_is_a_clear_error(nested_world):
    shown = invoke("suggest", "--snapshot", str(nested_world["snapshot"]), "--model-id", "nested-v2", "--env", "backtest_runs.start_date=2024-13-45")
    assert shown.exit_code == 2 and "backtest_runs.start_date=2024-13-45: not a date" in shown.output, shown.output
    # this model's env has no window length: the rule on its own
    import duckdb

    from metabatch.errors import BadInput
    from metabatch.workflows.environments import _window_leaves

    key = "backtest_runs.window_days"
    [(path, rows, days, _)] = _window_leaves(duckdb.connect(), [{key: 21}, {}, {key: "7.5"}], [key]).numbers
    assert path == key and rows.tolist() == [0, 2] and days.tolist() == [21.0, 7.5]
    with pytest.raises(BadInput, match="window_days=abc: not a number of days"):
        _window_leaves(duckdb.connect(), [{key: 21}, {key: "abc"}], [key])
