"""The v2 encoder: a fitted model turns a batch's leaves into vectors whose
neighbours share kind of config and kind of environment.

Takes the leaves of a batch by path (``unnest.collect_config`` /
``collect_metrics``) and a ``V2Model`` (fitted by ``metabatch.models.fitting``); returns
the (n, 384) float32 vectors and which branches each run has.

- **Stable slots.** Every feature has a name (``risk.vol_target#z``,
  ``strategy.signal.type=residual``, ...) whose MD5 gives its slot in its
  branch's slice and its sign (feature hashing): a key lands in the same
  dimension whatever else a config holds, and collisions cancel on average.
- **Per path**, list indices dropped (``model.signals.window`` holds the
  windows of every signal): a presence indicator; numbers and booleans as a
  robust z-score (median and IQR fitted per path, after a log for positive
  values spanning orders of magnitude; clipped) plus a soft one-hot over the
  path's fitted quantile knots (close values share knots, far ones do not: a
  single z-score cannot tell 20 from 60 when both are above the median);
  several values of a run (a list) are averaged. Strings as hashed indicators
  of ``path=value``, weighted by how informative the value is over the fitted
  runs (inverse document frequency; a value seen once, or never, counts as
  much as the path's new values tend to be worth: nothing for an id or a
  commit hash, a lot for a category). A run's strings at one path are a bag
  (normalised by its size). Lists add their length as a number.
- **Weights.** Each path's groups of features (presence, number, length,
  strings) carry a weight fitted from how much they tell about the rest of
  the run (``fit``); config paths matched by ``ignore`` give nothing.
- **Branch slices** (seed 001 §3, option 1: concatenation, then a linear
  projection back to R^384): each branch is L2-normalised into its own fixed
  slice of the 384 dimensions (``SLICES``), scaled by sqrt(share / sum of
  shares), so that with every branch present the joint cosine is the weighted
  mean of the branch cosines and a slice can be compared alone. A branch's
  share is its weight (the model file's) times its fitted reliability
  (``V2Model.branch_weights``): for the outcome branch, how much of its cosine
  repeats between runs of one kind of config in one kind of environment, so
  that per-run luck in the outcomes cannot decide who the neighbours are
  (config and env: 1). A branch with no feature (or weight 0) leaves its
  slice zero.
- **Paths never seen in the fit**: a config path the fit did not see gives
  nothing (its weight is unknown: refit to learn it) and is counted in the
  summary; an unseen env or outcome path is encoded with default statistics
  (signed log1p, no knots) and weight 1, as every path of those branches is.

A run's vector depends only on the model and the run: feature values are
rounded to a fixed grid (multiples of 2^-16, at most 16 in size), so that
their sums, squares and sums of squares are exact in float64 whatever their
order: the batch a run comes in, the batch size and the store change nothing,
bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...pipeline.combine import SOURCE_TAGS
from ..modelfile import BRANCHES, matches
from ...pipeline.unnest import PathLeaves, RootParse, ShapeCache, TextFacts, collect_config, collect_metrics, parse_config, text_facts
from .base import EmbeddedBatch, embedding_rows, split_top_level
from ...pipeline.unnest.paths import _text
from .dates import days_of

DIM = 384
SLICES = {"config": (0, 256), "env": (256, 320), "outcome": (320, 384)}
# 1: branches from name patterns; 2: branches learnt from the runs, ISO dates
# as numbers, the run's own window (backtest_runs.start_date, end_date)
FORMAT = 2
FORMATS = (1, 2)
# the run's own window, as env candidates beside the config paths and metrics
WINDOW_KEYS = ("backtest_runs.start_date", "backtest_runs.end_date", "backtest_runs.window_days")
Z_CLIP = 4.0
# within a path: the weight of the z-score beside the knots (which carry most of it)
Z_SHARE = 0.5
_GRID = 2.0**16  # feature values are multiples of 1/_GRID ...
_MAX_VALUE = 16.0  # ... and at most this in size: sums of squares stay exact in float64


# --------------------------------------------------------------------------
# The fitted model


@dataclass
class NumberModel:
    """How one path's numbers (or list lengths) become features."""

    weight: float
    log: bool = False  # log10 first (positive values spanning orders of magnitude)
    floor: float = 0.0  # with log: values below are taken as this
    center: float = 0.0
    scale: float = 1.0
    knots: list[float] = field(default_factory=list)

    signed_log: bool = False  # sign(x) * log1p(|x|) first: the defaults of a path never fitted

    def transform(self, x: np.ndarray) -> np.ndarray:
        if self.log:
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.log10(np.maximum(x, self.floor))
        if self.signed_log:
            return np.sign(x) * np.log1p(np.abs(x))
        return x

    @staticmethod
    def default() -> "NumberModel":
        return NumberModel(weight=1.0, signed_log=True)


