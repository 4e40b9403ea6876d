"""Benchmark: v2 backfill and fit against a v1 backfill of the same runs, same run.

For each size N it uses the PostgreSQL database of ``bench_backfill.py``
(N seeded runs, made on first use), then measures, alternating, each in a
fresh process after a CHECKPOINT and a sync:

- v1: ``backfill`` with ``joint-meta-config-env-v1`` (into an empty table);
- fit: ``metabatch fit`` of a v2 model with the defaults (``--refit``: the
  same id each time), which streams every selected run and fits on a sample;
- v2: ``backfill`` with that model (into an empty table).

It reports the medians and the ratios v2 / v1 and fit / v1 (medians of the
per-round ratios), the peak RSS of each (VmHWM), and the RSS at N over the
smallest N. The machine is shared: read the ratios, measured side by side.

    python benchmarks/bench_v2.py --runs 200000 1000000 [--repeat 3]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backfill import database_for, settle, sql  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
MODEL = "bench-v2"

_CHILD = """
import json, sys, time
from metabatch.urls import parse_url
url = parse_url(sys.argv[2])
t0 = time.perf_counter()
if sys.argv[1] == "fit":
    from metabatch.models import fit
    summary = fit(url, url, sys.argv[3], refit=True).as_dict()
else:
    from metabatch.pipeline.backfill import backfill
    summary = backfill(url, model_id=sys.argv[3]).as_dict(max_rejected=2)
summary["wall_seconds"] = time.perf_counter() - t0
summary["peak_rss_mb"] = int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]) / 1024
print(json.dumps(summary))
"""


def child(kind: str, url: str, model_id: str) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, kind, url, model_id], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def measure(url: str, repeat: int) -> dict:
    rounds = []
    env = {**os.environ, "METABATCH_RUNTIME_URL": url}
    subprocess.run([sys.executable, "-m", "metabatch", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)  # joint_models
    child("fit", url, MODEL)  # the model exists before the first v2 backfill
    for _ in range(repeat):
        sql(url, "TRUNCATE joint_embeddings")
        settle(url)
        v1 = child("backfill", url, "joint-meta-config-env-v1")
        sql(url, "TRUNCATE joint_embeddings")
        settle(url)
        fitted = child("fit", url, MODEL)
        sql(url, "TRUNCATE joint_embeddings")
        settle(url)
        v2 = child("backfill", url, MODEL)
        rounds.append({"v1": v1, "fit": fitted, "v2": v2})
        print(
            f"    v1 {v1['process_seconds']:.2f}s  fit {fitted['process_seconds']:.2f}s  v2 {v2['process_seconds']:.2f}s"
            f"  (v2/v1 {v2['process_seconds'] / v1['process_seconds']:.2f}, fit/v1 {fitted['process_seconds'] / v1['process_seconds']:.2f};"
            f" RSS v1 {v1['peak_rss_mb']:.0f} MB, fit {fitted['peak_rss_mb']:.0f} MB, v2 {v2['peak_rss_mb']:.0f} MB;"
            f" load {os.getloadavg()[0]:.1f})",
            file=sys.stderr,
        )
    median = lambda key, what: statistics.median(r[key][what] for r in rounds)  # noqa: E731
    return {
        "v1_seconds": round(median("v1", "process_seconds"), 2),
        "fit_seconds": round(median("fit", "process_seconds"), 2),
        "v2_seconds": round(median("v2", "process_seconds"), 2),
        "v2_over_v1": round(statistics.median(r["v2"]["process_seconds"] / r["v1"]["process_seconds"] for r in rounds), 3),
        "fit_over_v1": round(statistics.median(r["fit"]["process_seconds"] / r["v1"]["process_seconds"] for r in rounds), 3),
        "peak_rss_mb": {k: round(max(r[k]["peak_rss_mb"] for r in rounds)) for k in ("v1", "fit", "v2")},
        "v2_written": rounds[-1]["v2"]["written"],
        "v2_stage_seconds": rounds[-1]["v2"]["stage_seconds"],
        "v1_stage_seconds": rounds[-1]["v1"]["stage_seconds"],
        "rounds": len(rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    report = {}
    for n in args.runs:
        print(f"{n:,} runs", file=sys.stderr)
        url = database_for(n, args.seed, reseed=False)
        report[n] = measure(url, args.repeat)
        (OUT / f"v2-{n}.json").write_text(json.dumps(report[n], indent=2) + "\n")
    smallest = min(report)
    print("| runs | v1 backfill | v2 fit | v2 backfill | v2 / v1 | fit / v1 | peak RSS v1 / fit / v2 |\n|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in report.items():
        rss = r["peak_rss_mb"]
        print(f"| {n:,} | {r['v1_seconds']:.2f} s | {r['fit_seconds']:.2f} s | {r['v2_seconds']:.2f} s | **{r['v2_over_v1']:.2f}x** | **{r['fit_over_v1']:.2f}x** | {rss['v1']} / {rss['fit']} / {rss['v2']} MB |")
    for n, r in report.items():
        if n != smallest:
            ratio = r["peak_rss_mb"]["v2"] / report[smallest]["peak_rss_mb"]["v2"]
            print(f"v2 peak RSS {n:,} / {smallest:,}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
