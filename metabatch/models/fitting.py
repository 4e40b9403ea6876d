"""Fit: the selected runs -> a fitted v2 model (branches, statistics and weights per path).

``fit_model(sample, spec, fitted_runs)`` fits a ``V2Model`` on a table of runs
(run_id, config_json, metrics_json, start_date, end_date); ``RunSample`` draws
that table from a stream of any length with bounded memory; ``fit(...)`` (in
``models``) runs both over a store and registers the result.

The sample: the ``SAMPLE_RUNS`` runs whose MD5 of run_id is smallest (a
uniform sample that depends on the runs only, not on the order they come in),
so every statistic is approximate: quantiles, knots and value frequencies are
those of the sample (exact when there are fewer runs).

What is fitted, per path of the config (ignored paths left out), per key of
the metrics and per key of the run's own window (``backtest_runs.start_date``,
``.end_date``, ``.window_days``):

- **typed values**: a config path whose strings are ISO-8601 dates or
  timestamps (at least ``DATE_SHARE`` of them) holds dates, read as numbers
  (days since 1970), so that runs a week apart are near;
- **the branch** (what was tried, where, how it went): the model file's
  declaration where it gives one, else learnt from the runs
  (``branches.learn_branches``);
- numbers, dates (and list lengths): a log10 when every value is positive and
  they span two orders of magnitude or more; median and IQR of the (logged)
  values; knots at up to ``MAX_KNOTS`` quantiles (at the values themselves
  when there are few);
- strings: the number of sample runs holding each value (kept when >= 2), and
  the share of the path's values seen only once (Good-Turing's estimate that
  the next value is new), which sets what a new value is worth;
- **weights of the config paths' feature groups** (presence, number, length,
  strings, dates): how much of the group's entropy the structure of the config
  explains. The sample is encoded (every group at 1 the first time),
  clustered (scikit-learn's k-means on the config slices), and a group's
  weight is its bias-corrected (Miller-Madow) mutual information with the
  clusters over its own entropy; then again with those weights
  (``FitOptions.rounds``). A seed, a capital amount, a host name spread at
  random over the runs, or a commit hash is explained by nothing and weighs
  ~0 (under ``groups.WEIGHT_FLOOR``: 0); a hyperparameter that comes with the rest
  of its family's settings weighs ~1;
- **weights of the learnt env groups** the same way, over the clusters of the
  env slices (declared env paths and metrics weigh 1);
- **the outcome branch's reliability**: the intraclass correlation of the
  sample's outcome slices over (config cluster, env cluster) pairs (one-way
  ANOVA estimate, finer config clusters: splitting a kind of config leaves it
  unbiased, merging two lowers it), at least ``RELIABILITY_FLOOR``. It
  multiplies the outcome weight in the joint vector: two runs of one kind of
  config in one environment differ in outcome by their luck, and outcomes
  should count in the joint cosine as much as they repeat. On the campaign
  runs it is about 0.16.

``FitOptions(branches="names")`` fits the model of format 1 instead (v1's
name rule for the env branch, strings as tokens, no window): what models
fitted before learnt branches are, kept for comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .encoders.base import split_top_level
from .encoders.dates import days_of
from .encoders.v2 import (
    NumberModel,
    row_means,
    PathModel,
    PathValues,
    StringModel,
    V2Model,
    _joined,
    by_path,
    idf,
    window_leaves,
    joined_strings,
    with_dates,
)
from .groups import Clusters, as_leaves, explained, groups_of, intraclass, set_weights, slice_vectors, zero_constant_groups
from .branches import learn_branches
from .modelfile import PRIOR_ENV, PRIOR_ENV_METRICS, ModelSpec, matches
from ..pipeline.unnest import collect_config, collect_metrics

SAMPLE_RUNS = 20_000
MAX_KNOTS = 16
# the outcome branch keeps at least this share of its weight, so that it stays
# in the vector and can be compared alone (--branch outcome)
RELIABILITY_FLOOR = 0.05
# a config path holds dates when at least this share of its strings are ISO-8601 dates
DATE_SHARE = 0.9
# env numbers' knots are at least this many times their spread within an environment apart
KNOT_SPREAD = 3.0
SAMPLE_COLUMNS = ("run_id", "config_json", "metrics_json", "start_date", "end_date")


@dataclass(frozen=True)
class FitOptions:
    """Choices of the fit that the benchmarks compare; the defaults are v2's.

    ``branches``: "learned" (format 2: each path's branch learnt from the runs
    unless the model file declares it, dates as numbers, the run's window) or
    "names" (format 1: v1's name rule, or the file's patterns, for the env
    branch). ``weigh_config``: "clusters" (a group weighs the share of its
    entropy the k-means clusters of the config slices explain, ``rounds``
    times) or "none" (every group 1). ``presence``: "valueless" (a presence
    indicator only for paths with no number or string: elsewhere the values
    already say the path is there, and a second, shared feature pulls
    families of one template together) or "always". ``weigh_outcome``:
    outcome groups weigh what the (config cluster, env cluster) pairs explain
    of them, instead of 1. ``outcome_reliability``: the outcome branch's share
    of the joint cosine is its weight times its fitted reliability (False: its
    weight alone).
    """

    branches: str = "learned"
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
    metrics_json, start_date, end_date, ...); ``table()`` returns the sample
    in hash order. Holds at most ``size`` runs plus one batch.
    """

    def __init__(self, size: int = SAMPLE_RUNS, con: duckdb.DuckDBPyConnection | None = None):
        self.size = size
        self.con = con or duckdb.connect()
        self.runs = 0
        self.kept: pa.Table | None = None

    def add(self, batch: pa.Table) -> None:
        self.runs += batch.num_rows
        batch = _sample_columns(batch)
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
            return _sample_columns(pa.table({"run_id": pa.array([], pa.string()), "config_json": pa.array([], pa.string()), "metrics_json": pa.array([], pa.string())}))
        order = pc.sort_indices(self.kept, [("sample_hash", "ascending"), ("run_id", "ascending")])
        return self.kept.take(order).drop_columns(["sample_hash"])


def _sample_columns(batch: pa.Table) -> pa.Table:
    """The columns the fit reads (a missing date column as nulls)."""
    columns = []
    for name in SAMPLE_COLUMNS:
        if name in batch.column_names:
            column = batch.column(name)
            columns.append(column.cast(pa.date32()) if name.endswith("_date") else column)
        else:
            columns.append(pa.nulls(batch.num_rows, pa.date32() if name.endswith("_date") else pa.string()))
    return pa.table(columns, names=list(SAMPLE_COLUMNS))


# --------------------------------------------------------------------------
# The model


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
    learned = options.branches == "learned"
    config, _ = split_top_level(con, sample.column("config_json").combine_chunks(), "config_json")
    metrics, _ = split_top_level(con, sample.column("metrics_json").combine_chunks(), "metrics_json")
    config_values = by_path(collect_config(con, config)) if n else {}
    metric_values = by_path(collect_metrics(con, metrics)) if n else {}
    window_values = by_path(window_leaves(sample)) if n and learned else {}
    if learned:
        config_values = {p: _typed(v, con) for p, v in config_values.items()}

    config_paths: dict[str, PathModel] = {}
    ignored = 0
    for path, values in sorted(config_values.items()):
        if matches(path, spec.ignore):
            ignored += 1
            continue
        if learned:
            declared = spec.declared_config_branch(path)
            branch, how = (declared, "declared") if declared else ("config", "")
        else:
            branch, how = ("env" if matches(path, spec.env or PRIOR_ENV) else "config"), ""
        config_paths[path] = _path_model(branch, values, n, options, how)
    metric_paths = {}
    for key, values in sorted(metric_values.items()):
        if learned:
            declared = spec.declared_metric_branch(key)
            branch, how = (declared, "declared") if declared else ("outcome", "")
        else:
            branch, how = ("env" if matches(key, spec.env_metrics or PRIOR_ENV_METRICS) else "outcome"), ""
        metric_paths[key] = _path_model(branch, values, n, options, how)
    window_paths = {}
    for key, values in sorted(window_values.items()):
        if matches(key, spec.ignore):
            continue
        declared = spec.declared_config_branch(key)
        branch, how = (declared, "declared") if declared else ("none", "")
        window_paths[key] = _path_model(branch, values, n, options, how)
    if learned:
        patterns = {"ignore": list(spec.ignore), "config": list(spec.config), "env": list(spec.env),
                    "env_metrics": list(spec.env_metrics), "outcome_metrics": list(spec.outcome_metrics),
                    "prior_env": list(PRIOR_ENV), "prior_env_metrics": list(PRIOR_ENV_METRICS)}
    else:
        patterns = {"ignore": list(spec.ignore), "env": list(spec.env or PRIOR_ENV), "env_metrics": list(spec.env_metrics or PRIOR_ENV_METRICS)}
    model = V2Model(
        weights=dict(spec.weights),
        config_paths=config_paths,
        metric_paths=metric_paths,
        patterns=patterns,
        fitted_runs=n if fitted_runs is None else fitted_runs,
        sample_runs=n,
        ignored_paths=ignored,
        format=2 if learned else 1,
        window_paths=window_paths,
    )
    leaves = (as_leaves(config_values), as_leaves(metric_values), as_leaves(window_values))
    if learned:
        environments = learn_branches(model, (config_values, metric_values, window_values), leaves, n, con, options)
        if environments is None and n >= 20:
            environments = Clusters(model, "env", leaves, n, con).labels
        if environments is not None:
            _even_env_knots(model, (config_values, metric_values, window_values), environments, n)
    if options.weigh_config == "clusters" or options.weigh_outcome or options.outcome_reliability or learned:
        # learnt branches weighed the config paths already (beside the env ones): one more round without those
        rounds = 1 if learned and options.weigh_config == "clusters" else options.rounds
        _fit_weights(model, config_values, metric_values, window_values, leaves, n, con, options, rounds)
    return model


def _typed(values: PathValues, con: duckdb.DuckDBPyConnection) -> PathValues:
    """A path's values with its ISO-8601 date strings read as days, when at least
    ``DATE_SHARE`` of its strings are dates (else as they are)."""
    if not values.strings:
        return values
    days = days_of(con, joined_strings(values))
    if np.isfinite(days).mean() < DATE_SHARE:
        return values
    return with_dates(values, con, days)


def _path_model(branch: str, values: PathValues, n: int, options: FitOptions, how: str = "") -> PathModel:
    rows = values.rows(n)
    # a path every run holds tells nothing by being there
    present = 0 < len(rows) < n and (options.presence == "always" or not (values.numbers or values.strings or values.dates))
    number = _number_model(_joined(values.numbers, np.float64)) if values.numbers else None
    length = _number_model(_joined(values.lengths, np.float64)) if values.lengths else None
    string = _string_model(values) if values.strings else None
    date = _number_model(_joined(values.dates, np.float64)) if values.dates else None
    return PathModel(branch, float(present), number, length, string, date, how)


def _number_model(x: np.ndarray, even: bool = False, spacing: float = 0.0) -> NumberModel:
    """A number group's statistics; ``even``: knots spread evenly over the
    values' range (0.5th to 99.5th percentile) rather than at quantiles, at
    least ``spacing`` apart (in the transformed values)."""
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
    elif even:
        low, high = np.quantile(t, [0.005, 0.995])
        count = MAX_KNOTS if not spacing > 0 else int(np.clip((high - low) // spacing + 1, 2, MAX_KNOTS))
        knots = np.unique(np.linspace(low, high, count)) if high > low else distinct[[0, -1]]
    else:
        knots = np.unique(np.quantile(t, np.linspace(0, 1, MAX_KNOTS)))
    model.knots = [float(k) for k in knots]
    return model


def _even_env_knots(model: V2Model, values: tuple, environments: np.ndarray, n: int) -> None:
    """The env paths' numbers and dates with knots spread evenly, at least
    ``KNOT_SPREAD`` times their spread within an environment apart: what
    describes an environment is measured, and varies a little from run to run
    within one; quantile knots fall thickest inside the busiest environments
    and would cut their runs apart, even knots that wide keep them together.
    ``environments``: the sample runs' env clusters."""
    for paths, by_path_values in zip((model.config_paths, model.metric_paths, model.window_paths), values):
        for path, m in paths.items():
            if m.branch != "env":
                continue
            v = by_path_values[path]
            for kind, rows, parts in (("number", v.number_rows, v.numbers), ("date", v.date_rows, v.dates)):
                group = getattr(m, kind)
                if group is None or not parts:
                    continue
                x = _joined(parts, np.float64)
                held, mean_t, _ = row_means(_joined(rows, np.int64), group.transform(x), n)
                even = _number_model(x, even=True, spacing=KNOT_SPREAD * _within_spread(mean_t, environments[held]))
                even.weight = group.weight
                setattr(m, kind, even)


def _within_spread(x: np.ndarray, labels: np.ndarray) -> float:
    """The pooled standard deviation of ``x`` within the labels' groups."""
    fine = np.isfinite(x)
    x, labels = x[fine], labels[fine]
    groups = np.unique(labels, return_inverse=True)[1].reshape(-1)
    k = int(groups.max()) + 1 if len(groups) else 0
    if len(x) <= k + 1:
        return 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # values near the float limit
        means = np.bincount(groups, weights=x, minlength=k) / np.maximum(np.bincount(groups, minlength=k), 1)
        spread = float(np.sqrt(((x - means[groups]) ** 2).sum() / (len(x) - k)))
    return spread if np.isfinite(spread) else 0.0


def _string_model(values: PathValues) -> StringModel:
    rows = _joined(values.string_rows, np.int64)
    strings = joined_strings(values)
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
# Weights: how much each group of features is explained


def _fit_weights(model: V2Model, config_values, metric_values, window_values, leaves: tuple, n: int, con, options: FitOptions, rounds: int) -> None:
    """Weights of the config groups (explained by the config's clusters), of the
    learnt env groups (explained by the env's clusters, format 2), of the
    outcome groups (``weigh_outcome``: explained by the (config cluster, env
    cluster) pairs), then the outcome branch's reliability over those pairs."""
    if n < 20:
        return
    groups = [g for path, m in model.config_paths.items() if m.branch == "config" for g in groups_of(path, m, config_values[path], n)]
    if options.weigh_config == "clusters":
        zero_constant_groups(model, groups)
    config_labels = None
    rounds = rounds if groups and options.weigh_config == "clusters" else 1
    for _ in range(rounds):
        config_labels = Clusters(model, "config", leaves, n, con).labels
        if config_labels is None or not groups or options.weigh_config != "clusters":
            break
        set_weights(model.config_paths, groups, explained(groups, config_labels, n))
    env_labels = None
    if model.format >= 2:
        env_labels = _weigh_env(model, (config_values, metric_values, window_values), leaves, n, con)
    if not (options.weigh_outcome or options.outcome_reliability) or config_labels is None:
        return
    if env_labels is None:
        env_labels = Clusters(model, "env", leaves, n, con).labels
    if options.outcome_reliability:
        # finer config clusters: splitting a kind of config in two leaves the
        # intraclass estimate unbiased, merging two kinds lowers it
        config_labels = Clusters(model, "config", leaves, n, con, per_cluster=1).labels
    pairs = config_labels if env_labels is None else config_labels * (int(env_labels.max()) + 1) + env_labels
    pairs = np.unique(pairs, return_inverse=True)[1].reshape(-1)
    if options.weigh_outcome:
        outcome = [g for path, m in model.metric_paths.items() if m.branch == "outcome" for g in groups_of(path, m, metric_values[path], n)]
        if outcome:
            set_weights(model.metric_paths, outcome, explained(outcome, pairs, n))
    if options.outcome_reliability:
        reliability = _outcome_reliability(model, leaves, pairs, n, con)
        if reliability is not None:
            model.reliability["outcome"] = reliability


def _weigh_env(model: V2Model, values: tuple, leaves: tuple, n: int, con) -> np.ndarray | None:
    """Weights of the env groups the fit learnt (declared ones keep 1): the share
    of each group's entropy that the clusters of the env slices explain, so
    that a fact the environment does not settle counts little. Returns the
    clusters' labels (None without env features)."""
    clusters = Clusters(model, "env", leaves, n, con)
    if clusters.labels is None:
        return None
    learnt = []
    for paths, by_path_values in zip((model.config_paths, model.metric_paths, model.window_paths), values):
        for path, m in paths.items():
            if m.branch == "env" and m.how != "declared":
                learnt.extend((paths, g) for g in groups_of(path, m, by_path_values[path], n))
    if learnt:
        shares = explained([g for _, g in learnt], clusters.labels, n)
        for (paths, g), share in zip(learnt, shares.tolist()):
            set_weights(paths, [g], np.array([share]))
    return clusters.labels


def _outcome_reliability(model: V2Model, leaves, pairs: np.ndarray, n: int, con=None) -> float | None:
    """The intraclass correlation of the sample's outcome slices over the (config
    cluster, env cluster) pairs, at least ``RELIABILITY_FLOOR``; None when there
    are too few runs with outcomes to tell."""
    vectors, held = slice_vectors(model, "outcome", leaves, n, con)
    if held.sum() < 20:
        return None
    icc = intraclass(vectors, pairs[held])
    return None if icc is None else float(np.clip(icc, RELIABILITY_FLOOR, 1.0))
