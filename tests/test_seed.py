"""Tests for metabatch.synthetic.seed: the synthetic backtest_runs generator (no database)."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pytest

from metabatch.synthetic.seed import SEED_COLUMNS, _batch, generate_runs

N_SAMPLE = 20_000


def _strict_loads(text):
    """json.loads that refuses NaN / Infinity (not valid JSON)."""

    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def sample() -> pa.Table:
    return pa.concat_tables(generate_runs(N_SAMPLE, seed=11, batch_rows=8_000))


@pytest.fixture(scope="module")
def rows(sample) -> list[dict]:
    return sample.to_pylist()


def test_schema(sample):
    assert tuple(sample.column_names) == SEED_COLUMNS
    assert sample.schema.field("run_id").type == pa.string()
    assert sample.schema.field("strategy_id").type == pa.string()
    assert sample.schema.field("config_json").type == pa.string()
    assert sample.schema.field("start_date").type == pa.date32()
    assert sample.schema.field("end_date").type == pa.date32()
    assert sample.schema.field("universe_id").type == pa.string()
    assert sample.schema.field("metrics_json").type == pa.string()


@pytest.mark.parametrize(
    ("n", "batch_rows", "sizes"),
    [(0, 10, []), (1, 10, [1]), (25, 10, [10, 10, 5]), (30, 10, [10, 10, 10]), (7, 50_000, [7])],
)
def test_row_counts_and_batch_sizes(n, batch_rows, sizes):
    tables = list(generate_runs(n, seed=1, batch_rows=batch_rows))
    assert [t.num_rows for t in tables] == sizes
    assert sum(t.num_rows for t in tables) == n


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        list(generate_runs(-1))
    with pytest.raises(ValueError):
        list(generate_runs(10, batch_rows=0))


def test_deterministic_same_seed():
    a = list(generate_runs(2_500, seed=42, batch_rows=1_000))
    b = list(generate_runs(2_500, seed=42, batch_rows=1_000))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x.equals(y)


def test_different_seed_differs():
    a = pa.concat_tables(generate_runs(1_000, seed=1))
    b = pa.concat_tables(generate_runs(1_000, seed=2))
    assert a.column("config_json") != b.column("config_json")
    assert a.column("metrics_json") != b.column("metrics_json")
    assert a.column("run_id") != b.column("run_id")


def test_batch_regenerated_alone_and_prefix_stable():
    tables = list(generate_runs(2_500, seed=9, batch_rows=1_000))
    # batch k depends only on (seed, k) for a given batch size
    assert _batch(9, 1, 1_000, 1_000).equals(tables[1])
    assert _batch(9, 2, 1_000, 500).equals(tables[2])
    # fewer runs: a prefix of the same data
    shorter = pa.concat_tables(generate_runs(1_700, seed=9, batch_rows=1_000))
    assert shorter.equals(pa.concat_tables(tables).slice(0, 1_700))


def test_run_ids_unique_and_formatted(sample):
    ids = sample.column("run_id").to_pylist()
    assert len(set(ids)) == len(ids) == N_SAMPLE
    assert ids[0] == "BT_S11_00000000"
    assert ids[-1] == f"BT_S11_{N_SAMPLE - 1:08d}"


def test_dates(rows):
    for r in rows:
        assert r["end_date"] > r["start_date"]
        assert dt.date(2023, 1, 1) <= r["end_date"] <= dt.date(2026, 6, 30)


def test_config_json_objects_with_env_keys(rows):
    lookback_strings = max_position_objects = legacy_tags = sorted_keys = 0
    for r in rows:
        cfg = _strict_loads(r["config_json"])
        assert isinstance(cfg, dict)
        assert cfg["strategy_id"] == r["strategy_id"]
        assert isinstance(cfg["market_id"], str)
        assert isinstance(cfg["assessment"]["assessment_strategy_id"], str)
        assert isinstance(cfg["assessment"]["assessment_horizon_days"], int)
        if r["universe_id"] is None:
            assert cfg.get("universe_id") is None
        else:
            assert cfg["universe_id"] == r["universe_id"]
        assert all(isinstance(s["universe_id"], str) for s in cfg["sleeves"])
        assert cfg["backtest"]["end"] == r["end_date"].isoformat()
        lookback_strings += isinstance(cfg["engine"]["signal"]["lookback"], str)
        max_position_objects += isinstance(cfg["risk"]["max_position"], dict)
        legacy_tags += isinstance(cfg["tags"], str)
        sorted_keys += list(cfg) == sorted(cfg)
    # the irregular variants are there, at roughly their rates
    assert 0.003 * N_SAMPLE < lookback_strings < 0.03 * N_SAMPLE
    assert 0 < max_position_objects < 0.02 * N_SAMPLE
    assert 0 < legacy_tags < 0.02 * N_SAMPLE
    assert 0.1 * N_SAMPLE < sorted_keys < 0.3 * N_SAMPLE


def test_config_size_and_varying_lists(rows):
    sizes = [len(r["config_json"].encode()) for r in rows[:2_000]]
    assert 500 < sum(sizes) / len(sizes) < 1_100
    cfgs = [json.loads(r["config_json"]) for r in rows[:2_000]]
    for key in ("sleeves", "stops", "lookbacks"):
        lengths = {
            len(c["sleeves"]) if key == "sleeves"
            else len(c["risk"]["stops"]) if key == "stops"
            else len(c["engine"]["lookbacks"])
            for c in cfgs
        }
        assert len(lengths) >= 3, key


def test_universe_null_fraction(sample):
    frac = sample.column("universe_id").null_count / N_SAMPLE
    assert 0.01 < frac < 0.06


def test_metrics(rows):
    sql_null = json_null = empty = objects = 0
    for r in rows:
        text = r["metrics_json"]
        if text is None:
            sql_null += 1
            continue
        m = _strict_loads(text)
        if m is None:
            json_null += 1
        elif m == {}:
            empty += 1
        else:
            objects += 1
            assert m["max_drawdown"] < 0
            assert isinstance(m["n_trades"], int)
            assert set(m["lambda_bucket_sharpe"]) == {"low", "mid", "high"}
            assert isinstance(m["lambda_buckets"], list)
            for key in ("sharpe", "cagr", "vol", "turnover", "hit_rate"):
                assert isinstance(m[key], float)
    assert 0.01 < sql_null / N_SAMPLE < 0.06
    assert 0 < json_null < 0.02 * N_SAMPLE
    assert 0 < empty < 0.02 * N_SAMPLE
    assert objects > 0.9 * N_SAMPLE


def test_no_negative_zero_or_non_finite(sample):
    import pyarrow.compute as pc

    for col in ("config_json", "metrics_json"):
        texts = sample.column(col)
        for pattern in (":-0.0,", ":-0.0}", "-0.0]", "NaN", "Infinity"):
            assert not pc.any(pc.match_substring(texts, pattern)).as_py(), (col, pattern)
