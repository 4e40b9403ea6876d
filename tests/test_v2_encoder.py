"""The v2 encoder against a plain per-run reference (tests/reference_v2.py), and
the invariances it promises: key order, ignored paths, the batch a run is in."""

from __future__ import annotations

import json
import random

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metabatch.synthetic.campaigns import campaign_runs
from metabatch.models.encoders.v2 import SLICES, V2Encoder, V2Model
from metabatch.models.fitting import FitOptions, RunSample, fit_model
from metabatch.models.modelfile import ModelSpec, parse_model_file
from metabatch.synthetic.seed import SCHEMA
from metabatch.pipeline.unnest import ShapeCache
from reference_v2 import encode_run

KEYS = ["a", "b", "c", "kind", "lookback", "market_id", "universe_id", "tags", "signals", "name", "w", "a.b", "Ä"]
# keys DuckDB cannot take as struct fields ("" and case twins) are walked the slow way: the tests draw them rarely
ODD_KEYS = ["", "A"]
WORDS = ["x", "y", "gbm", "trend", "US_EQ", "", "ü", "a=b", "1"]
METRIC_KEYS = ["sharpe", "max_drawdown", "regime_bull", "stab_mean", "universe_coverage", "turnover", "new_metric"]

keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), st.sampled_from(KEYS), st.sampled_from(KEYS), st.sampled_from(ODD_KEYS))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.floats(-1000, 1000, allow_nan=False),
    st.sampled_from(WORDS),
    st.text(max_size=6),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)),
    max_leaves=14,
)
configs = st.one_of(st.dictionaries(keys, json_values, max_size=6), st.sampled_from([None, {}, [], 0, False, "", [1], "x", 3, True]))
metrics = st.one_of(
    st.dictionaries(st.sampled_from(METRIC_KEYS), st.one_of(st.floats(-5, 5, allow_nan=False), st.booleans(), st.integers(-10, 10**6), st.text(max_size=3), st.none()), max_size=5),
    st.sampled_from([None, {}]),
)


def _corpus(n: int, seed: int) -> list[tuple]:
    """Random nested configs and metrics over the same keys, for the fit."""
    rng = random.Random(seed)

    def value(depth):
        kind = rng.random()
        if depth > 2 or kind < 0.5:
            return rng.choice([rng.randint(-5, 500), rng.random() * 10, rng.choice(WORDS), True, False, None, 10**rng.randint(1, 12)])
        if kind < 0.75:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {rng.choice(KEYS): value(depth + 1) for _ in range(rng.randint(0, 4))}

    return [
        ({rng.choice(KEYS): value(0) for _ in range(rng.randint(1, 6))}, {k: rng.random() * 3 for k in rng.sample(METRIC_KEYS[:-1], 4)})
        for _ in range(n)
    ]


def _runs(pairs: list[tuple], prefix: str = "R") -> pa.Table:
    n = len(pairs)
    return pa.table(
        {
            "run_id": [f"{prefix}{i:05d}" for i in range(n)],
            "strategy_id": ["S"] * n,
            "config_json": [None if c is None else json.dumps(c) for c, _ in pairs],
            "start_date": pa.array([None] * n, pa.date32()),
            "end_date": pa.array([None] * n, pa.date32()),
            "universe_id": ["U"] * n,
            "metrics_json": [json.dumps(m) if m is not None else "null" for _, m in pairs],
        },
        schema=SCHEMA,
    )


@pytest.fixture(scope="module")
def model() -> V2Model:
    """Fitted on campaign runs plus random configs over the tests' keys."""
    campaign, _ = campaign_runs(300, seed=5)
    mixed = pa.concat_tables([campaign, _runs(_corpus(300, 1), "F")])
    return fit_model(mixed, ModelSpec())


def _embed(model: V2Model, runs: pa.Table, con=None, cache=None) -> dict[str, tuple[bytes, str]]:
    """run_id -> (vector bytes, source) through the encoder backfill drives."""
    con = con or duckdb.connect()
    encoder = V2Encoder(model, "test-v2")
    batch = encoder.embed(encoder.prepare(runs, con, cache), con, cache)
    scope = [json.loads(s) for s in batch.rows.column("entity_scope").to_pylist()]
    vectors = batch.rows.column("vector").to_pylist()
    return {s["run_id"]: (v, s["source"]) for s, v in zip(scope, vectors)}, batch


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(configs, metrics), min_size=1, max_size=10))
def test_matches_the_per_run_reference(model, pairs):
    params = json.loads(json.dumps(model.params()))
    runs = _runs(pairs)
    got, batch = _embed(model, runs)
    rejected = dict(batch.rejected)
    for i, (config, metric) in enumerate(pairs):
        run_id = f"R{i:05d}"
        vector, source = encode_run(params, config, metric)
        if vector is None and source:
            assert run_id in rejected
        elif vector is None:
            assert run_id not in got and run_id not in rejected
        else:
            assert got[run_id] == (vector, source), run_id


