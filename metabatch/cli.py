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
import time

import click

from . import __version__
from .errors import MetabatchError
from .pipeline.retry import DEFAULT_RETRIES
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
        if urls.defaulted and not kwargs.get("snapshot"):
            click.echo(
                f"metabatch: no database named (--runtime-url or ${RUNTIME_ENV}); "
                f"using the embedded file {urls.runtime.duckdb_path}",
                err=True,
            )
        return func(*args, urls=urls, **kwargs)

    return wrapper


def snapshot_option(func):
    """--snapshot DIR: read a Parquet snapshot instead of the historical database."""
    return click.option(
        "--snapshot",
        type=click.Path(file_okay=False, path_type=str),
        metavar="DIR",
        help="Read this snapshot (from `metabatch export-parquet`) instead of the historical database.",
    )(func)


def format_option(default: str | None = "csv", choices=("csv", "table", "json")):
    """--format: how a result is printed."""

    def decorate(func):
        return click.option(
            "--format",
            "fmt",
            type=click.Choice(list(choices)),
            default=default,
            show_default=default is not None,
            help="csv (header, empty fields for NULL), table (aligned, for a terminal) or json (an array of objects).",
        )(func)

    return decorate


def echo_warnings(call):
    """Run call(); print the warnings it raised as one line each on stderr."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    for warning in caught:
        click.echo(f"Warning: {warning.message}", err=True)
    return result


def on_terminal() -> bool:
    """Progress is drawn only for a person watching: stderr is a terminal."""
    return sys.stderr.isatty()


def progress_reporter(quiet: bool, label: str):
    """A callback (done, total) drawing a progress bar on a terminal, else nothing."""
    if quiet or not on_terminal():
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


def count_reporter(quiet: bool, label: str, unit: str):
    """A callback (done) keeping one line 'label: N unit' up to date on a terminal
    (for work whose total is not known beforehand), else nothing."""
    if quiet or not on_terminal():
        return None, lambda: None
    state = {"shown": 0.0, "done": None}

    def show(done):
        click.echo(f"\r{label}: {done:,} {unit}", err=True, nl=False)

    def report(done):
        now = time.monotonic()
        if now - state["shown"] >= 0.2:  # a few updates a second at most
            show(done)
            state["shown"] = now
        state["done"] = done

    def finish():
        if state["done"] is not None:
            show(state["done"])  # the last count, which the throttle may have skipped
            click.echo("", err=True)

    return report, finish


def retries_option(what: str):
    """--retries N: how many times in a row to reconnect after a lost connection."""
    return click.option(
        "--retries",
        type=click.IntRange(min=0),
        default=DEFAULT_RETRIES,
        show_default=True,
        metavar="N",
        help=(
            "Reconnect up to N times in a row when the connection to the database is lost "
            f"(server restart, failover), waiting 1 s, 2 s, 4 s... (at most 30 s) between tries, then {what}; "
            "0 fails at once. Example: --retries 10"
        ),
    )


def retry_reporter(limit: int):
    """A callback (error, retry, seconds) printing one line per retry on stderr."""

    def report(error, retry, seconds):
        click.echo(f"metabatch: {error.message}; retry {retry} of {limit} in {seconds:.0f} s", err=True)

    return report


def retries_note(retries: int, before: str) -> str:
    """For a summary line: ', 2 retries after a lost connection' ('' for none)."""
    if not retries:
        return ""
    return f"{before}{retries} {'retry' if retries == 1 else 'retries'} after a lost connection"


def ray_options(func):
    """--ray [auto|ADDRESS] and --shards N: run the job sharded over a Ray cluster."""
    func = click.option(
        "--shards", type=click.IntRange(min=1, max=256), metavar="N",
        help="With --ray: split the runs into N shards, one Ray task each [default: 2 per CPU of the cluster; at most 256].",
    )(func)
    return click.option(
        "--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[auto|ADDRESS]",
        help=(
            "Run sharded over a Ray cluster (pip install 'metabatch[ray]'): `auto` (or --ray alone) is $RAY_ADDRESS, "
            "else the cluster this machine belongs to (`ray start --head`); or the cluster's HOST:PORT. PostgreSQL stores only."
        ),
    )(func)


def check_ray_options(ray_address, shards) -> None:
    if shards is not None and ray_address is None:
        raise click.UsageError("--shards needs --ray")


def ray_reporter(quiet: bool, label: str):
    """A callback (JobProgress) drawing one progress bar over every shard of a
    Ray job, on a terminal; runs done only grow (a shard run again counts once)."""
    report, finish = progress_reporter(quiet, label)
    if report is None:
        return None, finish
    best = {"runs": 0}

    def on_progress(progress):
        best["runs"] = max(best["runs"], progress.runs)
        report(best["runs"], progress.total)

    return on_progress, finish


def ray_note(summary) -> str:
    """For a summary line: ' on 6 shards, 3 nodes (1 shard run again)'."""
    again = f" ({summary.task_retries} shard task{'s' if summary.task_retries != 1 else ''} run again)" if summary.task_retries else ""
    return f" on {summary.shards} shards, {summary.nodes} node{'s' if summary.nodes != 1 else ''}{again}"


# --------------------------------------------------------------------------
# The group: errors in one place


class MetabatchGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MetabatchError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            # one line: what went wrong, then what to do next
            click.echo(f"Error: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), err=True)
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
    from .stores.migrate import migrate as run_migrate

    applied = run_migrate(urls.runtime, urls.historical)
    for url, steps in applied.items():
        click.echo(f"{url}: " + (", ".join(steps) + " applied" if steps else "up to date"))


@main.command()
@database_options
@click.option("--runs", "n_runs", type=click.IntRange(min=1), default=10_000, show_default=True, help="How many runs to write.")
@click.option("--seed", type=int, default=7, show_default=True, help="Random seed: same seed, same runs.")
@click.option(
    "--kind", type=click.Choice(["sleeves", "campaigns"]), default="sleeves", show_default=True,
    help="sleeves: every setting drawn per run; campaigns: config families tried across environments, with a skill per pair (what the demo uses).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def seed(urls, n_runs, seed, kind, quiet):
    """Write realistic synthetic backtest_runs, deterministic for a seed.

    Runs that already exist (same run_id) are left as they are.

    \b
    Example:
      metabatch seed --runs 100000 --seed 7
      metabatch seed --runs 20000 --kind campaigns
    """
    from .synthetic.seed import seed_runs

    report, finish = progress_reporter(quiet, "seeding")
    try:
        inserted = seed_runs(urls.runtime, n_runs, seed, on_progress=report, kind=kind)
    finally:
        finish()
    click.echo(f"seeded {inserted} new runs ({n_runs - inserted} already there) into {urls.runtime}")


def selection_options(func):
    """--strategy-id / --start / --end / --limit: which runs a job reads (the spec's rules)."""
    func = click.option("--limit", type=click.IntRange(min=0), help="Only the first N runs by end_date DESC, run_id DESC.")(func)
    func = click.option("--end", type=DATE, help="Only runs with end_date <= this date.")(func)
    func = click.option("--start", type=DATE, help="Only runs with end_date >= this date.")(func)
    return click.option("--strategy-id", "strategy_ids", multiple=True, metavar="ID", help="Only runs of this strategy (repeatable).")(func)


def _selection(strategy_ids, start, end, limit):
    from .stores.base import RunSelection

    if start and end and start > end:
        raise click.UsageError(f"--start {start} is after --end {end}")
    return RunSelection(tuple(strategy_ids), start, end, limit)


def _model_id(value: str, option: str = "--joint-model-id") -> str:
    if not value or len(value) > 64:
        raise click.UsageError(f"{option} must be 1 to 64 characters")
    return value


@main.command()
@database_options
@selection_options
@click.option("--w-config", type=WEIGHT, default=1.0, show_default=True, help="Weight of the config branch (v1 model ids only).")
@click.option("--w-env", type=WEIGHT, default=1.0, show_default=True, help="Weight of the env branch (v1 model ids only).")
@click.option("--w-outcome", type=WEIGHT, default=1.0, show_default=True, help="Weight of the outcome branch (v1 model ids only).")
@click.option(
    "--joint-model-id", default="joint-meta-config-env-v1", show_default=True,
    help="model_id of the rows written: a model registered by `metabatch fit` embeds with it; any other id is v1; "
    "joint-meta-config-env-v2 is fitted with the defaults on first use.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=25_000, show_default=True, help="Runs per batch (and per transaction).")
@click.option(
    "--missing", is_flag=True,
    help="Only the selected runs that have no row of this model id yet (runs added since the last backfill); the others are counted, not read.",
)
@retries_option("resume with the runs not yet written")
@ray_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.pass_context
def backfill(ctx, urls, strategy_ids, start, end, limit, w_config, w_env, w_outcome, joint_model_id, batch_size, missing, retries, ray_address, shards, quiet, as_json):
    """Embed backtest_runs into joint_embeddings (idempotent, batch by batch).

    Reruns replace the rows of the runs they write, so running the same
    backfill twice leaves one row per run and model. A model id registered by
    `metabatch fit` embeds with its fitted encoder (its weights are part of
    it); any other id embeds with v1, bit-exact with the spec. A lost
    connection is retried (--retries): the job reconnects and goes on with the
    runs not yet written.

    \b
    Example:
      metabatch backfill --strategy-id US_EQ_CORE_LONG_EQ --start 2025-01-01 \\
          --end 2025-12-31 --limit 200 --w-config 1.0 --w-env 1.0 --w-outcome 1.0 \\
          --joint-model-id joint-meta-config-env-v1
      metabatch backfill --joint-model-id my-v2        # a model fitted with `metabatch fit`
      metabatch backfill --batch-size 10000 --retries 10
      metabatch backfill --missing --joint-model-id my-v2   # only runs added since
      metabatch backfill --ray auto --joint-model-id my-v2  # sharded over a Ray cluster
    """
    from .pipeline.backfill import backfill as run_backfill
    from .pipeline.embed import Weights

    if not (w_config > 0 or w_env > 0 or w_outcome > 0):
        raise click.UsageError("at least one of --w-config, --w-env, --w-outcome must be > 0")
    check_ray_options(ray_address, shards)
    selection = _selection(strategy_ids, start, end, limit)
    _model_id(joint_model_id)
    weights_given = any(
        ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT for name in ("w_config", "w_env", "w_outcome")
    )
    if ray_address is not None:
        from .pipeline.distributed import ray_backfill

        report, finish = ray_reporter(quiet or as_json, "backfill")
        try:
            summary = ray_backfill(
                urls.runtime, urls.historical, selection, Weights(w_config, w_env, w_outcome), joint_model_id, batch_size,
                on_progress=report, address=ray_address, shards=shards, retries=retries, weights_given=weights_given,
                missing=missing,
            )
        finally:
            finish()
    else:
        report, finish = progress_reporter(quiet or as_json, "backfill")
        try:
            summary = run_backfill(
                urls.runtime,
                urls.historical,
                selection,
                Weights(w_config, w_env, w_outcome),
                joint_model_id,
                batch_size,
                on_progress=report,
                weights_given=weights_given,
                retries=retries,
                on_retry=retry_reporter(retries),
                missing=missing,
            )
        finally:
            finish()
    if as_json:
        click.echo(json.dumps(summary.as_dict()))
        return
    if summary.fitted:
        f = summary.fitted
        click.echo(
            f"model {summary.model_id} was not fitted yet: fitted now with the defaults on {f['runs_read']:,} runs"
            f" (sample {f['sample_runs']:,}) in {f['seconds']:.1f}s; later backfills reuse it"
        )
    click.echo(
        f"model {summary.model_id} ({summary.encoder}): runs read {summary.runs_read}, written {summary.written}, "
        f"skipped {summary.skipped} (no branch taken), rejected {len(summary.rejected)}" + retries_note(summary.retries, ", ")
        + (f", {summary.already_embedded} already embedded (left alone)" if missing else "")
        + (ray_note(summary) if ray_address is not None else "")
    )
    for run_id, reason in summary.rejected[:10]:
        click.echo(f"  rejected {run_id}: {reason}")
    if len(summary.rejected) > 10:
        click.echo(f"  ... and {len(summary.rejected) - 10} more (--json lists them all)")
    if summary.unseen_config_paths:
        shown = ", ".join(summary.unseen_config_paths[:5]) + (" ..." if len(summary.unseen_config_paths) > 5 else "")
        click.echo(
            f"  {len(summary.unseen_config_paths)} config path(s) the fit never saw gave nothing: {shown}"
            " (fit a new model id, or --refit, to learn them)"
        )
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in summary.stage_seconds.items())
    click.echo(f"{summary.elapsed_seconds:.2f}s, {summary.runs_per_second:,.0f} runs/s ({stages})")


@main.command()
@database_options
@selection_options
@click.option("--joint-model-id", default="joint-meta-config-env-v2", show_default=True, help="The id to register the fitted model as.")
@click.option(
    "--model-file", type=click.Path(dir_okay=False, path_type=str), metavar="FILE.toml",
    help="The model file (TOML; every key optional; see README). Default: the defaults.",
)
@click.option("--refit", is_flag=True, help="Replace a model already fitted under this id and delete its embeddings.")
@click.option("--sample-runs", type=click.IntRange(min=100), default=20_000, show_default=True, help="Runs in the fit's sample.")
@click.option("--batch-size", type=click.IntRange(min=1), default=25_000, show_default=True, help="Runs read per batch.")
@ray_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def fit(urls, strategy_ids, start, end, limit, joint_model_id, model_file, refit, sample_runs, batch_size, ray_address, shards, quiet, as_json):
    """Fit a v2 model on the selected runs and register it in joint_models.

    Streams the runs (bounded memory), draws a sample of up to --sample-runs
    of them (the smallest MD5 of run_id: the same runs whatever their order),
    fits per-path statistics and weights on it, and registers the model under
    --joint-model-id in the historical database. Backfills with that id then
    embed with it, and runs added later land in the same space. A fitted id is
    never changed: fitting it again fails unless --refit, which replaces it
    and deletes its embeddings in the same transaction.

    \b
    Example:
      metabatch fit --joint-model-id my-v2 --model-file model.toml
      metabatch backfill --joint-model-id my-v2
      metabatch fit --ray auto --joint-model-id my-v2 --model-file model.toml
    """
    from .models.modelfile import ModelSpec, load_model_file
    from .models.registry import fit as run_fit

    check_ray_options(ray_address, shards)
    selection = _selection(strategy_ids, start, end, limit)
    spec = load_model_file(model_file) if model_file else ModelSpec()
    if ray_address is not None:
        from .pipeline.distributed import ray_fit

        report, finish = ray_reporter(quiet or as_json, "fit")
        try:
            summary = ray_fit(
                urls.runtime, urls.historical, _model_id(joint_model_id), spec, selection, refit=refit,
                batch_rows=batch_size, sample_runs=sample_runs, on_progress=report, address=ray_address, shards=shards,
            )
        finally:
            finish()
    else:
        report, finish = progress_reporter(quiet or as_json, "fit")
        try:
            summary = run_fit(
                urls.runtime, urls.historical, _model_id(joint_model_id), spec, selection,
                refit=refit, batch_rows=batch_size, sample_runs=sample_runs, on_progress=report,
            )
        finally:
            finish()
    if as_json:
        click.echo(json.dumps(summary.as_dict()))
        return
    if summary.encoder == "v1":
        click.echo(f"registered {summary.model_id} (v1 with the model file's weights)")
    else:
        paths = ", ".join(f"{n} {b}" for b, n in summary.paths.items())
        click.echo(
            f"fitted {summary.model_id} (v2) on {summary.runs_read:,} runs (sample {summary.sample_runs:,}):"
            f" paths {paths}" + (f", {summary.ignored_paths} ignored" if summary.ignored_paths else "")
        )
        for branch, what in (("env", "where it was tried"), ("outcome", "how it went"), ("config", "what was tried")):
            if summary.branches.get(branch):
                click.echo(f"  {branch} ({what}): {', '.join(summary.branches[branch])}")
        click.echo(f"  why each path is where it is: metabatch models --explain {summary.model_id}")
        if "outcome" in summary.reliability:
            click.echo(
                f"  outcome reliability {summary.reliability['outcome']:.2f}: the share of the outcome cosine that repeats"
                " between runs of one kind of config and environment; the outcome weight counts that much in the joint cosine"
            )
    if summary.refit:
        click.echo(f"  refit: the old parameters were replaced and its {summary.embeddings_deleted:,} embeddings deleted")
    click.echo(f"  hash {summary.content_hash[:16]}, {summary.seconds:.2f}s; next: metabatch backfill --joint-model-id {summary.model_id}")


@main.command()
@database_options
@format_option(default="table", choices=("table", "csv", "json"))
@click.option("--explain", "explain_id", metavar="ID", help="What the fitted model ID decided for each path, and why (instead of the list).")
def models(urls, fmt, explain_id):
    """List the models registered in the historical database (joint_models).

    For each: its id, encoder, the runs and selection it was fitted on, when,
    and its content hash. A model id not listed embeds as v1.

    With --explain ID: one row per path of the fitted model (config paths,
    metrics, the run's window): its branch (what was tried: config; where:
    env; how it went: outcome; none: gives nothing), how the branch was set
    (declared in the model file, learned from the runs, or v1's names where
    the runs could not tell), its kind (number, date, string, list,
    presence), its weight and the figures that decided. The env paths come
    first: they are what makes two runs "in the same environment". To
    override a decision, declare the path in the model file's [paths]
    (config, env, env_metrics, outcome_metrics) and fit again (--refit).

    \b
    Example:
      metabatch models
      metabatch models --format json
      metabatch models --explain my-v2
      metabatch models --explain my-v2 --format json | jq '.paths[] | select(.branch == "env")'
    """
    import polars as pl

    from .models.registry import list_models
    from .snapshot.query import format_frame

    if explain_id is not None:
        _explain(urls, explain_id, fmt)
        return
    rows = list_models(urls.historical)
    frame = pl.DataFrame(
        {
            "model_id": [r["model_id"] for r in rows],
            "encoder": [r["encoder"] for r in rows],
            "fitted_runs": [r["fitted_runs"] for r in rows],
            "selection": [_selection_text(r["selection"]) for r in rows],
            "fitted_at": [r["fitted_at"].isoformat(sep=" ", timespec="seconds") if r["fitted_at"] else None for r in rows],
            "content_hash": [r["content_hash"] if fmt != "table" else r["content_hash"][:16] for r in rows],
        },
        schema={"model_id": pl.String, "encoder": pl.String, "fitted_runs": pl.Int64, "selection": pl.String, "fitted_at": pl.String, "content_hash": pl.String},
    )
    if not rows and fmt == "table":
        click.echo("no models registered (every model id embeds as v1); fit one with `metabatch fit --joint-model-id ID`")
        return
    click.echo(format_frame(frame, fmt), nl=False)


def _explain(urls, model_id: str, fmt: str) -> None:
    from .models.explain import explain_model, explain_unregistered
    from .models.registry import registered
    from .snapshot.query import format_frame

    model = registered(urls.historical, model_id)
    if model is None:
        raise explain_unregistered(model_id)
    frame = explain_model(model)
    v2 = model.v2()
    if fmt == "json":
        rows = frame.to_dicts()
        for row in rows:
            row["figures"] = json.loads(row["figures"])
        header = {"model_id": model.model_id, "format": v2.format, "fitted_runs": model.fitted_runs, "sample_runs": v2.sample_runs,
                  "reliability": v2.reliability, "weights": v2.weights}
        click.echo(json.dumps({**header, "paths": rows}))
        return
    if fmt == "table":
        shares = ", ".join(f"{b} {w:.2f}" for b, w in v2.branch_weights().items())
        click.echo(f"model {model.model_id}: v2 format {v2.format}, fitted on {model.fitted_runs:,} runs (sample {v2.sample_runs:,}); branch shares {shares}")
        click.echo("two runs are in the same environment when their env paths (first below) hold near values; declare a path in the model file's [paths] to override")
        frame = frame.drop("figures")
    click.echo(format_frame(frame, fmt), nl=False)


def _selection_text(selection: dict) -> str:
    parts = []
    if selection.get("strategy_ids"):
        parts.append("strategy " + ",".join(selection["strategy_ids"]))
    if selection.get("start"):
        parts.append(f"from {selection['start']}")
    if selection.get("end"):
        parts.append(f"to {selection['end']}")
    if selection.get("limit") is not None:
        parts.append(f"limit {selection['limit']}")
    return "; ".join(parts) or "all runs"


# --------------------------------------------------------------------------
# export-parquet / show / similar / sql


@main.command("export-parquet")
@database_options
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=str), metavar="DIR", help="Snapshot folder (replaced atomically if it is a snapshot).")
@click.option("--model-id", metavar="ID", help="Only embeddings of this model_id (default: every model).")
@click.option("--strategy-id", "strategy_ids", multiple=True, metavar="ID", help="Only embeddings/runs of this strategy (repeatable).")
@click.option("--start", type=DATE, help="Only embeddings with as_of_date >= this date (runs: end_date).")
@click.option("--end", type=DATE, help="Only embeddings with as_of_date <= this date (runs: end_date).")
@retries_option("start the export again")
@ray_options
@click.option("--quiet", is_flag=True, help="No progress line.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def export_parquet(urls, out, model_id, strategy_ids, start, end, retries, ray_address, shards, quiet, as_json):
    """Write a Parquet snapshot of joint_embeddings and their runs for DuckDB.

    DIR gets embeddings/model_id=<id>/*.parquet (the vector as FLOAT[384],
    its L2 norm, the entity_scope ids), runs/*.parquet (config and metrics
    JSON text plus one column per numeric top-level metric: sharpe,
    max_drawdown, ...), index/ (raw vectors for fast `similar`) and
    manifest.json. The snapshot is built beside DIR and swapped in at the
    end: a failed or killed export leaves the previous one as it was. A lost
    connection is retried (--retries) by starting the export again.

    \b
    Example:
      metabatch export-parquet --out ./snapshot --model-id joint-meta-config-env-v1 \\
          --strategy-id US_EQ_CORE_LONG_EQ --start 2025-01-01 --end 2025-12-31
      metabatch export-parquet --out ./snapshot --retries 10
      metabatch export-parquet --ray auto --out /shared/snapshot   # a folder every node sees
    """
    from .snapshot import export_parquet as run_export

    if start and end and start > end:
        raise click.UsageError(f"--start {start} is after --end {end}")
    check_ray_options(ray_address, shards)
    if ray_address is not None:
        from .snapshot.sharded import ray_export

        report, finish = ray_reporter(quiet or as_json, "export")
        try:
            summary = ray_export(
                out, urls.historical, urls.runtime, model_id=model_id, strategy_id=strategy_ids, start=start, end=end,
                on_progress=report, retries=retries, address=ray_address, shards=shards,
            )
        finally:
            finish()
    else:
        report, finish = count_reporter(quiet or as_json, "export", "embeddings written")
        try:
            summary = run_export(
                out, urls.historical, urls.runtime,
                model_id=model_id, strategy_id=strategy_ids, start=start, end=end,
                on_progress=report, retries=retries, on_retry=retry_reporter(retries),
            )
        finally:
            finish()
    if as_json:
        click.echo(json.dumps(summary.as_dict()))
        return
    models = ", ".join(f"{m} {n:,}" for m, n in summary.models.items()) or "none"
    click.echo(
        f"snapshot {summary.path}: {summary.embeddings:,} embeddings ({models}), {summary.runs:,} runs"
        + retries_note(summary.retries, " ") + (ray_note(summary) if ray_address is not None else "")
    )
    if summary.metric_columns:
        click.echo(f"  metric columns in runs: {', '.join(summary.metric_columns)}")
    click.echo(f"{summary.seconds:.2f}s")


@main.command()
@database_options
@snapshot_option
@click.option("--as-of", type=DATE, help="Only embeddings with this as_of_date.")
@click.option("--start", type=DATE, help="Only embeddings with as_of_date >= this date.")
@click.option("--end", type=DATE, help="Only embeddings with as_of_date <= this date.")
@click.option("--run-id", "run_ids", multiple=True, metavar="ID", help="Only this run (repeatable).")
@click.option("--strategy-id", "strategy_ids", multiple=True, metavar="ID", help="Only this strategy (repeatable).")
@click.option("--universe-id", "universe_ids", multiple=True, metavar="ID", help="Only this universe (repeatable).")
@click.option("--model-id", default="joint-meta-config-env-v1", show_default=True, help="model_id of the embeddings.")
@click.option("--limit", type=click.IntRange(min=0), default=1000, show_default=True, help="At most N rows (0: all).")
@format_option()
def show(urls, snapshot, as_of, start, end, run_ids, strategy_ids, universe_ids, model_id, limit, fmt):
    """List embeddings with their dimension and L2 norm (the seeds' CSV).

    Prints as_of_date,run_id,strategy_id,universe_id,model_id,dim,l2_norm
    ordered by as_of_date then joint_id; missing ids are empty fields, the
    norm has 6 decimals. Reads --snapshot DIR, else the historical database.

    \b
    Example:
      metabatch show --strategy-id US_EQ_CORE_LONG_EQ --start 2025-01-01 \\
          --end 2025-12-31 --model-id joint-meta-config-env-v1 --limit 200
      metabatch show --snapshot ./snapshot --run-id BT_RUN_123 --format table
    """
    from .snapshot.query import format_frame, show as run_show

    if as_of and (start or end):
        raise click.UsageError("use either --as-of or --start/--end, not both")
    if start and end and start > end:
        raise click.UsageError(f"--start {start} is after --end {end}")
    frame = run_show(
        snapshot=snapshot, historical_url=urls.historical, as_of=as_of, start=start, end=end,
        run_id=run_ids, strategy_id=strategy_ids, universe_id=universe_ids, model_id=model_id, limit=limit,
    )
    click.echo(format_frame(frame, fmt), nl=False)


@main.command()
@database_options
@snapshot_option
@click.option("--run-id", required=True, metavar="ID", help="The run whose neighbours to find.")
@click.option("--model-id", default="joint-meta-config-env-v1", show_default=True, help="model_id of the embeddings.")
@click.option("--strategy-id", "strategy_ids", multiple=True, metavar="ID", help="Only candidates of this strategy (repeatable).")
@click.option("--start", type=DATE, help="Only candidates with as_of_date >= this date.")
@click.option("--end", type=DATE, help="Only candidates with as_of_date <= this date.")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True, help="How many neighbours to print.")
@click.option("--candidate-limit", type=click.IntRange(min=1), help="Only the N most recent candidates (by joint_id) [default: all].")
@click.option(
    "--branch", type=click.Choice(["joint", "config", "env", "outcome"]), default="joint", show_default=True,
    help="Compare one branch's slice alone: same kind of config, same environment, same outcomes (v2 models).",
)
@format_option()
def similar(urls, snapshot, run_id, model_id, strategy_ids, start, end, top_k, candidate_limit, branch, fmt):
    """Find the runs nearest to a run in the joint space (cosine, then euclidean).

    Prints cosine,euclidean,run_id,strategy_id,universe_id,as_of_date,source
    with 6 decimals, best first, the run itself excluded. A zero vector has
    cosine 0; candidates of another dimension are skipped with a warning.
    Reads --snapshot DIR, else the historical database.

    \b
    Example:
      metabatch similar --run-id BT_RUN_123 --strategy-id US_EQ_CORE_LONG_EQ \\
          --model-id joint-meta-config-env-v1 --top-k 20
      metabatch similar --snapshot ./snapshot --run-id BT_RUN_123 --format table
      metabatch similar --run-id BT_RUN_123 --model-id my-v2 --branch env
    """
    from .snapshot.query import format_frame, similar as run_similar

    if start and end and start > end:
        raise click.UsageError(f"--start {start} is after --end {end}")
    frame = echo_warnings(
        lambda: run_similar(
            run_id, snapshot=snapshot, historical_url=urls.historical, model_id=model_id,
            strategy_id=strategy_ids, start=start, end=end, top_k=top_k, candidate_limit=candidate_limit, branch=branch,
        )
    )
    click.echo(format_frame(frame, fmt), nl=False)


