"""Ray: backfill, fit and export-parquet sharded over the nodes of a Ray cluster.

The Python API of `--ray`: ``ray_backfill``, ``ray_fit`` and ``snapshot.sharded.ray_export``
take what ``backfill.backfill``, ``models.fit`` and ``snapshot.export_parquet``
take, plus ``address`` (a Ray cluster; "auto": RAY_ADDRESS, else the cluster
this machine belongs to) and ``shards``, and return the same summaries.

The selection (strategy ids, dates, limit) is split into shards by a hash of
run_id (``shards``); each shard is one Ray task that runs the job's own
pipeline on its runs, with its own database connections:

- ``backfill_on_ray``: ``backfill.backfill`` over the shard (read, unnest,
  encode, write; each batch one transaction), the encoder sent once through
  the object store;
- ``draw_sample_on_ray``: the fit's bottom-k sample (``fit.RunSample``) of
  each shard, merged on the driver into the sample a local fit draws, so that
  ``models.fit`` fits and registers the same model (same content hash);
- ``export_on_ray`` (in ``snapshot.sharded``): each shard writes its part files
  into the build folder, the driver the index, the manifest and the models.

Ray places the tasks, runs again a task whose node was lost (``max_retries``;
the upserts make a shard written twice harmless) and detects failures:
metabatch adds no scheduler of its own. A small actor on the driver's node
(``_Tracker``) only collects each shard's progress for the progress bar and
counts the attempts (Ray's retries).

PostgreSQL only: a DuckDB file is written by one process at a time and lives
on one machine, so ``--ray`` with a DuckDB store is a usage error
(``check_stores``); the local job already keeps every core busy on it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pyarrow as pa

from .. import __version__
from ..errors import BadInput, MetabatchError
from ..stores.shards import BUCKETS, Shard, split_by_shard
from ..stores.base import RunSelection
from ..urls import DatabaseURL

# Ray runs a shard again on another node this many times when its node is lost.
TASK_RETRIES = 3
# Default shards per CPU of the cluster (see default_shards).
SHARDS_PER_CPU = 2
INSTALL_HINT = "install it with: pip install 'metabatch[ray]'"


# --------------------------------------------------------------------------
# Connecting


def import_ray():
    """The ``ray`` module, or a usage error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise BadInput("--ray needs Ray, which is not installed", INSTALL_HINT) from None
    return ray


def check_stores(*urls: DatabaseURL) -> None:
    """A usage error unless every store is PostgreSQL (see the module docstring)."""
    for url in urls:
        if url.scheme != "postgresql":
            raise BadInput(
                f"--ray needs PostgreSQL stores, and `{url.redacted}` is a DuckDB file: DuckDB lets one process write a file"
                " at a time and the other machines of a cluster do not see it",
                "run without --ray (the local job uses every core of this machine), or use PostgreSQL",
            )