def _shuffled(value, rng):
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.dictionaries(keys, json_values, min_size=1, max_size=6), metrics), min_size=1, max_size=8), st.randoms())
def test_key_order_changes_nothing(model, pairs, rng):
    before, _ = _embed(model, _runs(pairs))
    after, _ = _embed(model, _runs([(_shuffled(c, rng), _shuffled(m, rng)) for c, m in pairs]))
    assert before == after


@pytest.fixture(scope="module")
def ignoring_model() -> V2Model:
    campaign, _ = campaign_runs(300, seed=5)
    noisy = [({**c, "zz_ignored": {"seed": i, "note": f"n{i}"}}, m) for i, (c, m) in enumerate(_corpus(300, 1))]
    spec = parse_model_file('[paths]\nignore = ["zz_ignored*", "seed", "notes"]\n')
    return fit_model(pa.concat_tables([campaign, _runs(noisy, "F")]), spec)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.dictionaries(keys, json_values, min_size=1, max_size=6), metrics), min_size=1, max_size=8), json_values)
def test_an_ignored_path_changes_nothing(ignoring_model, pairs, noise):
    plain, _ = _embed(ignoring_model, _runs(pairs))
    noisy, _ = _embed(ignoring_model, _runs([({**c, "zz_ignored": noise, "zz_ignored_too": [noise]}, m) for c, m in pairs]))
    assert plain == noisy


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(configs, metrics), min_size=2, max_size=14), st.randoms())
def test_a_runs_vector_is_the_same_in_any_batch(model, pairs, rng):
    runs = _runs(pairs)
    whole, _ = _embed(model, runs)
    alone = {}
    for i in range(runs.num_rows):
        alone.update(_embed(model, runs.slice(i, 1))[0])
    assert alone == whole
    # as a backfill does: batches in some order, one DuckDB connection, a structure cache across them
    order = list(range(runs.num_rows))
    rng.shuffle(order)
    shuffled = runs.take(pa.array(order))
    con, cache, cached = duckdb.connect(), ShapeCache(), {}
    cut = sorted(rng.sample(range(1, runs.num_rows), k=min(2, runs.num_rows - 1)))
    for start, stop in zip([0, *cut], [*cut, runs.num_rows]):
        cached.update(_embed(model, shuffled.slice(start, stop - start), con, cache)[0])
    assert cached == whole


def test_campaign_runs_match_the_reference(model):
    """Realistic configs (lists of objects, optional keys, noise) too, in one big batch."""
    runs, _ = campaign_runs(400, seed=9)
    got, _ = _embed(model, runs)
    params = json.loads(json.dumps(model.params()))
    columns = ("run_id", "config_json", "metrics_json", "start_date", "end_date")
    for run_id, config, metric, start, end in zip(*(runs.column(c).to_pylist() for c in columns)):
        assert got[run_id] == encode_run(params, json.loads(config), json.loads(metric), start, end), run_id


def test_slices_make_the_joint_cosine_the_weighted_mean_of_branch_cosines():
    runs, _ = campaign_runs(400, seed=9)
    spec = parse_model_file("[weights]\nconfig = 2.0\nenv = 1.0\noutcome = 0.5\n")
    model = fit_model(runs, spec)
    got, _ = _embed(model, runs)
    vectors = np.array([np.frombuffer(v, "<f4") for v, s in got.values() if s == "config+env+outcome"], np.float64)
    a, b = vectors[0], vectors[1:]
    joint = b @ a / (np.linalg.norm(b, axis=1) * np.linalg.norm(a))
    shares = model.branch_weights()  # the file's weights, outcome's times its fitted reliability
    assert shares["config"] == 2.0 and shares["env"] == 1.0 and 0 < shares["outcome"] < 0.5
    mean = 0
    for branch in ("config", "env", "outcome"):
        start, stop = SLICES[branch]
        mean = mean + shares[branch] * (b[:, start:stop] @ a[start:stop]) / (np.linalg.norm(b[:, start:stop], axis=1) * np.linalg.norm(a[start:stop]))
    np.testing.assert_allclose(joint, mean / sum(shares.values()), atol=1e-6)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_a_config_path_never_fitted_gives_nothing_and_is_reported(model):
    config = {"a": 3, "kind": "gbm"}
    plain, _ = _embed(model, _runs([(config, {"sharpe": 1.0})]))
    encoder = V2Encoder(model, "test-v2")
    con = duckdb.connect()
    runs = _runs([({**config, "brand_new_key": {"deep": [1, 2, "z"]}}, {"sharpe": 1.0})])
    batch = encoder.embed(encoder.prepare(runs, con, None), con, None)
    assert batch.rows.column("vector").to_pylist()[0] == plain["R00000"][0]
    assert encoder.unseen_config_paths == {"brand_new_key.deep"}


