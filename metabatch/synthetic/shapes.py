"""Shapes: labelled runs shaped as different teams' runs are, for judging whether
v2 learns from the runs themselves which keys say *where* a run was tried.

``labelled_runs(shape, n, seed)`` returns ``(runs, labels)`` as
``campaigns.campaign_runs`` does (``backtest_runs`` rows; ``run_id, family,
template, env, skill``), the labels adding ``market``: the coarse level of a
nested environment (the environment itself where there is no such level).

- ``main``, ``fixed_shapes``: ``campaigns.campaign_runs``' variants (the env
  keys under the names of v1's rule, the env figures in ``regime_*``,
  ``stab_*``, ``fragility_*``, ``*coverage*`` metrics).
- ``catalog``: shaped like the reference's own runs (prometheus_v2's
  ``backtest/catalog.py`` and ``runner.py``): a sleeve per strategy (twelve
  per market, each trading its one market) and horizon template (5, 21, 63
  days), ``config_json`` holding exactly the
  sleeve's ids (``universe_id``, ``portfolio_id``, ``assessment_strategy_id``
  derived from strategy and horizon), the strategy's one ``market_id``, the
  horizon, and the window as ISO strings (``start_date``, ``end_date``, rolled
  by a few days from run to run). The environment is the market and the
  period (three markets, four periods each); the over-run figures in the
  metrics (``regime_risk_score_mean_over_run``, ...) describe it.
- ``nested``: template families tried across environments nested in markets
  (three markets, two or three periods within each): ``market_id`` and
  ``universe_id`` in the config, the period only in the run's own window
  (``backtest_runs.start_date``/``end_date``) and in the figures, whose
  market level moves them more than the period does.
- ``renamed``: template families across eight environments whose keys and
  figures have names v1's rule does not match (``venue``, ``book.region``,
  ``evaluation.lookahead``; ``bull_share``, ``calm_index``, ...).
- ``follows_strategy``: template families of ten strategies, with a
  ``universe_id`` derived from the strategy (an id under an env-looking name
  that follows the config) beside the real environment's keys.

Deterministic for a seed; the families and environments depend on ``seed``
only. A generator for benchmarks and tests, not a hot path (a loop per run).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from . import campaigns
from .campaigns import Family
from ..stores.base import RUN_SCHEMA as SCHEMA

SHAPES = ("main", "fixed_shapes", "catalog", "nested", "renamed", "follows_strategy")

LABELS = {"run_id": pl.String, "family": pl.Int64, "template": pl.Int64, "env": pl.Int64, "market": pl.Int64, "skill": pl.Float64}


@dataclass(frozen=True)
class Place:
    """An environment: the keys a config names it by, the window its runs cover
    (first start, days, how far starts roll), the figures measured over it
    (name -> (mean, sd per run)) and its coarse level (market)."""

    keys: dict
    start: dt.date
    days: int
    roll: int
    figures: dict
    market: int


def labelled_runs(shape: str, n: int, seed: int = 11, run_prefix: str | None = None) -> tuple[pa.Table, pl.DataFrame]:
    """``n`` runs of ``shape`` and their labels (see the module docstring)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    prefix = run_prefix or f"{shape[:2].upper()}"
    if shape in ("main", "fixed_shapes"):
        runs, labels = campaigns.campaign_runs(n, seed, variant=shape, run_prefix=prefix)
        envs = campaigns.environments(seed, 8, shape)
        markets = sorted({e.market_id for e in envs})
        market_of = [markets.index(e.market_id) for e in envs]
        labels = labels.with_columns(market=pl.col("env").replace_strict(list(range(len(envs))), market_of, return_dtype=pl.Int64))
        return runs, labels.select(list(LABELS))
    return _generate(shape, n, seed, prefix)


# --------------------------------------------------------------------------
# Environments per shape


def _figures(rng: np.random.Generator, names: tuple[str, ...], periods: list[int], period_spread: float, shared: float = 0.0) -> list[list[dict]]:
    """Per market, per period: each figure's (mean, sd per run): a market level
    plus a period offset (nested: the market moves a figure more than the
    period does), ``shared`` of the offset common to every market (a calendar
    period is a crisis or a calm everywhere)."""
    common = rng.uniform(-1, 1, size=(max(periods), len(names)))
    out = []
    for count in periods:
        level = rng.uniform(0.2, 0.8, size=len(names))
        row = []
        for p in range(count):
            offset = period_spread * (shared * common[p] + (1 - shared) * rng.uniform(-1, 1, size=len(names)))
            row.append({name: (float(level[j] + offset[j]), 0.02 + 0.01 * float(rng.random())) for j, name in enumerate(names)})
        out.append(row)
    return out


