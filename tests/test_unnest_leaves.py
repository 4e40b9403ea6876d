"""Raw JSON leaves (as DuckDB prints them) into numbers: the one-cast path
must take only columns where every value is a JSON number."""

from __future__ import annotations

import math
import sys

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from metabatch.pipeline.unnest import ShapeCache, _all_numbers, _first_bytes, _json_strings, unnest_config


@pytest.mark.parametrize(
    "texts, expected",
    [
        (["1", "2.5", None, "-0.0", "1e400", "123456789012345678901234567890"], [1.0, 2.5, None, -0.0, math.inf, 1.2345678901234568e29]),
        ([None, "-7"], [None, -7.0]),
        (["1", '"2"'], None),  # a string that looks like a number stays a string
        (["1", "true"], None),
        (["1", "null"], None),
        (["1", "[1]"], None),
        (["1", "nan"], None),  # Arrow would read it as NaN; JSON has no such number
        (['"1"', "2"], None),
        ([None, None], None),
    ],
)
def test_all_numbers_takes_only_json_numbers(texts, expected):
    got = _all_numbers(pa.array(texts, pa.string()))
    if expected is None:
        assert got is None
    else:
        values = got.to_pylist()
        assert values == expected
        assert [math.copysign(1, v) if v is not None else None for v in values] == [
            math.copysign(1, v) if v is not None else None for v in expected
        ]


def test_json_strings_decode_escapes_only_where_there_are_some():
    literals = pa.array(['"plain"', None, '"a\\"b"', '"é\\u00e9"', '""'], pa.string())
    assert _json_strings(literals).to_pylist() == ["plain", None, 'a"b', "éé", ""]
    assert _json_strings(pa.array(['"x"', '"y"'])).to_pylist() == ["x", "y"]


def test_a_null_whose_span_holds_bytes_stays_null():
    """Arrow lets a null slot span bytes; the byte scans must not read them."""
    data = b'"x\\"y""q\\\\"'  # the literals "x\"y" and "q\\"; the second slot is null
    literals = pa.Array.from_buffers(
        pa.string(), 2, [pa.py_buffer(bytes([0b01])), pa.py_buffer(np.array([0, 6, 11], np.int32)), pa.py_buffer(data)]
    )
    assert _json_strings(literals).to_pylist() == ['x"y', None]
    assert _first_bytes(literals).tolist() == [ord('"'), 0]


class _ImportRecorder:
    """A meta path finder that records every module Python looks for (only
    modules not yet imported are looked for) and finds none itself."""

    def __init__(self):
        self.names = []

    def find_spec(self, name, path=None, target=None):
        self.names.append(name)
        return None


def test_unnesting_a_batch_looks_for_no_module():
    # Given a Python str, pyarrow's compute functions try to import dateutil and
    # pandas on every call; where they are missing, each call searched sys.path.
    configs = pa.array(
        [
            '{"a": {"b": [{"c": "x", "d": [1, 2]}, {"c": "y"}]}, "tags": ["p", "q"], "name": "n%d"}' % i
            for i in range(200)
        ],
        pa.string(),
    )
    con = duckdb.connect()
    cache = ShapeCache()
    unnest_config(con, configs, 384, cache)  # the first batch may import what it needs once
    recorder = _ImportRecorder()
    sys.meta_path.insert(0, recorder)
    try:
        unnested = unnest_config(con, configs, 384, cache)
    finally:
        sys.meta_path.remove(recorder)
    assert sum(len(leaves.string_rows) for leaves in unnested.leaves.values()) > 0  # string tokens were rendered
    assert recorder.names == []
