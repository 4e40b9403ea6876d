"""Seed: deterministic, columnar generator of synthetic ``backtest_runs`` rows.

``generate_runs(n, seed)`` yields Arrow tables of at most ``batch_rows`` rows
(``SEED_COLUMNS``), n rows in all. Batch k is drawn from
``numpy.random.default_rng([seed, k])`` only, always at the full ``batch_rows``
size and then cut, so:

- a batch can be regenerated on its own (``_batch(seed, k, batch_rows, rows)``)
  and memory stays bounded by one batch;
- for a fixed ``(seed, batch_rows)`` the runs of a smaller n are a prefix of
  the runs of a larger n (changing ``batch_rows`` changes the data).

No per-row Python: every column is drawn with numpy and the JSON text is
assembled in Polars with ``concat_str`` from pre-quoted vocabulary strings and
numbers cast to text (shortest round-trip form, rounded to a few decimals,
never NaN/inf/-0.0). Optional keys are fragments that are either
``,"key":value`` or empty; lists of varying length are joined from fixed slots
with ``ignore_nulls``.

What the rows look like (realistic, with the irregularities real data has):

- 6 strategies over 5 markets, ~2-3 universes each; ``universe_id`` is null
  for ~3% of runs (the config then has ``"universe_id": null`` or no key);
- ``config_json`` (~900 bytes on average, ~650-1300): a sleeve-style config nested 2-3 levels
  with env keys ``market_id``, ``universe_id``,
  ``assessment.assessment_strategy_id``, ``assessment.assessment_horizon_days``
  and ``sleeves[i].universe_id``; lists of varying length (lookbacks, stops,
  tags, sleeves, neutralize); booleans; optional keys; an occasional null;
  ``engine.signal.lookback`` is ``"20d"`` (a string) in ~1% of runs,
  ``risk.max_position`` an object in ~0.5%, ``tags`` a legacy string in ~0.5%;
  a key ``engine-rev`` beside ``engine`` in ~10% (per-level key order differs
  from whole-path order there); top-level keys in writer order (not sorted),
  and sorted by code point for ~20% of runs (as ``sort_keys=True`` writes them);
- ``metrics_json``: sharpe, sortino (null ~2%), cagr, max_drawdown (< 0), vol,
  turnover, hit_rate, n_trades (int), lambda_bucket_sharpe (object),
  lambda_buckets (list), sometimes calmar / status / converged (bool);
  Arrow NULL for ~3% of runs, JSON ``null`` for ~0.5%, ``{}`` for ~0.5%.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa

from ..stores.base import RUN_SCHEMA

SEED_COLUMNS = ("run_id", "strategy_id", "config_json", "start_date", "end_date", "universe_id", "metrics_json")

SCHEMA = RUN_SCHEMA

END_MIN = _dt.date(2023, 1, 1)
END_MAX = _dt.date(2026, 6, 30)
_EPOCH = _dt.date(1970, 1, 1)

# rates of the irregular variants
P_UNIVERSE_NULL = 0.03
P_METRICS_SQL_NULL = 0.03
P_METRICS_JSON_NULL = 0.005
P_METRICS_EMPTY = 0.005
P_LOOKBACK_STRING = 0.01
P_MAX_POSITION_OBJECT = 0.005
P_TAGS_LEGACY_STRING = 0.005
P_SORTED_KEYS = 0.20

# --------------------------------------------------------------------------
# Vocabularies (all JSON-safe; quoted once with json.dumps)

# strategy, market, universes, engine, signal type, share, long/short, calendar, benchmark, vol
_STRATEGIES = [
    ("US_EQ_CORE_LONG_EQ", "US_EQ", ["US_EQ_UNIVERSE_A", "US_EQ_SP500", "US_EQ_R1000"],
     "core_long_eq", "composite", 0.30, False, "NYSE", "SPX", 0.15),
    ("US_EQ_MOMENTUM_LS", "US_EQ", ["US_EQ_R1000", "US_EQ_R3000", "US_EQ_UNIVERSE_A"],
     "xs_momentum", "momentum", 0.20, True, "NYSE", "SPX", 0.10),
    ("EU_EQ_VALUE_LONG", "EU_EQ", ["EU_EQ_STOXX600", "EU_EQ_UNIVERSE_A"],
     "value_long", "value", 0.15, False, "XETR", "SXXP", 0.16),
    ("JP_EQ_QUALITY", "JP_EQ", ["JP_EQ_TOPIX500", "JP_EQ_NIKKEI225"],
     "quality_tilt", "quality", 0.12, False, "XTKS", "TPX", 0.14),
    ("GLOBAL_MACRO_FX", "FX_G10", ["FX_G10_MAJORS", "FX_G10_CROSSES"],
     "fx_carry_trend", "carry", 0.13, True, "FX24", "DXY", 0.08),
    ("CRYPTO_TREND", "CRYPTO", ["CRYPTO_TOP20", "CRYPTO_TOP50"],
     "ts_trend", "trend", 0.10, True, "CRYPTO24", "BTC", 0.45),
]
_STRAT_IDS = [s[0] for s in _STRATEGIES]
_STRAT_SHORT = ["CORE_LONG_EQ", "MOM_LS", "EU_VALUE", "JP_QUAL", "MACRO_FX", "CRYPTO_TREND"]
_STRAT_P = np.array([s[5] for s in _STRATEGIES])
_STRAT_P = _STRAT_P / _STRAT_P.sum()
_IS_LS = np.array([s[6] for s in _STRATEGIES])
_IS_EQ = np.array([s[1].endswith("_EQ") for s in _STRATEGIES])
_VOL = np.array([s[9] for s in _STRATEGIES])
_UNIVERSES = [u for s in _STRATEGIES for u in s[2]]
_UNI_OFF = np.cumsum([0] + [len(s[2]) for s in _STRATEGIES])[:-1]
_UNI_CNT = np.array([len(s[2]) for s in _STRATEGIES])

_ASSESS = ["WALK_FORWARD_V2", "CPCV_V1", "HOLDOUT_V1", "REGIME_SPLIT_V1"]
_ASSESS_P = [0.45, 0.25, 0.2, 0.1]
_HORIZONS = np.array([5, 10, 21, 63, 126, 252])
_HORIZONS_P = [0.1, 0.15, 0.4, 0.2, 0.1, 0.05]
_REBALANCE = ["daily", "weekly", "biweekly", "monthly"]
_REBALANCE_P = [0.15, 0.45, 0.15, 0.25]
_PORT_METHOD = ["risk_parity", "mean_variance", "equal_weight", "hrp", "inverse_vol"]
_COST_MODEL = ["linear", "sqrt_impact", "fixed_bps"]
_STOP_KINDS = ["trailing", "hard", "time", "vol_scaled"]
_TAGS = ["core", "v3", "prod", "research", "low_turnover", "robust", "ensemble", "nightly", "legacy", "v2"]
_NEUTRALIZE = ["sector", "beta", "country", "size", "industry"]
_ENGINE_REV = ["3.1.0", "3.2.1", "3.2.4", "4.0.0-rc1"]
_NOTES = ["re-run after data fix", "grid search point", "baseline", "Δ-hedged variant", "promoted from research"]
_STATUS = ["ok", "ok", "ok", "ok", "partial", "ok_with_warnings"]
_CREATED_BY = ["scheduler", "meta_orchestrator", "alice", "bob", "campaign_runner"]
_SLEEVE_IDS = ["S1", "S2", "S3", "S4"]

_MAX_LOOKBACKS = 5
_LADDER = np.array([3, 5, 10, 20, 40, 60, 120, 252])
_MAX_STOPS = 3
_MAX_TAGS = 4
_MAX_SLEEVES = 4
_MAX_NEUTRALIZE = 3
_MAX_LAMBDA = 6


def _q(values) -> list[str]:
    return [json.dumps(v, ensure_ascii=False) for v in values]


def _pick(vocab: list[str], idx: np.ndarray) -> pl.Series:
    """vocab[idx] as a string Series (vocab already in its final text form)."""
    return pl.Series(vocab, dtype=pl.String).gather(idx.astype(np.int64))


def _r(x: np.ndarray, decimals: int) -> np.ndarray:
    """Round to a few decimals; + 0.0 turns -0.0 into 0.0."""
    return np.round(x, decimals) + 0.0


# --------------------------------------------------------------------------
# Text-building expressions


def _cat(*parts) -> pl.Expr:
    """Concatenate literal strings and expressions (null if any part is null)."""
    return pl.concat_str([pl.lit(p) if isinstance(p, str) else p for p in parts])


def _opt(mask: str, *parts) -> pl.Expr:
    """The fragment where the boolean column ``mask`` is true, else ''."""
    return pl.when(pl.col(mask)).then(_cat(*parts)).otherwise(pl.lit(""))


def _list(length: str, slots: list[pl.Expr]) -> pl.Expr:
    """JSON array text of the first ``length`` slots."""
    items = [pl.when(pl.col(length) > j).then(s) for j, s in enumerate(slots)]
    return _cat("[", pl.concat_str(items, separator=",", ignore_nulls=True), "]")


def _num(col: str) -> pl.Expr:
    return pl.col(col).cast(pl.String)


def _bool(col: str) -> pl.Expr:
    return pl.when(pl.col(col)).then(pl.lit("true")).otherwise(pl.lit("false"))


# --------------------------------------------------------------------------
# One batch


def _draw(rng: np.random.Generator, b: int) -> dict:
    """All random columns of one batch, at the full batch size b (cut later)."""
    c: dict[str, np.ndarray] = {}
    u = lambda: rng.random(b)  # noqa: E731

    s = rng.choice(len(_STRATEGIES), size=b, p=_STRAT_P)
    c["s"] = s
    c["uni"] = _UNI_OFF[s] + (u() * _UNI_CNT[s]).astype(np.int64)
    c["uni_null"] = u() < P_UNIVERSE_NULL
    c["uni_cfg_absent"] = u() < 0.5  # when null: key absent (else "universe_id": null)

    # dates: end uniform in [END_MIN, END_MAX], length 63..1500 days
    lo = (END_MIN - _EPOCH).days
    hi = (END_MAX - _EPOCH).days
    c["end"] = rng.integers(lo, hi + 1, size=b, dtype=np.int64)
    c["start"] = c["end"] - rng.integers(63, 1501, size=b, dtype=np.int64)

    c["campaign"] = rng.integers(0, 200, size=b)
    c["has_campaign"] = u() < 0.5
    c["created_by"] = rng.integers(0, len(_CREATED_BY), size=b)
    c["has_created_by"] = u() < 0.3
    c["has_seed"] = u() < 0.5
    c["rng_seed"] = rng.integers(0, 2**31 - 1, size=b)
    c["sorted_keys"] = u() < P_SORTED_KEYS

    # assessment
    c["assess"] = rng.choice(len(_ASSESS), size=b, p=_ASSESS_P)
    c["horizon"] = rng.choice(_HORIZONS, size=b, p=_HORIZONS_P)
    c["has_min_hist"] = u() < 0.3
    c["min_hist"] = rng.choice(np.array([126, 252, 504]), size=b)
    c["has_embargo"] = u() < 0.25
    c["embargo"] = rng.integers(0, 11, size=b)

    # backtest window
    c["has_warmup"] = u() < 0.4
    c["warmup"] = rng.choice(np.array([20, 60, 126, 252]), size=b)
    c["has_benchmark"] = u() < 0.4
    c["has_calendar"] = u() < 0.5
    c["has_capital"] = u() < 0.3
    c["capital"] = rng.choice(np.array([1_000_000, 10_000_000, 100_000_000, 250_000_000]), size=b)

    # engine
    c["n_lookbacks"] = rng.integers(1, _MAX_LOOKBACKS + 1, size=b)
    # a sorted random subset of a ladder, n_lookbacks long (unused slots hold a filler)
    rank = np.argsort(np.argsort(rng.random((b, len(_LADDER))), axis=1), axis=1)
    chosen = np.sort(np.where(rank < c["n_lookbacks"][:, None], _LADDER[None, :], 10**6), axis=1)
    for j in range(_MAX_LOOKBACKS):
        c[f"lb{j}"] = chosen[:, j]
    c["rebalance"] = rng.choice(len(_REBALANCE), size=b, p=_REBALANCE_P)
    c["lookback"] = rng.choice(np.array([10, 20, 40, 60, 120, 252]), size=b)
    c["lookback_str"] = u() < P_LOOKBACK_STRING
    c["decay"] = _r(rng.uniform(0.85, 0.995, size=b), 3)
    c["zclip"] = rng.choice(np.array([2.0, 2.5, 3.0, 3.5, 4.0]), size=b)
    c["has_neutralize"] = _IS_EQ[s] & (u() < 0.4)
    c["n_neutralize"] = rng.integers(1, _MAX_NEUTRALIZE + 1, size=b)
    neut = np.argsort(rng.random((b, len(_NEUTRALIZE))), axis=1)[:, :_MAX_NEUTRALIZE]
    for j in range(_MAX_NEUTRALIZE):
        c[f"neut{j}"] = neut[:, j]
    c["use_gpu"] = u() < 0.2
    c["has_use_gpu"] = u() < 0.25
    c["has_engine_rev"] = u() < 0.1
    c["engine_rev"] = rng.integers(0, len(_ENGINE_REV), size=b)

    # risk
    c["max_gross"] = np.where(_IS_LS[s], rng.choice(np.array([1.5, 2.0, 2.5, 3.0]), size=b), 1.0)
    c["max_net"] = _r(rng.uniform(0.0, 0.3, size=b), 2)
    c["max_position"] = rng.choice(np.array([0.01, 0.02, 0.03, 0.05, 0.1]), size=b)
    c["max_position_obj"] = u() < P_MAX_POSITION_OBJECT
    c["vol_target"] = _r(_VOL[s] * rng.uniform(0.6, 1.2, size=b), 3)
    c["n_stops"] = rng.choice(np.arange(_MAX_STOPS + 1), size=b, p=[0.25, 0.4, 0.25, 0.1])
    kinds = np.argsort(rng.random((b, len(_STOP_KINDS))), axis=1)[:, :_MAX_STOPS]
    for j in range(_MAX_STOPS):
        c[f"stop_kind{j}"] = kinds[:, j]
        c[f"stop_pct{j}"] = _r(rng.uniform(0.02, 0.3, size=b), 2)
        c[f"stop_days{j}"] = rng.choice(np.array([5, 10, 21, 30, 63]), size=b)
    c["use_var"] = u() < 0.5
    c["has_var"] = c["use_var"] & (u() < 0.5)
    c["var_conf"] = rng.choice(np.array([0.95, 0.975, 0.99]), size=b)
    c["var_h"] = rng.choice(np.array([1, 5, 10]), size=b)

    # portfolio
    c["port_method"] = rng.integers(0, len(_PORT_METHOD), size=b)
    c["max_names"] = rng.choice(np.array([20, 50, 100, 150, 250, 500]), size=b)
    c["turnover_cap"] = _r(rng.uniform(0.05, 0.5, size=b), 2)
    c["turnover_cap_null"] = u() < 0.05
    c["min_weight"] = rng.choice(np.array([0.0, 0.0005, 0.001, 0.0025]), size=b)
    c["has_min_weight"] = u() < 0.3

    # costs
    c["bps"] = rng.choice(np.array([1, 2, 3, 5, 8, 10, 15]), size=b)
    c["slip"] = _r(rng.uniform(0.0, 5.0, size=b), 1)
    c["cost_model"] = rng.integers(0, len(_COST_MODEL), size=b)
    c["has_cost_model"] = u() < 0.5
    c["borrow_bps"] = rng.choice(np.array([25, 35, 50, 75, 100]), size=b)

    # tags
    c["n_tags"] = rng.choice(np.arange(_MAX_TAGS + 1), size=b, p=[0.1, 0.25, 0.35, 0.2, 0.1])
    tags = np.argsort(rng.random((b, len(_TAGS))), axis=1)[:, :_MAX_TAGS]
    for j in range(_MAX_TAGS):
        c[f"tag{j}"] = tags[:, j]
    c["tags_legacy"] = u() < P_TAGS_LEGACY_STRING

    # sleeves: weights summing to ~1, each on a universe of the same market
    n_sl = rng.choice(np.arange(1, _MAX_SLEEVES + 1), size=b, p=[0.45, 0.3, 0.15, 0.1])
    c["n_sleeves"] = n_sl
    w = rng.gamma(2.0, size=(b, _MAX_SLEEVES)) * (np.arange(_MAX_SLEEVES)[None, :] < n_sl[:, None])
    w = _r(w / w.sum(axis=1, keepdims=True), 3)
    for j in range(_MAX_SLEEVES):
        c[f"sl_w{j}"] = w[:, j]
        c[f"sl_uni{j}"] = _UNI_OFF[s] + (u() * _UNI_CNT[s]).astype(np.int64)
        c[f"sl_has_lb{j}"] = u() < 0.25
        c[f"sl_lb{j}"] = rng.choice(np.array([5, 10, 20, 60, 120]), size=b)
        c[f"sl_lev{j}"] = u() < 0.1
        c[f"sl_levx{j}"] = rng.choice(np.array([1.25, 1.5, 2.0]), size=b)

    c["notes_kind"] = rng.choice(3, size=b, p=[0.85, 0.05, 0.10])  # absent / null / text
    c["notes"] = rng.integers(0, len(_NOTES), size=b)

    # metrics, loosely consistent with each other
    vol = _VOL[s] * rng.uniform(0.7, 1.3, size=b)
    sharpe = rng.normal(0.55, 0.55, size=b)
    c["m_kind"] = rng.choice(
        4, size=b,
        p=[1 - P_METRICS_SQL_NULL - P_METRICS_JSON_NULL - P_METRICS_EMPTY,
           P_METRICS_SQL_NULL, P_METRICS_JSON_NULL, P_METRICS_EMPTY],
    )  # object / SQL NULL / "null" / "{}"
    c["sharpe"] = _r(sharpe, 4)
    c["sortino"] = _r(sharpe * rng.uniform(1.1, 1.8, size=b), 4)
    c["sortino_null"] = u() < 0.02
    c["cagr"] = _r(sharpe * vol + rng.normal(0, 0.01, size=b), 4)
    mdd = -np.clip(vol * rng.uniform(0.8, 3.0, size=b) - 0.3 * np.maximum(sharpe, 0) * vol, 0.005, 0.95)
    c["mdd"] = _r(mdd, 4)
    c["vol"] = _r(vol, 4)
    c["turnover"] = _r(rng.lognormal(1.0, 0.6, size=b), 3)
    c["hit_rate"] = _r(np.clip(0.5 + 0.03 * sharpe + rng.normal(0, 0.02, size=b), 0.3, 0.7), 4)
    c["n_trades"] = rng.negative_binomial(3, 3 / (3 + 800), size=b) + 1
    c["lb_low"] = _r(sharpe + rng.normal(-0.2, 0.4, size=b), 3)
    c["lb_mid"] = _r(sharpe + rng.normal(0.0, 0.3, size=b), 3)
    c["lb_high"] = _r(sharpe + rng.normal(0.15, 0.5, size=b), 3)
    c["n_lambda"] = rng.integers(0, _MAX_LAMBDA + 1, size=b)
    lam = np.cumsum(rng.uniform(0.05, 0.4, size=(b, _MAX_LAMBDA)), axis=1)
    for j in range(_MAX_LAMBDA):
        c[f"lam{j}"] = _r(lam[:, j], 2)
    c["has_calmar"] = u() < 0.4
    c["calmar"] = _r(c["cagr"] / -c["mdd"], 3)
    c["has_status"] = u() < 0.3
    c["status"] = rng.integers(0, len(_STATUS), size=b)
    c["has_converged"] = u() < 0.15
    c["converged"] = u() < 0.9
    return c


def _config_exprs() -> tuple[list[pl.Expr], pl.Expr]:
    """config_json text from the drawn columns (and the picked strings).

    Returns the top-level fragments (to compute once, as columns ``_f0``...)
    and the expression that joins them, in writer or code-point key order.
    """
    lookbacks = _list("n_lookbacks", [_num(f"lb{j}") for j in range(_MAX_LOOKBACKS)])
    neutralize = _list("n_neutralize", [pl.col(f"neut{j}_q") for j in range(_MAX_NEUTRALIZE)])
    signal = _cat(
        '{"type":', pl.col("signal_q"),
        ',"lookback":',
        pl.when(pl.col("lookback_str")).then(_cat('"', _num("lookback"), 'd"')).otherwise(_num("lookback")),
        ',"decay":', _num("decay"),
        ',"zscore_clip":', _num("zclip"),
        _opt("has_neutralize", ',"neutralize":', neutralize),
        "}",
    )
    engine = _cat(
        '{"name":', pl.col("engine_q"),
        ',"lookbacks":', lookbacks,
        ',"rebalance":', pl.col("rebalance_q"),
        ',"signal":', signal,
        _opt("has_use_gpu", ',"use_gpu":', _bool("use_gpu")),
        "}",
    )
    stops = _list(
        "n_stops",
        [
            pl.when(pl.col(f"stop_kind{j}") == 2)  # "time" stops count days
            .then(_cat('{"kind":"time","days":', _num(f"stop_days{j}"), "}"))
            .otherwise(_cat('{"kind":', pl.col(f"stop_kind{j}_q"), ',"pct":', _num(f"stop_pct{j}"), "}"))
            for j in range(_MAX_STOPS)
        ],
    )
    max_position = (
        pl.when(pl.col("max_position_obj"))
        .then(_cat('{"default":', _num("max_position"), ',"cap":', (pl.col("max_position") * 2).round(3).cast(pl.String), "}"))
        .otherwise(_num("max_position"))
    )
    risk = _cat(
        "{",
        _opt("is_ls", '"max_gross":', _num("max_gross"), ',"max_net":', _num("max_net"), ","),
        '"max_position":', max_position,
        ',"vol_target":', _num("vol_target"),
        ',"stops":', stops,
        ',"use_var":', _bool("use_var"),
        _opt("has_var", ',"var":{"confidence":', _num("var_conf"), ',"horizon_days":', _num("var_h"), "}"),
        "}",
    )
    portfolio = _cat(
        '{"method":', pl.col("port_method_q"),
        ',"max_names":', _num("max_names"),
        ',"long_only":', pl.when(pl.col("is_ls")).then(pl.lit("false")).otherwise(pl.lit("true")),
        ',"turnover_cap":', pl.when(pl.col("turnover_cap_null")).then(pl.lit("null")).otherwise(_num("turnover_cap")),
        _opt("has_min_weight", ',"min_weight":', _num("min_weight")),
        "}",
    )
    costs = _cat(
        '{"bps":', _num("bps"),
        ',"slippage_bps":', _num("slip"),
        _opt("has_cost_model", ',"model":', pl.col("cost_model_q")),
        _opt("is_ls", ',"borrow_bps":', _num("borrow_bps")),
        "}",
    )
    tags = (
        pl.when(pl.col("tags_legacy"))
        .then(_cat('"', pl.col("tag0_raw"), ",", pl.col("tag1_raw"), '"'))
        .otherwise(_list("n_tags", [pl.col(f"tag{j}_q") for j in range(_MAX_TAGS)]))
    )
    sleeves = _list(
        "n_sleeves",
        [
            _cat(
                '{"id":"', pl.lit(_SLEEVE_IDS[j]),
                '","weight":', _num(f"sl_w{j}"),
                ',"universe_id":', pl.col(f"sl_uni{j}_q"),
                _opt(f"sl_has_lb{j}", ',"lookback":', _num(f"sl_lb{j}")),
                _opt(f"sl_lev{j}", ',"leverage":', _num(f"sl_levx{j}")),
                "}",
            )
            for j in range(_MAX_SLEEVES)
        ],
    )
    assessment = _cat(
        '{"assessment_strategy_id":', pl.col("assess_q"),
        ',"assessment_horizon_days":', _num("horizon"),
        _opt("has_min_hist", ',"min_history_days":', _num("min_hist")),
        _opt("has_embargo", ',"embargo_days":', _num("embargo")),
        "}",
    )
    backtest = _cat(
        '{"start":"', pl.col("start").cast(pl.String),
        '","end":"', pl.col("end").cast(pl.String),
        '"',
        _opt("has_calendar", ',"calendar":', pl.col("calendar_q")),
        _opt("has_benchmark", ',"benchmark":', pl.col("benchmark_q")),
        _opt("has_capital", ',"initial_capital":', _num("capital")),
        _opt("has_warmup", ',"warmup_days":', _num("warmup")),
        "}",
    )
    universe = (
        pl.when(pl.col("uni_null") & pl.col("uni_cfg_absent")).then(pl.lit(""))
        .when(pl.col("uni_null")).then(pl.lit(',"universe_id":null'))
        .otherwise(_cat(',"universe_id":', pl.col("universe_q")))
    )
    notes = (
        pl.when(pl.col("notes_kind") == 1).then(pl.lit(',"notes":null'))
        .when(pl.col("notes_kind") == 2).then(_cat(',"notes":', pl.col("notes_q")))
        .otherwise(pl.lit(""))
    )
    # (key, fragment starting with ",") in writer order; the first loses its comma
    fields = [
        ("strategy_id", _cat(',"strategy_id":', pl.col("strategy_q"))),
        ("market_id", _cat(',"market_id":', pl.col("market_q"))),
        ("universe_id", universe),
        ("assessment", _cat(',"assessment":', assessment)),
        ("backtest", _cat(',"backtest":', backtest)),
        ("engine", _cat(',"engine":', engine)),
        ("engine-rev", _opt("has_engine_rev", ',"engine-rev":', pl.col("engine_rev_q"))),
        ("risk", _cat(',"risk":', risk)),
        ("portfolio", _cat(',"portfolio":', portfolio)),
        ("costs", _cat(',"costs":', costs)),
        ("tags", _cat(',"tags":', tags)),
        ("sleeves", _cat(',"sleeves":', sleeves)),
        ("seed", _opt("has_seed", ',"seed":', _num("rng_seed"))),
        ("campaign_id", _opt("has_campaign", ',"campaign_id":"CMP_', pl.col("short_raw"), "_", pl.col("campaign").cast(pl.String).str.zfill(3), '"')),
        ("created_by", _opt("has_created_by", ',"created_by":', pl.col("created_by_q"))),
        ("notes", notes),
    ]
    fragments = [f.alias(f"_f{i}") for i, (_, f) in enumerate(fields)]
    names = [(key, f"_f{i}") for i, (key, _) in enumerate(fields)]
    # strategy_id and market_id are always present, so the first fragment is never empty
    writer = pl.concat_str([pl.col(c) for _, c in names]).str.slice(1)
    ordered = pl.concat_str([pl.col(c) for _, c in sorted(names)]).str.slice(1)
    body = pl.when(pl.col("sorted_keys")).then(ordered).otherwise(writer)
    return fragments, _cat("{", body, "}")


def _metrics_expr() -> pl.Expr:
    lam = _list("n_lambda", [_num(f"lam{j}") for j in range(_MAX_LAMBDA)])
    obj = _cat(
        '{"sharpe":', _num("sharpe"),
        ',"sortino":', pl.when(pl.col("sortino_null")).then(pl.lit("null")).otherwise(_num("sortino")),
        ',"cagr":', _num("cagr"),
        ',"max_drawdown":', _num("mdd"),
        ',"vol":', _num("vol"),
        ',"turnover":', _num("turnover"),
        ',"hit_rate":', _num("hit_rate"),
        _opt("has_calmar", ',"calmar":', _num("calmar")),
        ',"lambda_bucket_sharpe":{"low":', _num("lb_low"), ',"mid":', _num("lb_mid"), ',"high":', _num("lb_high"), "}",
        ',"n_trades":', _num("n_trades"),
        ',"lambda_buckets":', lam,
        _opt("has_status", ',"status":', pl.col("status_q")),
        _opt("has_converged", ',"converged":', _bool("converged")),
        "}",
    )
    kind = pl.col("m_kind")
    return (
        pl.when(kind == 0).then(obj)
        .when(kind == 2).then(pl.lit("null"))
        .when(kind == 3).then(pl.lit("{}"))
        .otherwise(pl.lit(None, pl.String))
    )


_EXPRS: tuple | None = None  # (config fragments, config_json, metrics_json), built once

_Q = {
    "strategy": _q(_STRAT_IDS),
    "market": _q([st[1] for st in _STRATEGIES]),
    "engine": _q([st[3] for st in _STRATEGIES]),
    "signal": _q([st[4] for st in _STRATEGIES]),
    "calendar": _q([st[7] for st in _STRATEGIES]),
    "benchmark": _q([st[8] for st in _STRATEGIES]),
    "universe": _q(_UNIVERSES),
    "assess": _q(_ASSESS),
    "rebalance": _q(_REBALANCE),
    "port_method": _q(_PORT_METHOD),
    "cost_model": _q(_COST_MODEL),
    "stop_kind": _q(_STOP_KINDS),
    "tag": _q(_TAGS),
    "neut": _q(_NEUTRALIZE),
    "engine_rev": _q(_ENGINE_REV),
    "notes": _q(_NOTES),
    "status": _q(_STATUS),
    "created_by": _q(_CREATED_BY),
}


def _batch(seed: int, k: int, batch_rows: int, rows: int) -> pa.Table:
    """Batch k: the first ``rows`` (<= batch_rows) runs drawn from default_rng([seed, k])."""
    global _EXPRS
    if _EXPRS is None:
        _EXPRS = (*_config_exprs(), _metrics_expr())
    fragments, config_expr, metrics_expr = _EXPRS
    rng = np.random.default_rng([seed, k])
    c = {name: a[:rows] for name, a in _draw(rng, batch_rows).items()}
    s = c["s"]
    cols: dict[str, pl.Series | np.ndarray] = dict(c)
    cols["start"] = pl.Series(c["start"].astype(np.int32)).cast(pl.Date)
    cols["end"] = pl.Series(c["end"].astype(np.int32)).cast(pl.Date)
    cols["is_ls"] = _IS_LS[s]
    for name in ("strategy", "market", "engine", "signal", "calendar", "benchmark"):
        cols[f"{name}_q"] = _pick(_Q[name], s)
    cols["short_raw"] = _pick(_STRAT_SHORT, s)
    cols["strategy_raw"] = _pick(_STRAT_IDS, s)
    cols["universe_raw"] = _pick(_UNIVERSES, c["uni"])
    cols["universe_q"] = _pick(_Q["universe"], c["uni"])
    for name, idx in (("assess", "assess"), ("rebalance", "rebalance"), ("port_method", "port_method"),
                      ("cost_model", "cost_model"), ("engine_rev", "engine_rev"), ("notes", "notes"),
                      ("status", "status"), ("created_by", "created_by")):
        cols[f"{name}_q"] = _pick(_Q[name], c[idx])
    for j in range(_MAX_STOPS):
        cols[f"stop_kind{j}_q"] = _pick(_Q["stop_kind"], c[f"stop_kind{j}"])
    for j in range(_MAX_TAGS):
        cols[f"tag{j}_q"] = _pick(_Q["tag"], c[f"tag{j}"])
    cols["tag0_raw"] = _pick(_TAGS, c["tag0"])
    cols["tag1_raw"] = _pick(_TAGS, c["tag1"])
    for j in range(_MAX_NEUTRALIZE):
        cols[f"neut{j}_q"] = _pick(_Q["neut"], c[f"neut{j}"])
    for j in range(_MAX_SLEEVES):
        cols[f"sl_uni{j}_q"] = _pick(_Q["universe"], c[f"sl_uni{j}"])
    frame = pl.DataFrame(cols)

    first = k * batch_rows
    out = frame.with_columns(fragments).select(
        run_id=_cat(f"BT_S{seed}_", pl.int_range(first, first + rows, dtype=pl.Int64).cast(pl.String).str.zfill(8)),
        strategy_id=pl.col("strategy_raw"),
        config_json=config_expr,
        start_date=pl.col("start"),
        end_date=pl.col("end"),
        universe_id=pl.when(pl.col("uni_null")).then(pl.lit(None, pl.String))
        .otherwise(pl.col("universe_raw")),
        metrics_json=metrics_expr,
    )
    return out.to_arrow().cast(SCHEMA)


def generate_runs(n: int, seed: int = 7, batch_rows: int = 50_000) -> Iterator[pa.Table]:
    """Yield tables of at most batch_rows rows, n rows in all, deterministic for (n, seed)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    if batch_rows <= 0:
        raise ValueError("batch_rows must be > 0")
    k = 0
    done = 0
    while done < n:
        rows = min(batch_rows, n - done)
        yield _batch(seed, k, batch_rows, rows)
        done += rows
        k += 1


KINDS = ("sleeves", "campaigns")


def seed_runs(url, n: int, seed: int = 7, on_progress=None, batch_rows: int = 50_000, kind: str = "sleeves") -> int:
    """Write ``n`` synthetic runs into the runtime store at ``url``: ``generate_runs(n, seed)``
    (kind "sleeves"), or labelled research campaigns (kind "campaigns": config
    families tried across environments, see ``campaigns``).

    Runs whose run_id already exists are left as they are. Returns the number
    of runs inserted. ``on_progress(done, total)`` is called after each batch.
    """
    from .campaigns import generate_campaign_runs
    from ..stores import open_store

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: {' or '.join(KINDS)}")
    batches = generate_runs(n, seed, batch_rows) if kind == "sleeves" else (runs for runs, _labels in generate_campaign_runs(n, seed))
    store = open_store(url)
    inserted = done = 0
    try:
        store.check_table("backtest_runs")
        for table in batches:
            inserted += store.insert_runs(table)
            done += table.num_rows
            if on_progress:
                on_progress(done, n)
    finally:
        store.close()
    return inserted
