"""A plain, row-at-a-time implementation of the joint-meta-config-env-v1 spec.

It follows ../shared/spec/joint-meta-config-env-v1.md line by line, on Python
objects, one run at a time. The tests check the columnar engine against it,
and the benchmark uses it as the row-at-a-time baseline. Nothing here is fast
on purpose.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct

DIM = 384
ENV_NEEDLES = ("market_id", "universe_id", "assessment_strategy_id", "assessment_horizon_days")
M = 2**63 - 1


class Rejected(Exception):
    """The run cannot be encoded; the message says why."""


def _parse_int(digits: str):
    # Python refuses int() of more than 4300 digits (sys.int_max_str_digits), but
    # jsonb keeps integers of any size (1e5000 is printed with 5001 digits). Past
    # 400 digits an integer is far beyond the double range, so only its nearest
    # double (+-inf) matters: float() of the text gives it, with no digit limit.
    if len(digits) > 400:
        return float(digits)
    return int(digits)


def parse_json(text):
    """Parse JSON text as PostgreSQL printed it (None for SQL NULL)."""
    if text is None:
        return None
    return json.loads(text, parse_int=_parse_int)


def to_double(number) -> float:
    """A JSON number as the nearest double (inf when beyond the range)."""
    if isinstance(number, float):
        return number
    try:
        return float(number)
    except OverflowError:
        return math.inf if number > 0 else -math.inf


def as_object(value, what):
    """The spec's falsy rule: falsy -> {}, truthy non-object -> rejected."""
    if isinstance(value, dict):
        return value
    if isinstance(value, bool):
        truthy = value
    elif isinstance(value, (int, float)):
        truthy = to_double(value) != 0.0
    elif value is None:
        truthy = False
    else:
        truthy = len(value) > 0
    if truthy:
        raise Rejected(f"{what} is not a JSON object")
    return {}


def flatten(obj, prefix=""):
    """Depth-first leaves (path, value), keys in code-point order per level."""
    for key in sorted(obj):
        path = key if prefix == "" else f"{prefix}.{key}"
        yield from _walk(path, obj[key])


def _walk(path, value):
    if isinstance(value, dict):
        yield from flatten(value, path)
    elif isinstance(value, list):
        for index, element in enumerate(value):
            element_path = f"{path}[{index}]"
            if isinstance(element, dict):
                yield from flatten(element, element_path)
            else:
                yield element_path, element
    else:
        yield path, value


def string_hash(token: str) -> float:
    digest = hashlib.sha1(token.encode("utf-8")).digest()
    v = int.from_bytes(digest[:8], "big")
    return 2.0 * (float(v % M) / float(M)) - 1.0


def feature(path, value):
    """The feature of one leaf, or None when the leaf gives none."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return to_double(value)
    if isinstance(value, str):
        return string_hash(f"{path}={value}")
    return None


def to_f32(x: float) -> float:
    """Round a double to the nearest float32 (inf past the range)."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        # struct refuses values past FLT_MAX; IEEE rounding decides inf or FLT_MAX
        flt_max = 3.4028234663852886e38
        half_ulp = 2.0**103  # half the spacing of float32 at the top binade
        if abs(x) < flt_max + half_ulp:
            return math.copysign(flt_max, x)
        return math.copysign(math.inf, x)


def pad(features):
    if not features:
        return None
    features = features[:DIM]
    return [to_f32(f) for f in features] + [0.0] * (DIM - len(features))


def branches(cfg, m):
    leaves = list(flatten(cfg))
    config = [f for f in (feature(p, v) for p, v in leaves) if f is not None]
    env = [
        f
        for f in (feature(p, v) for p, v in leaves if any(n in p for n in ENV_NEEDLES))
        if f is not None
    ]
    outcome = []
    for key in sorted(m):
        value = m[key]
        if isinstance(value, bool) or isinstance(value, (int, float)):
            outcome.append(feature(key, value))
    return pad(config), pad(env), pad(outcome)


def f32(x):
    return to_f32(x)


def combine(vectors, weights):
    """Weighted average in float32, with the spec's order of operations."""
    names = ("config", "env", "outcome")
    taken = [(n, v, f32(w)) for n, v, w in zip(names, vectors, weights) if v is not None and f32(w) > 0]
    if not taken:
        return None, None
    denominator = 0.0
    for _, _, w in taken:
        denominator = f32(denominator + w)
    out = []
    for i in range(DIM):
        acc = 0.0
        for _, v, w in taken:
            acc = f32(acc + f32(w * v[i]))
        out.append(f32(acc / denominator) if denominator else math.nan)
    if not all(math.isfinite(x) for x in out):
        raise Rejected("the vector has a non-finite component")
    return out, "+".join(n for n, _, _ in taken)


def encode_run(config_text, metrics_text, weights=(1.0, 1.0, 1.0)):
    """(vector bytes, source) for one run, (None, None) when skipped; Rejected when bad."""
    return encode_values(parse_json(config_text), parse_json(metrics_text), weights)


def encode_values(config, metrics, weights=(1.0, 1.0, 1.0)):
    """encode_run for JSON already parsed (as a driver returns jsonb: dicts, lists, ...)."""
    cfg = as_object(config, "config_json")
    m = as_object(metrics, "metrics_json")
    vector, source = combine(branches(cfg, m), weights)
    if vector is None:
        return None, None
    return struct.pack("<384f", *vector), source
