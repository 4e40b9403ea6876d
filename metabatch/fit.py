"""Fit: the selected runs -> a fitted v2 model (statistics and weights per path).

``fit_model(sample, spec, fitted_runs)`` fits a ``V2Model`` on a table of runs
(run_id, config_json, metrics_json); ``RunSample`` draws that table from a
stream of any length with bounded memory; ``fit(...)`` (in ``models``) runs
both over a store and registers the result.

The sample: the ``SAMPLE_RUNS`` runs whose MD5 of run_id is smallest (a
uniform sample that depends on the runs only, not on the order they come in),
so every statistic is approximate: quantiles, knots and value frequencies are
those of the sample (exact when there are fewer runs).

What is fitted, per path of the config (ignored paths left out) and per key of
the metrics:

- numbers (and list lengths): a log10 when every value is positive and they
  span two orders of magnitude or more; median and IQR of the (logged) values;
  knots at up to ``MAX_KNOTS`` quantiles (at the values themselves when there
  are few);
- strings: the number of sample runs holding each value (kept when >= 2), and
  the share of the path's values seen only once (Good-Turing's estimate that
  the next value is new), which sets what a new value is worth;
- **weights of the config paths' feature groups** (presence, number, length,
  strings): how much of the group's entropy the structure of the config
  explains. The sample is encoded (every group at 1 the first time),
  clustered (scikit-learn's k-means on the config slices), and a group's
  weight is its bias-corrected (Miller-Madow) mutual information with the
  clusters over its own entropy; then again with those weights
  (``FitOptions.rounds``). A seed, a capital amount, a host name spread at
  random over the runs, or a commit hash is explained by nothing and weighs
  ~0 (under ``WEIGHT_FLOOR``: 0); a hyperparameter that comes with the rest
  of its family's settings weighs ~1. Env and outcome groups weigh 1.
- **the outcome branch's reliability**: the intraclass correlation of the
  sample's outcome slices over (config cluster, env cluster) pairs (one-way
  ANOVA estimate, finer config clusters: splitting a kind of config leaves it
  unbiased, merging two lowers it), at least ``RELIABILITY_FLOOR``. It
  multiplies the outcome weight in the joint vector: two runs of one kind of
  config in one environment differ in outcome by their luck, and outcomes
  should count in the joint cosine as much as they repeat. On the campaign
  runs it is about 0.16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .encoders.base import split_top_level
from .encoders.v2 import (
    SLICES,
    NumberModel,
    PathModel,
    PathValues,
    StringModel,
    V2Model,
    _joined,
    by_path,
    encode,
    idf,
    row_means,
)
from .modelfile import ModelSpec, matches
from .kmeans import kmeans
from .unnest import PathLeaves, collect_config, collect_metrics

SAMPLE_RUNS = 20_000
MAX_KNOTS = 16
# weights under this are taken as 0: mutual information estimated on a sample
# is not exactly 0 for independent fields, and a path at 0 costs nothing to encode
WEIGHT_FLOOR = 0.05
# the outcome branch keeps at least this share of its weight, so that it stays
# in the vector and can be compared alone (--branch outcome)
RELIABILITY_FLOOR = 0.05


@dataclass(frozen=True)
class FitOptions:
    """Choices of the fit that the retrieval benchmark compares; the defaults are v2's.

    ``weigh_config``: "clusters" (a group weighs the share of its entropy the
    k-means clusters of the config slices explain, ``rounds`` times) or "none"
    (every group 1). ``presence``: "valueless" (a presence indicator only for
    paths with no number or string: elsewhere the values already say the path
    is there, and a second, shared feature pulls families of one template
    together) or "always". ``weigh_outcome``: outcome groups weigh what the
    (config cluster, env cluster) pairs explain of them, instead of 1.
    ``outcome_reliability``: the outcome branch's share of the joint cosine is
    its weight times its fitted reliability (False: its weight alone).
    """

    weigh_config: str = "clusters"
    rounds: int = 2
    presence: str = "valueless"
    weigh_outcome: bool = False
    outcome_reliability: bool = True
    sample_runs: int = SAMPLE_RUNS
_LOG_SPAN = 100.0  # q95 / q05 at or above which positive values are logged


# --------------------------------------------------------------------------
# The sample


class RunSample:
    """The ``size`` runs of a stream with the smallest MD5 of run_id (bottom-k).

    ``add(batch)`` takes Arrow batches of runs (run_id, config_json,
    metrics_json, ...); ``table()`` returns the sample in hash order. Holds at
    most ``size`` runs plus one batch.
    """

    def __init__(self, size: int = SAMPLE_RUNS, con: duckdb.DuckDBPyConnection | None = None):
        self.size = size
        self.con = con or duckdb.connect()
        self.runs = 0
        self.kept: pa.Table | None = None

    def add(self, batch: pa.Table) -> None:
        self.runs += batch.num_rows
        batch = batch.select(["run_id", "config_json", "metrics_json"])
        self.con.register("mb_sample_ids", batch.select(["run_id"]))
        try:
            hashes = self.con.sql("SELECT md5_number_upper(run_id) AS h FROM mb_sample_ids").to_arrow_table().column("h")
        finally:
            self.con.unregister("mb_sample_ids")
        batch = batch.append_column("sample_hash", hashes.cast(pa.uint64()))
        table = batch if self.kept is None else pa.concat_tables([self.kept, batch]).combine_chunks()
        if table.num_rows > self.size:
            h = table.column("sample_hash").to_numpy()
            keep = np.argpartition(h, self.size - 1)[: self.size]
            table = table.take(pa.array(np.sort(keep)))
        self.kept = table

    def merge(self, runs: int, kept: pa.Table | None) -> None:
        """Add the sample of another stream (its ``runs`` and ``kept``: a shard's,
        drawn with the same size): the result is the sample of both streams
        together, as if their runs had come through ``add``."""
        self.runs += runs
        if kept is None or not kept.num_rows:
            return
        table = kept if self.kept is None else pa.concat_tables([self.kept, kept]).combine_chunks()
        if table.num_rows > self.size:
            h = table.column("sample_hash").to_numpy()
            table = table.take(pa.array(np.sort(np.argpartition(h, self.size - 1)[: self.size])))
        self.kept = table

    def table(self) -> pa.Table:
        if self.kept is None:
            return pa.table({"run_id": pa.array([], pa.string()), "config_json": pa.array([], pa.string()), "metrics_json": pa.array([], pa.string())})
        order = pc.sort_indices(self.kept, [("sample_hash", "ascending"), ("run_id", "ascending")])
        return self.kept.take(order).drop_columns(["sample_hash"])


# --------------------------------------------------------------------------
# Statistics per path


def fit_model(
    sample: pa.Table,
    spec: ModelSpec,
    fitted_runs: int | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
    options: FitOptions = FitOptions(),
) -> V2Model:
    """A ``V2Model`` fitted on the runs of ``sample`` (see the module docstring);
    ``fitted_runs``: how many runs the sample was drawn from."""
    con = con or duckdb.connect()
    n = sample.num_rows
    config, _ = split_top_level(con, sample.column("config_json").combine_chunks(), "config_json")
    metrics, _ = split_top_level(con, sample.column("metrics_json").combine_chunks(), "metrics_json")
    config_values = by_path(collect_config(con, config)) if n else {}
    metric_values = by_path(collect_metrics(con, metrics)) if n else {}

    config_paths: dict[str, PathModel] = {}
    ignored = 0
    for path, values in sorted(config_values.items()):
        if matches(path, spec.ignore):
            ignored += 1
            continue
        branch = "env" if matches(path, spec.env) else "config"
        config_paths[path] = _path_model(branch, values, n, options)
    metric_paths = {
        key: _path_model("env" if matches(key, spec.env_metrics) else "outcome", values, n, options)
        for key, values in sorted(metric_values.items())
    }
    model = V2Model(
        weights=dict(spec.weights),
        config_paths=config_paths,
        metric_paths=metric_paths,
        patterns={"ignore": list(spec.ignore), "env": list(spec.env), "env_metrics": list(spec.env_metrics)},
        fitted_runs=n if fitted_runs is None else fitted_runs,
        sample_runs=n,
        ignored_paths=ignored,
    )
    if options.weigh_config == "clusters" or options.weigh_outcome or options.outcome_reliability:
        _fit_weights(model, config_values, metric_values, n, con, options)
    return model


def _path_model(branch: str, values: PathValues, n: int, options: FitOptions) -> PathModel:
    rows = values.rows(n)
    # a path every run holds tells nothing by being there
    present = 0 < len(rows) < n and (options.presence == "always" or not (values.numbers or values.strings))
    number = _number_model(_joined(values.numbers, np.float64)) if values.numbers else None
    length = _number_model(_joined(values.lengths, np.float64)) if values.lengths else None
    string = _string_model(values) if values.strings else None
    return PathModel(branch, float(present), number, length, string)


def _number_model(x: np.ndarray) -> NumberModel:
    x = x[np.isfinite(x)]
    if not len(x):
        return NumberModel.default()
    model = NumberModel(weight=1.0)
    if (x > 0).all():
        q05, q95 = np.quantile(x, [0.05, 0.95])
        if q95 >= _LOG_SPAN * q05:
            model.log, model.floor = True, float(x.min()) / 10
    t = model.transform(x)
    q25, q50, q75 = np.quantile(t, [0.25, 0.5, 0.75])
    scale = q75 - q25
    if not scale > 0:
        scale = (t.max() - t.min()) / 2 or abs(q50) or 1.0
    model.center, model.scale = float(q50), float(scale)
    distinct = np.unique(t)
    if len(distinct) <= MAX_KNOTS:
        knots = distinct
    else:
        knots = np.unique(np.quantile(t, np.linspace(0, 1, MAX_KNOTS)))
    model.knots = [float(k) for k in knots]
    return model


def _string_model(values: PathValues) -> StringModel:
    rows = _joined(values.string_rows, np.int64)
    strings = pa.concat_arrays([s.cast(pa.string()) for s in values.strings])
    encoded = pc.dictionary_encode(strings)
    codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), np.int64)
    distinct = encoded.dictionary.to_pylist()
    pairs = np.unique(rows * len(distinct) + codes)  # (run, value) once each
    df = np.bincount(pairs % len(distinct), minlength=len(distinct))
    runs = len(np.unique(rows))
    singletons = int((df == 1).sum())
    new_share = singletons / max(len(pairs), 1)  # Good-Turing: P(the next value is new)
    unseen = (1.0 - new_share) * idf(1, runs)
    kept = {distinct[i]: int(df[i]) for i in np.flatnonzero(df >= 2).tolist()}
    # the mean factor over the sample's values is 1
    factors = np.array([idf(int(c), runs) if c >= 2 else unseen for c in df.tolist()])
    norm = float((factors * df).sum() / max(df.sum(), 1)) or 1.0
    return StringModel(weight=1.0, runs=runs, df=kept, unseen=float(unseen), norm=norm)


# --------------------------------------------------------------------------
# Weights of the config paths: how much each group of features is explained


@dataclass
class _Group:
    path: str
    kind: str  # present | number | length | string
    codes: np.ndarray  # (n,) int64, one category per run
    k: int
    entropy: float


def _fit_weights(model: V2Model, config_values: dict[str, PathValues], metric_values: dict[str, PathValues], n: int, con, options: FitOptions) -> None:
    """Weights of the config groups (explained by the config's clusters), then of
    the outcome groups (explained by the (config cluster, env cluster) pairs),
    then the outcome branch's reliability over those pairs."""
    if n < 20:
        return
    leaves = _as_leaves(config_values), _as_leaves(metric_values)
    groups = [g for path, m in model.config_paths.items() if m.branch == "config" for g in _groups(path, m, config_values[path], n)]
    if options.weigh_config == "clusters":
        _zero_constant_groups(model, groups)
    config_labels = None
    rounds = options.rounds if groups and options.weigh_config == "clusters" else 1
    for _ in range(rounds):
        config_labels = _cluster_labels(model, "config", leaves, n, con)
        if config_labels is None or not groups or options.weigh_config != "clusters":
            break
        _set_weights(model.config_paths, groups, _explained(groups, config_labels, n))
    if not (options.weigh_outcome or options.outcome_reliability) or config_labels is None:
        return
    env_labels = _cluster_labels(model, "env", leaves, n, con)
    if options.outcome_reliability:
        # finer config clusters: splitting a kind of config in two leaves the
        # intraclass estimate unbiased, merging two kinds lowers it
        config_labels = _cluster_labels(model, "config", leaves, n, con, per_cluster=1)
    pairs = config_labels if env_labels is None else config_labels * (int(env_labels.max()) + 1) + env_labels
    pairs = np.unique(pairs, return_inverse=True)[1].reshape(-1)
    if options.weigh_outcome:
        outcome = [g for path, m in model.metric_paths.items() if m.branch == "outcome" for g in _groups(path, m, metric_values[path], n)]
        if outcome:
            _set_weights(model.metric_paths, outcome, _explained(outcome, pairs, n))
    if options.outcome_reliability:
        reliability = _outcome_reliability(model, leaves, pairs, n)
        if reliability is not None:
            model.reliability["outcome"] = reliability


def _outcome_reliability(model: V2Model, leaves, pairs: np.ndarray, n: int) -> float | None:
    """The intraclass correlation of the sample's outcome slices over the (config
    cluster, env cluster) pairs, at least ``RELIABILITY_FLOOR``; None when there
    are too few runs with outcomes to tell."""
    vectors, held = _branch_vectors(model, "outcome", leaves, n)
    if held.sum() < 20:
        return None
    icc = _intraclass(vectors, np.unique(pairs[held], return_inverse=True)[1].reshape(-1))
    return None if icc is None else float(np.clip(icc, RELIABILITY_FLOOR, 1.0))


def _intraclass(x: np.ndarray, groups: np.ndarray) -> float | None:
    """One-way ANOVA estimate of the share of the rows' variance (summed over the
    columns) that lies between the groups; None when every row is its own group."""
    rows, k = len(x), int(groups.max()) + 1
    if k < 2 or k >= rows:
        return None
    sizes = np.bincount(groups, minlength=k).astype(np.float64)
    means = np.zeros((k, x.shape[1]))
    np.add.at(means, groups, x)
    means /= sizes[:, None]
    between = float((sizes * ((means - x.mean(axis=0)) ** 2).sum(axis=1)).sum()) / (k - 1)
    within = float(((x - means[groups]) ** 2).sum()) / (rows - k)
    n0 = (rows - float((sizes**2).sum()) / rows) / (k - 1)
    denominator = between + (n0 - 1) * within
    return (between - within) / denominator if denominator > 0 else None


def _zero_constant_groups(model: V2Model, groups: list[_Group]) -> None:
    """A config group with one category in every run (a constant, or values each
    seen once: ids, hashes) tells runs apart in nothing: weight 0."""
    kept = {(g.path, g.kind) for g in groups}
    for path, m in model.config_paths.items():
        if m.branch != "config":
            continue
        if m.present > 0 and (path, "present") not in kept:
            m.present = 0.0
        for kind in ("number", "length", "string"):
            group = getattr(m, kind)
            if group is not None and (path, kind) not in kept:
                group.weight = 0.0


def _set_weights(paths: dict[str, PathModel], groups: list[_Group], weights: np.ndarray) -> None:
    weights = np.where(weights < WEIGHT_FLOOR, 0.0, weights)
    for group, weight in zip(groups, weights.tolist()):
        m = paths[group.path]
        if group.kind == "present":
            m.present = float(weight)
        else:
            getattr(m, group.kind).weight = float(weight)


def _groups(path: str, m: PathModel, values: PathValues, n: int) -> list[_Group]:
    """The path's feature groups as one category per sample run (absent: its own)."""
    out = []
    rows = values.rows(n)
    if m.present > 0:
        codes = np.zeros(n, np.int64)
        codes[rows] = 1
        out.append(_group(path, "present", codes))
    for kind, model, vrows, vals in (
        ("number", m.number, values.number_rows, values.numbers),
        ("length", m.length, values.list_rows, values.lengths),
    ):
        if model is None or len(model.knots) < 2:
            continue
        held, mean_t, _ = row_means(_joined(vrows, np.int64), model.transform(_joined(vals, np.float64)), n)
        knots = np.asarray(model.knots)
        with np.errstate(over="ignore", invalid="ignore"):  # values near the float limit
            nearest = np.nan_to_num(np.abs(mean_t[:, None] - knots[None, :]), nan=np.inf).argmin(axis=1)
        codes = np.full(n, len(knots), np.int64)
        codes[held] = nearest
        out.append(_group(path, kind, codes))
    if m.string is not None:
        codes = _string_codes(values, n)
        if codes is not None:
            out.append(_group(path, "string", codes))
    return [g for g in out if g.entropy > 1e-9]


def _string_codes(values: PathValues, n: int) -> np.ndarray | None:
    """Per run, its set of values at the path as one category; sets seen once collapse into one."""
    rows = _joined(values.string_rows, np.int64)
    strings = pa.concat_arrays([s.cast(pa.string()) for s in values.strings])
    codes = np.asarray(pc.dictionary_encode(strings).indices.to_numpy(zero_copy_only=False), np.int64)
    # a set's identity: the sum of random 64-bit tags of its distinct values
    tags = np.random.default_rng(0).integers(1, 2**62, size=int(codes.max()) + 1, dtype=np.int64)
    pairs = np.unique(rows * (int(codes.max()) + 1) + codes)
    prow, pcode = pairs // (int(codes.max()) + 1), pairs % (int(codes.max()) + 1)
    set_id = np.zeros(n, np.int64)
    np.add.at(set_id, prow, tags[pcode])
    _, inverse, counts = np.unique(set_id, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    rare = counts[inverse] < 2
    inverse[rare] = -1
    _, out = np.unique(inverse, return_inverse=True)
    return out.reshape(-1).astype(np.int64)


def _group(path: str, kind: str, codes: np.ndarray) -> _Group:
    _, codes = np.unique(codes, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    k = int(codes.max()) + 1 if len(codes) else 1
    p = np.bincount(codes, minlength=k) / max(len(codes), 1)
    return _Group(path, kind, codes, k, _entropy(p))


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _mutual_information(a: _Group, b: _Group, n: int) -> float:
    """Bias-corrected (Miller-Madow) mutual information of two groups, in nats."""
    joint = np.bincount(a.codes * b.k + b.codes, minlength=a.k * b.k).reshape(a.k, b.k) / n
    pa_, pb_ = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa_, pb_)[nz])).sum())
    bias = (np.count_nonzero(pa_) - 1) * (np.count_nonzero(pb_) - 1) / (2 * n)
    return max(0.0, mi - bias)