_CATALOG_MARKETS = ("US_EQ", "EU_EQ", "JP_EQ")
_CATALOG_STYLES = (
    "CORE_LONG_EQ", "VALUE_LS", "QUALITY_LONG", "MOMENTUM_LS", "LOWVOL_LONG", "CARRY_LS",
    "SIZE_TILT", "DIVIDEND_LONG", "REVERSAL_LS", "GROWTH_LONG", "DEFENSIVE_LS", "BREADTH_LS",
)
# a strategy per market and style: each strategy trades one market (as the reference's do)
_CATALOG_STRATEGIES = tuple((f"{market}_{style}", m) for m, market in enumerate(_CATALOG_MARKETS) for style in _CATALOG_STYLES)
_CATALOG_HORIZONS = (5, 21, 63)
_CATALOG_FIGURES = (
    "regime_risk_score_mean_over_run", "stab_risk_score_mean_over_run", "lambda_score_coverage_over_run",
    "stab_closest_scenario_cosine_mean", "lambda_score_mean_over_run",
)
_PERIOD_STARTS = (dt.date(2021, 1, 4), dt.date(2021, 10, 1), dt.date(2022, 7, 1), dt.date(2023, 4, 3))


def _catalog_places(rng: np.random.Generator) -> list[Place]:
    figures = _figures(rng, _CATALOG_FIGURES, [4, 4, 4], 0.25, shared=0.6)
    return [
        Place({"market_id": market}, _PERIOD_STARTS[p], 182, 21, figures[m][p], m)
        for m, market in enumerate(_CATALOG_MARKETS)
        for p in range(4)
    ]


_NESTED_MARKETS = (("US_EQ", "US_EQ_SP500"), ("EU_EQ", "EU_EQ_STOXX600"), ("CRYPTO", "CRYPTO_TOP20"))
_NESTED_PERIODS = (3, 2, 3)
_NESTED_FIGURES = ("regime_bull_frac", "regime_high_vol_frac", "stab_mean", "fragility_p90", "universe_coverage")


def _nested_places(rng: np.random.Generator) -> list[Place]:
    figures = _figures(rng, _NESTED_FIGURES, list(_NESTED_PERIODS), 0.12)
    places = []
    for m, (market, universe) in enumerate(_NESTED_MARKETS):
        for p in range(_NESTED_PERIODS[m]):
            start = dt.date(2019, 1, 1) + dt.timedelta(days=int(400 * p + rng.integers(0, 60)))
            places.append(Place({"market_id": market, "universe_id": universe}, start, 365, 30, figures[m][p], m))
    return places


_RENAMED_VENUES = ("XNYS", "XLON", "XTKS", "XHKG", "XPAR", "XASX", "XNAS", "XETR")
_RENAMED_FIGURES = ("bull_share", "calm_index", "tail_p90", "breadth", "dispersion")


def _renamed_places(rng: np.random.Generator) -> list[Place]:
    figures = _figures(rng, _RENAMED_FIGURES, [1] * 8, 0.0)
    regions = ("AMER", "EMEA", "APAC")
    places = []
    for i, venue in enumerate(_RENAMED_VENUES):
        keys = {"venue": venue, "book": {"region": regions[i % 3], "calendar": f"CAL_{venue}"}, "evaluation": {"scheme": ("rolling", "expanding")[i % 2], "lookahead": (5, 10, 21, 63)[i % 4]}}
        places.append(Place(keys, dt.date(2020, 1, 1), 700, 700, figures[i][0], i))
    return places


def _follows_strategy_places(rng: np.random.Generator) -> list[Place]:
    envs = campaigns.environments(int(rng.integers(0, 2**31)), 8)
    markets = sorted({e.market_id for e in envs})
    return [
        Place({"market_id": e.market_id, "assessment": {"assessment_horizon_days": e.horizon, "assessment_window": e.assessment}},
              dt.date(2020, 1, 1), 700, 700, dict(e.descriptors), markets.index(e.market_id))
        for e in envs
    ]


# --------------------------------------------------------------------------
# Runs


