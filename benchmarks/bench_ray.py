"""Benchmark: backfill on a Ray cluster (`--ray`) against the local job, on this machine.

For each size N it uses the database of bench_backfill.py (N seeded runs,
made if missing; `metabatch migrate` adds the shard index) and measures, in
the same run and alternating, each in a fresh process after a CHECKPOINT:

- local: `backfill` (the single-machine job), as bench_backfill.py runs it;
- ray-K for K = 1, 2, 3 nodes: a local Ray cluster (ray.cluster_utils.Cluster,
  every node on 127.0.0.1) of K nodes of one CPU each, started before and
  stopped after the timed job (not timed), and `metabatch backfill --ray auto
  --json` (default shards: 2 per CPU) in a fresh process. The time includes
  connecting to Ray, counting nothing (no terminal), the shard tasks' worker
  processes starting, and the job.

Reported: each job's time (the summary's elapsed_seconds: what the command
itself spends; and the process's wall time), the ratio ray-K / local of the
same repeat (median over --repeat), per shard its runs, seconds and busy
seconds per stage, the peak RSS of each worker process (VmHWM), and of the
local job. With several sizes: peak RSS per worker, largest / smallest size.

--copy-limits: the database's COPY limits on the same data (psql binary COPY
out of the input columns and in of the output rows, with one stream and with
two at once: the halves by shard).

--missing: on a copy of the N-run database, with 1% new runs added: a full
local backfill, then (its new runs' rows deleted) `backfill --missing`, local
and on 3 nodes; the ratio missing / full.

--data-spike N: the choice between Ray tasks and Ray Data, measured on N runs
on 3 nodes: (a) tasks (what metabatch does), (b) a Ray Data datasource whose
read tasks each run a shard's pipeline (the same work under Ray Data's
executor), (c) Ray Data operators: read tasks stream a shard's runs as blocks
through the object store to map_batches actors that encode and write them.

Usage:
    python benchmarks/bench_ray.py --runs 200000 1000000 --repeat 3 --copy-limits --missing --data-spike 200000
Prints tables and writes benchmarks/out/ray-<N>.json per size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_backfill as bb  # noqa: E402

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1

NODES = (1, 2, 3)


def metabatch_cli(args: list[str], env: dict | None = None) -> tuple[dict, float, float]:
    """`metabatch ARGS --json` in a fresh process: its summary, wall seconds, CPU seconds (user+sys)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "metabatch", *args, "--json"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"metabatch {' '.join(args)} failed: {done.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(done.stdout.strip().splitlines()[-1]), wall, cpu


def local_backfill(url: str, extra: list[str] = ()) -> dict:
    """The local job in a fresh process (as bench_backfill.py runs it), with its
    peak RSS (VmHWM) and CPU seconds."""
    return bb.backfill_process(url, f"missing={'--missing' in extra}")


class LocalCluster:
    """K nodes of one CPU each on this machine (the first is the head)."""

    def __init__(self, nodes: int):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(nodes - 1):
            self.cluster.add_node(num_cpus=1)
        self.cluster.wait_for_nodes()

    def env(self) -> dict:
        return {**os.environ, "RAY_ADDRESS": self.cluster.address}

    def close(self) -> None:
        import shutil

        session = self.cluster.head_node.get_session_dir_path() if self.cluster.head_node else None
        self.cluster.shutdown()
        if session:
            shutil.rmtree(session, ignore_errors=True)  # this cluster's logs


def ray_backfill(url: str, nodes: int, extra: list[str] = ()) -> dict:
    cluster = LocalCluster(nodes)
    try:
        time.sleep(1)
        summary, wall, cpu = metabatch_cli(["backfill", "--runtime-url", url, "--ray", "auto", *extra], cluster.env())
    finally:
        cluster.close()
    summary.update(process_wall_seconds=wall, driver_cpu_seconds=cpu)
    return summary


def truncate(url: str) -> None:
    bb.sql(url, "TRUNCATE joint_embeddings")
    bb.settle(url)


def migrate(url: str) -> None:
    subprocess.run([sys.executable, "-m", "metabatch", "migrate", "--runtime-url", url], check=True, stdout=subprocess.DEVNULL)
    bb.sql(url, "ANALYZE backtest_runs")


# --------------------------------------------------------------------------
# the main comparison


