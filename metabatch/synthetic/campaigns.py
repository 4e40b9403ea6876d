"""Campaigns: labelled synthetic backtest runs, for judging what the joint space finds.

``campaign_runs(n, seed, ...)`` returns ``(runs, labels)``: an Arrow table of
``backtest_runs`` rows (the columns of ``seed.SEED_COLUMNS``) and a Polars
frame ``run_id, family, template, env, skill`` saying what each run is. Unlike
``seed`` (every hyperparameter drawn per run), runs here come from research
campaigns, as quants run them:

- **config families** drawn from a few shared **templates**: families of a
  template share its key set and differ in their hyperparameters (fixed per
  family, a couple jittered per run, as re-tuned grid points are);
- **environments**: market, universe, assessment strategy and horizon in the
  config; the regime, stability, fragility and coverage descriptors of the
  period in the metrics (``regime_*``, ``stab_*``, ``fragility_*``,
  ``*coverage*``), drawn per run around the environment's own values;
- a **skill** per (family, environment), in units of its standard deviation,
  that sets the outcomes (``annualised_sharpe``, ``max_drawdown``, ...) with
  per-run noise;
- the **noise** real configs carry: random seeds, capital amounts spanning
  orders of magnitude, free-text notes, commit hashes, request ids, user and
  host names, submission timestamps, optional keys left out when at their
  default, weight lists of varying length, key order as each writer left it.

``variant="fixed_shapes"`` is the case the v1 encoder already handles: every
family has one fixed config shape of its own (no shared template, no optional
keys), the noise is a few categorical fields (user, host, a timestamp) and the
environment shows only in the metrics' regime descriptors.

``families`` / ``envs`` restrict the runs to some families or environments
(by index), so that a model can be fitted on some families and the others
embedded later. Deterministic for a seed: the families and environments depend
on ``seed`` only, the runs on ``seed`` and ``n``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from ..stores.base import RUN_SCHEMA as SCHEMA

# --------------------------------------------------------------------------
# Environments: (market, universe, assessment, horizon) and the period's descriptors

_MARKETS = [
    ("US_EQ", "US_EQ_SP500"), ("US_EQ", "US_EQ_R3000"), ("EU_EQ", "EU_EQ_STOXX600"), ("JP_EQ", "JP_EQ_TOPIX500"),
    ("FX_G10", "FX_G10_MAJORS"), ("CRYPTO", "CRYPTO_TOP20"), ("US_EQ", "US_EQ_SP500"), ("EU_EQ", "EU_EQ_STOXX600"),
    ("CMDTY", "CMDTY_BCOM"), ("US_RATES", "US_TSY_CURVE"), ("APAC_EQ", "APAC_EQ_MSCI"), ("EM_EQ", "EM_EQ_MSCI"),
]
_ASSESSMENTS = ["WALK_FORWARD_V2", "CPCV_V1", "HOLDOUT_V1", "REGIME_SPLIT_V1"]
_HORIZONS = [5, 10, 21, 63, 126, 252]
_DESCRIPTORS = ("regime_bull_frac", "regime_high_vol_frac", "stab_mean", "fragility_p90", "universe_coverage")

_USERS = ["alice", "bob", "carol", "dmitri", "erin", "farid", "grace", "hiro"]
_HOSTS = [f"node-{i:02d}.cluster" for i in range(12)]
_NOTE_WORDS = ["rerun", "after", "data", "fix", "grid", "point", "baseline", "check", "tweak", "nightly", "promoted", "wip"]


@dataclass(frozen=True)
class Environment:
    market_id: str
    universe_id: str
    assessment: str
    horizon: int
    descriptors: dict  # descriptor -> (mean, sd) per run


@dataclass(frozen=True)
class Family:
    template: int
    strategy_id: str
    params: dict  # what the template's config builder reads


def environments(seed: int, count: int = 8, variant: str = "main") -> list[Environment]:
    """``count`` distinct environments; two share a market and universe and differ
    in horizon (and descriptors), as a strategy assessed at two horizons does."""
    rng = np.random.default_rng([seed, 1])
    envs = []
    for i in range(count):
        market, universe = _MARKETS[i % len(_MARKETS)]
        horizon = _HORIZONS[(i * 5 + 2) % len(_HORIZONS)] if i != 6 else 252
        if i == 0:
            horizon = 21
        descriptors = {
            "regime_bull_frac": (float(rng.uniform(0.2, 0.8)), 0.04),
            "regime_high_vol_frac": (float(rng.uniform(0.05, 0.6)), 0.04),
            "stab_mean": (float(rng.uniform(0.3, 0.9)), 0.03),
            "fragility_p90": (float(rng.uniform(0.1, 2.0)), 0.08),
            "universe_coverage": (float(rng.uniform(0.7, 1.0)), 0.02),
        }
        envs.append(Environment(market, universe, _ASSESSMENTS[i % len(_ASSESSMENTS)], horizon, descriptors))
    return envs


# --------------------------------------------------------------------------
# Families: hyperparameters drawn from a template's grid


_TEMPLATES = ("xs_momentum", "ts_trend", "gbm_alpha")
_STRATEGY_OF_TEMPLATE = ("XS_MOMENTUM_LS", "TS_TREND_MACRO", "ML_ALPHA_LS")


def families(seed: int, count: int = 40, variant: str = "main") -> list[Family]:
    """``count`` families, spread over the templates in turn."""
    rng = np.random.default_rng([seed, 2])
    out = []
    for i in range(count):
        if variant == "fixed_shapes":
            out.append(_fixed_shape_family(rng, i))
            continue
        template = i % len(_TEMPLATES)
        c = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
        common = {
            "vol_target": round(float(rng.uniform(0.05, 0.25)), 3),
            "max_leverage": c([1.0, 1.5, 2.0, 3.0]),
            "max_position": c([0.01, 0.02, 0.05, 0.1]),
            "stop_kind": c(["trailing", "hard", "vol_scaled", "time"]),
            "stop_pct": c([0.05, 0.1, 0.15, 0.2]),
            "cost_model": c(["linear", "sqrt_impact", "fixed_bps"]),
            "cost_bps": c([1.0, 2.0, 5.0, 10.0]),
            # optional: written only when not at its default (2.0), or by some writers anyway
            "slippage_bps": c([2.0, 2.0, 0.5, 4.0]),
            "rebalance": c(["daily", "weekly", "monthly"]),
        }
        if template == 0:
            params = {
                "lookback_days": c([21, 63, 126, 252]),
                "skip_days": c([0, 5, 21]),
                "top_quantile": c([0.1, 0.2, 0.3]),
                "signal_type": c(["price_momentum", "residual_momentum", "earnings_momentum"]),
                "zscore_clip": c([2.0, 3.0, 4.0]),
                "neutralize": sorted(rng.choice(["sector", "beta", "country", "size"], size=int(rng.integers(1, 4)), replace=False).tolist()),
                "method": c(["risk_parity", "mean_variance", "equal_weight"]),
            }
        elif template == 1:
            n_signals = int(rng.integers(2, 5))
            params = {
                "signals": [
                    {"name": c(["ewma_cross", "breakout", "tsmom", "carry"]), "window": c([10, 20, 50, 100, 200]),
                     "weight": round(float(rng.uniform(0.1, 1.0)), 2)}
                    for _ in range(n_signals)
                ],
                "combine": c(["mean", "vote", "risk_weighted"]),
                "vol_lookback": c([20, 60, 120]),
                "execution_algo": c(["twap", "vwap", "pov"]),
                "participation": c([0.05, 0.1, 0.2]),
            }
        else:
            params = {
                "n_estimators": c([100, 300, 1000]),
                "max_depth": c([3, 5, 8]),
                "learning_rate": c([0.01, 0.03, 0.1]),
                "features": sorted(rng.choice(["mom", "value", "quality", "vol", "size", "flow", "sentiment"], size=int(rng.integers(3, 6)), replace=False).tolist()),
                "target_horizon": c([5, 21, 63]),
                "subsample": c([0.5, 0.8, 1.0]),
                "method": c(["risk_parity", "mean_variance", "equal_weight"]),
            }
        out.append(Family(template, _STRATEGY_OF_TEMPLATE[template], {**common, **params}))
    return out


def _fixed_shape_family(rng: np.random.Generator, i: int) -> Family:
    """A family with a config shape of its own: its own keys, always all present,
    with values of modest size (settings in [0, 1], small counts, flags, names)."""
    n_keys = int(rng.integers(6, 14))
    keys = sorted({f"{p}_{int(rng.integers(0, 40))}" for p in rng.choice(["alpha", "beta", "gamma", "delta", "kappa", "sigma"], size=n_keys)})
    values = {}
    for key in keys:
        kind = rng.random()
        if kind < 0.45:
            values[key] = round(float(rng.uniform(0, 1)), 3)
        elif kind < 0.65:
            values[key] = int(rng.integers(1, 6))
        elif kind < 0.8:
            values[key] = bool(rng.random() < 0.5)
        else:
            values[key] = str(rng.choice(["fast", "slow", "robust", "aggressive", "none"]))
    return Family(0, f"FAMILY_{i:02d}", {"keys": values, "engine": f"engine_{i % 5}"})


# --------------------------------------------------------------------------
# Runs


def campaign_runs(
    n: int,
    seed: int = 11,
    n_families: int = 40,
    n_envs: int = 8,
    variant: str = "main",
    families_kept: list[int] | None = None,
    envs_kept: list[int] | None = None,
    run_prefix: str = "CR",
) -> tuple[pa.Table, pl.DataFrame]:
    """``n`` runs and their labels (see the module docstring)."""
    parts = list(generate_campaign_runs(n, seed, n_families, n_envs, variant, families_kept, envs_kept, run_prefix))
    if not parts:
        return SCHEMA.empty_table(), pl.DataFrame(schema=_LABELS)
    return pa.concat_tables([p[0] for p in parts]), pl.concat([p[1] for p in parts])


_LABELS = {"run_id": pl.String, "family": pl.Int64, "template": pl.Int64, "env": pl.Int64, "skill": pl.Float64}
CHUNK_RUNS = 50_000


def generate_campaign_runs(
    n: int,
    seed: int = 11,
    n_families: int = 40,
    n_envs: int = 8,
    variant: str = "main",
    families_kept: list[int] | None = None,
    envs_kept: list[int] | None = None,
    run_prefix: str = "CR",
):
    """``campaign_runs`` in chunks of ``CHUNK_RUNS`` runs (bounded memory): yields
    (runs, labels); chunk k is drawn from its own random generator, so the runs
    of a smaller n are a prefix of a larger n's."""
    if variant not in ("main", "fixed_shapes"):
        raise ValueError(f"unknown variant {variant!r}: main or fixed_shapes")
    fams = families(seed, n_families, variant)
    envs = environments(seed, n_envs, variant)
    skill = np.random.default_rng([seed, 3]).standard_normal((n_families, n_envs))
    fam_pool = np.array(families_kept if families_kept is not None else range(n_families))
    env_pool = np.array(envs_kept if envs_kept is not None else range(n_envs))
    for chunk, first in enumerate(range(0, n, CHUNK_RUNS)):
        count = min(CHUNK_RUNS, n - first)
        rng = np.random.default_rng([seed, 4, chunk, len(fam_pool), len(env_pool)])
        fam_of = fam_pool[rng.integers(0, len(fam_pool), count)]
        env_of = env_pool[rng.integers(0, len(env_pool), count)]
        rows = {name: [] for name in SCHEMA.names}
        start = dt.date(2023, 1, 1)
        for i in range(count):  # a generator for benchmarks and demos, not a hot path
            f, e = int(fam_of[i]), int(env_of[i])
            fam, env = fams[f], envs[e]
            end = start + dt.timedelta(days=int(rng.integers(0, 1300)))
            if variant == "fixed_shapes":
                config = _fixed_shape_config(rng, fam, end)
            else:
                config = _template_config(rng, fam, env, end)
            rows["run_id"].append(f"{run_prefix}_{seed}_{first + i:07d}")
            rows["strategy_id"].append(fam.strategy_id)
            rows["config_json"].append(json.dumps(config))
            rows["start_date"].append(end - dt.timedelta(days=int(rng.integers(180, 1500))))
            rows["end_date"].append(end)
            rows["universe_id"].append(env.universe_id)
            rows["metrics_json"].append(json.dumps(_metrics(rng, fam, env, float(skill[f, e]), variant)))
        labels = pl.DataFrame(
            {
                "run_id": rows["run_id"],
                "family": fam_of.astype(np.int64),
                "template": np.array([fams[f].template for f in fam_of], dtype=np.int64),
                "env": env_of.astype(np.int64),
                "skill": skill[fam_of, env_of],
            },
            schema=_LABELS,
        )
        yield pa.table(rows, schema=SCHEMA), labels


