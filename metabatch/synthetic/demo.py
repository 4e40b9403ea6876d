"""Demo: the whole pipeline on an embedded DuckDB file, in one call.

``run_demo(runs, directory, echo)`` makes ``directory`` (if needed), replaces
the demo's own files there (``metabatch-demo.duckdb``, the
``metabatch-demo-snapshot`` folder and ``metabatch-demo-landscape.html``;
nothing else is touched), then runs migrate, seed (labelled research
campaigns: config families tried across environments), backfill with v1 and
with the built-in v2 model (fitted on first use), a Parquet snapshot export, a
few ``show`` rows, the 10 nearest neighbours of one run (v2), one ad-hoc SQL
query, the configs to try in that run's environment (``suggest``), clusters
of the configs (``cluster``) and a landscape page, printing each step with its
time through ``echo``. Returns a ``DemoResult``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..urls import DatabaseURL, parse_url

DEFAULT_RUNS = 20_000
DEFAULT_DIR = "metabatch-demo"
DB_FILE = "metabatch-demo.duckdb"
SNAPSHOT_DIR = "metabatch-demo-snapshot"
LANDSCAPE = "metabatch-demo-landscape.html"
SEED = 7
NEIGHBOURS = 10
V1 = "joint-meta-config-env-v1"
V2 = "joint-meta-config-env-v2"


@dataclass
class DemoResult:
    database: Path
    snapshot: Path
    url: DatabaseURL
    runs_seeded: int = 0
    written: int = 0
    skipped: int = 0
    rejected: int = 0
    written_v2: int = 0
    snapshot_rows: int = 0
    shown: list[dict] = field(default_factory=list)
    query_run_id: str | None = None
    neighbours: list[dict] = field(default_factory=list)
    sql: str = ""
    sql_answer: list[dict] = field(default_factory=list)
    suggestions: list[dict] = field(default_factory=list)
    clusters: int = 0
    landscape: Path | None = None
    step_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0


def _remove_own_files(directory: Path) -> None:
    """Only the demo's own names: the database (and its WAL) and the snapshot folder."""
    for name in (DB_FILE, DB_FILE + ".wal", LANDSCAPE):
        path = directory / name
        if path.is_file() or path.is_symlink():
            path.unlink()
    # A folder of that name that is not a snapshot is left alone: the export then refuses it.
    snapshot = directory / SNAPSHOT_DIR
    if snapshot.is_dir() and not snapshot.is_symlink() and (snapshot / "manifest.json").is_file():
        shutil.rmtree(snapshot)


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.rstrip("\n").splitlines())


def _best_sharpe_sql(run_ids: list[str]) -> str:
    quoted = ["'" + r.replace("'", "''") + "'" for r in run_ids]
    lines = [", ".join(quoted[i:i + 4]) for i in range(0, len(quoted), 4)]
    ids = ",\n                 ".join(lines)
    return (
        "SELECT run_id, strategy_id, annualised_sharpe, max_drawdown FROM runs\n"
        f"WHERE run_id IN ({ids})\n"
        "ORDER BY annualised_sharpe DESC NULLS LAST LIMIT 1"
    )


