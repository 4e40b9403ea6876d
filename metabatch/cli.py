"""The `metabatch` command: a thin layer over the Python API.

Each command parses its options, calls one function of the package and prints
its result. Errors metabatch raises on purpose become one-line messages with
exit status 1 (2 for usage errors); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import os
import sys

import click

from . import __version__
from .errors import BadInput, MetabatchError
from .urls import RUNTIME_ENV, HISTORICAL_ENV, redact, resolve_urls

# --------------------------------------------------------------------------
# Typed parameters


class DateType(click.ParamType):
    name = "YYYY-MM-DD"

    def convert(self, value, param, ctx):
        if isinstance(value, dt.date):
            return value
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not a date like 2025-12-31", param, ctx)


class WeightType(click.ParamType):
    name = "WEIGHT"

    def convert(self, value, param, ctx):
        try:
            weight = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(weight) or weight < 0:
            self.fail(f"{value!r} must be finite and >= 0", param, ctx)
        return weight


DATE = DateType()
WEIGHT = WeightType()


# --------------------------------------------------------------------------
# Shared options


def database_options(func):
    """--runtime-url / --historical-url, resolved into ``urls`` (flag, env, default)."""

    @click.option(
        "--runtime-url",
        metavar="URL",
        help=f"Database holding backtest_runs (default: ${RUNTIME_ENV}, else ./metabatch.duckdb).",
    )
    @click.option(
        "--historical-url",
        metavar="URL",
        help=f"Database holding joint_embeddings (default: ${HISTORICAL_ENV}, else the runtime URL).",
    )
    @functools.wraps(func)
    def wrapper(*args, runtime_url, historical_url, **kwargs):
        urls = resolve_urls(runtime_url, historical_url)
        if urls.defaulted:
            click.echo(
                f"metabatch: no database named (--runtime-url or ${RUNTIME_ENV}); "
                f"using the embedded file {urls.runtime.duckdb_path}",
                err=True,
            )
        return func(*args, urls=urls, **kwargs)

    return wrapper


def progress_reporter(quiet: bool, label: str):
    """A callback (done, total) drawing a progress bar on a terminal, else nothing."""
    if quiet or not sys.stderr.isatty():
        return None, lambda: None
    state = {"bar": None, "done": 0}

    def report(done, total):
        if state["bar"] is None:
            state["bar"] = click.progressbar(length=total or 0, label=label, file=sys.stderr, show_pos=True)
            state["bar"].__enter__()
        state["bar"].update(done - state["done"])
        state["done"] = done

    def finish():
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)

    return report, finish


# --------------------------------------------------------------------------
# The group: errors in one place


class MetabatchGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MetabatchError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"  ({exc.hint})", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted: batches already committed stay; rerun to finish.", err=True)
            ctx.exit(130)
        except Exception as exc:  # the last net: one line, no traceback, no password
            if ctx.obj and ctx.obj.get("debug"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            for url in (os.environ.get(RUNTIME_ENV), os.environ.get(HISTORICAL_ENV)):
                if url:
                    message = message.replace(url, redact(url))
            click.echo(f"Error: {type(exc).__name__}: {message} (rerun with --debug for details)", err=True)
            ctx.exit(1)


@click.group(cls=MetabatchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="metabatch")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx, debug):
    """Columnar batch engine for Meta Config+Env embeddings of backtest runs.

    \b
    Quick start (embedded DuckDB file, no server):
      metabatch demo
    With PostgreSQL:
      export METABATCH_RUNTIME_URL=postgresql://root@127.0.0.1:5432/test
      metabatch migrate && metabatch seed --runs 100000 --seed 7
      metabatch backfill --strategy-id US_EQ_CORE_LONG_EQ --start 2025-01-01 --end 2025-12-31
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


# --------------------------------------------------------------------------
# migrate / seed / backfill


@main.command()
@database_options
def migrate(urls):
    """Create or upgrade the tables metabatch needs (safe to rerun).

    Creates backtest_runs (runtime database) and joint_embeddings (historical
    database) if missing, plus the indexes backfill uses. Never drops or
    rewrites existing data.

    \b
    Example:
      metabatch migrate --runtime-url postgresql://root@127.0.0.1:5432/test
    """
    from .migrate import migrate as run_migrate

    applied = run_migrate(urls.runtime, urls.historical)
    for url, steps in applied.items():
        click.echo(f"{url}: " + (", ".join(steps) + " applied" if steps else "up to date"))


