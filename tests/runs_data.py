"""Hand-written runs for backfill tests: the tricky cases the spec names."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa

BIG = 10**400

# (run_id, strategy_id, universe_id, end_date, config, metrics); config/metrics are
# Python values (dumped to JSON text) or the marker SQL_NULL.
SQL_NULL = object()

TRICKY_RUNS = [
    ("R001", "US_EQ", "U1", "2025-03-31",
     {"market_id": "US_EQ", "engine": {"lookbacks": [5, 20, 60], "name": "mom", "decay": 0.94},
      "risk": {"stops": [{"kind": "trailing", "pct": 0.1}, {"kind": "hard", "pct": 0.2}]}, "tags": ["core", "v3"]},
     {"sharpe": 1.25, "max_drawdown": -0.18, "n_trades": 412, "status": "ok", "buckets": {"low": 1}}),
    ("R002", "US_EQ", None, "2025-04-30",
     {"é": 1, "ß": "straße", "a": {"z": 1}, "a-b": 2, "日本": {"universe_id": "JP"}, "emoji😀": True},
     {"sharpe": 0.5}),
    ("R003", "US_EQ", "U2", "2025-05-31",
     {"big": 123456789012345678901234567890, "neg": -98765432109876543210, "i64": 9223372036854775807,
      "u64": 18446744073709551615, "tiny": 1e-300, "e": 1e30, "f": 1.10},
     {"sharpe": 12345678901234567890123, "ok": False}),
    ("R004", "EU_EQ", "U3", "2025-06-30",
     {"lists": [[1, 2], [3, [4]], [{"a": 1}]], "mixed": [1, "x", None, True, {"k": "v"}, []], "empty": [], "eo": {}},
     {"hit_rate": 0.51}),
    ("R005", "EU_EQ", "U3", "2025-07-31",
     {f"k{i:04d}": i * 0.5 for i in range(500)} | {"zzz": BIG},  # > 384 leaves; the huge number is truncated away
     {"sharpe": 1.0}),
    ("R006", "EU_EQ", "U3", "2025-08-31",
     {"a": {"b": {"c": {"d": {"e": {"market_id": "DEEP", "assessment_horizon_days": 21}}}}},
      "sub": {"universe_id_extra": "x"}, "market_ids": ["US", "EU"], "assessment_strategy_id": None},
     {"vol": 0.12}),
    ("R007", "FX", "U4", "2025-09-30", None, {"sharpe": 2.0}),          # JSON null config
    ("R008", "FX", "U4", "2025-09-30", False, 0),                        # falsy both: skipped
    ("R009", "FX", "U4", "2025-09-30", 0.0, {}),                         # falsy config, empty metrics: skipped
    ("R010", "FX", "U4", "2025-09-30", "", []),                          # skipped
    ("R011", "FX", "U4", "2025-09-30", [1, 2], {"sharpe": 1.0}),         # truthy non-object config: rejected
    ("R012", "FX", "U4", "2025-09-30", {"market_id": "FX"}, "bad"),      # truthy non-object metrics: rejected
    ("R013", "FX", "U4", "2025-09-30", {"x": 3.5e38}, {"sharpe": 1.0}),  # beyond float32: rejected
    ("R014", "FX", "U4", "2025-09-30", {"x": BIG}, {"sharpe": 1.0}),     # beyond double: rejected
    ("R015", "FX", "U4", "2025-09-30", {"": {"market_id": "X"}, "a": {"": {"b": 1}}, "a.b": 2}, None),  # JSON null metrics
    ("R016", "FX", "U4", "2025-09-30", {"a": 1, "A": "upper", "k\"q": 1, "s/l~": 2}, {"Sharpe": 1, "sharpe": 2}),
    ("R017", "FX", "U4", "2025-09-30", {"lookback": "20d", "x": {"y": 1}}, {"sharpe": 1}),
    ("R018", "FX", "U4", "2025-09-30", {"lookback": 20, "x": 5}, {"sharpe": 1}),
    ("R019", "FX", "U4", "2025-09-30", {"market_id": "US"}, SQL_NULL),   # SQL NULL metrics: not read
    ("R020", "FX", "U4", "2025-09-30", SQL_NULL, {"sharpe": -0.0, "x": 1e-320}),
]


def _text(value):
    if value is SQL_NULL:
        return None
    return json.dumps(value, ensure_ascii=False)


def runs_table(runs=TRICKY_RUNS) -> pa.Table:
    """The runs as an Arrow table for Store.insert_runs (JSON as text)."""
    return pa.table(
        {
            "run_id": [r[0] for r in runs],
            "strategy_id": [r[1] for r in runs],
            "config_json": [_text(r[4]) for r in runs],
            "start_date": pa.array([dt.date(2024, 1, 1)] * len(runs), pa.date32()),
            "end_date": pa.array([dt.date.fromisoformat(r[3]) for r in runs], pa.date32()),
            "universe_id": [r[2] for r in runs],
            "metrics_json": [_text(r[5]) for r in runs],
        }
    )