def _address_to_check(address: str) -> str | None:
    """The host:port ``address`` names (RAY_ADDRESS for ``auto``), or None when
    Ray is to find the local cluster itself."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "") or "auto"
    if address in ("auto", "local"):
        return None
    return address.split("://", 1)[-1]


def _reachable(host_port: str, seconds: float = 3.0) -> str | None:
    """None when a TCP connection to host:port opens, else why not. (``ray.init``
    retries an unreachable address for minutes; a wrong address should be one
    line at once.)"""
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        return f"`{host_port}` is not HOST:PORT"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=seconds):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


class RaySession:
    """A connection to a Ray cluster for one job (``with RaySession(address):``).
    Reuses the process's connection when there is one (a notebook, the tests);
    otherwise connects and disconnects at the end."""

    def __init__(self, address: str = "auto"):
        self.address = address or "auto"
        self.ray = import_ray()
        self.owned = False

    def __enter__(self) -> "RaySession":
        ray = self.ray
        if ray.is_initialized():
            return self
        target = _address_to_check(self.address)
        if target is not None:
            why = _reachable(target)
            if why is not None:
                raise MetabatchError(
                    f"cannot reach the Ray cluster at `{target}`: {why}",
                    "check --ray ADDRESS (or RAY_ADDRESS) and that the cluster is up (`ray status`)",
                )
        try:
            ray.init(address=self.address, logging_level=logging.ERROR, log_to_driver=False)
        except Exception as exc:  # ConnectionError, RuntimeError, ValueError: all mean "no cluster"
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MetabatchError(
                f"cannot connect to a Ray cluster (--ray {self.address}): {message}",
                "start one with `ray start --head`, or give its address with --ray ADDRESS or RAY_ADDRESS",
            ) from None
        self.owned = True
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.ray.shutdown()

    def cpus(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))


def default_shards(cpus: int) -> int:
    """A few shards per CPU: a lost node costs a small shard again, and a slow one
    does not hold the job up; each shard also reads its runs with a query of its
    own, so not many more."""
    return max(1, min(BUCKETS, SHARDS_PER_CPU * cpus))


def check_shards(shards: int | None) -> None:
    if shards is not None and not 1 <= shards <= BUCKETS:
        raise BadInput(f"--shards must be 1 to {BUCKETS} (a shard is a set of the {BUCKETS} buckets of run ids)")


# --------------------------------------------------------------------------
# Progress and attempts


class _Tracker:
    """Collects the shards' progress on the driver's node (a Ray actor): per shard
    its attempt, node and runs done. A shard that starts again starts from 0.

    Tasks only send to it, never wait for it: a task waiting in ``ray.get``
    lends its CPU to another task, and a node would run more shards at once
    than it has CPUs. A task's calls arrive in order, and its attempt is told
    apart by a token of its own."""

    def __init__(self):
        self.shards: dict[int, dict] = {}

    def started(self, shard: int, node: str, token: str) -> None:
        entry = self.shards.setdefault(shard, {"attempt": 0})
        entry.update(attempt=entry["attempt"] + 1, node=node, runs=0, finished=False, token=token)

    def progress(self, shard: int, token: str, runs: int, finished: bool = False) -> None:
        entry = self.shards.get(shard)
        if entry is not None and entry.get("token") == token:
            entry["runs"], entry["finished"] = runs, finished

    def state(self) -> dict[int, dict]:
        return self.shards


@dataclass
class JobProgress:
    """What ``on_progress`` gets while a sharded job runs."""

    runs: int  # runs done by the shards' current attempts
    total: int | None  # runs to do, when counted (a progress bar's length)
    shards: dict[int, dict] = field(default_factory=dict)  # shard -> attempt, node, runs, finished

    @property
    def task_retries(self) -> int:
        return sum(entry["attempt"] - 1 for entry in self.shards.values())


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB; 0 where unknown."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class _Reporter:
    """A shard task's link to the tracker: one fire-and-forget call per batch."""

    def __init__(self, tracker, shard: Shard, driver_version: str):
        if driver_version != __version__:
            raise MetabatchError(
                f"metabatch {__version__} on node {_node_id()[:12]}, {driver_version} on the driver",
                "install the same metabatch version on every node of the cluster",
            )
        import uuid

        self.tracker, self.shard = tracker, shard
        self.node = _node_id()
        self.token = uuid.uuid4().hex
        tracker.started.remote(shard.index, self.node, self.token)
        self.started = time.perf_counter()

    def progress(self, done: int, total: int | None = None) -> None:
        self.tracker.progress.remote(self.shard.index, self.token, done)

    def finish(self, done: int) -> dict:
        self.tracker.progress.remote(self.shard.index, self.token, done, True)
        return {
            "shard": self.shard.index, "node": self.node,
            "seconds": round(time.perf_counter() - self.started, 3), "peak_rss_mb": round(_peak_rss_mb(), 1),
        }