def compare(url: str, n: int, repeat: int) -> dict:
    rounds = []
    for r in range(repeat):
        round_ = {}
        truncate(url)
        round_["local"] = local_backfill(url)
        for k in NODES:
            truncate(url)
            round_[f"ray-{k}"] = ray_backfill(url, k)
        rounds.append(round_)
        line = "  ".join(f"{name} {s['elapsed_seconds']:.2f}s" for name, s in round_.items())
        print(f"  N={n:,} round {r + 1}: {line}", file=sys.stderr)
    ratios = {f"ray-{k}": [rd[f"ray-{k}"]["elapsed_seconds"] / rd["local"]["elapsed_seconds"] for rd in rounds] for k in NODES}
    return {"rounds": rounds, "ratios": ratios, "medians": {name: statistics.median(v) for name, v in ratios.items()}}


def print_comparison(n: int, result: dict) -> None:
    rounds = result["rounds"]
    print(f"\nN = {n:,} runs ({rounds[0]['local']['runs_read']:,} with metrics), {len(rounds)} rounds, each: local, then ray with 1, 2, 3 nodes")
    print(f"{'job':8} {'elapsed (median)':>17} {'process wall':>13} {'ratio to local (each round)':>32} {'median':>7} {'shards':>6} {'nodes':>5} {'peak RSS':>22}")
    local = [rd["local"] for rd in rounds]
    print(
        f"{'local':8} {statistics.median(s['elapsed_seconds'] for s in local):16.2f}s {statistics.median(s['process_wall_seconds'] for s in local):12.2f}s"
        f" {'':>32} {'':>7} {1:>6} {1:>5} {'(job process) ' + format(max(s.get('peak_rss_mb', 0) for s in local), '.0f') + ' MB':>22}"
    )
    for k in NODES:
        runs = [rd[f"ray-{k}"] for rd in rounds]
        each = ", ".join(f"{x:.2f}" for x in result["ratios"][f"ray-{k}"])
        peak = max(p["peak_rss_mb"] for s in runs for p in s["per_shard"])
        print(
            f"{'ray-' + str(k):8} {statistics.median(s['elapsed_seconds'] for s in runs):16.2f}s {statistics.median(s['process_wall_seconds'] for s in runs):12.2f}s"
            f" {each:>32} {result['medians'][f'ray-{k}']:6.2f}x {runs[0]['shards']:>6} {runs[0]['nodes']:>5} {'(worker, max) ' + format(peak, '.0f') + ' MB':>22}"
        )
    # where the time goes per shard: the median round's ray-1 and ray-3
    for k in (1, NODES[-1]):
        runs = sorted((rd[f"ray-{k}"] for rd in rounds), key=lambda s: s["elapsed_seconds"])
        s = runs[len(runs) // 2]
        print(f"  ray-{k} (median round), per shard: runs, seconds in the task, busy seconds per stage (threads overlap), worker peak RSS")
        for p in s["per_shard"]:
            stages = " ".join(f"{st}={v:.1f}" for st, v in p["stage_seconds"].items())
            print(f"    shard {p['shard']}: {p['runs_read']:>8,} runs {p['seconds']:7.2f}s  [{stages}]  {p['peak_rss_mb']:.0f} MB  node {p['node'][:8]}")
        shard_time = max(p["seconds"] for p in s["per_shard"])
        busy = sum(p["seconds"] for p in s["per_shard"]) / k
        print(
            f"    job {s['elapsed_seconds']:.2f}s; the longest shard {shard_time:.2f}s; the shards' seconds / {k} CPU(s) {busy:.2f}s;"
            f" the rest (connecting, counting, workers starting, a CPU left idle at the end) {s['elapsed_seconds'] - busy:.2f}s"
        )


# --------------------------------------------------------------------------
# the database's COPY limits


def copy_limits(url: str) -> dict:
    """Binary COPY out of the input columns and in of the output rows, one stream
    and two at once (each half a shard, read through the shard index)."""
    from metabatch.stores.shards import Shard, shard_condition

    out = {}
    halves = [f"{bb.SELECT_INPUT} AND {shard_condition(Shard(i, 2), 'run_id', 'postgresql')}" for i in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        bb.settle(url)
        out["copy_out_1_stream"] = bb.psql(url, f"\\copy ({bb.SELECT_INPUT}) TO '/dev/null' WITH (FORMAT binary)")
        bb.settle(url)
        out["copy_out_2_streams"] = _parallel([f"\\copy ({q}) TO '/dev/null' WITH (FORMAT binary)" for q in halves], url)
        files = [Path(tmp) / f"rows-{i}.bin" for i in range(2)]
        for i, f in enumerate(files):
            cond = shard_condition(Shard(i, 2), "(entity_scope ->> 'run_id')", "postgresql")
            bb.psql(url, f"\\copy (SELECT joint_type, as_of_date, entity_scope, model_id, vector FROM joint_embeddings WHERE {cond}) TO '{f}' WITH (FORMAT binary)")
        sizes = sum(f.stat().st_size for f in files)
        for streams in (1, 2):
            bb.sql(url, "DROP TABLE IF EXISTS floor_embeddings")
            bb.sql(url, "CREATE TABLE floor_embeddings (LIKE joint_embeddings INCLUDING ALL)")
            bb.settle(url)
            commands = [f"\\copy floor_embeddings (joint_type, as_of_date, entity_scope, model_id, vector) FROM '{f}' WITH (FORMAT binary)" for f in files]
            if streams == 1:
                t0 = time.perf_counter()
                for c in commands:
                    bb.psql(url, c)
                out["copy_in_1_stream"] = time.perf_counter() - t0
            else:
                out["copy_in_2_streams"] = _parallel(commands, url)
        bb.sql(url, "DROP TABLE floor_embeddings")
    out["rows_in"] = bb.sql(url, "SELECT count(*) FROM joint_embeddings")[0][0]
    out["bytes_in"] = sizes
    out["rows_out"] = bb.sql(url, "SELECT count(*) FROM backtest_runs WHERE metrics_json IS NOT NULL")[0][0]
    out["bytes_out"] = bb.sql(url, "SELECT sum(octet_length(config_json::text) + octet_length(metrics_json::text)) FROM backtest_runs WHERE metrics_json IS NOT NULL")[0][0]
    return out


def _parallel(commands: list[str], url: str) -> float:
    t0 = time.perf_counter()
    threads = [threading.Thread(target=bb.psql, args=(url, c)) for c in commands]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------
# --missing after 1% new runs


def missing(n: int, seed: int, repeat: int) -> dict:
    source = f"metabatch_bench_{n}_{seed}"
    name = f"metabatch_bench_missing_{n}_{seed}"
    bb.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    bb.admin(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
    url = f"{bb.SERVER}/{name}"
    try:
        bb.sql(url, "TRUNCATE joint_embeddings")
        cutoff = bb.sql(url, "SELECT now()")[0][0]
        from metabatch.synthetic.seed import seed_runs
        from metabatch.urls import parse_url

        added = seed_runs(parse_url(url), n + n // 100, seed)
        bb.sql(url, "VACUUM ANALYZE backtest_runs")
        rounds = []
        for r in range(repeat):
            truncate(url)
            full = local_backfill(url)
            forget = (
                "DELETE FROM joint_embeddings j USING backtest_runs r"
                f" WHERE r.created_at >= '{cutoff.isoformat()}' AND (j.entity_scope ->> 'run_id') = r.run_id"
            )
            bb.sql(url, forget)
            bb.sql(url, "VACUUM ANALYZE joint_embeddings")
            bb.settle(url)
            incremental = local_backfill(url, ["--missing"])
            bb.sql(url, forget)
            bb.sql(url, "VACUUM ANALYZE joint_embeddings")
            bb.settle(url)
            on_ray = ray_backfill(url, NODES[-1], ["--missing"])
            rounds.append({"full": full, "missing": incremental, "missing_ray": on_ray})
            print(
                f"  missing round {r + 1}: full {full['elapsed_seconds']:.2f}s, --missing {incremental['elapsed_seconds']:.2f}s"
                f" (process {incremental['process_wall_seconds']:.2f}s), --missing --ray {on_ray['elapsed_seconds']:.2f}s",
                file=sys.stderr,
            )
        return {"added": added, "rounds": rounds}
    finally:
        bb.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def print_missing(n: int, result: dict) -> None:
    rounds = result["rounds"]
    print(f"\n--missing on {n:,} runs + {result['added']:,} new (1%), {len(rounds)} rounds: full local backfill, then --missing local and --missing --ray (3 nodes)")
    for key, label in (("missing", "--missing (local)"), ("missing_ray", "--missing --ray, 3 nodes")):
        ratios = [rd[key]["elapsed_seconds"] / rd["full"]["elapsed_seconds"] for rd in rounds]
        walls = [rd[key]["process_wall_seconds"] / rd["full"]["process_wall_seconds"] for rd in rounds]
        s = rounds[0][key]
        print(
            f"  {label:26} {statistics.median(rd[key]['elapsed_seconds'] for rd in rounds):7.2f}s vs full {statistics.median(rd['full']['elapsed_seconds'] for rd in rounds):7.2f}s:"
            f" {statistics.median(ratios) * 100:.1f}% (each: {', '.join(f'{x * 100:.1f}%' for x in ratios)});"
            f" process wall {statistics.median(walls) * 100:.1f}%; read {s['runs_read']:,}, written {s['written']:,}, already embedded {s['already_embedded']:,}"
        )


def one_node_shards(n: int, seed: int, repeat: int) -> dict:
    """On one node, the default shards (2 per CPU) against --shards 1, beside the local job, alternating."""
    url = bb.database_for(n, seed, False)
    migrate(url)
    rounds = {"local": [], "ray-1 --shards 1": [], "ray-1 (default shards)": []}
    for r in range(repeat):
        truncate(url)
        rounds["local"].append(local_backfill(url)["elapsed_seconds"])
        truncate(url)
        rounds["ray-1 --shards 1"].append(ray_backfill(url, 1, ["--shards", "1"])["elapsed_seconds"])
        truncate(url)
        rounds["ray-1 (default shards)"].append(ray_backfill(url, 1)["elapsed_seconds"])
        print(f"  one node, round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in rounds.items()), file=sys.stderr)
    print(f"\none node, {n:,} runs, {repeat} rounds: elapsed (median), ratio to local (each round)")
    for job, times in rounds.items():
        ratios = [t / local for t, local in zip(times, rounds["local"])]
        print(f"  {job:24} {statistics.median(times):7.2f}s  {statistics.median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)})")
    return rounds


# --------------------------------------------------------------------------
# tasks or Ray Data


def data_spike(n: int, seed: int) -> dict:
    """The same backfill three ways on 3 nodes (see the module docstring)."""
    url = bb.database_for(n, seed, False)
    migrate(url)
    out = {}
    for way in ("tasks", "data-pipeline-per-read-task", "data-operators"):
        truncate(url)
        cluster = LocalCluster(3)
        try:
            time.sleep(1)
            t0 = time.perf_counter()
            if way == "tasks":
                summary, _wall, _cpu = metabatch_cli(["backfill", "--runtime-url", url, "--ray", "auto"], cluster.env())
                written = summary["written"]
            else:
                done = subprocess.run(
                    [sys.executable, __file__, "--data-way", way, "--data-url", url], capture_output=True, text=True, env=cluster.env(),
                )
                if done.returncode:
                    raise RuntimeError(done.stderr[-2000:])
                written = json.loads(done.stdout.strip().splitlines()[-1])["written"]
            out[way] = {"seconds": time.perf_counter() - t0, "written": written}
        finally:
            cluster.close()
        print(f"  data spike: {way} {out[way]['seconds']:.2f}s, {written:,} written", file=sys.stderr)
    return out


def run_data_way(way: str, url: str) -> None:
    """In a fresh process, the driver of one Ray Data way (prints {"written": n})."""
    import pyarrow as pa
    import ray
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    from metabatch.pipeline.backfill import backfill, first_batch_rows
    from metabatch.pipeline.embed import JOINT_TYPE  # noqa: F401
    from metabatch.models import encoder_for
    from metabatch.pipeline.read import read_runs
    from metabatch.stores.shards import Shard
    from metabatch.stores import open_store
    from metabatch.stores.base import RunSelection
    from metabatch.urls import parse_url

    ray.init(address="auto", logging_level=logging.ERROR, log_to_driver=False)
    db = parse_url(url)
    encoder, _ = encoder_for(db, db)
    shards = 2 * int(ray.cluster_resources()["CPU"])

    class Shards(Datasource):
        def __init__(self, whole_pipeline: bool):
            self.whole_pipeline = whole_pipeline

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def read(shard: Shard):
                selection = RunSelection(shard=shard)
                if self.whole_pipeline:
                    s = backfill(db, db, selection, encoder=encoder, batch_rows=25_000)
                    yield pa.table({"written": [s.written]})
                    return
                store = open_store(db)
                try:
                    for batch in read_runs(store, selection, 25_000, first_batch_rows(25_000)):
                        yield batch
                finally:
                    store.close()

            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(lambda s=Shard(i, shards): read(s), meta) for i in range(shards)]

    class EmbedAndWrite:
        def __init__(self):
            import duckdb

            from metabatch.pipeline.unnest import ShapeCache

            self.con, self.shapes, self.store = duckdb.connect(), ShapeCache(), open_store(db)

        def __call__(self, runs: pa.Table) -> pa.Table:
            from metabatch.pipeline.write import write_batch

            prepared = encoder.prepare(runs, self.con, self.shapes)
            batch = encoder.embed(prepared, self.con, self.shapes, None)
            return pa.table({"written": [write_batch(self.store, batch, encoder.model_id)]})

    if way == "data-pipeline-per-read-task":
        result = ray.data.read_datasource(Shards(True), override_num_blocks=shards).materialize()
    else:
        result = (
            ray.data.read_datasource(Shards(False), override_num_blocks=shards)
            .map_batches(EmbedAndWrite, batch_size=None, batch_format="pyarrow", concurrency=int(ray.cluster_resources()["CPU"]))
            .materialize()
        )
    written = sum(row["written"] for row in result.iter_rows())
    print(json.dumps({"written": written}))


# --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="*", default=[200_000])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--copy-limits", action="store_true")
    parser.add_argument("--missing", action="store_true", help="--missing after 1%% new runs, on the largest size")
    parser.add_argument("--data-spike", type=int, metavar="N", help="tasks vs Ray Data on N runs")
    parser.add_argument("--no-compare", action="store_true", help="skip the local / 1, 2, 3 nodes comparison")
    parser.add_argument("--one-node-shards", action="store_true", help="one node: default shards against --shards 1, on the largest size")
    parser.add_argument("--data-way", help=argparse.SUPPRESS)
    parser.add_argument("--data-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.data_way:
        run_data_way(args.data_way, args.data_url)
        return
    out_dir = ROOT / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    import ray

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, Ray {ray.__version__}")
    print(f"command: {' '.join(['python', 'benchmarks/bench_ray.py', *sys.argv[1:]])}")
    results = {}
    for n in [] if args.no_compare else args.runs:
        url = bb.database_for(n, args.seed, False)
        migrate(url)
        load = [os.getloadavg()[0]]
        result = {"compare": compare(url, n, args.repeat)}
        if args.copy_limits:
            result["copy_limits"] = copy_limits(url)
        load.append(os.getloadavg()[0])
        result["load_average_1min"] = load
        results[n] = result
        print_comparison(n, result["compare"])
        if args.copy_limits:
            c = result["copy_limits"]
            print(
                f"  COPY limits: out {c['rows_out']:,} runs ({c['bytes_out'] / 1e6:,.0f} MB of JSON text): 1 stream {c['copy_out_1_stream']:.2f}s,"
                f" 2 streams at once {c['copy_out_2_streams']:.2f}s; in {c['rows_in']:,} rows ({c['bytes_in'] / 1e6:,.0f} MB):"
                f" 1 stream {c['copy_in_1_stream']:.2f}s, 2 streams at once {c['copy_in_2_streams']:.2f}s"
            )
        print(f"  load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f}")
        (out_dir / f"ray-{n}.json").write_text(json.dumps(result, indent=2, default=str))
        sys.stdout.flush()
    if len(results) > 1:
        small, big = min(results), max(results)
        for k in NODES:
            peak = {n: max(p["peak_rss_mb"] for rd in results[n]["compare"]["rounds"] for p in rd[f"ray-{k}"]["per_shard"]) for n in (small, big)}
            print(f"peak RSS per worker, ray-{k}: {peak[big]:.0f} MB at {big:,} runs / {peak[small]:.0f} MB at {small:,}: {peak[big] / peak[small]:.2f}x")
    if args.missing:
        n = max(args.runs)
        result = missing(n, args.seed, args.repeat)
        print_missing(n, result)
        (out_dir / f"ray-missing-{n}.json").write_text(json.dumps(result, indent=2, default=str))
    if args.one_node_shards:
        one_node_shards(max(args.runs), args.seed, args.repeat)
    if args.data_spike:
        spike = data_spike(args.data_spike, args.seed)
        base = spike["tasks"]["seconds"]
        print(f"\ntasks or Ray Data, {args.data_spike:,} runs on 3 nodes (one round each):")
        for way, r in spike.items():
            print(f"  {way:30} {r['seconds']:7.2f}s  {r['seconds'] / base:.2f}x tasks  ({r['written']:,} written)")
        (out_dir / f"ray-data-spike-{args.data_spike}.json").write_text(json.dumps(spike, indent=2))


if __name__ == "__main__":
    main()
