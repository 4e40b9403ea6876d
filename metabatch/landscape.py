"""Landscape: a 2-D map of a v2 model's runs, as a page or a picture.

``draw_landscape(model_id, out="landscape.html", color="annualised_sharpe", snapshot=...)``
lays the runs out with a PCA of one slice (``joint`` by default: fast and
deterministic; scikit-learn's ``PCA``, fitted on up to ``PCA_SAMPLE`` of the
points drawn) and draws them coloured by a metric, by ``cluster`` (from
``metabatch cluster``), by ``strategy`` or by ``universe``.

- More runs than ``MAX_POINTS``: a stratified sample is drawn (by the colour's
  categories, or by strategy for a metric: each stratum in proportion, at least
  one run each), and the page says how many of how many it shows.
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
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import vl_convert  # vl-convert-python: the page's inlined Vega scripts and the PNG (4 ms to import)

from .errors import BadInput
from .space import Space, open_space

MAX_POINTS = 60_000
PCA_SAMPLE = 50_000
HOVER_PATHS = 3
CATEGORIES = 20  # more categories than this: the rest are drawn as "other"


@dataclass
class Landscape:
    path: Path
    points: int
    runs: int
    color: str
    on: str
    explained: tuple[float, float]
    sampled_by: str | None  # the stratum of the sample, None when every run is drawn


def draw_landscape(
    model_id: str,
    *,
    out: str | os.PathLike,
    color: str = "annualised_sharpe",
    on: str = "joint",
    snapshot: str | os.PathLike | None = None,
    historical_url=None,
    runtime_url=None,
    clusters: str | os.PathLike | None = None,
    max_points: int = MAX_POINTS,
    seed: int = 0,
    strategy_id: str | Sequence[str] | None = None,
    start: dt.date | None = None,
    end: dt.date | None = None,
) -> Landscape:
    """See the module docstring; returns what was drawn, and where."""
    from sklearn.decomposition import PCA

    out = Path(out)
    if out.suffix.lower() not in (".html", ".png"):
        raise BadInput(f"--out {out}: end it with .html (an interactive page) or .png (a picture)")
    if not out.parent.is_dir():
        raise BadInput(f"the folder `{out.parent}` does not exist", "create it first")
    if max_points < 10:
        raise BadInput("--max-points must be >= 10")
    strategy_ids = [strategy_id] if isinstance(strategy_id, str) else list(strategy_id or [])
    space = open_space(model_id, snapshot=snapshot, historical_url=historical_url, runtime_url=runtime_url, strategy_ids=strategy_ids, start=start, end=end)
    held = np.flatnonzero(space.held(on))
    if not len(held):
        raise BadInput(f"no run has features in the {on} slice")
    frame = space.runs.select("run_id", "strategy_id", "universe_id").with_row_index("position")[held]
    frame, color_title, kind = _with_color(space, frame, color, on, clusters, snapshot)
    sampled_by = None
    if frame.height > max_points:
        stratum = "color" if kind == "nominal" else "strategy_id"
        sampled_by = color_title if kind == "nominal" else "strategy"
        frame = _stratified(frame, stratum, max_points, seed)
    positions = frame.get_column("position").to_numpy()
    points = space.unit_rows(on, positions)
    fit_rows = points if len(points) <= PCA_SAMPLE else points[np.random.default_rng(seed).choice(len(points), PCA_SAMPLE, replace=False)]
    pca = PCA(n_components=2, random_state=seed).fit(fit_rows)
    xy = pca.transform(points)
    explained = tuple(float(v) for v in (list(pca.explained_variance_ratio_) + [0.0, 0.0])[:2])
    frame = frame.with_columns(pc1=pl.Series(np.round(xy[:, 0], 5)), pc2=pl.Series(np.round(xy[:, 1] if xy.shape[1] > 1 else 0.0 * xy[:, 0], 5)))
    frame, hover = _with_config_values(space, frame)
    caption = (
        f"{frame.height:,} runs" + (f" of {len(held):,} (a sample stratified by {sampled_by})" if sampled_by else "")
        + f" · model {model_id} · {on} slice · PCA: {explained[0]:.0%} + {explained[1]:.0%} of the variance"
    )
    chart = _chart(frame, color_title, kind, hover, explained, caption)
    part = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if out.suffix.lower() == ".png":
        part.write_bytes(vl_convert.vegalite_to_png(chart.to_dict(), scale=1.0))
    else:
        part.write_text(_page(chart.to_dict(), f"Landscape of {model_id}", caption, frame.height), encoding="utf-8")
    os.replace(part, out)
    return Landscape(out, frame.height, len(held), color_title, on, explained, sampled_by)


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


def _stratified(frame: pl.DataFrame, column: str, count: int, seed: int) -> pl.DataFrame:
    """``count`` rows (about), each stratum of ``column`` in proportion and at least one."""
    sizes = frame.group_by(column).agg(n=pl.len())
    total = frame.height
    quota = sizes.with_columns(quota=pl.max_horizontal(pl.lit(1), (pl.col("n").cast(pl.Float64) * count / total).floor().cast(pl.Int64)))
    ranked = with_random_rank(frame, column, seed)
    return ranked.join(quota.select(column, "quota"), on=column, how="left", nulls_equal=True).filter(pl.col("rank") <= pl.col("quota")).drop("rank", "quota").sort("position")


def with_random_rank(frame: pl.DataFrame, column: str, seed: int) -> pl.DataFrame:
    """``frame`` with ``rank``: each row's rank (1, 2, ...) within its ``column``
    group, in a random order fixed by ``seed``."""
    keyed = frame.with_columns(_key=pl.Series(np.random.default_rng(seed).random(frame.height)))
    return keyed.with_columns(rank=pl.col("_key").rank("ordinal").over(column)).drop("_key")


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


def _chart(frame: pl.DataFrame, color_title: str, kind: str, hover: list[str], explained, caption: str):
    import altair as alt

    data = frame.select("run_id", "strategy_id", "universe_id", "pc1", "pc2", "color", *hover)
    if kind == "nominal":
        top = data.group_by("color").agg(n=pl.len()).sort(["n", "color"], descending=[True, False]).head(CATEGORIES).get_column("color")
        data = data.with_columns(color=pl.when(pl.col("color").is_in(top.implode())).then(pl.col("color")).otherwise(pl.lit("other")))
        color = alt.Color("color:N", title=color_title, scale=alt.Scale(scheme="category20"))
    else:
        color = alt.Color("color:Q", title=color_title, scale=alt.Scale(scheme="viridis"))
    tooltip = [
        alt.Tooltip("run_id:N", title="run"),
        alt.Tooltip("strategy_id:N", title="strategy"),
        alt.Tooltip("universe_id:N", title="universe"),
        alt.Tooltip(f"color:{'N' if kind == 'nominal' else 'Q'}", title=color_title, **({} if kind == "nominal" else {"format": ".3f"})),
        *[alt.Tooltip(f"{h}:N", title=h.removeprefix("config.")) for h in hover],
    ]
    alt.data_transformers.disable_max_rows()
    return (
        alt.Chart(data.to_arrow(), title=alt.Title("Landscape of the runs", subtitle=caption))
        .mark_circle(size=14, opacity=0.65)
        .encode(
            x=alt.X("pc1:Q", title=f"PC1 ({explained[0]:.0%} of the variance)"),
            y=alt.Y("pc2:Q", title=f"PC2 ({explained[1]:.0%})"),
            color=color,
            tooltip=tooltip,
        )
        .properties(width=900, height=650)
        .interactive()
    )


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
  if (node.marktype === "symbol") return (node.items || []).length;
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