class shard_errors:
    """In a shard task: an error that is not metabatch's own comes back to the
    driver as a MetabatchError with its first line (driver errors, such as
    ADBC's, do not always survive pickling)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, MetabatchError) or not isinstance(exc, Exception):
            return False
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise MetabatchError(f"{type(exc).__name__}: {message}", "rerun with --debug for details") from None


def _cause(exc: BaseException) -> BaseException:
    """The exception a shard task raised (Ray wraps it in a RayTaskError)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def run_shards(
    ray,
    function: Callable,
    shards: list[Shard],
    args_of: Callable[[Shard], tuple],
    on_progress: Callable[[JobProgress], None] | None = None,
    total: int | None = None,
    what: str = "job",
) -> tuple[list[Any], JobProgress]:
    """Run ``function(shard, *args_of(shard), tracker)`` as one Ray task per shard
    (1 CPU each, spread over the nodes, retried on a lost node) and wait for all;
    returns their results in shard order and the last progress. The first task
    that fails cancels the others and its error is raised (a MetabatchError)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    tracker = ray.remote(num_cpus=0, max_restarts=0)(_Tracker).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ).remote()
    task = ray.remote(function).options(
        num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False, scheduling_strategy="SPREAD", name=f"metabatch-{what}"
    )
    refs = [task.remote(shard, *args_of(shard), tracker) for shard in shards]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    progress = JobProgress(0, total)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.25)
            for ref in ready:
                try:
                    results[index[ref]] = ray.get(ref)
                except Exception as exc:
                    raise _shard_failed(exc, shards[index[ref]], what) from None
            state = ray.get(tracker.state.remote())
            progress = JobProgress(sum(entry["runs"] for entry in state.values()), total, state)
            if on_progress is not None:
                on_progress(progress)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
    finally:
        ray.kill(tracker)
    return results, progress


def _shard_failed(exc: BaseException, shard: Shard, what: str) -> MetabatchError:
    cause = _cause(exc)
    if isinstance(cause, MetabatchError):
        error = MetabatchError(f"shard {shard} of the {what}: {cause.message}", cause.hint)
        error.exit_code = cause.exit_code
        return error
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return MetabatchError(
        f"shard {shard} of the {what} failed: {type(cause).__name__}: {message}",
        f"Ray ran it up to {TASK_RETRIES + 1} times; check the nodes (`ray status`) and rerun",
    )


def _shards(count: int) -> list[Shard]:
    return [Shard(i, count) for i in range(count)]


# --------------------------------------------------------------------------
# backfill


@dataclass(frozen=True)
class _BackfillArgs:
    """What every shard of a backfill needs (small: sent with each task)."""

    runtime_url: DatabaseURL
    historical_url: DatabaseURL
    selection: RunSelection
    batch_rows: int
    retries: int
    missing: bool
    version: str


def backfill_shard(shard: Shard, args: _BackfillArgs, encoder, embedded: pa.Array | None, tracker):
    """One shard of a backfill, on a Ray worker: ``backfill.backfill`` over the
    shard's runs; returns (its summary, its task's details)."""
    from .backfill import backfill

    with shard_errors():
        reporter = _Reporter(tracker, shard, args.version)
        summary = backfill(
            args.runtime_url, args.historical_url, dataclasses.replace(args.selection, shard=shard),
            model_id=encoder.model_id, batch_rows=args.batch_rows, on_progress=reporter.progress,
            retries=args.retries, encoder=encoder, missing=args.missing, embedded=embedded, count_total=False,
        )
        return summary, reporter.finish(summary.runs_read)


def backfill_on_ray(
    session: RaySession,
    runtime_url: DatabaseURL,
    historical_url: DatabaseURL,
    selection: RunSelection,
    encoder,
    *,
    shards: int | None = None,
    batch_rows: int,
    retries: int,
    missing: bool = False,
    on_progress: Callable[[JobProgress], None] | None = None,
    count_total: bool = False,
):
    """The backfill of ``backfill.backfill``, one Ray task per shard; returns the
    merged ``BackfillSummary`` (shards, nodes, task retries, per shard)."""
    from .backfill import BackfillSummary
    from .embed import JOINT_TYPE
    from ..stores import open_store

    started = time.perf_counter()
    ray = session.ray
    count = shards or default_shards(session.cpus())
    total = None
    selected = None
    per_shard_embedded: list[pa.Array | None] = [None] * count
    runs_store = open_store(runtime_url)
    try:
        runs_store.check_table("backtest_runs")
        if missing:
            history = open_store(historical_url)
            try:
                history.check_table("joint_embeddings")
                if runtime_url.raw != historical_url.raw:
                    # two databases: the embedded run ids read here once, not once per
                    # shard (with one, each shard's read leaves them out itself)
                    per_shard_embedded = split_by_shard(history.embedded_run_ids(JOINT_TYPE, encoder.model_id), count)
            finally:
                history.close()
            selected = runs_store.count_runs(selection)
        elif count_total:
            total = runs_store.count_runs(selection)
    finally:
        runs_store.close()
    args = _BackfillArgs(runtime_url, historical_url, selection, batch_rows, retries, missing, __version__)
    encoder_ref = ray.put(encoder)  # once, to every node through the object store
    embedded_refs = [ray.put(ids) if ids is not None else None for ids in per_shard_embedded]
    outcomes, progress = run_shards(
        ray, backfill_shard, _shards(count), lambda shard: (args, encoder_ref, embedded_refs[shard.index]),
        on_progress, total, "backfill",
    )
    summary = BackfillSummary(model_id=encoder.model_id, encoder=encoder.kind)
    merge_backfills(summary, outcomes, progress)
    if selected is not None:
        summary.count_already_embedded(selected)
    summary.elapsed_seconds = time.perf_counter() - started
    return summary


def merge_backfills(summary, outcomes: Iterable[tuple], progress: JobProgress) -> None:
    """Add the shards' summaries to ``summary`` (rejected runs in shard order)."""
    unseen: set[str] = set()
    nodes = set()
    for shard_summary, details in outcomes:
        summary.runs_read += shard_summary.runs_read
        summary.written += shard_summary.written
        summary.skipped += shard_summary.skipped
        summary.rejected.extend(shard_summary.rejected)
        summary.batches += shard_summary.batches
        summary.retries += shard_summary.retries
        for stage, seconds in shard_summary.stage_seconds.items():
            summary.stage_seconds[stage] = summary.stage_seconds.get(stage, 0.0) + seconds
        unseen.update(shard_summary.unseen_config_paths)
        nodes.add(details["node"])
        summary.per_shard.append(
            {
                **details, "runs_read": shard_summary.runs_read, "written": shard_summary.written,
                "elapsed_seconds": round(shard_summary.elapsed_seconds, 3),
                "stage_seconds": {k: round(v, 3) for k, v in shard_summary.stage_seconds.items()},
            }
        )
    summary.unseen_config_paths = sorted(unseen)
    summary.shards = len(summary.per_shard)
    summary.nodes = len(nodes)
    summary.task_retries = progress.task_retries