@main.command()
@database_options
@click.option("--runs", "n_runs", type=click.IntRange(min=1), default=10_000, show_default=True, help="How many runs to write.")
@click.option("--seed", type=int, default=7, show_default=True, help="Random seed: same seed, same runs.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def seed(urls, n_runs, seed, quiet):
    """Write realistic synthetic backtest_runs, deterministic for a seed.

    Runs that already exist (same run_id) are left as they are.

    \b
    Example:
      metabatch seed --runs 100000 --seed 7
    """
    from .seed import seed_runs

    report, finish = progress_reporter(quiet, "seeding")
    try:
        inserted = seed_runs(urls.runtime, n_runs, seed, on_progress=report)
    finally:
        finish()
    click.echo(f"seeded {inserted} new runs ({n_runs - inserted} already there) into {urls.runtime}")


@main.command()
@database_options
@click.option("--strategy-id", "strategy_ids", multiple=True, metavar="ID", help="Only runs of this strategy (repeatable).")
@click.option("--start", type=DATE, help="Only runs with end_date >= this date.")
@click.option("--end", type=DATE, help="Only runs with end_date <= this date.")
@click.option("--limit", type=click.IntRange(min=0), help="Only the first N runs by end_date DESC, run_id DESC.")
@click.option("--w-config", type=WEIGHT, default=1.0, show_default=True, help="Weight of the config branch.")
@click.option("--w-env", type=WEIGHT, default=1.0, show_default=True, help="Weight of the env branch.")
@click.option("--w-outcome", type=WEIGHT, default=1.0, show_default=True, help="Weight of the outcome branch.")
@click.option("--joint-model-id", default="joint-meta-config-env-v1", show_default=True, help="model_id tag of the rows written.")
@click.option("--batch-size", type=click.IntRange(min=1), default=50_000, show_default=True, help="Runs per batch (and per transaction).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def backfill(urls, strategy_ids, start, end, limit, w_config, w_env, w_outcome, joint_model_id, batch_size, quiet, as_json):
    """Embed backtest_runs into joint_embeddings (idempotent, batch by batch).

    Reruns replace the rows of the runs they write, so running the same
    backfill twice leaves one row per run and model.

    \b
    Example:
      metabatch backfill --strategy-id US_EQ_CORE_LONG_EQ --start 2025-01-01 \\
          --end 2025-12-31 --limit 200 --w-config 1.0 --w-env 1.0 --w-outcome 1.0 \\
          --joint-model-id joint-meta-config-env-v1
    """
    from .backfill import backfill as run_backfill
    from .embed import Weights
    from .stores.base import RunSelection

    if not (w_config > 0 or w_env > 0 or w_outcome > 0):
        raise click.UsageError("at least one of --w-config, --w-env, --w-outcome must be > 0")
    if start and end and start > end:
        raise click.UsageError(f"--start {start} is after --end {end}")
    if not joint_model_id or len(joint_model_id) > 64:
        raise click.UsageError("--joint-model-id must be 1 to 64 characters")
    report, finish = progress_reporter(quiet or as_json, "backfill")
    try:
        summary = run_backfill(
            urls.runtime,
            urls.historical,
            RunSelection(tuple(strategy_ids), start, end, limit),
            Weights(w_config, w_env, w_outcome),
            joint_model_id,
            batch_size,
            on_progress=report,
        )
    finally:
        finish()
    if as_json:
        click.echo(json.dumps(summary.as_dict()))
        return
    click.echo(
        f"runs read {summary.runs_read}, written {summary.written}, skipped {summary.skipped} (no branch taken), "
        f"rejected {len(summary.rejected)}"
    )
    for run_id, reason in summary.rejected[:10]:
        click.echo(f"  rejected {run_id}: {reason}")
    if len(summary.rejected) > 10:
        click.echo(f"  ... and {len(summary.rejected) - 10} more (--json lists them all)")
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in summary.stage_seconds.items())
    click.echo(f"{summary.elapsed_seconds:.2f}s, {summary.runs_per_second:,.0f} runs/s ({stages})")