@main.command()
@click.argument("query", required=False)
@click.option("--snapshot", required=True, type=click.Path(file_okay=False, path_type=str), metavar="DIR", help="The snapshot to query.")
@format_option(default=None, choices=("table", "csv", "json"))
def sql(query, snapshot, fmt):
    """Run DuckDB SQL over a snapshot (read-only); QUERY or stdin.

    \b
    Views:
      embeddings  joint_id, joint_type, model_id, as_of_date, run_id, strategy_id,
                  universe_id, source, dim, l2_norm, vector (FLOAT[384]), created_at
      runs        run_id, strategy_id, universe_id, start_date, end_date,
                  config_json, metrics_json, then a DOUBLE per numeric metric
                  (sharpe, max_drawdown, ...)
    Macros (sql/*.sql):
      cosine(a, b)                      0 when either vector is zero
      nearest(run_id, k)                the k nearest embeddings to a run
      neighbour_runs(run_id, k)         the same, joined with their runs' metrics
      strategy_drift(strategy, period := 'month')  runs, mean norm, centroid drift per period
    (each takes model := '...'; default joint-meta-config-env-v1)

    Output: an aligned table on a terminal, CSV when piped; --format to choose.
    A list, array, struct or map is written as its JSON text (in CSV, one
    cell; a map's keys as text); a type Polars cannot hold (INTERVAL, UNION,
    BLOB, ...) as DuckDB's text of it. Statements that write files (COPY,
    EXPORT, ATTACH) are refused.

    \b
    Example:
      metabatch sql --snapshot ./snapshot \\
          "SELECT run_id, cosine, sharpe FROM neighbour_runs('BT_RUN_123', 50) ORDER BY sharpe DESC LIMIT 5"
      echo "SELECT strategy_id, avg(l2_norm) FROM embeddings GROUP BY 1" | metabatch sql --snapshot ./snapshot --format csv
      metabatch sql --snapshot ./snapshot "SELECT run_id, vector FROM embeddings LIMIT 1" > one.csv
    """
    from .snapshot.query import format_frame, sql as run_sql

    if query is None or query == "-":
        if sys.stdin.isatty():
            raise click.UsageError("give a QUERY, or pipe one on stdin")
        query = sys.stdin.read()
    if not query.strip():
        raise click.UsageError("the query is empty")
    fmt = fmt or ("table" if sys.stdout.isatty() else "csv")
    frame = run_sql(query, snapshot)
    click.echo(format_frame(frame, fmt, None), nl=False)


