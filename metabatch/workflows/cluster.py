"""Cluster: runs grouped by behaviour, on one slice of a v2 model's space.

``cluster_runs(model_id, on="config", k=40, snapshot=...)`` returns a
``Clustering``: per run its cluster and distance to the centroid
(``assignments``, Polars), a summary per cluster (``summary``), the k used and
how it was chosen.

- The slice (``joint``, ``config``, ``env`` or ``outcome``) of every run,
  L2-normalised, so that k-means' distances follow cosines; scikit-learn's
  ``MiniBatchKMeans`` (deterministic for a ``seed``), fitted on up to
  ``FIT_SAMPLE`` runs and applied to all.
- With no ``k``: for k in ``K_CHOICES`` (up to a tenth of the sample), the
  mean silhouette (scikit-learn's ``silhouette_score``) of a k-means on a
  sample of ``SILHOUETTE_SAMPLE`` runs; the k with the highest is used.
- ``on="env"`` with no ``k``: environments nest (a market, then periods or
  regimes within it), and the silhouette over all runs picks the coarse
  level, so each coarse cluster is searched again the same way, on its own
  runs: where the best silhouette within it reaches ``SPLIT_SILHOUETTE`` (its
  runs fall into groups well apart), it is split. Where none is split (the
  silhouette picked the finest level), a coarser level exists when a k of at
  most half as many scores at least ``COARSE_SHARE`` of the best silhouette: each cluster then
  joins the coarse cluster (of that k) that holds most of its runs. The
  clusters are the finest level found; ``coarse`` says which coarse cluster
  each lies in (the assignments and the summary carry both).
- The summary: size, the metric's mean and spread, the dominant strategies
  and universes, a representative run (nearest its centroid), and the config
  paths whose values set the cluster apart: over a sample of each cluster's
  configs, the value whose share in the cluster most exceeds its share
  outside (strings; by 20 points at least), or the median furthest from the
  others' (numbers; half an IQR at least), among the config and env paths
  the model gives a weight.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from ..errors import BadInput
from ..models.kmeans import kmeans
from .space import Space, open_space, with_random_rank

BRANCHES = ("joint", "config", "env", "outcome")
FIT_SAMPLE = 200_000
SILHOUETTE_SAMPLE = 4_000
K_CHOICES = (2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60)
CONFIGS_PER_CLUSTER = 200
# a coarse environment is split when the best silhouette of its own runs reaches this
SPLIT_SILHOUETTE = 0.4
# a coarser level of environments exists when its k scores this share of the best silhouette
COARSE_SHARE = 0.9


@dataclass
class Clustering:
    model_id: str
    on: str
    k: int
    chosen_by: str  # "given", "silhouette" or "nested silhouette"
    assignments: pl.DataFrame  # run_id, cluster, distance (and coarse, when nested)
    summary: pl.DataFrame  # cluster, size, metric mean/std, strategies, universes, representative, sets_apart
    silhouettes: dict[int, float] = field(default_factory=dict)
    metric: str | None = None
    coarse_k: int | None = None  # nested: how many coarse clusters the finest level lies in
    splits: dict[int, dict[int, float]] = field(default_factory=dict)  # nested: per coarse cluster split, its silhouettes


def cluster_runs(
    model_id: str,
    *,
    on: str = "joint",
    k: int | None = None,
    snapshot: str | os.PathLike | None = None,
    historical_url=None,
    runtime_url=None,
    seed: int = 0,
    metric: str | None = None,
    strategy_id: str | Sequence[str] | None = None,
    start: dt.date | None = None,
    end: dt.date | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Clustering:
    """See the module docstring."""
    if on not in BRANCHES:
        raise BadInput(f"--on {on!r}: use one of {', '.join(BRANCHES)}")
    if k is not None and k < 2:
        raise BadInput(f"--k must be >= 2, got {k}")
    progress = on_progress or (lambda _message: None)
    strategy_ids = [strategy_id] if isinstance(strategy_id, str) else list(strategy_id or [])
    space = open_space(model_id, snapshot=snapshot, historical_url=historical_url, runtime_url=runtime_url, strategy_ids=strategy_ids, start=start, end=end)
    x = space.unit(on)
    held = np.flatnonzero(space.held(on))
    if len(held) < 2:
        raise BadInput(f"fewer than 2 runs have features in the {on} slice", "pick another --on or a wider selection")
    if k is not None and k > len(held):
        raise BadInput(f"--k {k} is more than the {len(held)} runs with features")
    rng = np.random.default_rng(seed)
    silhouettes: dict[int, float] = {}
    chosen_by = "given"
    if k is None:
        progress("choosing k by silhouette")
        k, silhouettes = choose_k(x[held], seed, rng)
        chosen_by = "silhouette"
    progress(f"k-means, k = {k}")
    labels, distance = _kmeans_labels(x, held, k, seed, rng, len(space))
    coarse, splits = None, {}
    if on == "env" and chosen_by == "silhouette":
        progress("searching each environment for nested ones")
        coarse = _by_size(labels, k)
        labels, distance, splits = _split_nested(x, coarse, distance, k, seed, rng)
        k = int(labels.max()) + 1  # the finest clusters (a given k stays as given)
        if not splits:
            coarse = _coarser(x, held, labels, k, silhouettes, seed, rng)
        chosen_by = "nested silhouette"
    labels = _by_size(labels, k)
    columns = {"run_id": space.runs.get_column("run_id"), "cluster": pl.Series(labels, dtype=pl.Int64), "distance": pl.Series(distance, dtype=pl.Float64)}
    if coarse is not None:
        columns["coarse"] = pl.Series(coarse, dtype=pl.Int64)
    assignments = pl.DataFrame(columns).filter(pl.col("cluster") >= 0)
    progress("summarising")
    summary, metric_name = _summary(space, labels, distance, k, metric)
    coarse_k = None
    if coarse is not None:
        coarse_k = int(coarse.max()) + 1
        of_cluster = assignments.group_by("cluster").agg(pl.col("coarse").first())
        summary = summary.join(of_cluster, on="cluster", how="left").select("cluster", "coarse", *[c for c in summary.columns if c != "cluster"])
    return Clustering(model_id, on, k, chosen_by, assignments, summary, silhouettes, metric_name, coarse_k, splits)


def _kmeans_labels(x: np.ndarray, held: np.ndarray, k: int, seed: int, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means (fitted on up to ``FIT_SAMPLE`` of the ``held`` rows) labels and
    distances to the centroid for every held row (-1 and NaN elsewhere)."""
    fit_rows = held if len(held) <= FIT_SAMPLE else np.sort(rng.choice(held, FIT_SAMPLE, replace=False))
    centroids = kmeans(k, seed, len(fit_rows)).fit(x[fit_rows])
    labels = np.full(n, -1, np.int64)
    distance = np.full(n, np.nan)
    for at in range(0, len(held), 131_072):  # bounded distance matrices
        rows = held[at : at + 131_072]
        labels[rows] = centroids.predict(x[rows])
        distance[rows] = np.linalg.norm(x[rows] - centroids.cluster_centers_[labels[rows]], axis=1)
    return labels, distance