@dataclass
class StringModel:
    """How one path's strings become features: ``df`` of the values seen at
    least twice in the fit's sample, of ``runs`` sample runs holding the path."""

    weight: float
    runs: int = 0
    df: dict[str, int] = field(default_factory=dict)
    unseen: float = 1.0  # the factor of a value seen once or never (before ``norm``)
    norm: float = 1.0  # divides every value's factor: the path's mean factor is 1
    _known: tuple | None = field(default=None, repr=False, compare=False)

    def factors(self, values: pa.Array) -> np.ndarray:
        """The factor of each value (an Arrow string array): idf over ``norm``."""
        if self._known is None:
            known = pa.array(list(self.df), pa.string())
            self._known = (known, np.array([idf(c, self.runs) for c in self.df.values()]) / self.norm)
        known, known_factors = self._known
        out = np.full(len(values), self.unseen / self.norm)
        if len(known):
            at = pc.index_in(values.cast(pa.string()), value_set=known)
            found = np.asarray(at.is_valid().to_numpy(zero_copy_only=False), bool)
            out[found] = known_factors[np.asarray(at.drop_null().to_numpy(), np.int64)]
        return out

    def gives_nothing(self) -> bool:
        return self.weight <= 0 or (not self.df and self.unseen <= 0)


def idf(df: int, runs: int) -> float:
    """Smoothed inverse document frequency: 1 for a value every run has."""
    return math.log((1 + runs) / (1 + df)) + 1.0


@dataclass
class PathModel:
    branch: str
    present: float = 0.0  # weight of the presence indicator
    number: NumberModel | None = None
    length: NumberModel | None = None
    string: StringModel | None = None
    date: NumberModel | None = None  # ISO-8601 strings, as days since 1970 (format 2)
    how: str = ""  # format 2: how the branch was set: declared, learned, prior
    figures: dict = field(default_factory=dict)  # format 2: the figures that decided the branch

    def kind(self) -> str:
        """What the path holds: date, string, number, list or presence (the first that applies)."""
        if self.date is not None:
            return "date"
        if self.string is not None:
            return "string"
        if self.number is not None:
            return "number"
        if self.length is not None:
            return "list"
        return "presence"

    def weight(self) -> float:
        """The largest weight of the path's feature groups."""
        groups = [self.present, *(g.weight for g in (self.number, self.length, self.string, self.date) if g is not None)]
        return max(groups)