def test_a_metric_never_fitted_counts_in_its_branch(model):
    base, _ = _embed(model, _runs([({"a": 3}, {"sharpe": 1.0})]))
    new, _ = _embed(model, _runs([({"a": 3}, {"sharpe": 1.0, "regime_never_seen": 0.7})]))
    v0, v1 = (np.frombuffer(x["R00000"][0], "<f4") for x in (base, new))
    start, stop = SLICES["env"]
    assert not np.array_equal(v0[start:stop], v1[start:stop])  # regime_* is an env metric


def test_a_host_name_spread_at_random_weighs_less_than_what_tells_families_apart():
    runs, _ = campaign_runs(3000, seed=4)
    model = fit_model(runs, ModelSpec())
    host = model.config_paths["submitted_by.host"].string.weight
    for telling in ("strategy.signal.type", "model.kind", "portfolio.method"):
        assert model.config_paths[telling].string.weight > 0.5 > host + 0.4, telling
    assert model.config_paths["seed"].number.weight == 0.0
    assert model.config_paths["initial_capital"].number.weight == 0.0


def test_the_sample_does_not_depend_on_the_order_runs_come_in():
    runs, _ = campaign_runs(900, seed=2)
    a, b = RunSample(200), RunSample(200)
    for start in range(0, 900, 128):
        a.add(runs.slice(start, 128))
    order = np.random.default_rng(1).permutation(900)
    shuffled = runs.take(pa.array(order))
    for start in range(0, 900, 300):
        b.add(shuffled.slice(start, 300))
    assert a.table().equals(b.table())
    assert a.runs == b.runs == 900


def test_fit_options_without_weights_give_every_group_one():
    runs, _ = campaign_runs(300, seed=3)
    model = fit_model(runs, ModelSpec(), options=FitOptions(weigh_config="none"))
    assert model.config_paths["seed"].number.weight == 1.0


def _with_outcomes(runs: pa.Table, labels, repeatable: bool) -> pa.Table:
    """The runs with their outcome metrics replaced: set by the run's (family,
    environment) alone, or drawn at random per run; env descriptors kept."""
    rng = np.random.default_rng(0)
    cell_value = rng.normal(size=(64, 64, 3))
    out = []
    for metrics, family, env in zip(runs.column("metrics_json").to_pylist(), labels["family"].to_list(), labels["env"].to_list()):
        kept = {k: v for k, v in json.loads(metrics).items() if k.startswith(("regime_", "stab_", "fragility_")) or "coverage" in k}
        values = cell_value[family, env] if repeatable else rng.normal(size=3)
        out.append(json.dumps({**kept, "annualised_sharpe": values[0], "max_drawdown": -abs(values[1]), "turnover": 5 + values[2]}))
    return runs.set_column(runs.schema.get_field_index("metrics_json"), "metrics_json", pa.array(out, pa.string()))


def test_outcomes_weigh_in_the_joint_space_as_much_as_they_repeat():
    """Outcomes set by the kind of config and environment keep most of their
    weight; outcomes that are per-run luck keep little, so they cannot decide
    which runs are neighbours (the outcome slice is still there to compare alone)."""
    runs, labels = campaign_runs(3000, seed=4)
    noisy = _with_outcomes(runs, labels, False)
    repeatable = fit_model(_with_outcomes(runs, labels, True), ModelSpec())
    luck = fit_model(noisy, ModelSpec())
    assert repeatable.reliability["outcome"] > 0.8
    assert luck.reliability["outcome"] < 0.15
    assert luck.branch_weights()["outcome"] == luck.reliability["outcome"] * 1.0
    got, _ = _embed(luck, noisy)
    assert all(source == "config+env+outcome" for _, source in got.values())
    plain = fit_model(noisy, ModelSpec(), options=FitOptions(outcome_reliability=False))
    assert "outcome" not in plain.reliability


def test_numbers_near_the_float_limit_fit_and_embed_as_the_reference_does():
    """Values near +-1.8e308 overflow to +-inf in the z-score and the knots: clipped,
    silently (the suite turns warnings into errors), and as the reference does."""
    rng = random.Random(0)
    extreme = [1.7976931348623157e308, -1.7976931348623157e308, 1e-300, 0.0, 5.0, 1e200, -1e250]
    pairs = [
        ({"x": rng.choice(extreme), "y": [rng.choice(extreme), rng.choice(extreme)], "kind": rng.choice("ab")},
         {"sharpe": rng.choice(extreme), "regime_bull": rng.choice(extreme)})
        for _ in range(300)
    ]
    model = fit_model(_runs(pairs), ModelSpec())
    got, _ = _embed(model, _runs(pairs))
    params = json.loads(json.dumps(model.params()))
    for i, (config, metric) in enumerate(pairs):
        assert got[f"R{i:05d}"] == encode_run(params, config, metric)