def _shuffled(rng: np.random.Generator, items: dict) -> dict:
    """The dict with its keys in a random order (writers differ), nested dicts too."""
    keys = list(items)
    order = rng.permutation(len(keys))
    return {keys[k]: (_shuffled(rng, items[keys[k]]) if isinstance(items[keys[k]], dict) else items[keys[k]]) for k in order}


def _noise(rng: np.random.Generator, end: dt.date) -> dict:
    """The per-run fields that say nothing about what was tried."""
    words = rng.choice(_NOTE_WORDS, size=int(rng.integers(2, 6))).tolist()
    noise = {
        "seed": int(rng.integers(0, 2**31 - 1)),
        "initial_capital": float(round(10 ** rng.uniform(4, 9), -2)),
        "notes": " ".join(words) + (f" #{int(rng.integers(1, 10_000))}" if rng.random() < 0.7 else ""),
        "git_commit": "%040x" % int(rng.integers(0, 2**62)) ,
        "request_id": "req-%012x" % int(rng.integers(0, 2**48)),
        "submitted_by": {"user": str(rng.choice(_USERS)), "host": str(rng.choice(_HOSTS))},
        "submitted_at": f"{end.isoformat()}T{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}:{int(rng.integers(0, 60)):02d}Z",
        "ensemble_weights": [round(float(w), 3) for w in rng.dirichlet(np.ones(int(rng.integers(1, 7))))],
    }
    return noise


