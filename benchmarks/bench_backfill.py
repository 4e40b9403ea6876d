"""Benchmark: metabatch backfill against a row-at-a-time baseline and the I/O floor.

For each size N it makes a PostgreSQL database, seeds N runs (not timed),
then measures, on the same data and in the same run:

- metabatch backfill (a fresh process: wall time, runs/s, time per stage,
  peak RSS);
- baseline (a), row at a time, the existing tool's way of working: psycopg2,
  every selected run fetched into memory, then per run tests/reference_v1.py's
  branches with their average in NumPy (as in the tool; the same bytes as the
  reference) and one cursor.execute(INSERT), one commit at the end (on at most
  --baseline-max runs; runs/s). For a size above --baseline-max, the speed-up
  is against the baseline's runs/s on its first --baseline-max runs: an
  extrapolation, and the output says so;
- baseline (b), the I/O floor: psql binary COPY out of the selected input
  columns, plus binary COPY in of as many output rows of the same size into a
  table defined like joint_embeddings (same indexes).

With --repeat K, metabatch and the floor are measured K times, alternating,
and the median of the K ratios is reported (the machine is shared: single
runs move by +-20%). Each timed step starts after a CHECKPOINT and a sync, so
that it does not pay for the writes of the step before.

Usage:
    python benchmarks/bench_backfill.py --runs 200000 1000000 --baseline-max 200000 [--repeat 3]
Prints one table and writes benchmarks/out/backfill-<N>.json per size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import adbc_driver_postgresql.dbapi as adbc
import numpy as np
import psycopg2
from psycopg2.extras import Json

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import reference_v1 as ref  # noqa: E402
SERVER = os.environ.get("METABATCH_BENCH_PG", "postgresql://root@127.0.0.1:5432")
SELECT_INPUT = (
    "SELECT run_id, strategy_id, universe_id, end_date, config_json, metrics_json"
    " FROM backtest_runs WHERE metrics_json IS NOT NULL"
)


def admin(sql: str) -> None:
    with adbc.connect(f"{SERVER}/postgres", autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql)


def database_for(n: int, seed: int, reseed: bool) -> str:
    """A database holding exactly the N seeded runs (reused across benchmark runs)."""
    name = f"metabatch_bench_{n}_{seed}"
    url = f"{SERVER}/{name}"
    exists = True
    try:
        with adbc.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM backtest_runs")
            exists = cur.fetchall()[0][0] == n
    except Exception:
        exists = False
    if exists and not reseed:
        return url
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin(f'CREATE DATABASE "{name}"')
    env = {**os.environ, "METABATCH_RUNTIME_URL": url}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "metabatch", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        [sys.executable, "-m", "metabatch", "seed", "--runs", str(n), "--seed", str(seed), "--quiet"],
        env=env, check=True, stdout=subprocess.DEVNULL,
    )
    print(f"  seeded {n} runs in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    with adbc.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE backtest_runs")
    return url


def sql(url: str, statement: str):
    with adbc.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(statement)
        try:
            return cur.fetchall()
        except Exception:
            return None


def settle(url: str) -> None:
    """Write out what earlier steps left dirty (the server's buffers, the OS page
    cache), so that a timed step does not pay for the writes of the one before:
    metabatch and the floor alternate, and each writes some 400 MB."""
    sql(url, "CHECKPOINT")
    os.sync()
    time.sleep(1)


def backfill_process(url: str, arguments: str = "", env: dict | None = None, cwd: str | None = None) -> dict:
    """``backfill(parse_url(url), ARGUMENTS)`` in a fresh process (``env``: another
    tree first on PYTHONPATH, say): its summary, its peak RSS, the package it
    imported (``source``), and the process's wall and CPU seconds."""
    code = (
        "import json, metabatch\n"
        "from metabatch.backfill import backfill\n"  # the old path: bench_ab.py also runs trees from before the re-layout
        "from metabatch.urls import parse_url\n"
        f"s = backfill(parse_url({url!r}){', ' + arguments if arguments else ''})\n"
        "d = s.as_dict(max_rejected=3)\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would
        # report this benchmark process's peak (the baseline holds all its runs)
        "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
        "d['peak_rss_mb'] = int(hwm.split()[1]) / 1024\n"
        "d['source'] = metabatch.__file__\n"
        "print(json.dumps(d))\n"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result.update(process_wall_seconds=wall, process_cpu_seconds=cpu)
    return result


def run_metabatch(url: str, batch_size: int) -> dict:
    """One backfill into an empty table in a fresh process; its summary plus its peak RSS."""
    sql(url, "TRUNCATE joint_embeddings")
    settle(url)
    return backfill_process(url, f"batch_rows={batch_size}")


def encode_row(config, metrics, weights=(1.0, 1.0, 1.0)):
    """One run encoded on its own, as the existing tool does: tests/reference_v1.py's
    per-leaf encoders (flatten, feature), each leaf's feature computed once, the
    branches padded and averaged over their 384 components at once with NumPy.
    (reference_v1.branches hashes the env leaves twice and reference_v1.combine
    averages one component at a time in Python, slow on purpose: 85% of its
    time, which the tool does not spend.) The same float32 operations in the same
    order, so the same bytes as reference_v1.encode_values (check_encode_row).
    Returns (vector bytes, source) or (None, None)."""
    cfg = ref.as_object(config, "config_json")
    m = ref.as_object(metrics, "metrics_json")
    config_features, env_features = [], []
    for path, value in ref.flatten(cfg):
        f = ref.feature(path, value)
        if f is not None:
            config_features.append(f)
            if any(needle in path for needle in ref.ENV_NEEDLES):
                env_features.append(f)
    outcome_features = [ref.feature(key, m[key]) for key in sorted(m) if isinstance(m[key], (bool, int, float))]
    taken = [
        (name, features[: ref.DIM], np.float32(w))
        for name, features, w in zip(("config", "env", "outcome"), (config_features, env_features, outcome_features), weights)
        if features and np.float32(w) > 0
    ]
    if not taken:
        return None, None
    denominator = np.float32(0)
    acc = np.zeros(ref.DIM, dtype=np.float32)
    with np.errstate(all="ignore"):
        for _, features, w in taken:
            vector = np.zeros(ref.DIM, dtype=np.float32)
            vector[: len(features)] = features  # rounded to float32, as the spec says
            denominator = denominator + w
            acc = acc + w * vector
        out = acc / denominator
    if not np.isfinite(out).all():
        raise ref.Rejected("the vector has a non-finite component")
    return out.astype("<f4").tobytes(), "+".join(name for name, _, _ in taken)


def run_row_at_a_time(url: str, limit: int) -> dict:
    """Baseline (a), the existing tool's way of working: psycopg2, every selected
    run fetched into memory first (jsonb decoded by psycopg2), then per run
    encode_row and one cursor.execute(INSERT), and one commit at the end. Runs on
    the first ``limit`` runs; returns runs/s."""
    sql(url, "DROP TABLE IF EXISTS baseline_embeddings")
    sql(url, "CREATE TABLE baseline_embeddings (LIKE joint_embeddings INCLUDING ALL)")
    settle(url)
    t0 = time.perf_counter()
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT run_id, strategy_id, universe_id, end_date, config_json, metrics_json"
            " FROM backtest_runs WHERE metrics_json IS NOT NULL LIMIT %s",
            (int(limit),),
        )
        runs = cur.fetchall()
        for run_id, strategy_id, universe_id, end_date, config, metrics in runs:
            try:
                vector, source = encode_row(config, metrics)
            except ref.Rejected:
                continue
            if vector is None:
                continue
            scope = {"run_id": run_id, "strategy_id": strategy_id, "universe_id": universe_id, "source": source}
            cur.execute(
                "INSERT INTO baseline_embeddings (joint_type, as_of_date, entity_scope, model_id, vector)"
                " VALUES ('META_CONFIG_ENV_V0', %s, %s, 'joint-meta-config-env-v1', %s)",
                (end_date, Json(scope), psycopg2.Binary(vector)),
            )
    conn.commit()
    conn.close()
    seconds = time.perf_counter() - t0
    sql(url, "DROP TABLE baseline_embeddings")
    check_encode_row(runs[:500])
    return {"runs": len(runs), "seconds": seconds, "runs_per_second": len(runs) / seconds}