def _explained(groups: list[_Group], labels: np.ndarray, n: int) -> np.ndarray:
    """Per group, the share of its entropy that the labels (clusters) explain."""
    k = int(labels.max()) + 1
    clusters = _Group("", "clusters", labels, k, _entropy(np.bincount(labels, minlength=k) / n))
    return np.array([min(1.0, _mutual_information(g, clusters, n) / max(g.entropy, 1e-12)) for g in groups])


def _as_leaves(values: dict[str, PathValues]) -> PathLeaves:
    leaves = PathLeaves()
    for path, v in values.items():
        for rows, numbers in zip(v.number_rows, v.numbers):
            leaves.add_numbers(path, rows, numbers, False)
        for rows, strings in zip(v.string_rows, v.strings):
            leaves.add_strings(path, rows, strings)
        for rows, lengths in zip(v.list_rows, v.lengths):
            leaves.add_list(path, rows, lengths)
    return leaves


def _cluster_labels(model: V2Model, branch: str, leaves, n: int, con, per_cluster: int = 4) -> np.ndarray | None:
    """k-means labels of the sample's slices of one branch, with the weights so far
    (runs without features in the branch: a cluster of their own); about
    sqrt(runs / per_cluster) clusters."""
    vectors, held = _branch_vectors(model, branch, leaves, n)
    if held.sum() < 20:
        return None
    k = int(np.clip(round(math.sqrt(held.sum() / per_cluster)), 4, 256 // per_cluster))
    labels = np.full(n, k, np.int64)
    labels[held] = kmeans(k, 0, int(held.sum())).fit_predict(vectors)
    return np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _branch_vectors(model: V2Model, branch: str, leaves, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The sample's slices of one branch encoded alone with the weights so far
    (float64, the runs that have the branch), and which runs have it."""
    only = V2Model({b: float(b == branch) for b in SLICES}, model.config_paths, model.metric_paths, model.patterns)
    encoded = encode(only, *leaves, n)
    start, stop = SLICES[branch]
    held = encoded.present[branch]
    return encoded.vectors[held, start:stop].astype(np.float64), held