@dataclass
class V2Model:
    """A fitted v2 model (``params`` is its JSON form, as stored in ``joint_models``)."""

    weights: dict[str, float]
    config_paths: dict[str, PathModel]
    metric_paths: dict[str, PathModel]
    patterns: dict[str, list[str]]
    fitted_runs: int = 0
    sample_runs: int = 0
    ignored_paths: int = 0  # config paths of the sample that ``ignore`` matched
    slices: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(SLICES))
    # per branch, the share of its cosine that repeats between runs of one kind
    # of config in one kind of environment (fitted for outcome; 1 when absent)
    reliability: dict[str, float] = field(default_factory=dict)
    format: int = FORMAT
    window_paths: dict[str, PathModel] = field(default_factory=dict)  # format 2: the run's own window
    _slots: dict[str, tuple[int, float]] = field(default_factory=dict, repr=False)
    _defaults: dict[str, PathModel] = field(default_factory=dict, repr=False)  # metric keys never fitted

    # -- JSON form

    def params(self) -> dict:
        def number(m: NumberModel | None):
            if m is None:
                return None
            return {"weight": m.weight, "log": m.log, "floor": m.floor, "center": m.center, "scale": m.scale, "knots": m.knots, "signed_log": m.signed_log}

        def path(m: PathModel) -> dict:
            out = {"branch": m.branch, "present": m.present}
            if m.number is not None:
                out["number"] = number(m.number)
            if m.length is not None:
                out["length"] = number(m.length)
            if m.string is not None:
                s = m.string
                out["string"] = {"weight": s.weight, "runs": s.runs, "unseen": s.unseen, "norm": s.norm, "df": dict(sorted(s.df.items()))}
            if self.format >= 2:
                if m.date is not None:
                    out["date"] = number(m.date)
                out["how"] = m.how
                out["figures"] = dict(m.figures)
            return out

        extra = {}
        if self.format >= 2:
            extra["window_paths"] = {p: path(m) for p, m in sorted(self.window_paths.items())}
        return {
            "encoder": "v2",
            "format": self.format,
            "dim": DIM,
            "slices": {b: list(v) for b, v in self.slices.items()},
            "weights": dict(self.weights),
            "reliability": dict(self.reliability),
            "patterns": self.patterns,
            "fitted_runs": self.fitted_runs,
            "sample_runs": self.sample_runs,
            "ignored_paths": self.ignored_paths,
            "config_paths": {p: path(m) for p, m in sorted(self.config_paths.items())},
            "metric_paths": {p: path(m) for p, m in sorted(self.metric_paths.items())},
            **extra,
        }

    @classmethod
    def from_params(cls, params: dict) -> "V2Model":
        if params.get("encoder") != "v2" or params.get("format") not in FORMATS:
            raise ValueError(f"not a v2 model of format {' or '.join(map(str, FORMATS))}")

        def number(d):
            return None if d is None else NumberModel(d["weight"], d["log"], d["floor"], d["center"], d["scale"], list(d["knots"]), d.get("signed_log", False))

        def path(d) -> PathModel:
            s = d.get("string")
            string = None if s is None else StringModel(s["weight"], s["runs"], dict(s["df"]), s["unseen"], s["norm"])
            return PathModel(d["branch"], d["present"], number(d.get("number")), number(d.get("length")), string,
                             number(d.get("date")), d.get("how", ""), dict(d.get("figures", {})))

        return cls(
            weights={b: float(w) for b, w in params["weights"].items()},
            config_paths={p: path(d) for p, d in params["config_paths"].items()},
            metric_paths={p: path(d) for p, d in params["metric_paths"].items()},
            patterns={k: list(v) for k, v in params["patterns"].items()},
            fitted_runs=int(params["fitted_runs"]),
            sample_runs=int(params["sample_runs"]),
            ignored_paths=int(params.get("ignored_paths", 0)),
            slices={b: (int(v[0]), int(v[1])) for b, v in params["slices"].items()},
            reliability={b: float(r) for b, r in params.get("reliability", {}).items()},
            format=int(params["format"]),
            window_paths={p: path(d) for p, d in params.get("window_paths", {}).items()},
        )

    def branch_weights(self) -> dict[str, float]:
        """Each branch's share of the joint cosine: its weight (the model file's)
        times its fitted reliability."""
        return {b: w * self.reliability.get(b, 1.0) for b, w in self.weights.items()}

    # -- paths

    def list_paths(self) -> set[str]:
        """The config paths the fit saw holding lists."""
        return {p for p, m in self.config_paths.items() if m.length is not None}

    def config_model(self, path: str) -> PathModel | None:
        """The model of a config path; None for an unseen one (it gives nothing)."""
        return self.config_paths.get(path)

    def metric_model(self, key: str) -> PathModel | None:
        """The model of a metric key; an unseen one gets defaults in its branch."""
        model = self.metric_paths.get(key) or self._defaults.get(key)
        if model is None:
            if self.format >= 2:  # declared, else v1's names (the fit never saw it)
                env = matches(key, tuple(self.patterns.get("env_metrics", ()))) or (
                    not matches(key, tuple(self.patterns.get("outcome_metrics", ()))) and matches(key, tuple(self.patterns.get("prior_env_metrics", ())))
                )
            else:
                env = matches(key, tuple(self.patterns.get("env_metrics", ())))
            model = self._defaults[key] = PathModel("env" if env else "outcome", present=1.0, number=NumberModel.default())
        return model

    def slot_of(self, names: list[str]) -> list[tuple[int, float]]:
        """(hash, sign) of feature names, cached: the first 8 bytes of the name's
        MD5 (UTF-8) read big-endian; the top bit is the sign, the rest picks the slot."""
        if len(self._slots) > 2_000_000:  # new string values keep coming: bound the cache
            self._slots.clear()
        out = []
        for name in names:  # a loop over distinct feature names, cached across batches
            slot = self._slots.get(name)
            if slot is None:
                h = int.from_bytes(hashlib.md5(name.encode("utf-8")).digest()[:8], "big")
                slot = self._slots[name] = (h & 0x7FFFFFFFFFFFFFFF, -1.0 if h >> 63 else 1.0)
            out.append(slot)
        return out


