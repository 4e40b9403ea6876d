"""Later batches reuse the JSON structure of earlier ones (unnest.ShapeCache):
the vectors must stay bit-exact when the shapes drift between batches."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference_v1 as ref
from metabatch.pipeline.embed import Weights, embed_batch
from metabatch.pipeline.unnest import ShapeCache, text_members

KEYS = st.sampled_from(["a", "b", "market_id", "lookback", "sleeves", "x y", "A", "é", ""])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**25), 10**25), st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(alphabet="ab \\\"é:[,{1", max_size=6),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)
CONFIGS = st.dictionaries(KEYS, VALUES, max_size=5)


def _table(configs, start):
    n = len(configs)
    return pa.table(
        {
            "run_id": [f"r{start + i}" for i in range(n)],
            "strategy_id": ["S"] * n,
            "universe_id": ["U"] * n,
            "end_date": pa.array([None] * n, pa.date32()),
            "config_json": [json.dumps(c, ensure_ascii=False) for c in configs],
            "metrics_json": ['{"sharpe": 1.5}'] * n,
        }
    )


def _check(batch_table, result):
    got = {r["run_id"]: r["vector"] for r in result.rows.select(["run_id", "vector"]).to_pylist()}
    rejected = {r for r, _ in result.rejected}
    for row in batch_table.select(["run_id", "config_json", "metrics_json"]).to_pylist():
        try:
            want, _ = ref.encode_run(row["config_json"], row["metrics_json"])
        except ref.Rejected:
            assert row["run_id"] in rejected
            continue
        assert got.get(row["run_id"]) == want, row["config_json"]


BATCHES = [
    [{"a": 1, "b": "x", "sleeves": [{"id": "S1", "w": 0.5}]}] * 3,
    [{"a": "now a string", "b": 2, "sleeves": [{"id": "S1", "w": 0.5, "new": True}, 5, [1, 2]]}],
    [{"a": {"nested": 1}, "sleeves": "legacy", "c": [[1], {"d": "e"}]}, {"a": [1, 2], "b": None}],
    [{"a": 1, "b": "x\\y \"quoted\"", "sleeves": [{"id": "S2"}]}, {"a": 1, "A": 2}],
    [{"": {"market_id": "M"}, "a": 3}, {"a": True, "b": 1e300, "sleeves": []}],
]


def test_drifting_shapes_across_batches():
    con, cache = duckdb.connect(), ShapeCache()
    start = 0
    for configs in BATCHES + BATCHES[::-1]:
        table = _table(configs, start)
        start += len(configs)
        _check(table, embed_batch(table, Weights(1.0, 1.0, 1.0), con=con, cache=cache))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(CONFIGS, min_size=1, max_size=6), min_size=2, max_size=4))
def test_random_batches_share_one_cache(batches):
    con, cache = duckdb.connect(), ShapeCache()
    start = 0
    for configs in batches:
        table = _table(configs, start)
        start += len(configs)
        _check(table, embed_batch(table, Weights(1.0, 1.0, 1.0), con=con, cache=cache))


@settings(max_examples=100, deadline=None)
@given(st.lists(CONFIGS, min_size=1, max_size=8), st.sampled_from([(",", ":"), (", ", ": "), (", ", " : "), (",\n", "\t:")]))
def test_text_members_never_count_too_few(configs, separators):
    """The count may be too high (a string that starts with a colon), never too
    low, unless the text is reported as not exact: a too-low count could match
    a parse that missed a key."""

    def plain(value):
        if isinstance(value, dict):
            return sum((v is not None) + plain(v) for v in value.values())
        if isinstance(value, list):
            return sum(plain(v) for v in value)
        return 0

    def colon_strings(value):
        if isinstance(value, dict):
            return sum(k.startswith(":") + colon_strings(v) for k, v in value.items())
        if isinstance(value, list):
            return sum(colon_strings(v) for v in value)
        return isinstance(value, str) and value.startswith(":")

    texts = [json.dumps(c, ensure_ascii=False, separators=separators) for c in configs]
    members, clean = text_members(pa.array(texts))
    for text, count, ok in zip(texts, members, clean):
        if "\\" in text or any(blank + ":" in text for blank in " \t\n\r"):
            assert not ok
        if ok:
            value = json.loads(text)
            assert plain(value) <= count <= plain(value) + colon_strings(value)
            if not colon_strings(value):
                assert count == plain(value)


def test_a_new_key_after_a_blank_before_its_colon_is_not_lost():
    """A key not in the cached structure, in a text written with a blank
    before its colon, must not be dropped by the fast parse."""
    con, cache = duckdb.connect(), ShapeCache()
    _check(_table([{"a": i, "b": 2} for i in range(3000)], 0), embed_batch(_table([{"a": i, "b": 2} for i in range(3000)], 0), con=con, cache=cache))
    texts = ['{"a" : 1, "zz" : 3}', '{"a": 1, "zz" : 3}', '{"a": 1,\n"zz"\t:3}']
    table = _table([{}] * len(texts), 5000).set_column(4, "config_json", pa.array(texts))
    _check(table, embed_batch(table, Weights(1.0, 1.0, 1.0), con=con, cache=cache))


def test_empty_objects_and_colliding_keys_keep_the_cached_structure(monkeypatch):
    """A few '{}' or case-colliding keys in a batch must not cost every later
    batch a structure inference over all its runs (and vectors stay exact)."""
    from metabatch.pipeline import unnest

    inferred = []
    real = unnest._Builder._structure
    monkeypatch.setattr(unnest._Builder, "_structure", lambda self, texts: inferred.append(len(texts)) or real(self, texts))
    con, cache = duckdb.connect(), ShapeCache()
    common = [{"a": i, "b": "x", "sleeves": [{"id": "S1", "w": 0.5}]} for i in range(40)]
    odd = [{}, {"a": 1, "A": 2}, {"B": 3, "b": "y"}]
    start = 0
    for configs in (common + odd, common + odd, common, common + odd):
        table = _table(configs, start).set_column(5, "metrics_json", pa.array(['{"sharpe": 1.5}', "{}"] * (len(configs) // 2) + ['{"sharpe": 1.5}'] * (len(configs) % 2)))
        start += len(configs)
        inferred.clear()
        _check(table, embed_batch(table, Weights(1.0, 1.0, 1.0), con=con, cache=cache))
        assert isinstance(cache.structures["config"], dict) and isinstance(cache.structures["metrics"], dict)
        if start > len(configs):  # after the first batch: only the odd runs are inferred
            assert all(size <= len(odd) for size in inferred), inferred


def test_a_batch_parsed_ahead_with_an_older_structure():
    """A backfill's reader thread parses the next batch with the structure it
    finds while the previous batch is still being encoded (and may add keys):
    the vectors stay exact, and no batch's additions to the cache are lost."""
    from metabatch.pipeline.embed import prepare_runs

    con, reader_con, cache = duckdb.connect(), duckdb.connect(), ShapeCache()
    first = _table([{"a": i, "b": "x"} for i in range(3000)], 0)
    _check(first, embed_batch(prepare_runs(first, reader_con, cache), con=con, cache=cache))
    second = _table([{"a": 1, "b": "y", "new_b": [1, 2]}, {"a": 2}], 5000)
    third = _table([{"a": 3, "new_c": {"d": True}}, {"a": 4, "b": "z"}], 6000)
    ahead = [prepare_runs(second, reader_con, cache), prepare_runs(third, reader_con, cache)]
    for table, prepared in zip((second, third), ahead):
        _check(table, embed_batch(prepared, con=con, cache=cache))
    assert {"a", "b", "new_b", "new_c"} <= set(cache.structures["config"])
    # with all three keys cached, a later batch takes the fast parse whole
    fourth = _table([{"a": 5, "new_b": [3], "new_c": {"d": False}}], 7000)
    _check(fourth, embed_batch(prepare_runs(fourth, reader_con, cache), con=con, cache=cache))
