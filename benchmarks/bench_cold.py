"""Benchmark: the first `metabatch similar` in a fresh process, snapshot out of the page cache.

For a snapshot folder, alternating, each after dropping the page cache
(``sync; echo 3 > /proc/sys/vm/drop_caches``; root needed):

- floor: a fresh process reading every file of the snapshot once, 16 MB at a time;
- cold: ``metabatch similar --snapshot DIR --run-id X --top-k 10`` in a fresh
  process (imports included), the run drawn at random each round;
- warm: the same command again, the page cache now warm;
- in process, warm: ``metabatch.similar`` on the opened snapshot against the
  NumPy floor (a pre-normalised float32 matrix times the query, argpartition),
  median of 20 queries.

    python benchmarks/bench_cold.py DIR --model-id ID [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

READ_ALL = """
import os, sys
total = 0
for root, _, files in os.walk(sys.argv[1]):
    for name in files:
        with open(os.path.join(root, name), 'rb', buffering=0) as f:
            while True:
                chunk = f.read(16 << 20)
                if not chunk:
                    break
                total += len(chunk)
print(total)
"""


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshot", type=Path)
    parser.add_argument("--model-id", default="joint-meta-config-env-v1")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from metabatch.snapshot.query import open_snapshot, similar

    data = open_snapshot(args.snapshot).model(args.model_id)
    run_ids = data.meta.column("run_id").to_pylist()
    rng = np.random.default_rng(0)
    metabatch = [str(Path(sys.executable).with_name("metabatch"))]
    floors, colds, warms = [], [], []
    for _ in range(args.rounds):
        run_id = run_ids[int(rng.integers(len(run_ids)))]
        command = [*metabatch, "similar", "--snapshot", str(args.snapshot), "--model-id", args.model_id, "--run-id", run_id, "--top-k", "10"]
        drop_caches()
        floors.append(timed([sys.executable, "-c", READ_ALL, str(args.snapshot)]))
        drop_caches()
        colds.append(timed(command))
        warms.append(timed(command))
        print(f"  floor {floors[-1]:.2f}s  cold {colds[-1]:.2f}s ({colds[-1] / floors[-1]:.2f}x)  warm CLI {warms[-1]:.2f}s", file=sys.stderr)
    # in process, warm: metabatch.similar against the NumPy floor
    matrix = np.asarray(data.matrices[384], np.float32)
    norms = np.linalg.norm(matrix, axis=1)
    unit = matrix / np.where(norms > 0, norms, 1)[:, None]
    ours, numpy_floor = [], []
    for _ in range(20):
        row = int(rng.integers(len(matrix)))
        t0 = time.perf_counter()
        similar(run_ids[row], snapshot=args.snapshot, model_id=args.model_id, top_k=10)
        t1 = time.perf_counter()
        scores = unit @ unit[row]
        np.argpartition(-scores, 11)[:11]
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        numpy_floor.append(t2 - t1)
    report = {
        "snapshot": str(args.snapshot),
        "model_id": args.model_id,
        "snapshot_bytes": sum(f.stat().st_size for f in args.snapshot.rglob("*") if f.is_file()),
        "cold_read_floor_seconds": round(statistics.median(floors), 2),
        "cold_similar_seconds": round(statistics.median(colds), 2),
        "cold_ratio": round(statistics.median(c / f for c, f in zip(colds, floors)), 2),
        "warm_cli_seconds": round(statistics.median(warms), 2),
        "warm_similar_seconds": round(statistics.median(ours), 3),
        "warm_numpy_floor_seconds": round(statistics.median(numpy_floor), 3),
        "warm_ratio": round(statistics.median(a / b for a, b in zip(ours, numpy_floor)), 2),
        "rounds": args.rounds,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