# --------------------------------------------------------------------------
# A batch's leaves, by path


@dataclass
class PathValues:
    """Everything one path holds in a batch (the chunks of ``PathLeaves`` joined)."""

    number_rows: list[np.ndarray] = field(default_factory=list)
    numbers: list[np.ndarray] = field(default_factory=list)
    string_rows: list[np.ndarray] = field(default_factory=list)
    strings: list[pa.Array] = field(default_factory=list)
    list_rows: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    date_rows: list[np.ndarray] = field(default_factory=list)  # strings that are ISO dates, as days
    dates: list[np.ndarray] = field(default_factory=list)

    def rows(self, n: int) -> np.ndarray:
        """The rows (of n) that hold the path, sorted, each once."""
        held = np.zeros(n, bool)
        for rows in self.number_rows + self.string_rows + self.list_rows + self.date_rows:
            held[rows] = True
        return np.flatnonzero(held)


def by_path(leaves: PathLeaves) -> dict[str, PathValues]:
    """The leaves grouped by path (a loop over chunks, i.e. structure nodes)."""
    out: dict[str, PathValues] = {}
    for path, rows, values, _boolean in leaves.numbers:
        entry = out.setdefault(path, PathValues())
        entry.number_rows.append(rows)
        entry.numbers.append(values)
    for path, rows, values in leaves.strings:
        entry = out.setdefault(path, PathValues())
        entry.string_rows.append(rows)
        entry.strings.append(values)
    for path, rows, lengths in leaves.lists:
        entry = out.setdefault(path, PathValues())
        entry.list_rows.append(rows)
        entry.lengths.append(lengths.astype(np.float64))
    for path, rows, days in leaves.dates:
        entry = out.setdefault(path, PathValues())
        entry.date_rows.append(rows)
        entry.dates.append(days)
    return out


def joined_strings(values: PathValues) -> pa.Array:
    """A path's strings as one array (in the order of ``_joined(values.string_rows)``)."""
    strings = [v.cast(pa.string()) for v in values.strings]  # a no-op cast for string arrays
    return strings[0] if len(strings) == 1 else pa.concat_arrays(strings)


def with_dates(values: PathValues, con: duckdb.DuckDBPyConnection, days: np.ndarray | None = None) -> PathValues:
    """``values`` with its strings that are ISO-8601 dates moved to ``dates`` (days;
    ``days``: those of ``joined_strings(values)`` when the caller has them)."""
    if not values.strings:
        return values
    rows = _joined(values.string_rows, np.int64)
    strings = joined_strings(values)
    days = days_of(con, strings) if days is None else days
    is_date = np.isfinite(days)
    if not is_date.any():
        return values
    rest = ~is_date
    out = PathValues(values.number_rows, values.numbers, [], [], values.list_rows, values.lengths, [rows[is_date]], [days[is_date]])
    if rest.any():
        out.string_rows, out.strings = [rows[rest]], [strings.filter(pa.array(rest))]
    return out