def _template_config(rng: np.random.Generator, fam: Family, env: Environment, end: dt.date) -> dict:
    where = {
        "market_id": env.market_id,
        "universe_id": env.universe_id,
        "assessment": {"assessment_strategy_id": env.assessment, "assessment_horizon_days": env.horizon},
    }
    return placed_config(rng, where, fam, end)


def placed_config(rng: np.random.Generator, where: dict, fam: Family, end: dt.date) -> dict:
    """A config of ``fam`` tried ``where``, with the noise of a real submission, its keys shuffled."""
    config = {**where, **family_config(rng, fam)}
    config.update(_noise(rng, end))
    return _shuffled(rng, config)


def family_config(rng: np.random.Generator, fam: Family) -> dict:
    """What a run of a template family tried: the family's settings, a couple
    re-tuned per run, optional keys left out at their default."""
    p = fam.params
    risk = {
        "vol_target": round(p["vol_target"] * float(rng.uniform(0.97, 1.03)), 4),  # re-tuned per run
        "max_leverage": p["max_leverage"],
        "max_position": p["max_position"],
        "stop": {"kind": p["stop_kind"], "pct": p["stop_pct"]},
    }
    costs = {"model": p["cost_model"], "bps": p["cost_bps"]}
    if p["slippage_bps"] != 2.0 or rng.random() < 0.4:  # left out when at its default
        costs["slippage_bps"] = p["slippage_bps"]
    config: dict = {"rebalance": p["rebalance"], "risk": risk, "costs": costs}
    if fam.template == 0:
        config["strategy"] = {
            "kind": "xs_momentum",
            "lookback_days": p["lookback_days"],
            "skip_days": p["skip_days"],
            "top_quantile": p["top_quantile"],
            "signal": {"type": p["signal_type"], "zscore_clip": p["zscore_clip"]},
        }
        config["portfolio"] = {"method": p["method"], "neutralize": p["neutralize"]}
    elif fam.template == 1:
        config["model"] = {
            "kind": "ts_trend",
            "signals": [dict(s, window=s["window"]) for s in p["signals"]],
            "combine": p["combine"],
            "vol_lookback": p["vol_lookback"],
        }
        config["execution"] = {"algo": p["execution_algo"], "participation": p["participation"]}
    else:
        config["model"] = {
            "kind": "gbm",
            "n_estimators": p["n_estimators"],
            "max_depth": p["max_depth"],
            "learning_rate": p["learning_rate"],
            "features": p["features"],
            "target_horizon": p["target_horizon"],
            "subsample": round(p["subsample"] * float(rng.uniform(0.98, 1.0)), 4),
        }
        config["portfolio"] = {"method": p["method"]}
    if rng.random() < 0.5:
        config["debug"] = bool(rng.random() < 0.5)
    return config