# --------------------------------------------------------------------------
# suggest / cluster / landscape: the Meta-Orchestrator's workflows (v2 models)


def workflow_options(func):
    """--model-id, --snapshot or the databases, and the run filters of the workflows."""
    func = click.option("--end", type=DATE, help="Only runs with as_of_date <= this date.")(func)
    func = click.option("--start", type=DATE, help="Only runs with as_of_date >= this date.")(func)
    func = click.option("--strategy-id", "strategy_ids", multiple=True, metavar="ID", help="Only runs of this strategy (repeatable).")(func)
    func = snapshot_option(func)
    func = database_options(func)
    return click.option(
        "--model-id", default="joint-meta-config-env-v2", show_default=True, metavar="ID",
        help="A v2 model (registered by `metabatch fit`, or the built-in id once backfilled).",
    )(func)


def _space_source(urls, snapshot):
    if snapshot:
        return {"snapshot": snapshot}
    return {"historical_url": urls.historical, "runtime_url": urls.runtime}


def stage_reporter(quiet: bool):
    """A callback (message) printing the stages of a long job on stderr, on a terminal."""
    if quiet or not sys.stderr.isatty():
        return None
    return lambda message: click.echo(f"metabatch: {message}...", err=True)


@main.command()
@workflow_options
@click.option("--like-run", metavar="RUN_ID", help="The target environment is this run's.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="The target environment key by key (repeatable): env config paths and env metrics of the model; values parsed as JSON where they parse.")
@click.option("--metric", metavar="NAME", help="Rank by this metric [default: annualised_sharpe, else the first Sharpe-like one].")
@click.option("--minimise", is_flag=True, help="Lower is better (drawdown-like metrics).")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="How many distinct configs to suggest.")
@click.option("--neighbours", type=click.IntRange(min=1), default=2000, show_default=True, help="At most this many runs of the most similar environments to draw from.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), help="table (default on a terminal), json (default otherwise) or csv.")
def suggest(urls, model_id, snapshot, strategy_ids, start, end, like_run, env, metric, minimise, top_k, neighbours, fmt):
    """Suggest configs to try next in an environment (to revalidate by backtests).

    The runs tried in the environments most like the target (env-slice
    cosine; with --env, on the keys given alone) are ranked by --metric, and
    near-duplicate configs (config-slice cosine >= 0.9) grouped, so that each
    suggestion is a distinct config: its best run's config, the paths where
    it differs from --like-run's, its supporting runs best first, how many,
    the metric's mean and spread over them (ranked by that mean, shrunk
    towards the neighbourhood's by 2 runs' worth) and how similar their
    environments were (mean env cosine).

    \b
    Example:
      metabatch suggest --snapshot ./snapshot --like-run BT_RUN_123 --model-id my-v2 --top-k 5
      metabatch suggest --env market_id=US_EQ --env universe_id=US_EQ_SP500 \\
          --env assessment_horizon_days=21 --model-id my-v2 --format json
    """
    from .snapshot.query import format_frame
    from .workflows.suggest import plan_suggestions

    if start and end and start > end:
        raise click.UsageError(f"--start {start} is after --end {end}")
    if bool(like_run) == bool(env):
        raise click.UsageError("give the target environment as --like-run RUN_ID or as --env KEY=VALUE (one of the two)")
    result = plan_suggestions(
        model_id, like_run=like_run, env=list(env) or None, metric=metric, minimise=minimise, top_k=top_k,
        strategy_id=list(strategy_ids), start=start, end=end, neighbours=neighbours, **_space_source(urls, snapshot),
    )
    fmt = fmt or ("table" if sys.stdout.isatty() else "json")
    if fmt == "json":
        click.echo(json.dumps(result.as_dict(), default=str))
        return
    frame = result.frame.with_columns(
        best_run=pl_first("run_ids"), run_ids=pl_join("run_ids"), differs=pl_join("differs"),
    ).select("rank", "mean", "std", "support", "env_cosine", "best_run", "differs", "config", "run_ids")
    if fmt == "csv":
        click.echo(format_frame(frame, "csv"), nl=False)
        return
    target = result.target
    where = f"run {target['like_run']}'s environment" if target.get("like_run") else "environment " + ", ".join(f"{k}={v}" for k, v in target["env"].items())
    hood = target["neighbourhood"]
    click.echo(
        f"configs to try in {where} (model {model_id}), by {target['metric']}{' (lower is better)' if minimise else ''};"
        f" from the {hood['runs']:,} runs of the most similar environments (env cosine >= {hood['min_env_cosine']:.3f})"
    )
    click.echo(format_frame(frame.drop("run_ids"), "table", 3), nl=False)


def pl_first(column: str):
    import polars as pl

    return pl.col(column).list.first()


def pl_join(column: str):
    import polars as pl

    return pl.col(column).list.join(" ")


@main.command()
@workflow_options
@click.option("--on", "on", type=click.Choice(["joint", "config", "env", "outcome"]), default="joint", show_default=True, help="The slice to cluster on.")
@click.option("--k", "k", type=click.IntRange(min=2), help="Clusters; without it the tool picks k by silhouette (on a 4,000-run sample, k from 2 to 60) and says which.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed: same seed, same clusters.")
@click.option("--metric", metavar="NAME", help="The metric the summary shows [default: annualised_sharpe, else the first Sharpe-like one].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=str), metavar="FILE.parquet", help="Write run_id, cluster, distance here [default with --snapshot: DIR/clusters/<model>/<on>.parquet].")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@format_option(default="table", choices=("table", "csv", "json"))
def cluster(urls, model_id, snapshot, strategy_ids, start, end, on, k, seed, metric, out, quiet, fmt):
    """Group runs by behaviour: k-means on one slice of a v2 model's space.

    Prints a summary per cluster: size, the metric's mean and spread, the
    dominant strategies and universes, a representative run (nearest the
    centroid) and the config paths whose values set the cluster apart. The
    assignments go to --out, or with --snapshot into the snapshot (a
    `clusters` view in `metabatch sql`). scikit-learn's MiniBatchKMeans on the
    L2-normalised slices, deterministic for a --seed.

    \b
    Example:
      metabatch cluster --model-id my-v2 --on config --k 40 --out clusters.parquet
      metabatch cluster --snapshot ./snapshot --model-id my-v2 --on joint
    """
    from .workflows.cluster import COARSE_SHARE, SPLIT_SILHOUETTE, best_k, cluster_runs, snapshot_clusters_path, write_assignments
    from .snapshot.query import format_frame

    if start and end and start > end:
        raise click.UsageError(f"--start {start} is after --end {end}")
    if out and not out.endswith(".parquet"):
        raise click.UsageError("--out must end in .parquet")
    result = cluster_runs(
        model_id, on=on, k=k, seed=seed, metric=metric, strategy_id=list(strategy_ids), start=start, end=end,
        on_progress=stage_reporter(quiet), **_space_source(urls, snapshot),
    )
    path = out or (snapshot_clusters_path(snapshot, model_id, on) if snapshot else None)
    if path is not None:
        if not out:
            path.parent.mkdir(parents=True, exist_ok=True)
        write_assignments(result, path)
    if fmt == "json":
        click.echo(json.dumps({"k": result.k, "chosen_by": result.chosen_by, "coarse_k": result.coarse_k, "on": on, "out": str(path) if path else None, "clusters": result.summary.to_dicts()}, default=str))
        return
    if fmt == "csv":
        click.echo(format_frame(result.summary, "csv"), nl=False)
        return
    how = "given" if result.chosen_by == "given" else "picked by silhouette: " + ", ".join(f"{c}: {v:.3f}" for c, v in result.silhouettes.items())
    if result.coarse_k is not None and result.splits:
        click.echo(f"{result.coarse_k} coarse clusters of {result.assignments.height:,} runs on the {on} slice of {model_id} (k {how})")
        for c, scores in result.splits.items():
            best = best_k(scores)
            click.echo(f"  coarse cluster {c} holds {best} environments (silhouette of its own runs {scores[best]:.3f} >= {SPLIT_SILHOUETTE})")
        click.echo(f"{result.k} environments at the finest level (column cluster; coarse: the coarse cluster)")
    else:
        click.echo(f"{result.k} clusters of {result.assignments.height:,} runs on the {on} slice of {model_id} (k {how})")
        if result.coarse_k is not None:
            click.echo(f"{result.coarse_k} coarse clusters hold them (k = {result.coarse_k} scores at least {COARSE_SHARE:.0%} of the best silhouette; column coarse)")
            click.echo(f"{result.k} environments at the finest level")
    if result.metric:
        click.echo(f"mean and std: {result.metric}")
    click.echo(format_frame(result.summary, "table", 3), nl=False)
    click.echo(f"assignments: {path}" if path else "assignments not written (give --out FILE.parquet)")


@main.command()
@workflow_options
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=str), metavar="FILE.html|FILE.png", help="An interactive page (.html, opens offline) or a picture (.png).")
@click.option("--color", default="annualised_sharpe", show_default=True, metavar="METRIC|cluster|strategy|universe", help="What colours the points.")
@click.option("--on", "on", type=click.Choice(["joint", "config", "env", "outcome"]), default="joint", show_default=True, help="The slice to lay out.")
@click.option(
    "--layout", type=click.Choice(["tsne", "pca"]), default="tsne", show_default=True,
    help="tsne: keeps each run's neighbours (groups of alike runs stand apart; ~30 s from 10,000 runs up); pca: faster, axes that mean something, groups overlap.",
)
@click.option("--clusters", type=click.Path(dir_okay=False, exists=True, path_type=str), metavar="FILE.parquet", help="Clusters for --color cluster [default with --snapshot: the snapshot's clusters on --on].")
@click.option("--max-points", type=click.IntRange(min=10), default=60_000, show_default=True, help="More runs than this: a stratified sample (said on the page).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the sample and the layout (the same seed, the same map).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def landscape(urls, model_id, snapshot, strategy_ids, start, end, out, color, on, layout, clusters, max_points, seed, quiet):
    """Draw the landscape of the runs: a 2-D map of a v2 model's space, coloured.

    The runs of one slice (--on) laid out by t-SNE (default: runs near each
    other are alike) or PCA, coloured by a metric (a diverging scale centred
    at 0 for Sharpe-like ratios and returns, else sequential), by `cluster`
    (from `metabatch cluster`: a colour each, the legend in order, labels at
    the centres above 20 clusters), by strategy or by universe. An .html
    page is self-contained (no script from the network): hovering a point
    names its run, strategy, universe, colour value and the config values
    that tell runs apart most. A .png is a picture for reports. More runs
    than --max-points: a stratified sample.

    \b
    Example:
      metabatch landscape --model-id my-v2 --color annualised_sharpe --out landscape.html
      metabatch landscape --snapshot ./snapshot --model-id my-v2 --on config --color cluster --out landscape.png
      metabatch landscape --snapshot ./snapshot --layout pca --out landscape-pca.html
    """
    from .workflows.landscape import draw_landscape

    if start and end and start > end:
        raise click.UsageError(f"--start {start} is after --end {end}")
    drawn = draw_landscape(
        model_id, out=out, color=color, on=on, layout=layout, clusters=clusters, max_points=max_points, seed=seed,
        strategy_id=list(strategy_ids), start=start, end=end, on_progress=stage_reporter(quiet), **_space_source(urls, snapshot),
    )
    shown = f"{drawn.points:,} runs" + (f" of {drawn.runs:,} (stratified by {drawn.sampled_by})" if drawn.sampled_by else "")
    how = {"tsne": "t-SNE", "pca": "PCA"}[drawn.layout]
    click.echo(f"landscape of {model_id} ({drawn.on} slice, {how}, coloured by {drawn.color}): {shown} -> {drawn.path}")


# --------------------------------------------------------------------------
# demo


@main.command()
@click.option("--runs", "n_runs", type=click.IntRange(min=1), default=20_000, show_default=True, help="How many synthetic runs to seed.")
@click.option(
    "--dir", "directory", type=click.Path(file_okay=False), default="metabatch-demo", show_default=True,
    help="Folder for the demo's DuckDB file and snapshot (only those are replaced).",
)
def demo(n_runs, directory):
    """Run the whole pipeline on an embedded DuckDB file: no server needed.

    Migrates, seeds N synthetic runs, backfills their embeddings, exports a
    Parquet snapshot, shows a few rows, finds the 10 nearest neighbours of one
    run and answers one SQL question, timing each step. Rerunning replaces the
    demo's own files in the folder and nothing else.

    \b
    Example:
      metabatch demo --runs 20000 --dir ./metabatch-demo
    """
    from .synthetic.demo import run_demo

    run_demo(n_runs, directory, echo=click.echo)
