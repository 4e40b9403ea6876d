"""Landscape layouts: how well each keeps a run's neighbours, and what it costs.

For each slice (``--on``) and layout, in a fresh process as a user runs it
(imports and any JIT compilation included), ``draw_landscape`` of a snapshot
to an ``.html`` page: wall seconds from the process's first statement to the
page written, CPU seconds (all threads), peak RSS (VmHWM) and the page's
size. Then, outside the timing, the trustworthiness at k = 10
(``sklearn.manifold.trustworthiness``) of the drawn coordinates against the
runs' L2-normalised slice, on a random sample of ``--trust-sample`` drawn runs
(the same runs for every layout of a slice).

Layouts: ``pca`` (the baseline: speed ratios are against it, in the same
round), ``tsne`` (openTSNE, the default), and ``umap`` when umap-learn is
installed (``pip install umap-learn``; not a dependency: the candidate not
taken). UMAP runs through the same ``draw_landscape`` with
``landscape.tsne_layout`` replaced by ``umap.UMAP(n_neighbors=15,
random_state=seed)`` over the same 50 principal components of every drawn run
(a seed makes UMAP single-threaded; numba compiles on first use in a process,
and caches to disk: the first round pays more).

Rounds alternate the layouts; medians are shown, with the machine's load.

    .venv/bin/python benchmarks/bench_landscape.py --snapshot metabatch-demo/metabatch-demo-snapshot \\
        --on config:cluster joint:annualised_sharpe --layouts pca tsne umap --rounds 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DRIVER = r"""
import json, os, sys, time
started, cpu_started = time.perf_counter(), time.process_time()
args = json.loads(sys.argv[1])
import numpy as np
from metabatch.workflows import landscape

if args["layout"] == "umap":
    def umap_layout(points, laid, seed):
        import umap
        from sklearn.decomposition import PCA
        pcs = min(landscape.TSNE_PCS, points.shape[1], len(points))
        reduced = PCA(n_components=pcs, svd_solver="covariance_eigh", random_state=seed).fit_transform(points)
        return umap.UMAP(n_neighbors=15, random_state=seed).fit_transform(reduced)
    landscape.tsne_layout = umap_layout
layout = "pca" if args["layout"] == "pca" else "tsne"
drawn = landscape.draw_landscape(
    args["model"], out=args["out"], color=args["color"], on=args["on"], layout=layout,
    snapshot=args["snapshot"], seed=args["seed"],
)
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))

from sklearn.manifold import trustworthiness
from metabatch.workflows.space import open_space
import polars as pl
space = open_space(args["model"], snapshot=args["snapshot"])
positions = space.runs.select("run_id").with_row_index("position").join(drawn.coordinates, on="run_id")
sample = positions.sort("run_id").sample(min(args["trust_sample"], positions.height), seed=args["trust_seed"])
points = space.unit_rows(args["on"], sample.get_column("position").to_numpy())
xy = sample.select("x", "y").to_numpy()
trust = trustworthiness(points, xy, n_neighbors=10)
print(json.dumps({
    "seconds": seconds, "cpu": cpu, "rss_mb": hwm / 1024, "bytes": os.path.getsize(args["out"]),
    "points": drawn.points, "runs": drawn.runs, "layout_used": drawn.layout, "trust": trust,
}))
"""


def run_once(python: str, layout: str, on: str, color: str, args, out: Path) -> dict:
    spec = {
        "layout": layout, "on": on, "color": color, "model": args.model_id, "snapshot": str(args.snapshot),
        "out": str(out), "seed": args.seed, "trust_sample": args.trust_sample, "trust_seed": 1,
    }
    load = os.getloadavg()[0]
    # -P: the installed metabatch, not one in the current folder.
    done = subprocess.run([python, "-P", "-c", DRIVER, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{layout} on {on} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load"] = load
    return result


def chromium_draws(page: Path) -> str:
    """Seconds for headless Chromium to draw the page, and the points it drew."""
    import re
    import shutil
    import time

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return "no chromium"
    with tempfile.TemporaryDirectory() as profile:
        started = time.perf_counter()
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
             "--virtual-time-budget=60000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=300,
        ).stdout
        seconds = time.perf_counter() - started
    drawn = re.search(r'data-rendered-points="(\d+)"', dom)
    return f"{seconds:.1f} s, data-rendered-points={drawn.group(1) if drawn else 'none'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--model-id", default="joint-meta-config-env-v2")
    parser.add_argument("--on", nargs="+", default=["config:cluster", "joint:annualised_sharpe"], help="SLICE:COLOR pairs")
    parser.add_argument("--layouts", nargs="+", default=["pca", "tsne", "umap"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-sample", type=int, default=5000)
    parser.add_argument("--chromium", action="store_true", help="Also time headless Chromium drawing the last t-SNE page.")
    args = parser.parse_args()
    python = sys.executable
    layouts = list(args.layouts)
    if "umap" in layouts:
        try:
            import umap  # noqa: F401
        except ImportError:
            print("umap-learn is not installed: the umap candidate is skipped (pip install umap-learn)")
            layouts.remove("umap")
    import metabatch

    print(f"bench_landscape {dt.datetime.now().isoformat(timespec='seconds')} on {platform.node()}, {os.cpu_count()} cores,"
          f" Python {platform.python_version()}, snapshot {args.snapshot}, model {args.model_id}")
    versions = {}
    for name in ("openTSNE", "umap", "sklearn", "numba"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()), "| metabatch", getattr(metabatch, "__version__", "dev"))
    with tempfile.TemporaryDirectory() as folder:
        for pair in args.on:
            on, color = pair.split(":")
            results: dict[str, list[dict]] = {layout: [] for layout in layouts}
            for round_ in range(args.rounds):
                for layout in layouts if round_ % 2 == 0 else list(reversed(layouts)):
                    out = Path(folder) / f"{on}-{layout}.html"
                    result = run_once(python, layout, on, color, args, out)
                    results[layout].append(result)
                    print(f"  round {round_ + 1} {on:7s} {layout:5s} {result['seconds']:7.1f} s wall {result['cpu']:7.1f} s CPU"
                          f" {result['rss_mb']:6.0f} MB  {result['bytes'] / 1e6:5.1f} MB page  {result['points']:,} of {result['runs']:,} runs"
                          f"  trust@10 {result['trust']:.4f}  load {result['load']:.1f}", flush=True)
            base = statistics.median(r["seconds"] for r in results["pca"]) if results.get("pca") else None
            print(f"{on} slice, coloured by {color}: medians of {args.rounds} rounds")
            print("| layout | trustworthiness@10 | seconds (wall) | CPU s | / PCA (wall) | peak RSS | page |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for layout, rows in results.items():
                seconds = statistics.median(r["seconds"] for r in rows)
                print(f"| {layout} | {statistics.median(r['trust'] for r in rows):.4f} | {seconds:.1f} | "
                      f"{statistics.median(r['cpu'] for r in rows):.1f} | {seconds / base:.2f}x | "
                      f"{statistics.median(r['rss_mb'] for r in rows):,.0f} MB | {statistics.median(r['bytes'] for r in rows) / 1e6:.1f} MB |"
                      if base else "")
            if args.chromium and "tsne" in results:
                print(f"Chromium, the {on} t-SNE page: {chromium_draws(Path(folder) / f'{on}-tsne.html')}")


if __name__ == "__main__":
    main()
