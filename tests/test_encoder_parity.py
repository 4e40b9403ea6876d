"""Parity: the columnar engine (metabatch.pipeline.embed) against the per-row reference.

The contract is /work/shared/spec/joint-meta-config-env-v1.md; it is bit exact.
``tests/reference_v1.py`` follows it row by row, ``embed_batch`` follows it
column by column; every run of a batch must come out the same from both:
the same 1,536 vector bytes and source tag, or skipped by both, or rejected
by both.

The engine reads JSON as PostgreSQL prints ``jsonb`` (no duplicate keys, keys
reordered, ``1e30`` printed as an integer, no negative zero, ...), so every
JSON text below is first round-tripped through ``jsonb`` in a throwaway
database, and both implementations get PostgreSQL's text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_v1 as ref  # noqa: E402

from metabatch.pipeline.embed import Weights, embed_batch  # noqa: E402
from metabatch.pipeline.encode import DIM, hash_tokens  # noqa: E402
from metabatch.pipeline.unnest import ShapeCache, max_depth  # noqa: E402

# the server, as in conftest.py (no database part)
PG_SERVER = os.environ.get("METABATCH_TEST_PG", "postgresql://root@127.0.0.1:5432")
FLT_MAX = 3.4028234663852886e38


# --------------------------------------------------------------------------
# PostgreSQL: a throwaway database and the jsonb round trip


@pytest.fixture(scope="session")
def pg():
    """A connection to a throwaway database of its own, dropped at the end of the session."""
    dbapi = pytest.importorskip("adbc_driver_postgresql.dbapi")
    try:
        admin = dbapi.connect(f"{PG_SERVER}/postgres", autocommit=True)
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"PostgreSQL is not reachable at {PG_SERVER}: {exc}")
    name = f"mbparity_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    con = dbapi.connect(f"{PG_SERVER}/{name}", autocommit=True)
    try:
        yield con
    finally:
        con.close()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def pg_jsonb(con, texts: list[str | None]) -> list[str | None]:
    """Each JSON text as PostgreSQL prints it after a cast to ``jsonb`` (None stays None).

    One query for the whole list: the texts travel as the elements of one JSON
    array of strings, and come back in order.
    """
    if not texts:
        return []
    with con.cursor() as cur:
        cur.execute(
            "SELECT e::jsonb::text FROM json_array_elements_text($1::json) WITH ORDINALITY AS a(e, i) ORDER BY i",
            parameters=(json.dumps(texts),),
        )
        rows = cur.fetchall()
    assert len(rows) == len(texts)
    return [r[0] for r in rows]


def dump(value) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


# --------------------------------------------------------------------------
# Running both sides


def reference_outcome(config_text, metrics_text, weights):
    try:
        vector, source = ref.encode_run(config_text, metrics_text, weights)
    except ref.Rejected:
        return ("rejected",)
    if vector is None:
        return ("skipped",)
    return ("ok", vector, source)


def _runs_table(configs, metrics, run_ids):
    n = len(configs)
    return pa.table(
        {
            "run_id": pa.array(run_ids, pa.string()),
            "strategy_id": pa.array(["S"] * n, pa.string()),
            "universe_id": pa.array(["U"] * n, pa.string()),
            "end_date": pa.array([None] * n, pa.date32()),
            "config_json": pa.array(configs, pa.string()),
            "metrics_json": pa.array(metrics, pa.string()),
        }
    )


def _outcomes(batch, run_ids):
    out = {}
    for run_id, reason in batch.rejected:
        assert run_id not in out, f"{run_id} rejected twice"
        assert isinstance(reason, str) and reason, f"{run_id} rejected without a reason"
        out[run_id] = ("rejected",)
    for row in batch.rows.to_pylist():
        assert row["run_id"] not in out, f"{row['run_id']} both rejected and written"
        scope = json.loads(row["entity_scope"])
        assert scope["run_id"] == row["run_id"]
        assert row["joint_type"] == "META_CONFIG_ENV_V0"
        assert len(row["vector"]) == DIM * 4
        out[row["run_id"]] = ("ok", row["vector"], scope["source"])
    missing = [r for r in run_ids if r not in out]
    assert batch.skipped == len(missing), (batch.skipped, missing)
    for r in missing:
        out[r] = ("skipped",)
    return [out[r] for r in run_ids]


def engine_outcomes(configs, metrics, weights):
    """The engine's outcome per run, two ways: {how: [outcome per run]}.

    ``one batch``: one ``embed_batch`` call, no cache. ``cached``: as the
    backfill runs it, one connection and one ``ShapeCache`` for the job: the
    first half of the runs as a batch, then the whole list as the next batch
    (so the second batch is parsed with a structure learnt from other runs).
    """
    n = len(configs)
    run_ids = [f"r{i}" for i in range(n)]
    con, w = _duckdb(), Weights(*weights)
    results = {"one batch": _outcomes(embed_batch(_runs_table(configs, metrics, run_ids), w, con=con), run_ids)}
    cache, half = ShapeCache(), n // 2
    first = embed_batch(_runs_table(configs[:half], metrics[:half], run_ids[:half]), w, con=con, cache=cache)
    second = embed_batch(_runs_table(configs, metrics, run_ids), w, con=con, cache=cache)
    results["cached, 1st batch"] = _outcomes(first, run_ids[:half])
    results["cached, 2nd batch"] = _outcomes(second, run_ids)
    return results


_DUCKDB = []


def _duckdb():
    """One DuckDB connection for every call (as a backfill job shares one); connecting costs ~10 ms."""
    if not _DUCKDB:
        _DUCKDB.append(duckdb.connect())
    return _DUCKDB[0]


def describe(outcome):
    if outcome[0] != "ok":
        return outcome[0]
    return f"ok {outcome[2]}"


def assert_parity(configs, metrics, weights):
    """Both sides on the same (PostgreSQL-printed) texts; bit-for-bit equal per run.

    Returns the engine's outcomes (one batch).
    """
    expected = [reference_outcome(c, m, weights) for c, m in zip(configs, metrics)]
    problems = []
    engine = engine_outcomes(configs, metrics, weights)
    for how, got in engine.items():
        for i, (c, m, g, e) in enumerate(zip(configs, metrics, got, expected)):
            if g == e:
                continue
            msg = f"{how}, run {i}: engine {describe(g)} != reference {describe(e)}\n  config={c!r}\n  metrics={m!r}"
            if g[0] == e[0] == "ok" and g[1] != e[1]:
                a, b = np.frombuffer(g[1], "<u4"), np.frombuffer(e[1], "<u4")
                diff = np.flatnonzero(a != b)
                fa, fb = np.frombuffer(g[1], "<f4"), np.frombuffer(e[1], "<f4")
                msg += f"\n  {len(diff)} components differ, first at {diff[:8].tolist()}: "
                msg += f"engine {fa[diff[:4]].tolist()} reference {fb[diff[:4]].tolist()}"
            problems.append(msg)
    assert not problems, f"weights={weights}\n" + "\n".join(problems)
    return engine["one batch"]


def check(pg, docs, weights=(1.0, 1.0, 1.0)):
    """Round-trip (config, metrics) Python values or raw texts through jsonb, then compare.

    A value of type ``Raw`` is sent as is (to test duplicate keys, exponents, ...);
    ``SQL_NULL`` is an SQL NULL, ``None`` the JSON null.
    """

    def text(value):
        if value is SQL_NULL:
            return None
        return value.text if isinstance(value, Raw) else dump(value)

    printed = pg_jsonb(pg, [text(v) for doc in docs for v in doc])
    return assert_parity(printed[0::2], printed[1::2], weights)


class Raw:
    def __init__(self, text):
        self.text = text


class _SqlNull:
    def __repr__(self):
        return "SQL_NULL"


SQL_NULL = _SqlNull()


def floats_of(vector: bytes) -> np.ndarray:
    return np.frombuffer(vector, "<f4")


# --------------------------------------------------------------------------
# Strategies

# PostgreSQL's jsonb refuses NUL and lone surrogates; everything else goes, control characters included
_chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
_SPECIAL_KEYS = [
    "", ".", "a.b", "a", "A", "b", "a-b", "z", "ß", "SS", "ss", "k", "K", "\u212a", "i", "I", "\u0130",
    "\u01c4", "\u01c5", "\u01c6", "é", "É", "😀", "[", "a[0]", "]", '"', "/", "~", "~0", "~1", "a/b", "a~b",
    " ", "\t", "\n", "\x01", "\\", "x y", "0", "10", "2",
    "market_id", "universe_id", "assessment_horizon_days", "assessment_strategy_id",
    "sub.universe_id_extra", "market_ids", "my_market_id_x", "Market_Id", "MARKET_ID", "universe",
]
keys = st.one_of(st.sampled_from(_SPECIAL_KEYS), st.text(_chars, max_size=5))

_SPECIAL_INTS = [
    0, 1, -1, 2**31, 2**53 + 1, -(2**53 + 1), 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1, -(2**64),
    2**127, 2**128, 10**30, 10**38 * 35 // 10, 10**308, 2**1024 - 2**970, 2**1024 - 2**970 - 1, 2**1024,
    10**400, -(10**400), 12345678901234567890123456789,
]
_SPECIAL_FLOATS = [
    0.0, -0.0, 0.5, -1.5, 1e-30, 5e-324, -5e-324, 1e-46, -1e-46, 1.4e-45, -7e-46, 1.1754943508222875e-38,
    3.4028234663852886e38, -3.4028234663852886e38, 3.4028235677973366e38, 3.4028235677973362e38, 3.5e38,
    -3.5e38, 3e38, 1e308, -1e308, 1.7976931348623157e308, 1e30, 0.1, 16777217.0,
]
_ordinary_numbers = st.one_of(
    st.integers(min_value=-1000, max_value=1000),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(min_value=-1e-36, max_value=1e-36, allow_nan=False),  # float32 subnormals, -0.0 after rounding
    st.floats(min_value=-1e30, max_value=1e30, allow_nan=False),  # finite after weighting and summing
)
_extreme_numbers = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=False, allow_infinity=False),  # up to the double range: mostly past float32
    st.sampled_from(_SPECIAL_INTS),
    st.sampled_from(_SPECIAL_FLOATS),
)
# a number past the float32 range rejects the whole run: keep them rare enough that most runs encode
numbers = st.integers(0, 24).flatmap(lambda i: _extreme_numbers if i == 7 else _ordinary_numbers)
strings = st.one_of(
    st.text(_chars, max_size=8),
    st.sampled_from(["", "x", "US", "é", "a=b", "1.5", "true", "null", "\u2028", "\x7f", "\x1f", "😀"]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)

json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=25,
)

_ENV_KEYS = ["market_id", "universe_id", "assessment_horizon_days", "assessment_strategy_id",
             "sub.universe_id_extra", "market_ids", "x_assessment_strategy_id"]


@st.composite
def deep_env(draw):
    """A value buried under a few levels of keys and lists, with an env key somewhere on the way."""
    depth = draw(st.integers(1, 5))
    path = draw(st.lists(st.one_of(keys, st.just(0)), min_size=depth, max_size=depth))
    at = draw(st.integers(0, depth - 1))
    if not isinstance(path[at], str) or not path[at]:
        path[at] = draw(st.sampled_from(_ENV_KEYS))
    elif draw(st.booleans()):
        path[at] = path[at] + draw(st.sampled_from(_ENV_KEYS))
    value = draw(json_values)
    for step in reversed(path):
        value = [value] if step == 0 else {step: value}
    return value


@st.composite
def long_lists(draw):
    """More than DIM features (truncation), with huge numbers after the cut."""
    head = draw(st.integers(DIM - 8, DIM + 8))
    items = draw(st.lists(st.one_of(_ordinary_numbers, strings, st.booleans(), st.none()), min_size=head, max_size=head))
    tail = draw(st.lists(st.sampled_from([10**400, -(10**400), 3.5e38, 1e308, "x", None, [1]]), max_size=4))
    return items + tail


_FALSY = [None, False, 0, 0.0, "", [], {}]
_TRUTHY_NON_OBJECTS = [True, 1, -0.5, 10**400, "x", " ", [0], [None], [{}], "{}"]


@st.composite
def configs(draw):
    kind = draw(st.sampled_from(["object"] * 10 + ["falsy", "truthy", "sql-null"]))
    if kind == "falsy":
        return draw(st.sampled_from(_FALSY))
    if kind == "truthy":
        return draw(st.sampled_from(_TRUTHY_NON_OBJECTS))
    if kind == "sql-null":
        return SQL_NULL
    cfg = draw(st.dictionaries(keys, json_values, max_size=6))
    extras = draw(st.lists(st.sampled_from(["env", "long", "nested-list"]), max_size=2))
    for extra in extras:
        key = draw(keys)
        if extra == "env":
            cfg[key] = draw(deep_env())
        elif extra == "long":
            cfg[key] = draw(long_lists())
        else:
            cfg[key] = draw(st.lists(st.lists(json_values, max_size=3), max_size=3))
    return cfg


@st.composite
def metrics_values(draw):
    kind = draw(st.sampled_from(["object"] * 8 + ["falsy", "truthy"]))
    if kind == "falsy":
        return draw(st.sampled_from(_FALSY))
    if kind == "truthy":
        return draw(st.sampled_from(_TRUTHY_NON_OBJECTS))
    values = st.one_of(scalars, scalars, json_values)
    return draw(st.dictionaries(keys, values, max_size=8))


_WEIGHTS = [0.0, 1.0, 0.5, 2.0, 0.3, 1e-3, 3.0, 1e-46, 0.1]
weights_strategy = st.one_of(
    st.just((1.0, 1.0, 1.0)),
    st.tuples(*[st.sampled_from(_WEIGHTS)] * 3).filter(lambda w: max(w) >= 0.1),
)


# --------------------------------------------------------------------------
# 1. Property: random batches


def _mutate(draw, value):
    """The value with one subtree (possibly the whole) replaced by a random value."""
    if isinstance(value, dict) and value and draw(st.integers(0, 3)) > 0:
        key = draw(st.sampled_from(sorted(value)))
        return {**value, key: _mutate(draw, value[key])}
    if isinstance(value, list) and value and draw(st.integers(0, 3)) > 0:
        i = draw(st.integers(0, len(value) - 1))
        return value[:i] + [_mutate(draw, value[i])] + value[i + 1 :]
    return draw(json_values)


_PLAIN_KEYS = st.sampled_from(["a", "b", "c", "l", "x.y", "market_id", "sub.universe_id_extra", "é", "z"])


@st.composite
def batches(draw):
    """Runs of one batch: fresh random ones, and variants of a common base (the
    same keys, with a subtree of another shape here and there), so that the
    same key holds an object in one run and a number or a list in another."""
    # mostly keys that can be struct fields, so that a reused structure is tried (keys
    # such as "" or "a"/"A" send a level to the JSON-pointer path instead)
    base_keys = st.integers(0, 4).flatmap(lambda i: keys if i == 0 else _PLAIN_KEYS)
    base_values = st.one_of(json_values, st.dictionaries(_PLAIN_KEYS, json_values, min_size=1, max_size=4))
    base_config = draw(st.dictionaries(base_keys, base_values, min_size=2, max_size=6))
    base_metrics = draw(st.dictionaries(base_keys, st.one_of(scalars, json_values), min_size=1, max_size=6))
    runs = []
    hows = draw(st.lists(st.sampled_from(["fresh", "base", "variant", "variant"]), min_size=1, max_size=7))
    if draw(st.booleans()):
        # the base runs first: the first half of the batch teaches the ShapeCache one
        # structure, which the variants in the second half then break
        hows.sort(key=lambda how: how != "base")
    for how in hows:
        if how == "fresh":
            runs.append((draw(configs()), draw(metrics_values())))
        elif how == "base":
            runs.append((base_config, base_metrics))
        else:
            config, metrics = dict(base_config), dict(base_metrics)
            for _ in range(draw(st.integers(1, 3))):
                key = draw(st.sampled_from(sorted(config)))
                if draw(st.booleans()):  # the whole value becomes a scalar or a flat list
                    config[key] = draw(st.one_of(scalars, st.lists(scalars, max_size=3)))
                else:
                    config[key] = _mutate(draw, config[key])
            if draw(st.booleans()):
                key = draw(st.sampled_from(sorted(metrics)))
                metrics[key] = _mutate(draw, metrics[key])
            runs.append((config, metrics))
    return runs


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(runs=batches(), weights=weights_strategy)
def test_engine_matches_reference_on_random_batches(pg, runs, weights):
    texts = []
    for c, m in runs:
        texts.append(None if c is SQL_NULL else dump(c))
        texts.append(dump(m))  # metrics_json IS NOT NULL is a read condition; a JSON null is read
    printed = pg_jsonb(pg, texts)
    assert_parity(printed[0::2], printed[1::2], weights)


# --------------------------------------------------------------------------
# 2. Examples: the cases the product named


def test_unicode_keys(pg):
    cfg = {"é": 1, "e": 2, "z": 3, "😀": "x", "\uffff": 4, "ß": {"SS": 1, "ss": 2}, "ǅ": 5, "Ǆ": 6, "\u212a": 7, "K": 8}
    got = check(pg, [(cfg, {"é": 1.0, "😀": 2, "E": True})])
    assert got[0][0] == "ok"


def test_case_only_keys_in_one_run_and_across_runs(pg):
    docs = [
        ({"a": 1, "A": 2, "ß": 3, "SS": 4}, {"a": 1, "A": 2}),
        ({"a": {"b": 1}}, {"A": 3}),
        ({"A": {"B": "x"}, "b": [1, {"a": 1, "A": 2}]}, {"a": True}),
        ({"k": 1}, {"K": 1, "\u212a": 2}),
    ]
    check(pg, docs)


def test_key_order_is_per_level(pg):
    # a.z comes before a-b although "a-b" < "a.z" as whole strings
    docs = [({"a": {"z": 1}, "a-b": 2}, {"s": 1}), ({"a-b": 5, "a": {"z": 7, "y": 6}}, {})]
    got = check(pg, docs)
    assert got[0][2] == "config+outcome"
    got = check(pg, docs, (1.0, 0.0, 0.0))  # the config branch alone
    assert floats_of(got[0][1])[:3].tolist() == [1.0, 2.0, 0.0]
    assert floats_of(got[1][1])[:4].tolist() == [6.0, 7.0, 5.0, 0.0]


def test_dotted_key_and_nested_key_share_a_path(pg):
    check(pg, [({"a.b": "x", "a": {"b": "x"}}, {}), ({"a": {"b": "x"}}, {}), ({"a.b": "x"}, {})])
    got = check(pg, [({"a.b": "x"}, {}), ({"a": {"b": "x"}}, {})])
    assert got[0] == got[1]


def test_big_integers(pg):
    docs = [
        ({"a": 2**53 + 1, "b": 2**64 + 1, "c": -(2**64), "d": 10**30, "e": 123456789012345678901234567890}, {"x": 2**64}),
        ({"a": 1.5, "b": "s", "c": None, "d": [2**100], "e": {"f": 2**70}}, {"x": 1}),
        ({"a": 2**1024 - 2**970 - 1}, {}),  # just below the double overflow threshold: DBL_MAX, then inf in float32
        ({"x": 10**400}, {"a": 1}),
        ({"x": -(10**400)}, {"a": 1}),
        ({}, {"x": 10**400}),
        ({"x": 10**400}, {"a": 1}),
    ]
    got = check(pg, docs, (1.0, 1.0, 1.0))
    assert [g[0] for g in got] == ["ok", "ok", "rejected", "rejected", "rejected", "rejected", "rejected"]
    # the weight of the branch holding the huge number is 0: nothing to reject
    got = check(pg, docs[3:6], (0.0, 1.0, 1.0))
    assert [g[0] for g in got] == ["ok", "ok", "rejected"]
    got = check(pg, [(Raw('{"x": 1e30, "y": 1E+2, "z": 1.0e-2}'), Raw("{}"))])
    expected = np.float32([1e30, 100.0, 0.01])
    assert floats_of(got[0][1])[:3].tobytes() == expected.tobytes()


def test_lists_of_lists(pg):
    docs = [
        ({"l": [[1], [{"x": 1}], 2, [], [[3]]]}, {}),
        ({"l": [1, [2, 3], {"x": [4, [5]]}, None, "s"]}, {}),
        ({"l": [[1, 2], [3]]}, {"z": 1}),
        ({"l": 7}, {}),
        ({"l": {"x": 1}}, {}),
        ({"m": [{"x": 1}, 5, "t", {"y": [1, 2]}], "l": [[{"a": "b"}]]}, {}),
        ([[1]], {}),
    ]
    got = check(pg, docs)
    # a nested array is a leaf that gives nothing: run 0 has the one feature 2.0
    v = floats_of(got[0][1])
    assert got[0][2] == "config" and v[0] == 2.0 and not v[1:].any()
    assert got[6][0] == "rejected"


def test_truncation_at_384_features(pg):
    long = list(range(1, DIM + 1))
    docs = [
        ({"a": long + [10**400]}, {}),
        ({"a": long + [10**400, 3.5e38, "s"], "b": 10**400}, {}),
        ({"a": long[:-1] + ["s", 10**400]}, {}),
        ({"a": [None] * 500 + [1]}, {}),
        ({"a": [{"market_id": i} for i in range(400)] + [{"market_id": 10**400}]}, {}),
        ({"a": [[10**400]] + long}, {}),
        ({"a": long[: DIM - 1] + [10**400]}, {}),  # at position 384 (the last kept): rejected
    ]
    got = check(pg, docs)
    assert [g[0] for g in got] == ["ok", "ok", "ok", "ok", "ok", "ok", "rejected"]
    v = floats_of(got[0][1])
    assert v[DIM - 1] == np.float32(DIM)
    metrics = {f"k{i:04d}": i for i in range(DIM + 20)}
    metrics["k9999"] = 10**400
    got = check(pg, [({}, metrics), ({"a": long * 2}, metrics)])
    assert [g[0] for g in got] == ["ok", "ok"]


def test_env_keys_nested_deep(pg):
    docs = [
        ({"a": {"b": [{"c": {"market_id": "US"}}, {"d": [1, {"universe_id_x": 2}]}]}}, {}),
        ({"sub.universe_id_extra": 3, "market_ids": [1, 2], "x": {"market_ids": [{"y": "z"}]}}, {}),
        ({"x": {"assessment_horizon_days": {"q": [21, [22], None, 23]}}}, {}),
        ({"x": {"assessment_strategy_id": None, "market": {"id": 1}, "market.id": 2, "market_i": {"d": 3}}}, {}),
        ({"": {"market_id": "X"}}, {}),
        ({"market": {"_id": 1}, "universe": [{"_id": 1}]}, {}),
        ({"Market_Id": 1, "MARKET_ID": 2}, {}),
    ]
    got = check(pg, docs)
    assert [g[2] if g[0] == "ok" else g[0] for g in got] == [
        "config+env", "config+env", "config+env", "config", "config+env", "config", "config"
    ]
    got = check(pg, docs, (0.0, 1.0, 0.0))
    assert [g[0] for g in got] == ["ok", "ok", "ok", "skipped", "ok", "skipped", "skipped"]


@pytest.mark.parametrize("falsy", [None, False, 0, 0.0, "", [], {}], ids=repr)
def test_falsy_non_objects_count_as_empty(pg, falsy):
    docs = [
        (falsy, {"a": 1}),
        ({"a": 1}, falsy),
        (falsy, falsy),
        (Raw("0.00"), Raw("-0")),
        (Raw("-0.0"), Raw("0e5")),
    ]
    got = check(pg, docs)
    assert [g[0] for g in got] == ["ok", "ok", "skipped", "skipped", "skipped"]


@pytest.mark.parametrize("truthy", [True, 1, -1.5, 10**400, "x", "0", [0], [None], [{}], "{}"], ids=repr)
def test_truthy_non_objects_are_rejected(pg, truthy):
    got = check(pg, [(truthy, {"a": 1}), ({"a": 1}, truthy), ({"a": 2}, {"b": 3})])
    assert [g[0] for g in got] == ["rejected", "rejected", "ok"]


def test_empty_key_paths(pg):
    docs = [
        ({"": {"market_id": "X"}}, {}),
        ({"market_id": "X"}, {}),
        ({"a": {"": {"b": 1}}}, {}),
        ({"a": {"": {"b": "s"}}}, {}),
        ({"a..b": "s"}, {}),
        ({"": "s", "a": {"": "s"}, "b": [{"": "t"}]}, {"": 1}),
        ({"": {"": {"": "s"}}}, {}),
        ({"": ["s"]}, {}),
    ]
    got = check(pg, docs)
    # the path of {"": {"market_id": "X"}} is market_id, not .market_id
    assert got[0] == got[1]
    assert got[3] == got[4]  # a..b


def test_number_in_one_row_object_in_another(pg):
    docs = [
        ({"a": 1, "b": 2}, {"m": 1, "n": {"x": 1}}),
        ({"a": {"x": 2, "y": "s"}, "b": 3}, {"m": {"x": 2}, "n": 2}),
        ({"a": [1, 2], "b": 4}, {"m": "s", "n": True}),
        ({"a": "s", "b": 5}, {"m": None, "n": 0.5}),
        ({"a": True, "b": 6}, {"m": [1], "n": "x"}),
        ({"a": None, "b": 7}, {"m": False, "n": None}),
        ({"a": [{"x": 1}, 3, [4], "s", True, None, {"x": "t"}], "b": 8}, {"m": 2**64}),
        ({"b": {"c": 1}}, {"m": 1.5}),
    ]
    check(pg, docs)
    for i in range(len(docs)):  # and every pair of shapes on its own
        for j in range(i + 1, len(docs)):
            check(pg, [docs[i], docs[j]])


def test_zero_weight_branch_with_inf(pg):
    docs = [
        ({"a": 10**400, "market_id": 1}, {"x": 1}),
        ({"a": 1, "market_id": 10**400}, {"x": 1}),
        ({"a": 1}, {"x": 10**400}),
        ({"a": 3.5e38}, {"x": 1}),
    ]
    got = check(pg, docs, (0.0, 1.0, 1.0))
    assert [g[0] for g in got] == ["ok", "rejected", "rejected", "ok"]
    assert got[0][2] == "env+outcome"
    got = check(pg, docs, (1.0, 0.0, 1.0))  # an env leaf is a config leaf too
    assert [g[0] for g in got] == ["rejected", "rejected", "rejected", "rejected"]
    got = check(pg, docs, (1.0, 1.0, 0.0))
    assert [g[0] for g in got] == ["rejected", "rejected", "ok", "rejected"]
    # a weight that rounds to 0 in float32 is a weight of 0
    got = check(pg, docs, (1e-46, 1.0, 1.0))
    assert [g[0] for g in got] == ["ok", "rejected", "rejected", "ok"]


def test_float32_overflow_is_rejected(pg):
    docs = [
        ({"a": 3.5e38}, {}),
        ({"a": -3.5e38}, {}),
        ({}, {"a": 3.5e38}),
        ({"a": 3.4028234663852886e38}, {}),  # FLT_MAX itself
        ({"a": 3.4028235677973362e38}, {}),  # just under FLT_MAX + half an ulp: rounds to FLT_MAX
        ({"a": 3.4028235677973366e38}, {}),  # FLT_MAX + half an ulp: ties to even, inf
        ({"a": 1e308}, {}),
        ({"a": 3.5e38, "b": -3.5e38}, {}),  # inf and -inf in one vector
    ]
    got = check(pg, docs)
    assert [g[0] for g in got] == ["rejected", "rejected", "rejected", "ok", "ok", "rejected", "rejected", "rejected"]
    assert floats_of(got[4][1])[0] == np.float32(FLT_MAX)


def test_weighted_sum_overflow_is_rejected(pg):
    docs = [
        ({"a": 3e38}, {"a": 3e38}),  # (3e38 + 3e38) overflows before the division
        ({"a": 3e38}, {"a": -3e38}),
        ({"a": 2e38}, {"a": 1e38}),
        ({"a": 3e38, "market_id": 1}, {"a": 1}),
    ]
    got = check(pg, docs, (1.0, 1.0, 1.0))
    assert [g[0] for g in got] == ["rejected", "ok", "ok", "ok"]
    got = check(pg, docs, (2.0, 1.0, 0.0))  # 2 * 3e38 and 2 * 2e38 overflow
    assert [g[0] for g in got] == ["rejected", "rejected", "rejected", "rejected"]
    got = check(pg, docs, (0.5, 1.0, 0.5))
    assert [g[0] for g in got] == ["ok", "ok", "ok", "ok"]


def test_all_branches_absent_is_skipped(pg):
    docs = [
        ({}, {}),
        ({"a": None, "b": [], "c": {}, "d": [[1]], "e": [None]}, {"s": "x", "n": None, "o": {"a": 1}, "l": [1]}),
        ({"market_id": 1}, {"s": "x"}),
        ({"a": 1}, {"b": 1}),
    ]
    got = check(pg, docs, (1.0, 1.0, 1.0))
    assert [g[0] for g in got] == ["skipped", "skipped", "ok", "ok"]
    got = check(pg, docs, (0.0, 0.0, 1.0))
    assert [g[0] for g in got] == ["skipped", "skipped", "skipped", "ok"]
    got = check(pg, docs, (0.0, 1.0, 0.0))
    assert [g[0] for g in got] == ["skipped", "skipped", "ok", "skipped"]


def test_negative_zero(pg):
    tiny = [-1e-46, -1e-300, -5e-324]  # nonzero doubles that round to -0.0 in float32
    docs = [
        ({"a": -0.0}, {"a": -0.0}),
        ({"a": tiny}, {"b": tiny[0]}),
        ({"a": tiny[0]}, {}),
        ({"a": [-1e-46, 1e-46]}, {"a": -1e-46, "b": 1e-46}),
        (Raw('{"a": -0.000000000000000000000000000000000000000000000000000001}'), Raw('{"a": -0}')),
        (Raw('{"a": -1e-400}'), Raw('{"a": -0.0}')),
    ]
    got = check(pg, docs)
    for g in got:
        assert g[0] == "ok"
    # jsonb has no negative zero, and the sums start from +0.0: no -0.0 comes out here
    for g in got:
        v = floats_of(g[1])
        assert not (np.signbit(v) & (v == 0)).any()
    # -0.0 in every term still sums to +0.0
    got = check(pg, [({"a": -1e-46}, {"a": -1e-46})], (1.0, 1.0, 1.0))
    assert floats_of(got[0][1])[0] == 0 and not np.signbit(floats_of(got[0][1])[0])
    # but a division can round to -0.0: (-min_subnormal + 0) / 2 ties to (negative) zero
    got = check(pg, [({"a": -1.401298464324817e-45}, {"a": 0})], (1.0, 1.0, 1.0))
    assert floats_of(got[0][1])[0] == 0 and np.signbit(floats_of(got[0][1])[0])


def test_integers_past_python_digit_limit(pg):
    # jsonb keeps 1e5000 as a 5001-digit integer; Python's int() refuses more than 4300 digits
    docs = [
        (Raw('{"a": 1e5000, "b": 1}'), Raw("{}")),
        (Raw("{}"), Raw('{"m": -1e5000, "n": 2}')),
        (Raw("1e5000"), Raw("{}")),
        (Raw('{"a": 1e-5000, "b": 1}'), Raw("-1e-5000")),
    ]
    got = check(pg, docs, (0.0, 1.0, 1.0))
    assert [g[0] for g in got] == ["skipped", "rejected", "rejected", "skipped"]
    got = check(pg, docs, (1.0, 1.0, 1.0))
    assert [g[0] for g in got] == ["rejected", "rejected", "rejected", "ok"]


def test_json_null_next_to_one_kind_of_scalar(pg):
    # keys that collide ("" or case) are read by JSON pointer, which gives the text 'null'
    # for a null value: it must give no feature, next to numbers, strings or booleans
    for value in [0, 1.5, "s", "é\n", True, False]:
        docs = [
            ({"": None, "a": None, "A": None}, {"": None, "k": None, "K": None}),
            ({"": value, "a": value, "A": None}, {"": value, "k": None, "K": value}),
            ({"": None, "a": None, "A": value}, {"": None, "k": value, "K": None}),
        ]
        check(pg, docs)


def test_mixed_kinds_with_escapes_and_unicode(pg):
    docs = [
        ({"a": "é😀", "b": ["x\"y", 1], "c": {"d": "\u0001\\"}}, {}),
        ({"a": 1, "b": [True, "z"], "c": "\u2028"}, {}),
        ({"a": [None, "é"], "b": {"x": "a\tb"}, "c": 2}, {}),
        ({"a": False, "b": None, "c": ["\\\"", {"d": "😀"}]}, {}),
    ]
    check(pg, docs)


@pytest.mark.parametrize("depth", [10, 40, 70])
def test_deep_nesting(pg, depth):
    # DuckDB infers structures only to 128 levels (and fails fatally past that),
    # Arrow nests types only to 64: deep configs must still come out right
    deep_objects = Raw('{"a": ' * depth + '"s"' + "}" * depth)
    deep_lists = Raw('{"l": ' + '[{"market_id": ' * depth + "1" + "}]" * depth + ', "z": 2}')
    deep_arrays = Raw('{"l": ' + "[" * depth + "1" + "]" * depth + ', "z": [1, [2], {"q": "[[{"}]}')
    brackets_in_strings = Raw('{"s": "' + "[{" * depth + '", "t": "\\\"[[", "u": 1}')
    docs = [
        (deep_objects, Raw('{"m": ' + '{"x": ' * depth + "1" + "}" * depth + ', "n": 2}')),
        (deep_lists, Raw("{}")),
        (deep_arrays, Raw('{"m": 1}')),
        (brackets_in_strings, Raw("{}")),
        ({"a": {"b": [1, {"c": "x"}]}, "market_id": "u"}, {"q": 1}),
    ]
    got = check(pg, docs)
    assert [g[0] for g in got] == ["ok"] * 5
    check(pg, docs[1:2] + docs[4:])


def test_very_deep_config(pg):
    # 260 levels: walked by pointer, a few Python frames a level, past the default recursion limit
    depth = 260
    cfg = Raw('{"a": ' * depth + '[1, {"market_id": "s"}, "t"]' + "}" * depth)
    configs, metrics = pg_jsonb(pg, [cfg.text, dump({"a": 1})]), pg_jsonb(pg, [dump({"m": 1}), dump({"m": 2})])
    expected = [reference_outcome(c, m, (1.0, 1.0, 1.0)) for c, m in zip(configs, metrics)]
    run_ids = ["r0", "r1"]
    got = _outcomes(embed_batch(_runs_table(configs, metrics, run_ids), Weights(), con=_duckdb()), run_ids)
    assert got == expected
    assert [g[2] for g in got] == ["config+env+outcome", "config+outcome"]


def test_max_depth_skips_brackets_in_strings():
    texts = pa.array([
        '{"a": "[[[{{"}',  # 1: brackets in a string
        '[[1], {"a": [2]}]',  # 3
        None,
        '"\\\\"',  # 0: a string holding one backslash
        '{"x\\"[[": [[["\\\\\\"[[[["]]]}',  # 4: escaped quotes after a run of backslashes
        "1",
    ])
    assert all(json.loads(t) is not None for t in texts.to_pylist() if t is not None)
    assert max_depth(texts) == 4
    assert [max_depth(texts.slice(i, 1)) for i in range(len(texts))] == [1, 3, 0, 0, 4, 0]


def test_structure_reused_across_batches(pg):
    """The backfill parses a batch with the structure learnt from earlier ones:
    every change of shape in a later batch must still come out right."""
    first = [({"a": 1, "b": {"c": "x"}, "l": [1, 2], "market_id": "u"}, {"s": 1.5, "t": True})] * 3
    later = [
        ({"a": "x", "b": {"c": 1}, "l": [1, 2], "market_id": "u"}, {"s": "x", "t": 2}),
        ({"a": {"z": 1}, "b": 5, "l": {"k": [1]}, "market_id": ["u"]}, {"s": {"a": 1}, "t": None}),
        ({"a": [1, [2]], "b": {"c": None, "d": 2}, "l": [[1], 2], "market_id": None}, {"s": [1], "u": 1}),
        ({"A": 1, "a": 2, "b": {"C": 1, "c": 2}, "": 3}, {"S": 1, "s": 2}),
        ({"a": 1, "b": {"c": "x\"y"}, "l": [1, 2, None], "market_id": "u"}, {"s": 1.5, "t": True}),
        ({"a": 1, "b": {"c": "x"}, "l": [], "market_id": "u"}, {"s": 1.5, "t": True}),
        ({"a": 1, "b": {"c": "x"}, "l": [1, 2], "market_id": "u", "new": 1}, {"s": 1.5, "t": True, "new": 1}),
        ({"a": 1, "b": {}, "l": [1, 2], "market_id": "u"}, {"s": 1.5}),
        ({"a": 1, "b": {"c": "x"}, "l": [{"x": 1}], "market_id": "u"}, {"s": 1.5, "t": True}),
    ]
    check(pg, first + later)
    for doc in later:
        check(pg, first + [doc])


def test_first_batch_structure_from_a_sample(pg):
    """A job's first big batch learns its structure from its first rows only;
    rows past the sample that hold other shapes must still come out right."""
    base = ({"a": 1, "b": {"c": "x"}, "l": [1, {"m": 2}], "market_id": "u"}, {"s": 1.5, "t": True})
    later = [
        ({"a": "x", "b": {"c": 1}, "l": [1, {"m": 2}], "market_id": "u"}, {"s": "x", "t": 2}),
        ({"a": {"z": 1}, "b": 5, "l": {"k": [1]}, "market_id": ["u"]}, {"s": {"a": 1}, "t": None}),
        ({"a": [1, [2]], "b": {"c": None, "d": 2}, "l": [[1], 2], "market_id": None}, {"s": [1], "u": 1}),
        ({"A": 1, "a": 2, "b": {"C": 1, "c": 2}, "": 3}, {"S": 1, "s": 2}),
        ({"a": 1, "b": {"c": "x\"y"}, "l": [1, {"m": "z"}, None], "market_id": "u"}, {"s": 1.5, "t": True}),
        ({"a": 1, "b": [{"c": "x"}], "l": [], "market_id": "u", "new": {"market_id": 1}}, {"s": 1.5, "new": 1}),
        ({"a": 1, "b": {}, "l": [1, {"m": [2]}], "market_id": "u"}, {"s": 1.5}),
        ({"a": 1, "b": "s", "l": [{"x": 1}, 7], "market_id": "u"}, {"s": 1.5, "t": True}),
    ]
    docs = [({**base[0], "a": i}, {**base[1], "s": i / 7}) for i in range(2100)] + later
    texts = pg_jsonb(pg, [dump(v) for doc in docs for v in doc])
    configs, metrics = texts[0::2], texts[1::2]
    run_ids = [f"r{i}" for i in range(len(docs))]
    expected = [reference_outcome(c, m, (1.0, 1.0, 1.0)) for c, m in zip(configs, metrics)]
    cache = ShapeCache()
    for _ in range(2):  # the first batch of a job, then the same rows with the structure known
        batch = embed_batch(_runs_table(configs, metrics, run_ids), Weights(), con=_duckdb(), cache=cache)
        got = _outcomes(batch, run_ids)
        bad = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
        assert not bad, [(i, configs[i], describe(got[i]), describe(expected[i])) for i in bad[:5]]


def test_duplicate_keys_and_number_formats(pg):
    docs = [
        (Raw('{"a": 1, "a": "x", "b": {"c": 1, "c": 2}}'), Raw('{"m": 1, "m": true}')),
        (Raw('{"a": 1e30, "b": 1.50, "c": 0.1e1, "d": 100e-2, "e": -0}'), Raw('{"m": 2.0E0}')),
        (Raw('{"b": 1, "a": 2, "aa": 3, "ab": {"z": 1, "y": 2}}'), Raw("{}")),
    ]
    check(pg, docs)


def test_strings_with_escapes_and_unicode(pg):
    docs = [
        ({"s": "a\u0001b\n\t\"\\/", "t": "é😀", "u": "\u2028\u2029", "v": ""}, {}),
        ({"s": ["x", "y", {"z": "w"}], "market_id": "US"}, {"s": "x"}),
        ({"a=b": "c=d", "p": {"q": "="}}, {}),
    ]
    check(pg, docs)


def test_mixed_batch_of_everything(pg):
    docs = [
        ({"b": 1, "a": {"z": 1, "y": "s"}, "l": [1, {"q": 2}, [3], None, "x"], "market_id": "US"},
         {"sharpe": 1.5, "dd": -0.2, "x": "s", "n": {"a": 1}, "ok": True}),
        ({"b": "x", "a": {"z": 2.5}, "big": 123456789012345678901234567890,
          "env": {"universe_id": "U1", "assessment_horizon_days": 21}}, None),
        ({"a": 1, "A": "x", "": {"market_id": "X"}}, {"s": 1}),
        ({"a": {"": {"b": 1}}, "a-b": 2, "a.b": 3}, {}),
        ([], 0),
        ("s", {}),
        ({}, {}),
        ({"l": [[1], [{"x": 1}]], "m": [{"x": 1}, 5, "t", {"y": [1, 2]}]}, {"z": 1}),
        ({"x": 10**400}, {"a": 1}),
    ]
    for w in [(1.0, 1.0, 1.0), (0.5, 2.0, 0.3), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.1, 0.1, 0.1)]:
        check(pg, docs, w)


# --------------------------------------------------------------------------
# 3. The string hash


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.text(_chars, max_size=30), min_size=1, max_size=20))
def test_string_hash_matches_reference(tokens):
    got = hash_tokens(pa.array(tokens, pa.string()))
    expected = np.array([ref.string_hash(t) for t in tokens], np.float64)
    assert got.dtype == np.float64
    assert got.tobytes() == expected.tobytes()


def test_string_hash_follows_the_spec_formula():
    tokens = ["", "a=b", "market_id=US", "é=😀", "x" * 1000] + [f"k{i}=v" for i in range(2000)]
    got = hash_tokens(pa.array(tokens, pa.string()))
    for token, value in zip(tokens, got):
        v = int(hashlib.sha1(token.encode("utf-8")).hexdigest()[:16], 16)
        expected = 2 * (float(v % (2**63 - 1)) / float(2**63)) - 1
        assert struct.pack("<d", value) == struct.pack("<d", expected), token
        assert ref.string_hash(token) == expected
    # half the digests are >= 2^63 - 1: the reduction branch is exercised
    digests = [int(hashlib.sha1(t.encode()).hexdigest()[:16], 16) for t in tokens]
    assert any(d >= 2**63 - 1 for d in digests) and any(d < 2**63 - 1 for d in digests)
    assert math.isfinite(got.sum())