def run_demo(
    runs: int = DEFAULT_RUNS,
    directory: str | os.PathLike = DEFAULT_DIR,
    echo: Callable[[str], Any] = print,
) -> DemoResult:
    """Run the pipeline end to end on ``directory``/metabatch-demo.duckdb (see the module docstring)."""
    from ..snapshot import query
    from ..pipeline.backfill import backfill
    from ..workflows.cluster import cluster_runs, snapshot_clusters_path, write_assignments
    from ..workflows.landscape import draw_landscape
    from ..stores.migrate import migrate
    from .seed import seed_runs
    from ..snapshot import check_out_folder, export_parquet
    from ..workflows.suggest import plan_suggestions

    started = time.perf_counter()
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    check_out_folder(directory / SNAPSHOT_DIR)  # before any work: refuse a foreign folder of that name
    _remove_own_files(directory)
    database = directory / DB_FILE
    url = parse_url(f"duckdb://{database}")
    result = DemoResult(database=database, snapshot=directory / SNAPSHOT_DIR, url=url)
    steps = 11
    echo(f"metabatch demo: {runs:,} synthetic backtest runs, embedded DuckDB file {database}")

    def step(number: int, name: str, action: Callable[[], tuple[str, str | None]]) -> None:
        t0 = time.perf_counter()
        summary, detail = action()
        seconds = time.perf_counter() - t0
        result.step_seconds[name] = seconds
        echo(f"[{number}/{steps}] {name:<9} {seconds:6.2f}s  {summary}")
        if detail:
            echo(_indent(detail))

    def do_migrate():
        applied = migrate(url)
        return ", ".join(s for names in applied.values() for s in names) + " applied", None

    def do_seed():
        result.runs_seeded = seed_runs(url, runs, SEED, kind="campaigns")
        return f"{result.runs_seeded:,} runs of research campaigns written to backtest_runs (seed {SEED})", None

    def do_backfill():
        summary = backfill(url)
        result.written, result.skipped, result.rejected = summary.written, summary.skipped, len(summary.rejected)
        return (
            f"{summary.written:,} {V1} embeddings written to joint_embeddings from {summary.runs_read:,} runs"
            f" ({summary.skipped} skipped, {len(summary.rejected)} rejected; {summary.runs_per_second:,.0f} runs/s)"
        ), None

    def do_v2():
        summary = backfill(url, model_id=V2)
        result.written_v2 = summary.written
        fitted = summary.fitted or {}
        return (
            f"{summary.written:,} {V2} embeddings: the model was fitted on first use on {fitted.get('runs_read', 0):,} runs"
            f" ({fitted.get('seconds', 0):.1f}s), then every run embedded ({summary.runs_per_second:,.0f} runs/s)"
        ), None

    def do_snapshot():
        summary = export_parquet(result.snapshot, url, url)
        result.snapshot_rows = summary.embeddings
        return f"{summary.embeddings:,} embeddings and {summary.runs:,} runs as Parquet in {result.snapshot}", None

    def do_show():
        frame = query.show(snapshot=result.snapshot, model_id=V2, limit=5)
        result.shown = frame.to_dicts()
        return f"the first {frame.height} embeddings by as_of_date", query.format_frame(frame, "table", 4)

    def do_similar():
        if not result.shown:
            return "no embedding to start from", None
        result.query_run_id = min(r["run_id"] for r in result.shown)
        frame = query.similar(result.query_run_id, snapshot=result.snapshot, model_id=V2, top_k=NEIGHBOURS)
        result.neighbours = frame.to_dicts()
        return (
            f"the {frame.height} nearest neighbours of run {result.query_run_id} in {V2}: same kind of config, same environment",
            query.format_frame(frame, "table", 4),
        )

    def do_sql():
        if not result.neighbours:
            return "no neighbours to ask about", None
        result.sql = _best_sharpe_sql([row["run_id"] for row in result.neighbours])
        frame = query.sql(result.sql, result.snapshot)
        result.sql_answer = frame.to_dicts()
        return "best Sharpe among those neighbours, in DuckDB SQL over the snapshot", (
            result.sql + "\n" + query.format_frame(frame, "table", 4)
        )

    def do_suggest():
        if not result.query_run_id:
            return "no run to start from", None
        planned = plan_suggestions(V2, like_run=result.query_run_id, snapshot=result.snapshot, top_k=3)
        result.suggestions = planned.frame.to_dicts()
        table = planned.frame.select("rank", "mean", "std", "support", "env_cosine", pl_first_run(), "config")
        return (
            f"configs to try in the environment of run {result.query_run_id}, by annualised_sharpe"
            f" (from the {planned.target['neighbourhood']['runs']:,} runs of that environment)",
            query.format_frame(table, "table", 3),
        )

    def do_cluster():
        clustering = cluster_runs(V2, on="config", snapshot=result.snapshot)
        result.clusters = clustering.k
        write_assignments(clustering, _ensure_parent(snapshot_clusters_path(result.snapshot, V2, "config")))
        shown = clustering.summary.select("cluster", "size", "mean", "strategies", "sets_apart").head(5)
        return (
            f"{clustering.k} clusters of the configs (k picked by silhouette); the 5 largest:",
            query.format_frame(shown, "table", 3),
        )

    def do_landscape():
        drawn = draw_landscape(V2, out=directory / LANDSCAPE, color="cluster", on="config", snapshot=result.snapshot)
        result.landscape = drawn.path
        return f"a map of {drawn.points:,} runs (t-SNE of the configs) coloured by cluster: open {drawn.path} in a browser", None

    step(1, "migrate", do_migrate)
    step(2, "seed", do_seed)
    step(3, "backfill", do_backfill)
    step(4, "v2", do_v2)
    step(5, "snapshot", do_snapshot)
    step(6, "show", do_show)
    step(7, "similar", do_similar)
    step(8, "sql", do_sql)
    step(9, "suggest", do_suggest)
    step(10, "cluster", do_cluster)
    step(11, "landscape", do_landscape)

    result.total_seconds = time.perf_counter() - started
    echo(f"done in {result.total_seconds:.1f}s. Files:")
    echo(f"  database: {database}  (backtest_runs, joint_embeddings)")
    echo(f"  snapshot: {result.snapshot}  (Parquet: embeddings/, runs/, models/, clusters/; manifest.json)")
    echo(f"  landscape: {result.landscape}  (open it in a browser; hover a point for its run)")
    run = result.query_run_id or "RUN_ID"
    echo("Try next:")
    echo(f"  metabatch similar --snapshot {result.snapshot} --model-id {V2} --run-id {run} --branch env --top-k 5 --format table")
    echo(f"  metabatch suggest --snapshot {result.snapshot} --model-id {V2} --env market_id=US_EQ --env universe_id=US_EQ_SP500")
    echo(f"  metabatch cluster --snapshot {result.snapshot} --model-id {V2} --on env")
    echo(f"  metabatch sql --snapshot {result.snapshot} \"SELECT strategy_id, count(*) AS runs, avg(annualised_sharpe) FROM runs GROUP BY 1\"")
    return result


def pl_first_run():
    import polars as pl

    return pl.col("run_ids").list.first().alias("best_run")


def _ensure_parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