def check_encode_row(runs) -> None:
    """encode_row gives reference_v1's bytes (checked after the timing, on a sample)."""
    for run in runs:
        config, metrics = run[4], run[5]
        try:
            want = ref.encode_values(config, metrics)
        except ref.Rejected:
            want = "rejected"
        try:
            got = encode_row(config, metrics)
        except ref.Rejected:
            got = "rejected"
        if got != want:
            raise AssertionError(f"encode_row differs from reference_v1 on run {run[0]}")


def psql(url: str, command: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["psql", url, "-q", "-v", "ON_ERROR_STOP=1", "-c", command], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_io_floor(url: str) -> dict:
    """Baseline (b): binary COPY out of the input columns + COPY in of the output rows."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "out.bin"
        settle(url)
        copy_out = psql(url, f"\\copy ({SELECT_INPUT}) TO '/dev/null' WITH (FORMAT binary)")
        # the output rows metabatch wrote are the rows to COPY in
        psql(url, f"\\copy (SELECT joint_type, as_of_date, entity_scope, model_id, vector FROM joint_embeddings) TO '{rows_file}' WITH (FORMAT binary)")
        sql(url, "DROP TABLE IF EXISTS floor_embeddings")
        sql(url, "CREATE TABLE floor_embeddings (LIKE joint_embeddings INCLUDING ALL)")
        settle(url)
        copy_in = psql(url, f"\\copy floor_embeddings (joint_type, as_of_date, entity_scope, model_id, vector) FROM '{rows_file}' WITH (FORMAT binary)")
        sql(url, "DROP TABLE floor_embeddings")
    return {"copy_out_seconds": copy_out, "copy_in_seconds": copy_in, "seconds": copy_out + copy_in}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=25_000)
    parser.add_argument(
        "--baseline-max", type=int, default=200_000,
        help="at most this many runs for the row-at-a-time baseline (larger sizes are extrapolated from its runs/s)",
    )
    parser.add_argument("--reseed", action="store_true", help="reseed even if a bench database exists")
    parser.add_argument("--repeat", type=int, default=1, help="measure metabatch and the floor this many times, alternating")
    args = parser.parse_args()
    out_dir = ROOT / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    rows = []
    for n in args.runs:
        print(f"N = {n}", file=sys.stderr)
        url = database_for(n, args.seed, args.reseed)
        load_before = os.getloadavg()[0]
        pairs = []
        for _ in range(max(1, args.repeat)):
            pairs.append((run_metabatch(url, args.batch_size), run_io_floor(url)))
        # the pair with the median ratio stands for the size; every pair is kept
        pairs.sort(key=lambda pair: pair[0]["elapsed_seconds"] / pair[1]["seconds"])
        ours, floor = pairs[len(pairs) // 2]
        baseline = run_row_at_a_time(url, min(n, args.baseline_max))
        # other jobs share the cores: the load average tells how much they took
        load_after = os.getloadavg()[0]
        # above --baseline-max, the baseline's time for all the runs is extrapolated from its runs/s
        baseline["extrapolated"] = args.baseline_max < n
        baseline["seconds_for_all_runs"] = ours["runs_read"] / baseline["runs_per_second"]
        result = {
            "runs": n,
            "metabatch": ours,
            "row_at_a_time": baseline,
            "io_floor": floor,
            "speedup_vs_row_at_a_time": ours["runs_per_second"] / baseline["runs_per_second"],
            "ratio_to_io_floor": ours["elapsed_seconds"] / floor["seconds"],
            "ratios_to_io_floor": [m["elapsed_seconds"] / f["seconds"] for m, f in pairs],
            "peak_rss_mb_max": max(m["peak_rss_mb"] for m, _ in pairs),
            "load_average_1min": [load_before, load_after],
        }
        (out_dir / f"backfill-{n}.json").write_text(json.dumps(result, indent=2))
        rows.append(result)
        stages = " ".join(f"{k}={v:.2f}" for k, v in ours["stage_seconds"].items())
        print(
            f"N={n:>9,}  metabatch {ours['elapsed_seconds']:7.2f}s {ours['runs_per_second']:>9,.0f} runs/s"
            f"  peak RSS {ours['peak_rss_mb']:6.0f} MB  [{stages}]"
        )
        extrapolated = (
            f", extrapolated to all {ours['runs_read']:,} runs: {baseline['seconds_for_all_runs']:.0f}s"
            if baseline["extrapolated"] else ""
        )
        print(
            f"{'':13}row-at-a-time (psycopg2, as the existing tool) {baseline['seconds']:.2f}s for"
            f" {baseline['runs']:,} runs, {baseline['runs_per_second']:,.0f} runs/s{extrapolated}"
            f"  -> metabatch is {result['speedup_vs_row_at_a_time']:.1f}x"
        )
        print(
            f"{'':13}I/O floor {floor['seconds']:7.2f}s (COPY out {floor['copy_out_seconds']:.2f}s + COPY in"
            f" {floor['copy_in_seconds']:.2f}s) -> metabatch is {result['ratio_to_io_floor']:.2f}x the floor"
        )
        if len(pairs) > 1:
            ratios = ", ".join(f"{r:.2f}" for r in sorted(result["ratios_to_io_floor"]))
            print(f"{'':13}ratios to the floor over {len(pairs)} alternating runs: {ratios} (median shown above)")
            each = ", ".join(f"{m['elapsed_seconds']:.2f}s {m['peak_rss_mb']:.0f} MB / {f['seconds']:.2f}s" for m, f in pairs)
            print(f"{'':13}each run (in the order above), metabatch / floor: {each}")
        print(f"{'':13}load average (1 min) before / after this size: {load_before:.2f} / {load_after:.2f}")
        sys.stdout.flush()
    if len(rows) > 1:
        small, big = rows[0], rows[-1]
        print(
            f"peak RSS {big['runs']:,} / {small['runs']:,} runs: "
            f"{big['peak_rss_mb_max'] / small['peak_rss_mb_max']:.2f}x (highest of each size's runs)"
        )


if __name__ == "__main__":
    main()
