"""A plain, per-run implementation of the v2 encoding, to check the columnar one against.

``encode_run(params, config, metrics, start_date, end_date)`` takes a fitted
model's parameters (as stored in joint_models), one run's parsed JSON and its
window (``datetime.date`` or None), and returns
``(vector bytes, source)``, ``(None, "")`` when no branch is taken, or
``(None, reason)`` for a truthy non-object. It walks the JSON with ordinary
recursion and loops, one feature at a time, following the rules the
``metabatch.models.encoders.v2`` docstring states; nothing is shared with the package
but the parameters.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import math
import re
import struct

DIM = 384
Z_CLIP = 4.0
Z_SHARE = 0.5
GRID = 2.0**16
MAX_VALUE = 16.0
BRANCHES = ("config", "env", "outcome")


def _truthy_object(value, column):
    """The spec's top-level rule: falsy -> {}, a truthy non-object -> a reason."""
    if not value:
        return {}, None
    if isinstance(value, dict):
        return value, None
    return None, f"{column} is not a JSON object"


def leaves(config: dict) -> dict:
    """path (list indices dropped) -> {"numbers": [...], "strings": [...], "lengths": [...]}."""
    out: dict = {}

    def entry(path):
        return out.setdefault(path, {"numbers": [], "strings": [], "lengths": []})

    def gives_leaf(value) -> bool:
        if value is None or isinstance(value, list):
            return False  # a null, or a list inside a list: nothing
        if isinstance(value, dict):
            return any(_gives(v) for v in value.values())
        return True

    def _gives(value) -> bool:
        if value is None:
            return False
        if isinstance(value, dict):
            return any(_gives(v) for v in value.values())
        if isinstance(value, list):
            return any(gives_leaf(e) for e in value)
        return True

    def walk(value, path: str, v1_empty: bool, element: bool):
        if isinstance(value, dict):
            for key, child in value.items():
                walk(child, key if v1_empty else f"{path}.{key}", v1_empty and key == "", False)
        elif isinstance(value, list):
            if element:
                return  # a list inside a list gives nothing
            length = sum(1 for e in value if gives_leaf(e))
            if length:
                entry(path)["lengths"].append(float(length))
            for e in value:
                walk(e, path, False, True)
        elif isinstance(value, bool):
            entry(path)["numbers"].append(1.0 if value else 0.0)
        elif isinstance(value, (int, float)):
            entry(path)["numbers"].append(_double(value))
        elif isinstance(value, str):
            entry(path)["strings"].append(value)

    walk(config, "", True, False)
    return out


def metric_leaves(metrics: dict) -> dict:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = {"numbers": [1.0 if value else 0.0], "strings": [], "lengths": []}
        elif isinstance(value, (int, float)):
            out[key] = {"numbers": [_double(value)], "strings": [], "lengths": []}
    return out


ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?)?(Z|([+-])(\d{2})(?::?(\d{2}))?)?")
EPOCH = dt.date(1970, 1, 1).toordinal()


def iso_days(text: str) -> float | None:
    """Days since 1970-01-01 UTC of an ISO-8601 date or timestamp string (no offset:
    UTC), None when it is not one."""
    m = ISO_DATE.fullmatch(text)
    if not m:
        return None
    year, month, day, hour, minute, second, fraction, zone, sign, off_h, off_m = m.groups()
    try:
        days = dt.date(int(year), int(month), int(day)).toordinal() - EPOCH
    except ValueError:
        return None
    hour, minute, second = int(hour or 0), int(minute or 0), int(second or 0)
    if hour > 23 or minute > 59 or second > 59:
        return None
    seconds = hour * 3600 + minute * 60 + second + (float(fraction) if fraction else 0.0)
    if sign:
        seconds -= (1 if sign == "+" else -1) * (int(off_h) * 3600 + int(off_m or 0) * 60)
    return days + seconds / 86_400.0


def _double(value) -> float:
    """The nearest double; an integer beyond the range is infinite (as DuckDB parses it)."""
    try:
        return float(value)
    except OverflowError:
        return math.copysign(math.inf, value)


def _matches(path: str, patterns) -> bool:
    prefixes = [path[: m.start()] for m in re.finditer(r"\.", path)] + [path]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def _hash(name: str) -> tuple[int, float]:
    h = int.from_bytes(hashlib.md5(name.encode("utf-8")).digest()[:8], "big")
    return h & 0x7FFFFFFFFFFFFFFF, (-1.0 if h >> 63 else 1.0)


def _transform(m: dict, x: float) -> float:
    if m["log"]:
        return math.log10(max(x, m["floor"]))
    if m.get("signed_log"):
        return math.copysign(math.log1p(abs(x)), x) if x != 0 else 0.0
    return x


def _clip(x, lo, hi):
    if math.isnan(x):
        return x
    return min(max(x, lo), hi)


def _idf(df, runs):
    return math.log((1 + runs) / (1 + df)) + 1.0