def _fixed_shape_config(rng: np.random.Generator, fam: Family, end: dt.date) -> dict:
    config = dict(fam.params["keys"])
    config["engine"] = fam.params["engine"]
    config["user"] = str(rng.choice(_USERS))
    config["host"] = str(rng.choice(_HOSTS))
    config["submitted_at"] = f"{end.isoformat()}T{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}Z"
    return config


def outcome_metrics(rng: np.random.Generator, sharpe: float, vol: float, skill: float) -> dict:
    """A run's outcome figures around its Sharpe and volatility (the draws in a fixed order)."""
    return {
        "annualised_sharpe": round(sharpe, 4),
        "sortino": round(sharpe * 1.3 + 0.1 * rng.standard_normal(), 4),
        "cagr": round(sharpe * vol + 0.01 * rng.standard_normal(), 5),
        "annualised_vol": round(vol, 4),
        "max_drawdown": round(-abs(0.25 - 0.06 * skill + 0.05 * rng.standard_normal()), 4),
        "hit_rate": round(0.5 + 0.03 * skill + 0.01 * rng.standard_normal(), 4),
    }


def _metrics(rng: np.random.Generator, fam: Family, env: Environment, skill: float, variant: str) -> dict:
    """Outcomes set by the skill plus noise, and the period's descriptors."""
    sharpe = 0.6 * skill + 0.3 * rng.standard_normal()
    vol = 0.08 + 0.1 * float(rng.random())
    metrics = outcome_metrics(rng, sharpe, vol, skill)
    if variant == "main":
        rebalance = fam.params.get("rebalance")
        metrics["turnover"] = round(float({"daily": 8.0, "weekly": 3.0, "monthly": 1.0}.get(rebalance, 2.0) * rng.uniform(0.8, 1.2)), 3)
        metrics["n_trades"] = int(rng.integers(100, 20_000))
    for name, (mean, sd) in env.descriptors.items():
        metrics[name] = round(mean + sd * float(rng.standard_normal()), 4)
    return metrics
