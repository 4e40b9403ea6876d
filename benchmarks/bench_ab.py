"""Benchmark: the local backfill of two source trees, alternating (did a change touch the hot path?).

Runs bench_backfill.py's metabatch step (a fresh process, TRUNCATE, CHECKPOINT,
`backfill` with the defaults) on the database of bench_backfill.py for N runs,
--repeat times for each tree in turn: the tree of this checkout, and the one
given by --base (a folder holding another version's `metabatch/` package,
e.g. `git archive <commit> | tar -x -C DIR`), imported first through
PYTHONPATH. Prints each run and the median ratio this / base.

Usage:
    git archive f4c9d89 | (mkdir -p /tmp/mb-base && tar -x -C /tmp/mb-base)
    python benchmarks/bench_ab.py --base /tmp/mb-base --runs 1000000 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_backfill as bb  # noqa: E402


def run(url: str, base: str | None) -> dict:
    env = dict(os.environ)
    if base:
        env["PYTHONPATH"] = base
    else:
        env.pop("PYTHONPATH", None)
    bb.sql(url, "TRUNCATE joint_embeddings")
    bb.settle(url)
    # from a neutral folder: `python -c` puts the current folder first on sys.path
    return bb.backfill_process(url, env=env, cwd="/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="folder holding the other version's metabatch/ package")
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    url = bb.database_for(args.runs, args.seed, False)
    print(f"command: python benchmarks/bench_ab.py {' '.join(sys.argv[1:])}")
    ratios = []
    for r in range(args.repeat):
        base = run(url, args.base)
        this = run(url, None)
        ratios.append(this["elapsed_seconds"] / base["elapsed_seconds"])
        print(
            f"round {r + 1}: base {base['elapsed_seconds']:.2f}s {base['peak_rss_mb']:.0f} MB ({base['source']}),"
            f" this {this['elapsed_seconds']:.2f}s {this['peak_rss_mb']:.0f} MB ({this['source']}): {ratios[-1]:.3f}x"
            f"  load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    print(f"this / base, median of {len(ratios)}: {statistics.median(ratios):.3f}x (each: {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