# --------------------------------------------------------------------------
# fit: the sample


def sample_shard(shard: Shard, runtime_url: DatabaseURL, selection: RunSelection, batch_rows: int, sample_runs: int, version: str, tracker):
    """One shard's bottom-k sample, on a Ray worker: (runs read, the sample's
    runs with their hash) and the task's details."""
    from ..models.registry import draw_sample

    with shard_errors():
        reporter = _Reporter(tracker, shard, version)
        sample = draw_sample(runtime_url, dataclasses.replace(selection, shard=shard), batch_rows, sample_runs, reporter.progress, count_total=False)
        return (sample.runs, sample.kept), reporter.finish(sample.runs)


def draw_sample_on_ray(
    session: RaySession,
    runtime_url: DatabaseURL,
    selection: RunSelection,
    batch_rows: int,
    sample_runs: int,
    *,
    shards: int | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
    count_total: bool = False,
):
    """The fit's sample of the selected runs (a ``fit.RunSample``), drawn shard by
    shard on the cluster and merged: the same runs a local fit samples."""
    from ..models.fitting import RunSample
    from ..stores import open_store

    count = shards or default_shards(session.cpus())
    total = None
    store = open_store(runtime_url)
    try:
        store.check_table("backtest_runs")
        if count_total:
            total = store.count_runs(selection)
    finally:
        store.close()
    outcomes, _progress = run_shards(
        session.ray, sample_shard, _shards(count),
        lambda shard: (runtime_url, selection, batch_rows, sample_runs, __version__), on_progress, total, "fit",
    )
    sample = RunSample(sample_runs)
    for (runs, kept), _details in outcomes:
        sample.merge(runs, kept)
    return sample


