"""Fitted models as a user works with them: model files, `metabatch fit`, the
joint_models registry, backfills with a fitted model, on both stores."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from helpers import embeddings, execute, store_with_runs
from metabatch.synthetic.campaigns import campaign_runs
from metabatch.cli import main
from metabatch.errors import BadInput
from metabatch.stores.migrate import migrate
from metabatch.models.modelfile import PRIOR_ENV, ModelSpec, matches, parse_model_file
from metabatch.models import BUILTIN_V2, list_models, registered
from metabatch.stores import open_store
from metabatch.urls import parse_url
from reference_v2 import encode_run


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# --------------------------------------------------------------------------
# model files


def test_an_empty_model_file_is_the_defaults_and_declares_no_branch():
    spec = parse_model_file("")
    assert spec == ModelSpec(text="") and spec.weights == {"config": 1.0, "env": 1.0, "outcome": 1.0}
    assert spec.env == spec.env_metrics == spec.config == spec.outcome_metrics == ()  # every branch is learnt
    assert spec.declared_config_branch("market_id") is None and spec.declared_metric_branch("regime_x") is None


@pytest.mark.parametrize(
    "text, key",
    [
        ("encoder = 'v3'", "encoder"),
        ("colour = 1", "colour"),
        ("[paths]\nignored = []", "paths.ignored"),
        ("[paths]\nignore = 'seed'", "paths.ignore"),
        ("[paths]\nenv = ['market[']", "paths.env"),
        ("[paths]\nenv_metrics = ['']", "paths.env_metrics"),
        ("[weights]\nconfig = -1", "weights.config"),
        ("[weights]\nenv = 'high'", "weights.env"),
        ("[weights]\noutcome = true", "weights.outcome"),
        ("[weights]\nlabel = 1", "weights.label"),
        ("paths = 3", "paths"),
        ("[weights]\nconfig = 0\nenv = 0\noutcome = 0", "weights.config"),
        ("encoder = ", "TOML"),
    ],
)
def test_a_bad_model_file_is_a_usage_error_naming_the_key(text, key):
    with pytest.raises(BadInput) as caught:
        parse_model_file(text, "model.toml")
    assert key in str(caught.value)


def test_a_pattern_matches_a_path_and_everything_under_it():
    assert matches("engine.weights", ("engine",)) and matches("engine.weights", ("*.weights",))
    assert matches("risk.stop.pct", ("risk.stop",)) and not matches("risk_stop", ("risk",))
    assert matches("sleeves.universe_id", PRIOR_ENV) and not matches("universe", PRIOR_ENV)


# --------------------------------------------------------------------------
# fit, the registry and backfill, through the CLI


@pytest.fixture(params=["duckdb", "postgres"])
def store_url(request, tmp_path, pg_url):
    url = f"duckdb://{tmp_path / 'models.duckdb'}" if request.param == "duckdb" else pg_url
    store_with_runs(url, campaign_runs(600, seed=3)[0])
    return url


def test_fit_backfill_refit_and_models(store_url, tmp_path):
    model_file = tmp_path / "model.toml"
    model_file.write_text('[paths]\nignore = ["seed", "notes", "git_commit"]\n[weights]\noutcome = 0.5\n')
    fitted = invoke("fit", "--runtime-url", store_url, "--joint-model-id", "my-v2", "--model-file", str(model_file), "--json")
    assert fitted.exit_code == 0, fitted.output
    summary = json.loads(fitted.output)
    assert summary["runs_read"] == 600 and summary["ignored_paths"] == 3

    model = registered(parse_url(store_url), "my-v2")
    assert model.encoder == "v2" and model.model_file == model_file.read_text() and model.fitted_runs == 600
    assert model.params["weights"]["outcome"] == 0.5 and "seed" not in model.params["config_paths"]

    done = invoke("backfill", "--runtime-url", store_url, "--joint-model-id", "my-v2", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["written"] == 600 and json.loads(done.output)["encoder"] == "v2"
    rows = {r["run_id"]: r for r in embeddings(store_url, "my-v2")}
    assert len(rows) == 600
    # each vector is the per-run reference's for the registered parameters
    texts = _run_texts(store_url)
    for run_id in list(rows)[:50]:
        config, metrics = texts[run_id]
        assert rows[run_id]["vector"] == encode_run(model.params, json.loads(config), json.loads(metrics))[0]

    again = invoke("fit", "--runtime-url", store_url, "--joint-model-id", "my-v2")
    assert again.exit_code == 1 and "already fitted" in again.output and "--refit" in again.output
    assert registered(parse_url(store_url), "my-v2").content_hash == model.content_hash

    refit = invoke("fit", "--runtime-url", store_url, "--joint-model-id", "my-v2", "--refit", "--json")  # now with the defaults
    assert refit.exit_code == 0 and json.loads(refit.output)["embeddings_deleted"] == 600
    assert embeddings(store_url, "my-v2") == []
    refitted = registered(parse_url(store_url), "my-v2")
    assert refitted.content_hash == json.loads(refit.output)["content_hash"] != model.content_hash
    assert "seed" in refitted.params["config_paths"]

    listed = invoke("models", "--runtime-url", store_url, "--format", "json")
    assert [m["model_id"] for m in json.loads(listed.output)] == ["my-v2"]
    assert json.loads(listed.output)[0]["content_hash"] == refitted.content_hash


def _run_texts(url: str) -> dict:
    from helpers import run_texts

    return {run_id: (values[0], values[1]) for run_id, values in run_texts(url).items()}


def test_the_registry_survives_migrate_twice(store_url):
    assert invoke("fit", "--runtime-url", store_url, "--joint-model-id", "kept", "--quiet").exit_code == 0
    before = registered(parse_url(store_url), "kept")
    for _ in range(2):
        assert invoke("migrate", "--runtime-url", store_url).exit_code == 0
    assert registered(parse_url(store_url), "kept") == before


def test_the_builtin_v2_id_is_fitted_on_first_use_and_then_reused(store_url):
    first = invoke("backfill", "--runtime-url", store_url, "--joint-model-id", BUILTIN_V2)
    assert first.exit_code == 0, first.output
    assert "fitted now with the defaults on 600 runs" in first.output
    fitted = registered(parse_url(store_url), BUILTIN_V2)
    second = invoke("backfill", "--runtime-url", store_url, "--joint-model-id", BUILTIN_V2)
    assert second.exit_code == 0 and "fitted now" not in second.output
    assert registered(parse_url(store_url), BUILTIN_V2).content_hash == fitted.content_hash


def test_weights_cannot_change_a_fitted_model(store_url):
    assert invoke("fit", "--runtime-url", store_url, "--joint-model-id", "my-v2", "--quiet").exit_code == 0
    result = invoke("backfill", "--runtime-url", store_url, "--joint-model-id", "my-v2", "--w-env", "2")
    assert result.exit_code == 2 and "--w-config/--w-env/--w-outcome" in result.output


def test_fit_refuses_an_id_that_already_has_v1_embeddings(store_url):
    assert invoke("backfill", "--runtime-url", store_url, "--quiet").exit_code == 0
    result = invoke("fit", "--runtime-url", store_url, "--joint-model-id", "joint-meta-config-env-v1")
    assert result.exit_code == 1 and "600 embeddings (written as v1)" in result.output


def test_an_unregistered_id_is_v1_even_without_a_registry(tmp_path):
    """A database migrated before joint_models existed: v1 ids embed as before."""
    url = f"duckdb://{tmp_path / 'old.duckdb'}"
    migrate(parse_url(url))
    execute(url, "DROP TABLE joint_models")
    store = open_store(parse_url(url))
    try:
        store.insert_runs(campaign_runs(50, seed=1)[0])
    finally:
        store.close()
    result = invoke("backfill", "--runtime-url", url, "--joint-model-id", "legacy-id", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["encoder"] == "v1"
    assert list_models(parse_url(url)) == []
    fit = invoke("fit", "--runtime-url", url, "--joint-model-id", "new-v2")
    assert fit.exit_code == 1 and "metabatch migrate" in fit.output


def test_later_runs_land_in_the_same_space(tmp_path):
    """Vectors of runs already embedded do not change when more runs are backfilled later."""
    url = f"duckdb://{tmp_path / 'later.duckdb'}"
    migrate(parse_url(url))
    runs, _ = campaign_runs(800, seed=6)
    store = open_store(parse_url(url))
    try:
        store.insert_runs(runs.slice(0, 500))
        assert invoke("fit", "--runtime-url", url, "--joint-model-id", "m", "--quiet").exit_code == 0
        assert invoke("backfill", "--runtime-url", url, "--joint-model-id", "m", "--quiet").exit_code == 0
        before = {r["run_id"]: r["vector"] for r in embeddings(url, "m")}
        store.insert_runs(runs.slice(500))
    finally:
        store.close()
    assert invoke("backfill", "--runtime-url", url, "--joint-model-id", "m", "--quiet", "--batch-size", "97").exit_code == 0
    after = {r["run_id"]: r["vector"] for r in embeddings(url, "m")}
    assert len(after) == 800 and all(after[k] == v for k, v in before.items())


def test_both_stores_give_the_same_vectors(tmp_path, pg_url):
    """The same runs and the same registered model give bit-identical vectors on PostgreSQL and DuckDB."""
    runs, _ = campaign_runs(400, seed=8)
    urls = [f"duckdb://{tmp_path / 'a.duckdb'}", pg_url]
    for url in urls:
        store_with_runs(url, runs)
    assert invoke("fit", "--runtime-url", urls[0], "--joint-model-id", "same", "--quiet").exit_code == 0
    row = registered(parse_url(urls[0]), "same").as_row()
    store = open_store(parse_url(urls[1]))
    try:
        store.save_model(row, "META_CONFIG_ENV_V0", replace=False)
    finally:
        store.close()
    assert registered(parse_url(urls[1]), "same").content_hash == row["content_hash"]
    vectors = []
    for url in urls:
        assert invoke("backfill", "--runtime-url", url, "--joint-model-id", "same", "--quiet").exit_code == 0
        vectors.append({r["run_id"]: (r["vector"], r["entity_scope"]["source"]) for r in embeddings(url, "same")})
    assert len(vectors[0]) == 400 and vectors[0] == vectors[1]
