"""Groups: the fit's view of a sample's features, for measuring what goes with what.

A path's features come in groups (its presence, number, list length,
strings, dates: ``KINDS``); ``groups_of(path, model, values, n)`` turns each
into one category per sample run (numbers and dates: the nearest fitted
knot; strings: the run's set of values, sets seen once pooled; absent: a
category of its own), as a ``Group``. On them:

- ``explained(groups, labels)``: per group, the share of its entropy that a
  partition of the runs (clusters) explains: bias-corrected (Miller-Madow)
  mutual information over the group's entropy;
- ``intraclass(x, labels)``: the one-way ANOVA estimate of the share of the
  rows' variance that lies between the labels' groups;
- ``set_weights`` / ``zero_constant_groups``: groups' weights into their path
  models (under ``WEIGHT_FLOOR``: 0);
- ``slice_vectors(model, branch, leaves, n)`` and ``Clusters``: a branch's
  slices of the sample encoded alone (with the weights so far) and their
  k-means clusters, with ``without(slots)``: each run's nearest centroid when
  some dimensions are left out (is a group explained by the clusters, or did
  it only shape them?).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow.compute as pc

from .encoders.v2 import SLICES, PathModel, PathValues, V2Model, _joined, _Slicer, encode, joined_strings, row_means
from .kmeans import kmeans
from ..pipeline.unnest import PathLeaves

KINDS = ("present", "number", "length", "string", "date")
# weights under this are taken as 0: mutual information estimated on a sample
# is not exactly 0 for independent fields, and a path at 0 costs nothing to encode
WEIGHT_FLOOR = 0.05


@dataclass
class Group:
    path: str
    kind: str  # one of KINDS
    codes: np.ndarray  # (n,) int64, one category per run
    k: int
    entropy: float


def groups_of(path: str, m: PathModel, values: PathValues, n: int) -> list[Group]:
    """The path's feature groups as one category per sample run (absent: its own);
    groups with one category only are left out."""
    out = []
    rows = values.rows(n)
    if m.present > 0:
        codes = np.zeros(n, np.int64)
        codes[rows] = 1
        out.append(group(path, "present", codes))
    for kind, model, vrows, vals in (
        ("number", m.number, values.number_rows, values.numbers),
        ("length", m.length, values.list_rows, values.lengths),
        ("date", m.date, values.date_rows, values.dates),
    ):
        if model is None or len(model.knots) < 2 or not vals:
            continue
        held, mean_t, _ = row_means(_joined(vrows, np.int64), model.transform(_joined(vals, np.float64)), n)
        knots = np.asarray(model.knots)
        with np.errstate(over="ignore", invalid="ignore"):  # values near the float limit
            nearest = np.nan_to_num(np.abs(mean_t[:, None] - knots[None, :]), nan=np.inf).argmin(axis=1)
        codes = np.full(n, len(knots), np.int64)
        codes[held] = nearest
        out.append(group(path, kind, codes))
    if m.string is not None and values.strings:
        codes = _string_codes(values, n)
        if codes is not None:
            out.append(group(path, "string", codes))
    return [g for g in out if g.entropy > 1e-9]


def _string_codes(values: PathValues, n: int) -> np.ndarray | None:
    """Per run, its set of values at the path as one category; sets seen once collapse into one."""
    rows = _joined(values.string_rows, np.int64)
    strings = joined_strings(values)
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


def group(path: str, kind: str, codes: np.ndarray) -> Group:
    """A ``Group`` of categories (renumbered 0..k-1) with its entropy."""
    _, codes = np.unique(codes, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    k = int(codes.max()) + 1 if len(codes) else 1
    p = np.bincount(codes, minlength=k) / max(len(codes), 1)
    return Group(path, kind, codes, k, entropy(p))


def entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mutual_information(a: Group, b: Group, n: int) -> float:
    """Bias-corrected (Miller-Madow) mutual information of two groups, in nats."""
    joint = np.bincount(a.codes * b.k + b.codes, minlength=a.k * b.k).reshape(a.k, b.k) / n
    pa_, pb_ = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa_, pb_)[nz])).sum())
    bias = (np.count_nonzero(pa_) - 1) * (np.count_nonzero(pb_) - 1) / (2 * n)
    return max(0.0, mi - bias)


def explained(groups: list[Group], labels: np.ndarray, n: int) -> np.ndarray:
    """Per group, the share of its entropy that the labels (clusters) explain."""
    clusters = group("", "clusters", labels)
    return np.array([min(1.0, mutual_information(g, clusters, n) / max(g.entropy, 1e-12)) for g in groups])


def explaining(g: Group, labels: np.ndarray, n: int) -> float:
    """The share of the labels' entropy that the group explains."""
    clusters = group("", "clusters", labels)
    return min(1.0, mutual_information(g, clusters, n) / max(clusters.entropy, 1e-12))


def intraclass(x: np.ndarray, labels: np.ndarray) -> float | None:
    """One-way ANOVA estimate of the share of the rows' variance (summed over the
    columns) that lies between the labels' groups; None when every row is its
    own group or there is one group."""
    groups = np.unique(labels, return_inverse=True)[1].reshape(-1)
    x = x.reshape(len(x), -1)
    rows, k = len(x), int(groups.max()) + 1 if len(groups) else 0
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