def _coarser(x, held, labels, k, silhouettes: dict, seed, rng) -> np.ndarray | None:
    """The coarse cluster of each run when a k of at most half of ``k`` scores at
    least ``COARSE_SHARE`` of ``k``'s silhouette (each of ``labels``' clusters
    joins the coarse cluster holding most of its runs); None when none does."""
    smaller = {c: v for c, v in silhouettes.items() if c <= k // 2}
    if not smaller:
        return None
    best = best_k(smaller)
    if smaller[best] < COARSE_SHARE * silhouettes[k]:
        return None
    groups, _ = _kmeans_labels(x, held, best, seed, rng, len(labels))
    joint = np.zeros((k, best), np.int64)
    np.add.at(joint, (labels[held], groups[held]), 1)
    of_cluster = _by_size(joint.argmax(axis=1), best)
    return np.where(labels >= 0, of_cluster[np.maximum(labels, 0)], -1)


def _split_nested(x, coarse: np.ndarray, distance: np.ndarray, k: int, seed: int, rng) -> tuple[np.ndarray, np.ndarray, dict]:
    """Each coarse cluster split where its own runs' best silhouette reaches
    ``SPLIT_SILHOUETTE`` (see the module docstring): the finest labels, their
    distances (``distance`` updated in place) and per split cluster the
    silhouettes tried."""
    labels = np.full(len(coarse), -1, np.int64)
    splits: dict[int, dict[int, float]] = {}
    next_label = 0
    for c in range(k):  # a loop over the coarse clusters
        rows = np.flatnonzero(coarse == c)
        sub_k, scores = choose_k(x[rows], seed, rng) if len(rows) >= 40 else (1, {})
        if sub_k < 2 or scores.get(sub_k, 0.0) < SPLIT_SILHOUETTE:
            labels[rows] = next_label
            next_label += 1
            continue
        splits[c] = scores
        sub, sub_distance = _kmeans_labels(x, rows, sub_k, seed, rng, len(coarse))
        labels[rows] = next_label + sub[rows]
        distance[rows] = sub_distance[rows]
        next_label += sub_k
    return labels, distance, splits


def choose_k(x: np.ndarray, seed: int, rng: np.random.Generator) -> tuple[int, dict[int, float]]:
    """The k of ``K_CHOICES`` with the best mean silhouette on a sample of ``x``."""
    from sklearn.metrics import silhouette_score

    sample = x if len(x) <= SILHOUETTE_SAMPLE else x[np.sort(rng.choice(len(x), SILHOUETTE_SAMPLE, replace=False))]
    distinct = len(np.unique(np.round(sample, 4), axis=0))
    scores = {}
    for k in K_CHOICES:
        if k >= min(distinct, max(3, len(sample) // 10)):
            break
        labels = kmeans(k, seed, len(sample)).fit_predict(sample)
        if len(np.unique(labels)) < 2:
            continue
        scores[k] = float(silhouette_score(sample, labels, metric="euclidean", random_state=seed))
    if not scores:
        return 2, scores
    return best_k(scores), scores


def best_k(scores: dict[int, float]) -> int:
    """The k of the best silhouette (to 3 decimals; the smaller k on a tie)."""
    return max(scores, key=lambda c: (round(scores[c], 3), -c))


def _by_size(labels: np.ndarray, k: int) -> np.ndarray:
    """Clusters renumbered by size, largest first (ties by old number): stable names."""
    counts = np.bincount(labels[labels >= 0], minlength=k)
    order = np.lexsort((np.arange(k), -counts))
    new = np.empty(k, np.int64)
    new[order] = np.arange(k)
    return np.where(labels >= 0, new[np.maximum(labels, 0)], -1)


def _summary(space: Space, labels, distance, k, metric: str | None) -> tuple[pl.DataFrame, str | None]:
    from .suggest import pick_metric

    try:
        metric_name = pick_metric(space, metric)
        values = space.metric(metric_name)
    except BadInput:
        if metric:
            raise
        metric_name, values = None, np.full(len(space), np.nan)
    runs = space.runs.select("run_id", "strategy_id", "universe_id").with_columns(
        cluster=pl.Series(labels), distance=pl.Series(distance), value=pl.Series(values)
    ).filter(pl.col("cluster") >= 0)
    stats = (
        runs.group_by("cluster")
        .agg(
            size=pl.len(),
            mean=pl.col("value").drop_nans().mean(),
            std=pl.col("value").drop_nans().std(),
            representative=pl.col("run_id").sort_by("distance").first(),
        )
        .sort("cluster")
    )
    strategies = _dominant(runs, "strategy_id", "strategies")
    universes = _dominant(runs, "universe_id", "universes")
    apart = _sets_apart(space, runs, k)
    summary = (
        stats.join(strategies, on="cluster", how="left")
        .join(universes, on="cluster", how="left")
        .join(apart, on="cluster", how="left")
        .sort("cluster")
    )
    return summary, metric_name


def _dominant(runs: pl.DataFrame, column: str, name: str, top: int = 2) -> pl.DataFrame:
    """Per cluster, its most frequent values of ``column`` with their shares, as text."""
    counts = runs.group_by("cluster", column).agg(n=pl.len()).with_columns(share=pl.col("n") / pl.col("n").sum().over("cluster"))
    counts = counts.sort(["cluster", "n", column], descending=[False, True, False], nulls_last=True)
    label = pl.format("{} {}%", pl.col(column).fill_null("(none)"), (pl.col("share") * 100).round(0).cast(pl.Int64))
    return counts.group_by("cluster", maintain_order=True).agg(label.head(top).str.join(", ").alias(name))


def _sets_apart(space: Space, runs: pl.DataFrame, k: int) -> pl.DataFrame:
    """Per cluster, the config paths (weighted by the model) whose values set it apart."""
    import duckdb

    from ..models.encoders.base import split_top_level
    from ..models.encoders.v2 import by_path
    from ..pipeline.unnest import collect_config


    sample = with_random_rank(runs, "cluster", 0).filter(pl.col("rank") <= CONFIGS_PER_CLUSTER)
    ids = sample.get_column("run_id").to_list()
    configs = space.configs(ids)
    texts = pa.array([json.dumps(configs.get(r, {})) for r in ids], pa.string())
    clusters = sample.get_column("cluster").to_numpy()
    con = duckdb.connect()
    objects, _ = split_top_level(con, texts, "config_json")
    values = by_path(collect_config(con, objects))
    model = space.model.v2()
    scored: list[list[tuple[float, str]]] = [[] for _ in range(k)]
    n = len(ids)
    for path, v in values.items():  # a loop over paths
        m = model.config_paths.get(path)
        if m is None or m.branch not in ("config", "env"):
            continue
        if v.strings and m.string is not None and m.string.weight > 0:
            rows = np.concatenate(v.string_rows)
            strings = pa.concat_arrays([s.cast(pa.string()) for s in v.strings]).to_numpy(zero_copy_only=False)
            frame = pl.DataFrame({"row": rows, "value": strings}).unique()
            frame = frame.with_columns(cluster=pl.Series(clusters[frame.get_column("row").to_numpy()]))
            inside = frame.group_by("cluster", "value").agg(n=pl.len())
            total = frame.group_by("value").agg(all=pl.len())
            size = pl.DataFrame({"cluster": np.arange(k), "size": np.bincount(clusters, minlength=k)})
            best = (
                inside.join(total, on="value").join(size, on="cluster")
                .with_columns(share=pl.col("n") / pl.col("size"), other=(pl.col("all") - pl.col("n")) / np.maximum(n - pl.col("size"), 1))
                .with_columns(lift=pl.col("share") - pl.col("other"))
                .sort(["cluster", "lift", "value"], descending=[False, True, False])
                .group_by("cluster", maintain_order=True).first()
            )
            for c, value, share, other, lift in best.select("cluster", "value", "share", "other", "lift").iter_rows():
                scored[c].append((lift * m.string.weight, f"{path}={value} ({share:.0%} vs {other:.0%})"))
        if v.numbers and m.number is not None and m.number.weight > 0:
            rows = np.concatenate(v.number_rows)
            nums = np.concatenate(v.numbers)
            frame = pl.DataFrame({"row": rows, "x": nums}).group_by("row").agg(pl.col("x").mean())
            frame = frame.with_columns(cluster=pl.Series(clusters[frame.get_column("row").to_numpy()]))
            iqr = max(float(frame.get_column("x").quantile(0.75) - frame.get_column("x").quantile(0.25)), 1e-12)
            overall = frame.get_column("x").median()
            for c, median in frame.group_by("cluster").agg(pl.col("x").median()).iter_rows():
                others = frame.filter(pl.col("cluster") != c).get_column("x").median()
                others = overall if others is None else others
                gap = min(abs(median - others) / iqr, 1.0) if abs(median - others) / iqr >= 0.5 else 0.0
                scored[c].append((gap * m.number.weight, f"{path}~{_short(median)} (vs {_short(others)})"))
    # a value at least 20 points more common inside, a median at least half an IQR away
    text = ["; ".join(label for _, label in sorted((t for t in items if t[0] >= 0.2), key=lambda t: -t[0])[:3]) for items in scored]
    return pl.DataFrame({"cluster": np.arange(k, dtype=np.int64), "sets_apart": text})


def _short(x: float) -> str:
    return f"{x:.4g}"


def write_assignments(clustering: Clustering, path: str | os.PathLike) -> Path:
    """``clustering.assignments`` as Parquet at ``path`` (written beside it, then moved in)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise BadInput(f"the folder `{path.parent}` does not exist", "create it first")
    table = clustering.assignments.with_columns(model_id=pl.lit(clustering.model_id), on=pl.lit(clustering.on)).to_arrow()
    part = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, part, compression="zstd")
    os.replace(part, path)
    return path


def snapshot_clusters_path(snapshot: str | os.PathLike, model_id: str, on: str) -> Path:
    """Where a snapshot keeps a model's clusters on a slice: clusters/<model>/<on>.parquet."""
    from ..snapshot import model_dir_name

    return Path(snapshot) / "clusters" / model_dir_name(model_id) / f"{on}.parquet"
