"""Landscape: a 2-D map of a v2 model's runs, as a page or a picture.

``draw_landscape(model_id, out="landscape.html", color="annualised_sharpe", snapshot=...)``
lays out the runs of one slice (``joint`` by default) and draws them coloured
by a metric, by ``cluster`` (from ``metabatch cluster``), by ``strategy`` or by
``universe``. It returns a ``Landscape``: where the file is, what was drawn,
and every drawn run's coordinates (``coordinates``: run_id, x, y).

- Layout ``tsne`` (the default): openTSNE's t-SNE, which keeps each run's
  neighbours (trustworthiness at k = 10 0.9996-0.9998 on the demo's runs
  against 0.906-0.998 for PCA; ``benchmarks/bench_landscape.py``). The slice
  is reduced to ``TSNE_PCS`` principal components; up to ``TSNE_SAMPLE`` runs
  (a sample stratified like the one below, at least ``TSNE_MIN_PER_STRATUM``
  of each stratum) are laid out by t-SNE and the others placed at the median
  of their 10 nearest laid-out runs (openTSNE's ``prepare_partial``), so the
  time does not grow with the runs drawn beyond that. Deterministic for a
  ``seed`` (exact nearest neighbours, PCA initialisation). Near points are
  alike; the distance between two groups says little. Fewer than
  ``TSNE_MIN_RUNS`` runs are laid out by PCA.
- Layout ``pca``: scikit-learn's ``PCA`` (fitted on up to ``PCA_SAMPLE``
  runs): the axes and distances mean something, neighbours overlap more.
- More runs than ``MAX_POINTS``: a stratified sample is drawn (by the colour's
  categories, or by strategy for a metric: each stratum in proportion, at least
  one run each), and the page says how many of how many it shows.
- Categories (clusters, strategies, universes) each get their own colour
  (colorcet's Glasbey palette: up to ``CATEGORIES``, the smallest beyond in
  grey as "other"), the legend in order (clusters by number); with more than
  ``LABELLED`` categories each is also labelled at its centre. A metric with
  a point that is neither good nor bad (``NEUTRAL``: Sharpe-like ratios,
  returns, alpha and P&L at 0, a profit factor at 1) gets a diverging scale,
  red below it, grey at it, blue above; any other metric a sequential one
  (viridis). Both span the metric's 1st to 99th percentile.
- ``.html``: a self-contained page (the Vega, Vega-Lite and Vega-Embed scripts
  inlined, nothing fetched from the network) where hovering a point names the
  run, its strategy, universe, the colour's value and the values of the
  config paths that tell runs apart most (the model's highest weights); the
  page records how many points Vega drew in ``data-rendered-points``.
- ``.png``: a picture for reports, rendered without a browser.

Altair builds the chart and vl-convert renders it: one library that does both
offline (plotly's pictures need a Chrome at hand).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl
import vl_convert  # vl-convert-python: the page's inlined Vega scripts and the PNG (4 ms to import)

from ..errors import BadInput
from .space import Space, open_space, with_random_rank

LAYOUTS = ("tsne", "pca")
MAX_POINTS = 60_000
PCA_SAMPLE = 50_000
TSNE_SAMPLE = 10_000  # runs laid out by t-SNE; the others are placed among them
TSNE_MIN_PER_STRATUM = 50
TSNE_MIN_RUNS = 100
TSNE_PCS = 50
HOVER_PATHS = 3
CATEGORIES = 60  # more categories than this: the smallest are drawn as "other"
LABELLED = 20  # more categories than this: each is labelled at its centre too
# Metrics with a value that means "neither good nor bad" (fnmatch on the name, lower case).
NEUTRAL = (
    (("*sharpe*", "*sortino*", "*calmar*", "*information_ratio*", "*cagr*", "*return*", "*alpha*", "*pnl*"), 0.0),
    (("*profit_factor*",), 1.0),
)
GREY = "#bdbdbd"  # "other" and "(none)"
BELOW, NEITHER, ABOVE = "#c0392b", "#b3b3b3", "#1f5fa8"  # a diverging metric: red, grey at the neutral value, blue


@dataclass
class Landscape:
    path: Path
    points: int
    runs: int
    color: str
    on: str
    layout: str  # "tsne" or "pca" (the one used)
    explained: tuple[float, float] | None  # PCA: the variance the two axes keep
    sampled_by: str | None  # the stratum of the sample, None when every run is drawn
    coordinates: pl.DataFrame  # run_id, x, y of every run drawn


def draw_landscape(
    model_id: str,
    *,
    out: str | os.PathLike,
    color: str = "annualised_sharpe",
    on: str = "joint",
    layout: str = "tsne",
    snapshot: str | os.PathLike | None = None,
    historical_url=None,
    runtime_url=None,
    clusters: str | os.PathLike | None = None,
    max_points: int = MAX_POINTS,
    seed: int = 0,
    strategy_id: str | Sequence[str] | None = None,
    start: dt.date | None = None,
    end: dt.date | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Landscape:
    """See the module docstring; returns what was drawn, and where."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".png"):
        raise BadInput(f"--out {out}: end it with .html (an interactive page) or .png (a picture)")
    if not out.parent.is_dir():
        raise BadInput(f"the folder `{out.parent}` does not exist", "create it first")
    if max_points < 10:
        raise BadInput("--max-points must be >= 10")
    if layout not in LAYOUTS:
        raise BadInput(f"--layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    progress = on_progress or (lambda _message: None)
    strategy_ids = [strategy_id] if isinstance(strategy_id, str) else list(strategy_id or [])
    space = open_space(model_id, snapshot=snapshot, historical_url=historical_url, runtime_url=runtime_url, strategy_ids=strategy_ids, start=start, end=end)
    held = np.flatnonzero(space.held(on))
    if not len(held):
        raise BadInput(f"no run has features in the {on} slice")
    frame = space.runs.select("run_id", "strategy_id", "universe_id").with_row_index("position")[held]
    frame, color_title, kind = _with_color(space, frame, color, on, clusters, snapshot)
    stratum = "color" if kind == "nominal" else "strategy_id"
    sampled_by = None
    if frame.height > max_points:
        sampled_by = color_title if kind == "nominal" else "strategy"
        frame = _stratified(frame, stratum, max_points, seed)
    points = space.unit_rows(on, frame.get_column("position").to_numpy())
    used = layout if layout == "pca" or len(points) >= TSNE_MIN_RUNS else "pca"
    progress(f"laying out {len(points):,} runs ({'t-SNE' if used == 'tsne' else 'PCA'})")
    if used == "tsne":
        laid = _layout_sample(frame, stratum, seed)
        xy, explained = tsne_layout(points, laid, seed), None
    else:
        xy, explained = pca_layout(points, seed)
    decimals = max(0, 4 - math.floor(math.log10(max(float(np.ptp(xy)), 1e-9))))  # 4 significant digits of the map's width
    frame = frame.with_columns(x=pl.Series(np.round(xy[:, 0], decimals)), y=pl.Series(np.round(xy[:, 1], decimals)))
    progress("drawing")
    frame, hover = _with_config_values(space, frame)
    how = (
        "t-SNE: near runs are alike, the distance between two groups says little"
        if used == "tsne"
        else f"PCA: {explained[0]:.0%} + {explained[1]:.0%} of the variance"
    )
    caption = (
        f"{frame.height:,} runs" + (f" of {len(held):,} (a sample stratified by {sampled_by})" if sampled_by else "")
        + f" · model {model_id} · {on} slice · {how}"
    )
    chart = _chart(frame, color_title, kind, hover, explained, caption)
    part = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if out.suffix.lower() == ".png":
        part.write_bytes(vl_convert.vegalite_to_png(chart.to_dict(), scale=1.0))
    else:
        part.write_text(_page(chart.to_dict(), f"Landscape of {model_id}", caption, frame.height), encoding="utf-8")
    os.replace(part, out)
    coordinates = frame.select("run_id", "x", "y")
    return Landscape(out, frame.height, len(held), color_title, on, used, explained, sampled_by, coordinates)


def pca_layout(points: np.ndarray, seed: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The rows of ``points`` on their first two principal components (fitted on up
    to ``PCA_SAMPLE`` of them), and the share of the variance each keeps."""
    from sklearn.decomposition import PCA

    if len(points) < 2:  # one run: a point at the origin (PCA has no variance to share)
        return np.zeros((len(points), 2)), (0.0, 0.0)
    fit_rows = points if len(points) <= PCA_SAMPLE else points[np.random.default_rng(seed).choice(len(points), PCA_SAMPLE, replace=False)]
    pca = PCA(n_components=min(2, *fit_rows.shape), random_state=seed).fit(fit_rows)
    xy = np.zeros((len(points), 2))
    xy[:, : pca.n_components_] = pca.transform(points)
    explained = tuple(float(v) for v in (list(pca.explained_variance_ratio_) + [0.0, 0.0])[:2])
    return xy, explained


def tsne_layout(points: np.ndarray, laid: np.ndarray, seed: int) -> np.ndarray:
    """The rows of ``points`` (L2-normalised slices) in 2-D by openTSNE's t-SNE: the
    rows ``laid`` (positions) are laid out, every other row is placed at the median
    of its 10 nearest laid-out rows. Deterministic for ``seed``, whatever the
    number of threads."""
    import openTSNE
    from sklearn.decomposition import PCA

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    pcs = min(TSNE_PCS, points.shape[1], len(laid))
    # The usual first step of a t-SNE: the neighbours of the main components, found exactly.
    # (covariance_eigh: one small eigenproblem of dims x dims, as many rows as there are.)
    pca = PCA(n_components=pcs, svd_solver="covariance_eigh", random_state=seed).fit(points[laid])
    reduced = pca.transform(points).astype(np.float32)
    affinities = openTSNE.affinity.PerplexityBasedNN(
        reduced[laid], perplexity=min(30.0, (len(laid) - 1) / 3), method="exact", n_jobs=threads, random_state=seed,
    )
    start = openTSNE.initialization.pca(reduced[laid], random_state=seed)
    # FFT gradients: Barnes-Hut (openTSNE's choice below 10,000 rows) crawls on the many
    # identical points of a slice (runs that differ only in noise paths). ints_in_interval=2:
    # half the default grid per side (measured: the same trustworthiness, 2x faster).
    embedding = openTSNE.TSNEEmbedding(
        start, affinities, n_jobs=threads, random_state=seed, negative_gradient_method="fft", ints_in_interval=2,
    )
    # 250 early-exaggeration iterations (openTSNE's default), then 300 (its default is 500:
    # measured, the same trustworthiness on the demo's runs, 40% less time).
    embedding = embedding.optimize(n_iter=250, exaggeration=12).optimize(n_iter=300)
    xy = np.empty((len(points), 2))
    xy[laid] = np.asarray(embedding)
    rest = np.setdiff1d(np.arange(len(points)), laid)
    if len(rest):
        xy[rest] = np.asarray(embedding.prepare_partial(reduced[rest], initialization="median", k=10, perplexity=5))
    return xy


def _layout_sample(frame: pl.DataFrame, stratum: str, seed: int) -> np.ndarray:
    """The positions (row numbers of ``frame``) that t-SNE lays out: every row, or
    ``TSNE_SAMPLE`` stratified by ``stratum`` with at least ``TSNE_MIN_PER_STRATUM`` each."""
    if frame.height <= TSNE_SAMPLE:
        return np.arange(frame.height)
    rows = frame.select(stratum).with_row_index("position")
    return _stratified(rows, stratum, TSNE_SAMPLE, seed, minimum=TSNE_MIN_PER_STRATUM).get_column("position").to_numpy()


def _with_color(space: Space, frame: pl.DataFrame, color: str, on: str, clusters, snapshot) -> tuple[pl.DataFrame, str, str]:
    """The frame with a ``color`` column; its title and Vega-Lite type."""
    if color in ("strategy", "strategy_id"):
        return frame.with_columns(color=pl.col("strategy_id").fill_null("(none)")), "strategy", "nominal"
    if color in ("universe", "universe_id"):
        return frame.with_columns(color=pl.col("universe_id").fill_null("(none)")), "universe", "nominal"
    if color == "cluster":
        from .cluster import snapshot_clusters_path

        path = Path(clusters) if clusters else (snapshot_clusters_path(snapshot, space.model.model_id, on) if snapshot else None)
        if path is None or not path.exists():
            raise BadInput(
                "--color cluster needs clusters of these runs",
                f"run `metabatch cluster --model-id {space.model.model_id} --on {on}` first"
                + ("" if snapshot else " with --out FILE.parquet, then pass --clusters FILE.parquet"),
            )
        assigned = pl.read_parquet(path, columns=["run_id", "cluster"])
        frame = frame.join(assigned, on="run_id", how="left").with_columns(
            color=pl.when(pl.col("cluster").is_null()).then(pl.lit("(none)")).otherwise(pl.col("cluster").cast(pl.String))
        )
        return frame.drop("cluster"), "cluster", "nominal"
    values = space.metric(color)  # BadInput listing the metrics
    return frame.with_columns(color=pl.Series(values[frame.get_column("position").to_numpy()]).fill_nan(None)), color, "quantitative"


def _stratified(frame: pl.DataFrame, column: str, count: int, seed: int, minimum: int = 1) -> pl.DataFrame:
    """``count`` rows (about), each stratum of ``column`` in proportion and at least
    ``minimum`` (or all of it)."""
    sizes = frame.group_by(column).agg(n=pl.len())
    total = frame.height
    share = (pl.col("n").cast(pl.Float64) * count / total).floor().cast(pl.Int64)
    quota = sizes.with_columns(quota=pl.max_horizontal(pl.min_horizontal(pl.col("n"), pl.lit(minimum)), share))
    ranked = with_random_rank(frame, column, seed)
    return ranked.join(quota.select(column, "quota"), on=column, how="left", nulls_equal=True).filter(pl.col("rank") <= pl.col("quota")).drop("rank", "quota").sort("position")


def hover_paths(space: Space, count: int = HOVER_PATHS) -> list[str]:
    """The config paths that tell runs apart most: the highest fitted weights,
    strings first, among paths most runs hold."""
    model = space.model.v2()
    scored = []
    for path, m in model.config_paths.items():
        if m.branch != "config":
            continue
        if m.string is not None and m.string.runs >= model.sample_runs / 2:
            scored.append((m.string.weight, 1, path))
        elif m.number is not None and m.number.weight > 0:
            scored.append((m.number.weight, 0, path))
    scored.sort(key=lambda s: (-s[0], -s[1], s[2]))
    return [path for weight, _, path in scored[:count] if weight > 0]


def _with_config_values(space: Space, frame: pl.DataFrame) -> tuple[pl.DataFrame, list[str]]:
    """The frame with the values of ``hover_paths`` for its runs (read with DuckDB from the snapshot's runs)."""
    import duckdb

    from .environments import extract_env_values, json_path

    paths = hover_paths(space)
    if not paths:
        return frame, []
    pointers = {path: json_path(space.model.v2(), path) for path in paths}
    files = [str(space.folder / f) for f in space.manifest["runs"]["files"]]
    con = duckdb.connect()
    con.register("mb_points", frame.select("run_id").to_arrow())
    quoted = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
    configs = con.sql(f"SELECT r.run_id, r.config_json FROM read_parquet({quoted}, union_by_name = true) r SEMI JOIN mb_points USING (run_id)").to_arrow_table()
    values = extract_env_values(con, configs.column("config_json"), pointers)
    table = pl.from_arrow(values).with_columns(run_id=pl.Series(configs.column("run_id").to_pylist()))
    renamed = {p: f"config.{p}" for p in paths}
    table = table.rename(renamed).with_columns([pl.col(c).str.strip_chars('"') for c in renamed.values()])
    return frame.join(table.unique("run_id"), on="run_id", how="left"), list(renamed.values())


def neutral_value(metric: str) -> float | None:
    """The value of ``metric`` that is neither good nor bad (``NEUTRAL``), or None."""
    name = metric.lower()
    for patterns, value in NEUTRAL:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return value
    return None


def category_order(labels: Sequence[str]) -> list[str]:
    """Categories in reading order: numbers by value (0, 1, 2, ..., 10), then text,
    then "(none)" and "other"."""
    last = {"(none)": 1, "other": 2}

    def key(label: str):
        if label in last:
            return (2, last[label], 0, "")
        return (0, 0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, 0, label)

    return sorted(labels, key=key)


def _palette(count: int) -> list[str]:
    """``count`` colours told apart on a white page: colorcet's Glasbey palette
    (Tableau's ten first, then each colour as far as can be from those before),
    less its greys (grey is for "other") and its lightest colours."""
    import colorcet

    return [c for c in colorcet.palette["glasbey_category10"] if _visible(c)][:count]


def _visible(colour: str) -> bool:
    """Not a grey (HLS saturation >= 0.15) nor faint on white (relative luminance <= 0.6)."""
    import colorsys

    r, g, b = (int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return colorsys.rgb_to_hls(r, g, b)[2] >= 0.15 and luminance <= 0.6


def _color_encoding(data: pl.DataFrame, color_title: str, kind: str):
    """The data (categories capped) and the Altair colour encoding."""
    import altair as alt

    if kind == "nominal":
        sizes = data.group_by("color").agg(n=pl.len()).sort(["n", "color"], descending=[True, False])
        if sizes.height > CATEGORIES:
            kept = sizes.head(CATEGORIES - 1).get_column("color")
            data = data.with_columns(color=pl.when(pl.col("color").is_in(kept.implode())).then(pl.col("color")).otherwise(pl.lit("other")))
        domain = category_order(data.get_column("color").unique().to_list())
        named = [c for c in domain if c not in ("(none)", "other")]
        colours = dict(zip(named, _palette(len(named))))
        scale = alt.Scale(domain=domain, range=[colours.get(c, GREY) for c in domain])
        legend = alt.Legend(symbolLimit=0, columns=1 if len(domain) <= 25 else 2, labelLimit=160)
        return data, alt.Color("color:N", title=color_title, scale=scale, legend=legend, sort=domain)
    values = data.get_column("color").drop_nulls()
    low, high = (float(values.quantile(q)) for q in (0.01, 0.99)) if values.len() else (0.0, 1.0)
    mid = neutral_value(color_title)
    if mid is None:
        scale = alt.Scale(scheme="viridis", domain=[low, high], clamp=True)
        title = color_title
    else:
        low, high = min(low, mid), max(high, mid)
        stops = [(v, c) for v, c in ((low, BELOW), (mid, NEITHER), (high, ABOVE)) if v != mid or c == NEITHER]
        scale = alt.Scale(domain=[v for v, _ in stops], range=[c for _, c in stops], interpolate="lab", clamp=True)
        title = f"{color_title} (grey: {mid:g})"
    return data, alt.Color("color:Q", title=title, scale=scale, legend=alt.Legend(gradientLength=300))


def _labels_at_centres(data: pl.DataFrame) -> pl.DataFrame:
    """Each category's label at the centre of each of its pieces (a category can
    lie in a few places of a t-SNE map): the pieces are scikit-learn's DBSCAN
    groups of its points (within 2% of the map's width), those holding at least
    a tenth of the category's points or 100 of them; a label sits on the run
    of the piece nearest the piece's median point."""
    from sklearn.cluster import DBSCAN

    xy = data.select("x", "y").to_numpy()
    reach = 0.02 * float(max(np.ptp(xy[:, 0]), np.ptp(xy[:, 1]), 1e-9))
    labelled = data.filter(~pl.col("color").is_in(["other", "(none)"])).with_row_index("row")
    pieces = np.full(labelled.height, -1)
    for _, group in labelled.group_by("color"):  # one DBSCAN per category
        rows = group.get_column("row").to_numpy()
        found = DBSCAN(eps=reach, min_samples=3).fit_predict(group.select("x", "y").to_numpy())
        sizes = np.bincount(found[found >= 0]) if (found >= 0).any() else np.zeros(0, int)
        big = np.flatnonzero((sizes >= 0.1 * len(rows)) | (sizes >= 100))
        keep = np.isin(found, big)
        pieces[rows[keep]] = found[keep]
    with_piece = labelled.with_columns(piece=pl.Series(pieces)).filter(pl.col("piece") >= 0)
    medians = with_piece.group_by("color", "piece").agg(mx=pl.col("x").median(), my=pl.col("y").median())
    return (
        with_piece.join(medians, on=["color", "piece"])
        .with_columns(d=(pl.col("x") - pl.col("mx")) ** 2 + (pl.col("y") - pl.col("my")) ** 2)
        .sort("d", "run_id")
        .group_by("color", "piece", maintain_order=True)
        .first()
        .select("color", "x", "y")
        .sort("color", "x", "y")
    )


def _axis_domain(values: pl.Series) -> list[float]:
    """The values' range with a 3% margin each side (no point or label cut at the edge)."""
    low, high = float(values.min()), float(values.max())
    margin = 0.03 * max(high - low, 1e-9)
    return [low - margin, high + margin]


def _chart(frame: pl.DataFrame, color_title: str, kind: str, hover: list[str], explained, caption: str):
    import altair as alt

    data = frame.select("run_id", "strategy_id", "universe_id", "x", "y", "color", *hover)
    data, color = _color_encoding(data, color_title, kind)
    tooltip = [
        alt.Tooltip("run_id:N", title="run"),
        alt.Tooltip("strategy_id:N", title="strategy"),
        alt.Tooltip("universe_id:N", title="universe"),
        alt.Tooltip(f"color:{'N' if kind == 'nominal' else 'Q'}", title=color_title, **({} if kind == "nominal" else {"format": ".3f"})),
        *[alt.Tooltip(f"{h}:N", title=h.removeprefix("config.")) for h in hover],
    ]
    if explained is None:  # t-SNE: the axes mean nothing
        x = alt.X("x:Q", axis=None, scale=alt.Scale(domain=_axis_domain(data.get_column("x")), nice=False))
        y = alt.Y("y:Q", axis=None, scale=alt.Scale(domain=_axis_domain(data.get_column("y")), nice=False))
    else:
        x = alt.X("x:Q", title=f"PC1 ({explained[0]:.0%} of the variance)")
        y = alt.Y("y:Q", title=f"PC2 ({explained[1]:.0%})")
    alt.data_transformers.disable_max_rows()
    points = (
        alt.Chart(data.to_arrow())
        .mark_circle(size=14, opacity=0.7)
        .encode(x=x, y=y, color=color, tooltip=tooltip)
        .interactive()
    )
    layers = [points]
    if kind == "nominal" and data.get_column("color").n_unique() > LABELLED:
        centres = alt.Chart(_labels_at_centres(data).to_arrow()).encode(x="x:Q", y="y:Q", text="color:N")
        layers += [
            centres.mark_text(fontSize=12, fontWeight="bold", stroke="white", strokeWidth=3, strokeOpacity=0.9),
            centres.mark_text(fontSize=12, fontWeight="bold", color="#111111"),
        ]
    return alt.layer(*layers, title=alt.Title("Landscape of the runs", subtitle=caption)).properties(width=900, height=650)


def _page(spec: dict, title: str, caption: str, points: int) -> str:
    """A self-contained HTML page drawing ``spec`` (scripts inlined)."""
    bundle = vl_convert.javascript_bundle().replace("</script", "<\\/script")
    spec_text = json.dumps(spec, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em}} #status{{color:#555}}</style>
</head><body data-points="{points}">
<h1>{html.escape(title)}</h1>
<p id="status">Drawing {points:,} points…</p>
<div id="map"></div>
<script>{bundle}</script>
<script>
const spec = {spec_text};
function countMarks(node) {{
  if (!node) return 0;
  if (node.marktype === "symbol" && node.role === "mark") return (node.items || []).length;  // not the legend's
  return (node.items || []).reduce((sum, child) => sum + countMarks(child), 0);
}}
vegaEmbed("#map", spec, {{renderer: "canvas", actions: false}}).then(result => {{
  const drawn = countMarks(result.view.scenegraph().root);
  document.body.dataset.renderedPoints = String(drawn);
  document.getElementById("status").textContent = {json.dumps(caption)} + " · hover a point for its run.";
}}).catch(error => {{
  document.body.dataset.renderError = String(error);
  document.getElementById("status").textContent = "The map could not be drawn: " + error;
}});
</script>
</body></html>
"""