def _generate(shape: str, n: int, seed: int, prefix: str) -> tuple[pa.Table, pl.DataFrame]:
    setup = np.random.default_rng([seed, 20, SHAPES.index(shape)])
    if shape == "catalog":
        places = _catalog_places(setup)
        fams = [Family(h, strategy, {"market": market, "horizon": horizon}) for strategy, market in _CATALOG_STRATEGIES for h, horizon in enumerate(_CATALOG_HORIZONS)]
    else:
        places = {"nested": _nested_places, "renamed": _renamed_places, "follows_strategy": _follows_strategy_places}[shape](setup)
        count = 30 if shape == "nested" else 40
        fams = campaigns.families(seed, count)
        if shape == "follows_strategy":
            fams = [Family(f.template, f"STRAT_{i % 10:02d}", f.params) for i, f in enumerate(fams)]
    skill = np.random.default_rng([seed, 21, SHAPES.index(shape)]).standard_normal((len(fams), len(places)))
    rng = np.random.default_rng([seed, 22, SHAPES.index(shape), n])
    rows = {name: [] for name in SCHEMA.names}
    labels = {name: [] for name in LABELS}
    for i in range(n):  # a generator for benchmarks and tests, not a hot path
        f = int(rng.integers(len(fams)))
        fam = fams[f]
        feasible = [e for e, place in enumerate(places) if shape != "catalog" or place.market == fam.params["market"]]
        e = feasible[int(rng.integers(len(feasible)))]
        place = places[e]
        start = place.start + dt.timedelta(days=int(rng.integers(0, place.roll)))
        end = start + dt.timedelta(days=place.days + int(rng.integers(-3, 4)))
        if shape == "catalog":
            config, universe = _catalog_config(fam, place, start, end)
        else:
            config, universe = _template_config(rng, shape, fam, place, end)
        run_id = f"{prefix}_{seed}_{i:07d}"
        rows["run_id"].append(run_id)
        rows["strategy_id"].append(fam.strategy_id)
        rows["config_json"].append(json.dumps(config))
        rows["start_date"].append(start)
        rows["end_date"].append(end)
        rows["universe_id"].append(universe)
        rows["metrics_json"].append(json.dumps(_metrics(rng, shape, place, float(skill[f, e]))))
        for name, value in (("run_id", run_id), ("family", f), ("template", fam.template), ("env", e), ("market", place.market), ("skill", float(skill[f, e]))):
            labels[name].append(value)
    return pa.table(rows, schema=SCHEMA), pl.DataFrame(labels, schema=LABELS)


def _catalog_config(fam: Family, place: Place, start: dt.date, end: dt.date) -> tuple[dict, str]:
    """The reference runner's config: the sleeve's ids and the window, nothing else."""
    sleeve = f"{fam.strategy_id}_H{fam.params['horizon']}"
    config = {
        "sleeve_id": sleeve,
        "strategy_id": fam.strategy_id,
        "market_id": place.keys["market_id"],
        "universe_id": f"{sleeve}_UNIVERSE",
        "portfolio_id": f"{sleeve}_PORTFOLIO",
        "assessment_strategy_id": f"{sleeve}_ASSESS",
        "assessment_horizon_days": fam.params["horizon"],
        "start_date": start.isoformat(),
        "end_date": end.isoformat(),
    }
    return config, config["universe_id"]


def _template_config(rng: np.random.Generator, shape: str, fam: Family, place: Place, end: dt.date) -> tuple[dict, str]:
    where = json.loads(json.dumps(place.keys))
    if shape == "follows_strategy":
        where["universe_id"] = f"{fam.strategy_id}_UNIVERSE"
    universe = where.get("universe_id") or where.get("venue") or where.get("market_id")
    return campaigns.placed_config(rng, where, fam, end), universe


def _metrics(rng: np.random.Generator, shape: str, place: Place, skill: float) -> dict:
    """Outcomes set by the skill plus per-run luck, and the environment's figures."""
    sharpe = 0.6 * skill + 0.3 * rng.standard_normal()
    vol = 0.08 + 0.1 * float(rng.random())
    if shape == "catalog":
        years = place.days / 365.0
        metrics = {
            "cumulative_return": round(sharpe * vol * years + 0.01 * rng.standard_normal(), 5),
            "max_drawdown": round(-abs(0.15 - 0.04 * skill + 0.03 * rng.standard_normal()), 4),
            "annualised_vol": round(vol, 4),
            "annualised_sharpe": round(sharpe, 4),
        }
    else:
        metrics = campaigns.outcome_metrics(rng, sharpe, vol, skill)
        metrics["n_trades"] = int(rng.integers(100, 20_000))
    for name, (mean, sd) in place.figures.items():
        metrics[name] = round(mean + sd * float(rng.standard_normal()), 4)
    return metrics