def as_leaves(values: dict[str, PathValues]) -> PathLeaves:
    """Values by path back into leaves (dates already read stay dates)."""
    leaves = PathLeaves()
    for path, v in values.items():
        for rows, numbers in zip(v.number_rows, v.numbers):
            leaves.add_numbers(path, rows, numbers, False)
        for rows, strings in zip(v.string_rows, v.strings):
            leaves.add_strings(path, rows, strings)
        for rows, lengths in zip(v.list_rows, v.lengths):
            leaves.add_list(path, rows, lengths)
        for rows, days in zip(v.date_rows, v.dates):
            leaves.add_dates(path, rows, days)
    return leaves


def slice_vectors(model: V2Model, branch: str, leaves: tuple, n: int, con: duckdb.DuckDBPyConnection | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The sample's slices of one branch encoded alone with the weights so far
    (float64, the runs that have the branch), and which runs have it.
    ``leaves``: (config, metrics, window)."""
    only = V2Model({b: float(b == branch) for b in SLICES}, model.config_paths, model.metric_paths, model.patterns,
                   slices=model.slices, format=model.format, window_paths=model.window_paths)
    encoded = encode(only, leaves[0], leaves[1], n, window=leaves[2], con=con)
    start, stop = model.slices[branch]
    held = encoded.present[branch]
    return encoded.vectors[held, start:stop].astype(np.float64), held


class Clusters:
    """k-means clusters of the sample's slices of one branch (about sqrt(runs /
    ``per_cluster``) of them): ``labels`` per sample run (runs without the
    branch: a cluster of their own), and what ``without`` needs."""

    def __init__(self, model: V2Model, branch: str, leaves: tuple, n: int, con=None, per_cluster: int = 4, seed: int = 0):
        self.model, self.branch, self.n = model, branch, n
        self.vectors, self.held = slice_vectors(model, branch, leaves, n, con)
        self.labels: np.ndarray | None = None
        if self.held.sum() < 20:
            return
        k = int(np.clip(round(math.sqrt(self.held.sum() / per_cluster)), 4, 256 // per_cluster))
        fitted = kmeans(k, seed, int(self.held.sum())).fit(self.vectors)
        self.centroids = fitted.cluster_centers_
        self.labels = self._with_absent(fitted.labels_.astype(np.int64))
        self._products: np.ndarray | None = None  # vectors @ centroids.T, once ``without`` needs it

    def _with_absent(self, labels: np.ndarray) -> np.ndarray:
        out = np.full(self.n, len(self.centroids), np.int64)
        out[self.held] = labels
        return np.unique(out, return_inverse=True)[1].reshape(-1).astype(np.int64)

    def slots(self, path: str, kind: str) -> np.ndarray:
        """The dimensions (of the branch's slice) that a group of ``path`` feeds."""
        m = self.model.config_paths.get(path) or self.model.metric_paths.get(path) or self.model.window_paths.get(path)
        names = feature_names(path, kind, m)
        if not names:
            return np.zeros(0, np.int64)
        slots, _ = _Slicer(self.model).slots(self.branch, names)
        return np.unique(slots - self.model.slices[self.branch][0])

    def without(self, dims: np.ndarray) -> np.ndarray:
        """Each sample run's nearest centroid when ``dims`` are left out (the labels
        a clustering that never saw them would most likely give)."""
        if not len(dims):
            return self.labels
        x, c = self.vectors, self.centroids
        if self._products is None:
            self._products = x @ c.T
        scores = (c**2).sum(axis=1) - (c[:, dims] ** 2).sum(axis=1) - 2 * (self._products - x[:, dims] @ c[:, dims].T)
        return self._with_absent(np.argmin(scores, axis=1))


def feature_names(path: str, kind: str, m: PathModel | None) -> list[str]:
    """The names of a group's features (as ``encoders.v2`` names them)."""
    if m is None:
        return []
    if kind == "present":
        return [f"{path}#present"]
    if kind == "string":
        return [f"{path}={value}" for value in m.string.df] if m.string is not None else []
    prefix, model = {"number": (f"{path}#", m.number), "length": (f"{path}#len", m.length), "date": (f"{path}#date", m.date)}[kind]
    if model is None:
        return []
    return [prefix + "z"] + [f"{prefix}k{j}" for j in range(len(model.knots))]


def zero_constant_groups(model: V2Model, groups: list[Group]) -> None:
    """A config group with one category in every run (a constant, or values each
    seen once: ids, hashes) tells runs apart in nothing: weight 0."""
    kept = {(g.path, g.kind) for g in groups}
    for path, m in model.config_paths.items():
        if m.branch != "config":
            continue
        if m.present > 0 and (path, "present") not in kept:
            m.present = 0.0
        for kind in ("number", "length", "string", "date"):
            group = getattr(m, kind)
            if group is not None and (path, kind) not in kept:
                group.weight = 0.0


def set_weights(paths: dict[str, PathModel], groups: list[Group], weights: np.ndarray) -> None:
    weights = np.where(weights < WEIGHT_FLOOR, 0.0, weights)
    for group, weight in zip(groups, weights.tolist()):
        m = paths[group.path]
        if group.kind == "present":
            m.present = float(weight)
        else:
            getattr(m, group.kind).weight = float(weight)
