"""Snapshots and queries at scale: export-parquet, warm and cold `similar`, each
next to its floor, measured side by side in one run.

    python benchmarks/bench_query.py --url postgresql://root@127.0.0.1:5432/mbbench_query \\
        --out benchmarks/out/snapshot [--rounds 3] [--queries 20] [--skip-export]

The database must hold embedded runs (`metabatch seed` + `metabatch backfill`).
Floors:
- export: psql binary COPY to /dev/null of the same rows and columns that
  export-parquet reads (the embeddings query and the runs query), one after
  the other ("sequential") and at the same time ("parallel");
- warm similar: a pre-normalised float32 matrix (in memory) times the query
  vector plus argpartition, in the same process, alternating with
  `metabatch.similar` on the already opened snapshot;
- cold similar: a fresh process reading the snapshot's vector bytes (the
  index .npy) with one read(); then a fresh process timing its first
  `metabatch.similar` (imports done before the clock starts; import time
  reported apart). Both with the snapshot's files evicted from the page cache
  (posix_fadvise DONTNEED) and both with the cache warm.
For context: DuckDB array_cosine_similarity over an in-memory FLOAT[384]
table, and the `nearest` SQL macro over the snapshot's Parquet.
Writes a JSON report to OUT/../bench_query.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

EMB_SQL = (
    "SELECT joint_id, joint_type, model_id, as_of_date, entity_scope ->> 'run_id', entity_scope ->> 'strategy_id',"
    " entity_scope ->> 'universe_id', entity_scope ->> 'source', vector, created_at FROM joint_embeddings"
    " WHERE joint_type = 'META_CONFIG_ENV_V0'"
)
RUNS_SQL = "SELECT run_id, strategy_id, universe_id, start_date, end_date, config_json, metrics_json FROM backtest_runs"
MODEL = "joint-meta-config-env-v1"


def psql_copy(url: str, sql: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["psql", url, "-q", "-c", f"\\copy ({sql}) TO '/dev/null' WITH (FORMAT binary)"],
        stdout=subprocess.DEVNULL,
    )


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (they are clean: written and synced)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def bench_export(url: str, out: Path, rounds: int) -> dict:
    result = {"copy_embeddings": [], "copy_runs": [], "copy_sequential": [], "copy_parallel": [], "export": []}
    for _ in range(rounds):
        a = timed(lambda: psql_copy(url, EMB_SQL).wait())
        b = timed(lambda: psql_copy(url, RUNS_SQL).wait())
        result["copy_embeddings"].append(a)
        result["copy_runs"].append(b)
        result["copy_sequential"].append(a + b)

        def both():
            procs = [psql_copy(url, EMB_SQL), psql_copy(url, RUNS_SQL)]
            for p in procs:
                p.wait()

        result["copy_parallel"].append(timed(both))
        cmd = [sys.executable, "-m", "metabatch", "export-parquet", "--historical-url", url, "--runtime-url", url,
               "--out", str(out), "--json"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result["export"].append(time.perf_counter() - t0)
        result["summary"] = json.loads(done.stdout)
        print(f"  export round: copy seq {a + b:.2f}s (emb {a:.2f} + runs {b:.2f}), copy parallel "
              f"{result['copy_parallel'][-1]:.2f}s, export-parquet {result['export'][-1]:.2f}s", flush=True)
    return result


def bench_warm(out: Path, queries: int) -> dict:
    import duckdb
    import numpy as np
    import pyarrow as pa

    import metabatch
    from metabatch.snapshot.query import open_snapshot

    snapshot = open_snapshot(out)
    data = snapshot.model(MODEL)
    matrix = data.matrices[384]
    rng = np.random.default_rng(1)
    meta = data.sql("SELECT run_id, vector_row FROM embeddings WHERE dim = 384 AND run_id IS NOT NULL", {})
    picks = rng.choice(meta.num_rows, queries, replace=False)
    run_ids = meta.column("run_id").take(pa.array(picks)).to_pylist()
    rows = meta.column("vector_row").take(pa.array(picks)).to_numpy()

    # The floor's matrix: in memory, pre-normalised, float32.
    t0 = time.perf_counter()
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    normalised = np.divide(matrix, norms, out=np.zeros(matrix.shape, np.float32), where=norms > 0)
    prepare = time.perf_counter() - t0
    metabatch.similar(run_ids[0], snapshot=out)  # the snapshot is opened (cold run measured apart)

    floor, ours = [], []
    for run_id, row in zip(run_ids, rows):
        q = normalised[row]
        floor.append(timed(lambda: np.argpartition(-(normalised @ q), 10)[:10]))
        ours.append(timed(lambda: metabatch.similar(run_id, snapshot=out, top_k=10)))

    # Context: DuckDB over an in-memory FLOAT[384] table, and the SQL macro over Parquet.
    con = duckdb.connect()
    con.register("m", pa.table({"i": np.arange(len(matrix)), "v": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(matrix).reshape(-1)), 384)}))
    con.execute("CREATE TABLE t AS SELECT * FROM m")
    duck = []
    for row in rows[:3]:
        q = [float(x) for x in matrix[row]]
        duck.append(timed(lambda: con.sql(
            "SELECT i FROM t ORDER BY array_cosine_similarity(v, $q::FLOAT[384]) DESC LIMIT 10", params={"q": q}
        ).fetchall()))
    sql_times = [timed(lambda: metabatch.sql(f"SELECT * FROM nearest('{run_id}', 10)", out)) for run_id in run_ids[:2]]
    return {
        "queries": queries,
        "floor_prepare_seconds": prepare,
        "floor": floor,
        "similar": ours,
        "duckdb_in_memory_float384": duck,
        "sql_nearest_macro_over_parquet": sql_times,
    }


_READ = "import sys, time; t = time.perf_counter(); open(sys.argv[1], 'rb').read(); print(time.perf_counter() - t)"
_FIRST = (
    "import sys, time, warnings; t = time.perf_counter(); import metabatch.snapshot.query as q; i = time.perf_counter() - t;"
    " warnings.simplefilter('ignore');"
    " t = time.perf_counter(); q.similar(sys.argv[2], snapshot=sys.argv[1]); print(time.perf_counter() - t, i)"
)


def bench_cold(out: Path, rounds: int) -> dict:
    from metabatch.snapshot import read_manifest

    manifest = read_manifest(out)
    npy = out / manifest["embeddings"]["models"][MODEL]["vectors"]["384"]["path"]
    run_id = None
    import metabatch

    run_id = metabatch.show(snapshot=out, limit=1)["run_id"][0]
    result = {"vector_bytes": npy.stat().st_size}
    for cache in ("evicted", "warm"):
        reads, firsts, imports = [], [], []
        for _ in range(rounds):
            if cache == "evicted":
                evict(out)
            reads.append(float(subprocess.run([sys.executable, "-c", _READ, str(npy)], capture_output=True, text=True, check=True).stdout))
            if cache == "evicted":
                evict(out)
            line = subprocess.run([sys.executable, "-c", _FIRST, str(out), run_id], capture_output=True, text=True, check=True).stdout
            first, imported = map(float, line.split())
            firsts.append(first)
            imports.append(imported)
            print(f"  cold round ({cache} cache): read vector bytes {reads[-1]:.2f}s, first similar {first:.2f}s"
                  f" (+ imports {imported:.2f}s)", flush=True)
        result[cache] = {"read_vector_bytes": reads, "first_similar": firsts, "imports": imports}
    return result


def med(values) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/snapshot"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--skip-export", action="store_true", help="Reuse the snapshot at --out.")
    args = parser.parse_args()
    args.out = args.out.absolute()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"url": args.url, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
              "loadavg_start": os.getloadavg()}
    if not args.skip_export:
        print("export-parquet vs COPY ...", flush=True)
        report["export"] = bench_export(args.url, args.out, args.rounds)
    print("warm similar vs NumPy floor ...", flush=True)
    report["warm"] = bench_warm(args.out, args.queries)
    print("first similar in a fresh process vs reading the vector bytes ...", flush=True)
    report["cold"] = bench_cold(args.out, args.rounds)
    report["loadavg_end"] = os.getloadavg()
    (args.out.parent / "bench_query.json").write_text(json.dumps(report, indent=2))

    print()
    print("| measure | floor | metabatch | ratio | target |")
    print("|---|---|---|---|---|")
    if "export" in report:
        e = report["export"]
        seq, par, ours = med(e["copy_sequential"]), med(e["copy_parallel"]), med(e["export"])
        print(f"| export-parquet, {e['summary']['embeddings']:,} embeddings + {e['summary']['runs']:,} runs "
              f"| COPY {seq:.1f}s (sequential; parallel {par:.1f}s) | {ours:.1f}s | {ours / seq:.2f}x ({ours / par:.2f}x parallel) | <= 1.5x |")
    w = report["warm"]
    print(f"| similar top-10, warm (median of {w['queries']}) | NumPy {med(w['floor']):.3f}s | {med(w['similar']):.3f}s "
          f"| {med(w['similar']) / med(w['floor']):.2f}x | <= 3x |")
    for cache in ("evicted", "warm"):
        c = report["cold"][cache]
        print(f"| first similar, fresh process, {cache} page cache | read {report['cold']['vector_bytes'] / 1e9:.2f} GB "
              f"{med(c['read_vector_bytes']):.2f}s | {med(c['first_similar']):.2f}s (+{med(c['imports']):.2f}s imports) "
              f"| {med(c['first_similar']) / med(c['read_vector_bytes']):.2f}x | <= 2x |")
    print(f"| context: DuckDB array_cosine_similarity, in-memory FLOAT[384] | | {med(w['duckdb_in_memory_float384']):.2f}s | | |")
    print(f"| context: `nearest` SQL macro over the Parquet snapshot | | {med(w['sql_nearest_macro_over_parquet']):.2f}s | | |")
    print(f"load average: start {report['loadavg_start']}, end {report['loadavg_end']}")


if __name__ == "__main__":
    main()