def _number_features(m: dict, prefix: str, values: list[float]) -> list[tuple[str, float]]:
    out = []
    ts = [_transform(m, x) for x in values]
    total = 0.0
    for t in ts:
        total += t
    mean = total / len(ts)
    z = (mean - m["center"]) / m["scale"]
    z = 0.0 if math.isnan(z) else _clip(z, -Z_CLIP, Z_CLIP)
    knots = m["knots"]
    z_weight = m["weight"] * (Z_SHARE if len(knots) > 1 else 1.0) / Z_CLIP
    _, sign = _hash(prefix + "z")
    out.append((prefix + "z", sign * z_weight * z))
    if len(knots) > 1:
        share = m["weight"] * (1.0 - Z_SHARE) / len(ts)
        for t in ts:
            j = 0
            while j + 1 < len(knots) and knots[j + 1] <= t:
                j += 1
            j = min(j, len(knots) - 2)
            frac = (t - knots[j]) / (knots[j + 1] - knots[j])
            frac = 0.0 if math.isnan(frac) else _clip(frac, 0.0, 1.0)
            for k, part in ((j, 1.0 - frac), (j + 1, frac)):
                _, sign = _hash(f"{prefix}k{k}")
                out.append((f"{prefix}k{k}", sign * share * part))
    return out


def _path_features(model: dict, path: str, values: dict) -> list[tuple[str, float]]:
    out = []
    present = bool(values["numbers"] or values["strings"] or values["lengths"])
    date = model.get("date")
    dates = []
    if date is not None:  # a date path: its ISO date strings are numbers, the rest strings
        strings = []
        for text in values["strings"]:
            days = iso_days(text)
            (strings if days is None else dates).append(text if days is None else days)
        values = {**values, "strings": strings}
    if model["present"] > 0 and present:
        _, sign = _hash(f"{path}#present")
        out.append((f"{path}#present", sign * model["present"]))
    number = model.get("number")
    if number and number["weight"] > 0 and values["numbers"]:
        out += _number_features(number, f"{path}#", values["numbers"])
    length = model.get("length")
    if length and length["weight"] > 0 and values["lengths"]:
        out += _number_features(length, f"{path}#len", values["lengths"])
    string = model.get("string")
    if string and values["strings"] and string["weight"] > 0 and (string["df"] or string["unseen"] > 0):
        distinct = list(dict.fromkeys(values["strings"]))
        for value in distinct:
            count = string["df"].get(value)
            factor = (_idf(count, string["runs"]) if count is not None else string["unseen"]) / string["norm"] * string["weight"]
            if factor > 0:
                _, sign = _hash(f"{path}={value}")
                out.append((f"{path}={value}", sign * factor / math.sqrt(len(distinct))))
    if date and date["weight"] > 0 and dates:
        out += _number_features(date, f"{path}#date", dates)
    return out


def encode_run(params: dict, config, metrics, start_date: dt.date | None = None, end_date: dt.date | None = None) -> tuple[bytes | None, str]:
    cfg, bad = _truthy_object(config, "config_json")
    if bad:
        return None, bad
    met, bad = _truthy_object(metrics, "metrics_json")
    if bad:
        return None, bad
    weights = params["weights"]
    slices = params["slices"]
    cells = [0.0] * DIM
    for path, values in leaves(cfg).items():
        model = params["config_paths"].get(path)
        if model is None:
            continue  # a config path the fit never saw gives nothing
        _add(cells, model, path, values, weights, slices)
    for key, values in metric_leaves(met).items():
        model = params["metric_paths"].get(key)
        if model is None:
            patterns = params["patterns"]
            env = _matches(key, patterns["env_metrics"])
            if params["format"] >= 2:  # declared, else v1's names
                env = env or (not _matches(key, patterns["outcome_metrics"]) and _matches(key, patterns["prior_env_metrics"]))
            model = {"branch": "env" if env else "outcome", "present": 1.0, "number": {"weight": 1.0, "log": False, "floor": 0.0, "center": 0.0, "scale": 1.0, "knots": [], "signed_log": True}}
        _add(cells, model, key, values, weights, slices)
    window = {}
    if start_date is not None:
        window["backtest_runs.start_date"] = float(start_date.toordinal() - EPOCH)
    if end_date is not None:
        window["backtest_runs.end_date"] = float(end_date.toordinal() - EPOCH)
    if start_date is not None and end_date is not None:
        window["backtest_runs.window_days"] = float(end_date.toordinal() - start_date.toordinal())
    for key, value in window.items():
        model = params.get("window_paths", {}).get(key)
        if model is not None:
            _add(cells, model, key, {"numbers": [value], "strings": [], "lengths": []}, weights, slices)
    # a branch's share of the joint cosine: its weight times its fitted reliability
    shares = {b: w * params.get("reliability", {}).get(b, 1.0) for b, w in weights.items()}
    total = sum(w for w in shares.values() if w > 0)
    vector = [0.0] * DIM
    taken = []
    for branch in BRANCHES:
        start, stop = slices[branch]
        norm = math.sqrt(sum(c * c for c in cells[start:stop]))
        if norm > 0 and shares[branch] > 0:
            taken.append(branch)
            scale = math.sqrt(shares[branch] / total) / norm
            for i in range(start, stop):
                vector[i] = cells[i] * scale
    if not taken:
        return None, ""
    return struct.pack(f"<{DIM}f", *vector), "+".join(taken)


def _add(cells, model, path, values, weights, slices):
    branch = model["branch"]
    if branch not in slices or weights.get(branch, 0.0) <= 0:
        return
    start, stop = slices[branch]
    for name, value in _path_features(model, path, values):
        h, _ = _hash(name)
        value = _clip(value, -MAX_VALUE, MAX_VALUE)
        cells[start + h % (stop - start)] += round(value * GRID) / GRID