def window_leaves(runs: pa.Table) -> PathLeaves:
    """The run's own window as numbers (days since 1970): ``WINDOW_KEYS`` from the
    runs' start_date and end_date columns (a run without a date has none)."""
    leaves = PathLeaves()
    ends = _days(runs, "end_date")
    starts = _days(runs, "start_date")
    for key, days in zip(WINDOW_KEYS, (starts, ends, ends - starts)):
        rows = np.flatnonzero(np.isfinite(days))
        if len(rows):
            leaves.add_numbers(key, rows, days[rows], False)
    return leaves


def _days(runs: pa.Table, column: str) -> np.ndarray:
    if column not in runs.column_names:
        return np.full(runs.num_rows, np.nan)
    days = runs.column(column).combine_chunks().cast(pa.date32()).cast(pa.int32()).cast(pa.float64())
    return np.asarray(pc.fill_null(days, np.nan).to_numpy(), np.float64)


def _joined(parts: list[np.ndarray], dtype) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def row_means(rows: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows holding values, the mean of their values, the count per value's row):
    a run's several values at one path (its list elements) are averaged."""
    counts = np.bincount(rows, minlength=n)
    held = np.flatnonzero(counts)
    if len(held) == len(rows):
        means = np.zeros(n)
        means[rows] = values
        return held, means[held], counts
    sums = np.bincount(rows, weights=values, minlength=n)
    return held, sums[held] / counts[held], counts


# --------------------------------------------------------------------------
# Features -> vectors


@dataclass
class _Features:
    """Features of one batch: (row, slot in the 384 dims, signed value)."""

    rows: list[np.ndarray] = field(default_factory=list)
    slots: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    def add(self, rows: np.ndarray, slot: np.ndarray | int, values: np.ndarray | float) -> None:
        if not len(rows):
            return
        self.rows.append(rows)
        self.slots.append(np.broadcast_to(np.asarray(slot, np.int64), rows.shape))
        self.values.append(np.broadcast_to(np.asarray(values, np.float64), rows.shape))


@dataclass
class Encoded:
    vectors: np.ndarray  # (n, 384) float32
    present: dict[str, np.ndarray]  # branch -> (n,) bool: the branch has features (and weight > 0)
    unseen_config_paths: set[str]


class _Slicer:
    """Feature names -> slots of one branch's slice, with the model's cache."""

    def __init__(self, model: V2Model):
        self.model = model

    def slots(self, branch: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        start, stop = self.model.slices[branch]
        pairs = self.model.slot_of(names)
        slots = np.array([start + h % (stop - start) for h, _ in pairs], np.int64)
        signs = np.array([s for _, s in pairs], np.float64)
        return slots, signs


def encode(
    model: V2Model,
    config: PathLeaves,
    metrics: PathLeaves,
    n: int,
    scratch: np.ndarray | None = None,
    window: PathLeaves | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> Encoded:
    """The vectors of a batch of n runs from its config and metrics leaves and
    (format 2) its window (``window_leaves``). ``scratch``: float64 memory of at
    least n * 384 to reuse (it is overwritten); ``con``: a DuckDB connection
    for parsing dates (a new one when needed and not given)."""
    features = _Features()
    slicer = _Slicer(model)
    unseen: set[str] = set()
    for path, values in by_path(config).items():
        path_model = model.config_model(path)
        if path_model is None:
            unseen.add(path)
            continue
        if path_model.date is not None and _reads_dates(path_model):
            con = con or duckdb.connect()
            values = with_dates(values, con)
        _path_features(features, slicer, path, path_model, values, n)
    for key, values in by_path(metrics).items():
        _path_features(features, slicer, key, model.metric_model(key), values, n)
    if window is not None and model.window_paths:
        for key, values in by_path(window).items():
            if key in model.window_paths:
                _path_features(features, slicer, key, model.window_paths[key], values, n)
    return _vectors(model, features, n, unseen, scratch)


def _reads_dates(m: PathModel) -> bool:
    """Whether a date path's strings must be read (one that gives nothing either
    way, a timestamp of no weight, costs nothing)."""
    return m.date.weight > 0 or (m.string is not None and not m.string.gives_nothing())


def _path_features(features: _Features, slicer: _Slicer, path: str, m: PathModel, values: PathValues, n: int) -> None:
    branch = m.branch
    if branch not in SLICES or slicer.model.weights.get(branch, 0.0) <= 0:  # reliability is never 0
        return
    if m.present > 0:
        (slot,), (sign,) = slicer.slots(branch, [f"{path}#present"])
        features.add(values.rows(n), slot, sign * m.present)
    if m.number is not None and m.number.weight > 0 and values.numbers:
        _number_features(features, slicer, branch, f"{path}#", m.number, _joined(values.number_rows, np.int64), _joined(values.numbers, np.float64), n)
    if m.length is not None and m.length.weight > 0 and values.lengths:
        _number_features(features, slicer, branch, f"{path}#len", m.length, _joined(values.list_rows, np.int64), _joined(values.lengths, np.float64), n)
    if m.string is not None and not m.string.gives_nothing() and values.strings:
        _string_features(features, slicer, branch, path, m.string, values)
    if m.date is not None and m.date.weight > 0 and values.dates:
        _number_features(features, slicer, branch, f"{path}#date", m.date, _joined(values.date_rows, np.int64), _joined(values.dates, np.float64), n)


def _number_features(features, slicer, branch, prefix, m: NumberModel, rows, values, n) -> None:
    t = m.transform(values)
    held, mean_t, counts = row_means(rows, t, n)
    with np.errstate(invalid="ignore", over="ignore"):  # values near the float limit: +-inf, clipped
        z = np.clip((mean_t - m.center) / m.scale, -Z_CLIP, Z_CLIP)
    z = np.nan_to_num(z, nan=0.0)  # inf - inf: a run holding both ends of the range
    knots = np.asarray(m.knots, np.float64)
    names = [prefix + "z"] + [f"{prefix}k{j}" for j in range(len(knots))]
    slots, signs = slicer.slots(branch, names)
    z_weight = m.weight * (Z_SHARE if len(knots) > 1 else 1.0) / Z_CLIP
    features.add(held, slots[0], signs[0] * z_weight * z)
    if len(knots) > 1:
        # soft one-hot: each value between two knots splits its weight between them
        j = np.clip(np.searchsorted(knots, t, side="right") - 1, 0, len(knots) - 2)
        with np.errstate(invalid="ignore", over="ignore"):
            frac = np.clip((t - knots[j]) / (knots[j + 1] - knots[j]), 0.0, 1.0)
        frac = np.nan_to_num(frac, nan=0.0)
        share = m.weight * (1.0 - Z_SHARE) / counts[rows]  # a run's values are averaged
        features.add(rows, slots[1:][j], signs[1:][j] * share * (1.0 - frac))
        features.add(rows, slots[1:][j + 1], signs[1:][j + 1] * share * frac)


def _string_features(features, slicer, branch, path, m: StringModel, values: PathValues) -> None:
    rows = _joined(values.string_rows, np.int64)
    strings = joined_strings(values)
    encoded = pc.dictionary_encode(strings)
    codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), np.int64)
    factors = m.factors(encoded.dictionary) * m.weight
    if not (factors > 0).any():
        return
    distinct = encoded.dictionary
    size = 1.0
    if np.bincount(rows).max() > 1:
        # a bag: each distinct value of a run once, the bag normalised by its size
        pair = np.unique(rows * len(distinct) + codes)
        rows, codes = pair // len(distinct), pair % len(distinct)
        size = np.bincount(rows)[rows]
    keep = factors[codes] > 0
    if not keep.all():
        rows, codes = rows[keep], codes[keep]
        size = size if np.isscalar(size) else size[keep]
    used = np.unique(codes)
    names = pc.binary_join_element_wise(_text(path + "="), distinct.take(pa.array(used)).cast(pa.string()), _text(""))
    slots, signs = slicer.slots(branch, names.to_pylist())
    slot_of, sign_of = np.zeros(len(distinct), np.int64), np.zeros(len(distinct))
    slot_of[used], sign_of[used] = slots, signs
    features.add(rows, slot_of[codes], sign_of[codes] * factors[codes] / np.sqrt(size))


def _vectors(model: V2Model, features: _Features, n: int, unseen: set[str], scratch: np.ndarray | None) -> Encoded:
    if scratch is not None and scratch.size >= n * DIM:
        acc = scratch.reshape(-1)[: n * DIM]
        acc.fill(0)
    else:
        acc = np.zeros(n * DIM, np.float64)
    if features.rows:
        rows = np.concatenate(features.rows)
        flat = rows * DIM + np.concatenate(features.slots)
        values = np.clip(np.concatenate(features.values), -_MAX_VALUE, _MAX_VALUE)
        np.add.at(acc, flat, np.round(values * _GRID) / _GRID)  # exact sums: the order does not matter
    acc = acc.reshape(n, DIM)
    weights = model.branch_weights()
    total = sum(w for w in weights.values() if w > 0)
    out = np.zeros((n, DIM), np.float32)
    present = {}
    for branch in BRANCHES:
        start, stop = model.slices[branch]
        block = acc[:, start:stop]
        norm = np.sqrt(np.einsum("ij,ij->i", block, block))  # a sum of exact squares of grid values: exact
        weight = weights.get(branch, 0.0)
        has = (norm > 0) & (weight > 0)
        present[branch] = has
        if has.any():
            scale = np.where(has, math.sqrt(weight / total) / np.where(has, norm, 1.0), 0.0)
            np.multiply(block, scale[:, None], out=out[:, start:stop], casting="same_kind")
    return Encoded(out, present, unseen)


# --------------------------------------------------------------------------
# The encoder backfill drives


@dataclass
class PreparedV2:
    """A batch with its reader-thread work done: the top-level split, the
    configs' text facts and first parse, the metrics' leaves, the runs' window."""

    runs: pa.Table
    config: pa.Array
    bad_reason: np.ndarray
    config_facts: TextFacts
    config_parsed: RootParse | None
    metrics: PathLeaves
    window: PathLeaves | None = None


@dataclass
class V2Encoder:
    model: V2Model
    model_id: str
    kind: str = "v2"
    unseen_config_paths: set[str] = field(default_factory=set)  # over the job, for its summary
    _scratch: np.ndarray | None = field(default=None, repr=False)

    def prepare(self, runs: pa.Table, con: duckdb.DuckDBPyConnection, cache: ShapeCache | None) -> PreparedV2:
        config, config_bad = split_top_level(con, runs.column("config_json").combine_chunks(), "config_json")
        metrics, metrics_bad = split_top_level(con, runs.column("metrics_json").combine_chunks(), "metrics_json")
        bad = np.where(config_bad != None, config_bad, metrics_bad)  # noqa: E711 (elementwise)
        parsed = parse_config(con, config, cache) if cache is not None else None
        metric_leaves = collect_metrics(con, metrics, cache, text_facts(metrics))
        window = window_leaves(runs) if self.model.window_paths else None
        return PreparedV2(runs, config, bad, text_facts(config), parsed, metric_leaves, window)

    def embed(self, prepared, con, cache: ShapeCache | None = None, vectors_out: np.ndarray | None = None) -> EmbeddedBatch:
        t0 = time.perf_counter()
        if not isinstance(prepared, PreparedV2):
            prepared = self.prepare(prepared, con, cache)
        n = prepared.runs.num_rows
        config = collect_config(con, prepared.config, cache, prepared.config_facts, prepared.config_parsed)
        t1 = time.perf_counter()
        if self._scratch is None or self._scratch.size < n * DIM:
            self._scratch = np.empty(n * DIM, np.float64)
        encoded = encode(self.model, config, prepared.metrics, n, self._scratch, prepared.window, con)
        self.unseen_config_paths |= encoded.unseen_config_paths
        if vectors_out is not None:
            vectors_out[:n] = encoded.vectors
            vectors = vectors_out[:n]
        else:
            vectors = encoded.vectors
        mask = sum(encoded.present[b].astype(np.int64) << i for i, b in enumerate(BRANCHES))
        t2 = time.perf_counter()
        rows, skipped, rejected = embedding_rows(prepared.runs, vectors, SOURCE_TAGS[mask], mask == 0, prepared.bad_reason, self.model_id)
        t3 = time.perf_counter()
        return EmbeddedBatch(rows, skipped, rejected, {"unnest": t1 - t0, "encode": t2 - t1, "combine": t3 - t2})
