"""Demo: the whole pipeline on an embedded DuckDB file, in one call.

``run_demo(runs, directory, echo)`` makes ``directory`` (if needed), replaces
the demo's own files there (``metabatch-demo.duckdb`` and the
``metabatch-demo-snapshot`` folder; nothing else is touched), then runs
migrate, seed, backfill, a Parquet snapshot export, a few ``show`` rows, the
10 nearest neighbours of one run and one ad-hoc SQL query, printing each step
with its time through ``echo``. Returns a ``DemoResult``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .urls import DatabaseURL, parse_url

DEFAULT_RUNS = 20_000
DEFAULT_DIR = "metabatch-demo"
DB_FILE = "metabatch-demo.duckdb"
SNAPSHOT_DIR = "metabatch-demo-snapshot"
SEED = 7
NEIGHBOURS = 10


@dataclass
class DemoResult:
    database: Path
    snapshot: Path
    url: DatabaseURL
    runs_seeded: int = 0
    written: int = 0
    skipped: int = 0
    rejected: int = 0
    snapshot_rows: int = 0
    shown: list[dict] = field(default_factory=list)
    query_run_id: str | None = None
    neighbours: list[dict] = field(default_factory=list)
    sql: str = ""
    sql_answer: list[dict] = field(default_factory=list)
    step_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0


def _remove_own_files(directory: Path) -> None:
    """Only the demo's own names: the database (and its WAL) and the snapshot folder."""
    for name in (DB_FILE, DB_FILE + ".wal"):
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
        "SELECT run_id, strategy_id, sharpe, max_drawdown FROM runs\n"
        f"WHERE run_id IN ({ids})\n"
        "ORDER BY sharpe DESC NULLS LAST LIMIT 1"
    )


def run_demo(
    runs: int = DEFAULT_RUNS,
    directory: str | os.PathLike = DEFAULT_DIR,
    echo: Callable[[str], Any] = print,
) -> DemoResult:
    """Run the pipeline end to end on ``directory``/metabatch-demo.duckdb (see the module docstring)."""
    from . import query
    from .backfill import backfill
    from .migrate import migrate
    from .seed import seed_runs
    from .snapshot import check_out_folder, export_parquet

    started = time.perf_counter()
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    check_out_folder(directory / SNAPSHOT_DIR)  # before any work: refuse a foreign folder of that name
    _remove_own_files(directory)
    database = directory / DB_FILE
    url = parse_url(f"duckdb://{database}")
    result = DemoResult(database=database, snapshot=directory / SNAPSHOT_DIR, url=url)
    steps = 7
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
        result.runs_seeded = seed_runs(url, runs, SEED)
        return f"{result.runs_seeded:,} runs written to backtest_runs (seed {SEED})", None

    def do_backfill():
        summary = backfill(url)
        result.written, result.skipped, result.rejected = summary.written, summary.skipped, len(summary.rejected)
        return (
            f"{summary.written:,} embeddings written to joint_embeddings from {summary.runs_read:,} runs"
            f" ({summary.skipped} skipped, {len(summary.rejected)} rejected; {summary.runs_per_second:,.0f} runs/s)"
        ), None

    def do_snapshot():
        summary = export_parquet(result.snapshot, url, url)
        result.snapshot_rows = summary.embeddings
        return f"{summary.embeddings:,} embeddings and {summary.runs:,} runs as Parquet in {result.snapshot}", None

    def do_show():
        frame = query.show(snapshot=result.snapshot, limit=5)
        result.shown = frame.to_dicts()
        return f"the first {frame.height} embeddings by as_of_date", query.format_frame(frame, "table", 4)

    def do_similar():
        if not result.shown:
            return "no embedding to start from", None
        # The shown run with the smallest norm: in a run whose config holds a large number
        # (initial_capital) that one feature dominates, and every cosine is then ~1.
        result.query_run_id = min(result.shown, key=lambda r: (r["l2_norm"], r["run_id"]))["run_id"]
        frame = query.similar(result.query_run_id, snapshot=result.snapshot, top_k=NEIGHBOURS)
        result.neighbours = frame.to_dicts()
        return (
            f"the {frame.height} nearest neighbours of run {result.query_run_id} (cosine)",
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

    step(1, "migrate", do_migrate)
    step(2, "seed", do_seed)
    step(3, "backfill", do_backfill)
    step(4, "snapshot", do_snapshot)
    step(5, "show", do_show)
    step(6, "similar", do_similar)
    step(7, "sql", do_sql)

    result.total_seconds = time.perf_counter() - started
    echo(f"done in {result.total_seconds:.1f}s. Files:")
    echo(f"  database: {database}  (backtest_runs, joint_embeddings)")
    echo(f"  snapshot: {result.snapshot}  (Parquet: embeddings/, runs/; manifest.json)")
    run = result.query_run_id or "RUN_ID"
    echo("Try next:")
    echo(f"  metabatch show --runtime-url {url.raw} --strategy-id CRYPTO_TREND --limit 5 --format table")
    echo(f"  metabatch similar --snapshot {result.snapshot} --run-id {run} --top-k 5 --format table")
    echo(f"  metabatch sql --snapshot {result.snapshot} \"SELECT strategy_id, count(*) AS runs, avg(sharpe) FROM runs GROUP BY 1\"")
    return result