# --------------------------------------------------------------------------
# The Python API (the CLI's `--ray`)


def ray_backfill(
    runtime_url: DatabaseURL,
    historical_url: DatabaseURL | None = None,
    selection: RunSelection = RunSelection(),
    weights=None,
    model_id: str | None = None,
    batch_rows: int | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
    *,
    address: str = "auto",
    shards: int | None = None,
    retries: int | None = None,
    weights_given: bool = False,
    missing: bool = False,
):
    """``backfill.backfill`` sharded over the Ray cluster at ``address`` ("auto":
    RAY_ADDRESS, else the cluster this machine belongs to); the same rows as a
    local backfill. ``shards``: default ``default_shards`` of the cluster's CPUs.
    ``on_progress(JobProgress)``: the job's progress; the runs are counted first
    for it. Returns the merged ``BackfillSummary``."""
    from .backfill import DEFAULT_BATCH_ROWS
    from .embed import DEFAULT_MODEL_ID, Weights
    from ..models.registry import encoder_for
    from .retry import DEFAULT_RETRIES

    historical_url = historical_url or runtime_url
    check_shards(shards)
    check_stores(runtime_url, historical_url)
    started = time.perf_counter()
    with RaySession(address) as session:
        draw = _sampler(session, shards)
        encoder, fitted = encoder_for(
            runtime_url, historical_url, model_id or DEFAULT_MODEL_ID, weights or Weights(), weights_given, selection, draw=draw
        )
        summary = backfill_on_ray(
            session, runtime_url, historical_url, selection, encoder, shards=shards,
            batch_rows=batch_rows or DEFAULT_BATCH_ROWS, retries=DEFAULT_RETRIES if retries is None else retries,
            missing=missing, on_progress=on_progress, count_total=on_progress is not None,
        )
    summary.fitted = fitted.as_dict() if fitted else None
    summary.elapsed_seconds = time.perf_counter() - started
    return summary


def _sampler(session: RaySession, shards: int | None, on_progress: Callable[[JobProgress], None] | None = None):
    """``models.fit``'s ``draw``: the sample drawn shard by shard on the cluster."""

    def draw(runtime_url, selection, batch_rows, sample_runs, _local_progress=None):
        return draw_sample_on_ray(
            session, runtime_url, selection, batch_rows, sample_runs, shards=shards,
            on_progress=on_progress, count_total=on_progress is not None,
        )

    return draw


def ray_fit(
    runtime_url: DatabaseURL,
    historical_url: DatabaseURL | None = None,
    model_id: str | None = None,
    spec=None,
    selection: RunSelection = RunSelection(),
    refit: bool = False,
    batch_rows: int = 25_000,
    sample_runs: int | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
    *,
    address: str = "auto",
    shards: int | None = None,
):
    """``models.fit`` with its sample drawn shard by shard on the Ray cluster at
    ``address``: the same model as a local fit (same content hash)."""
    from ..models.fitting import SAMPLE_RUNS
    from ..models.registry import BUILTIN_V2, fit

    historical_url = historical_url or runtime_url
    check_shards(shards)
    check_stores(runtime_url, historical_url)
    with RaySession(address) as session:
        return fit(
            runtime_url, historical_url, model_id or BUILTIN_V2, spec, selection, refit=refit, batch_rows=batch_rows,
            sample_runs=sample_runs or SAMPLE_RUNS, draw=_sampler(session, shards, on_progress),
        )
