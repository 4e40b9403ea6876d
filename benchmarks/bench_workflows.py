"""Benchmark: are the workflows' answers good, and fast at 1M runs?

Quality, on labelled campaign runs (``metabatch.synthetic.campaigns``; a known skill per
(family, environment), in units of its standard deviation), through the real
pipeline (DuckDB file: fit, backfill, export-parquet):

- ``suggest``: for target runs drawn at random, the regret of the top-1 and
  top-5 suggestions (the best skill in the target's environment minus the
  mean skill there of the suggested configs' families), beside two baselines
  measured on the same targets: the globally best runs as distinct configs
  (the environment ignored) and random distinct configs; with --like-run and
  with --env (the target's market, universe and horizon only);
- ``cluster``: NMI of ``--on config --k <families>`` against the families,
  and of ``--on env`` (k chosen by the tool) against the environments.

Speed, with ``--speed-snapshot DIR`` (a snapshot of a v2 model's
embeddings, e.g. 1M runs): one ``suggest`` from a warm Python session
(median of 10 targets) and from the CLI in a fresh process; ``cluster --on
config --k 40`` and ``landscape`` in fresh processes (time, peak RSS, page
size).

    python benchmarks/bench_workflows.py [--runs 20000] [--targets 200]
    python benchmarks/bench_workflows.py --skip-quality --speed-snapshot DIR --speed-model ID
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from metabatch.pipeline.backfill import backfill
from metabatch.synthetic.campaigns import campaign_runs
from metabatch.stores.migrate import migrate
from metabatch.models import fit
from metabatch.snapshot import export_parquet
from metabatch.workflows.space import open_space
from metabatch.stores import open_store
from metabatch.workflows.suggest import DUPLICATE_COSINE, plan_suggestions
from metabatch.urls import parse_url

OUT = Path(__file__).resolve().parent / "out"
MODEL = "bench-v2"


def quality(runs_count: int, targets_count: int, seed: int) -> dict:
    from sklearn.metrics import normalized_mutual_info_score

    from metabatch.workflows.cluster import cluster_runs

    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = parse_url(f"duckdb://{folder / 'runs.duckdb'}")
        migrate(url)
        runs, labels = campaign_runs(runs_count, seed=seed)
        store = open_store(url)
        try:
            store.insert_runs(runs)
        finally:
            store.close()
        fit(url, url, MODEL)
        backfill(url, model_id=MODEL)
        snapshot = folder / "snapshot"
        export_parquet(snapshot, url, url)
        space = open_space(MODEL, snapshot=snapshot)
        labels = space.runs.select("run_id").join(labels, on="run_id", how="left")
        family = labels.get_column("family").to_numpy()
        env = labels.get_column("env").to_numpy()
        n_families, n_envs = int(family.max()) + 1, int(env.max()) + 1
        skill = np.zeros((n_families, n_envs))
        cells = labels.group_by("family", "env").agg(pl.col("skill").first())
        skill[cells["family"].to_numpy(), cells["env"].to_numpy()] = cells["skill"].to_numpy()
        metric = space.metric("annualised_sharpe")
        rng = np.random.default_rng(seed)
        targets = rng.choice(len(labels), size=targets_count, replace=False)

        def family_of(run_ids):
            rows = labels.filter(pl.col("run_id").is_in(run_ids))
            return int(rows.get_column("family").mode().sort()[0])

        def regret(e, families, k):
            return float(skill[:, e].max() - skill[families[:k], e].mean())

        global_best = distinct_global_best(space, metric, family, 5)
        results = {"suggest --like-run": [[], []], "suggest --env (market, universe, horizon)": [[], []], "global best runs": [[], []], "random configs": [[], []]}
        seconds = []
        for t in targets.tolist():
            run_id = labels.get_column("run_id")[t]
            e = int(env[t])
            started = time.perf_counter()
            frame = plan_suggestions(MODEL, like_run=run_id, snapshot=snapshot, top_k=5).frame
            seconds.append(time.perf_counter() - started)
            fams = [family_of(ids) for ids in frame.get_column("run_ids").to_list()]
            config = space.configs([run_id])[run_id]
            keys = [f"market_id={config['market_id']}", f"universe_id={config['universe_id']}",
                    f"assessment_horizon_days={config['assessment']['assessment_horizon_days']}"]
            by_env = plan_suggestions(MODEL, env=keys, snapshot=snapshot, top_k=5).frame
            env_fams = [family_of(ids) for ids in by_env.get_column("run_ids").to_list()]
            random_fams = rng.choice(n_families, size=5, replace=False)
            for name, fams_k in (("suggest --like-run", fams), ("suggest --env (market, universe, horizon)", env_fams), ("global best runs", global_best), ("random configs", random_fams)):
                results[name][0].append(regret(e, np.array(fams_k), 1))
                results[name][1].append(regret(e, np.array(fams_k), 5))
        report["suggest"] = {
            name: {"top1_regret": round(float(np.mean(r1)), 3), "top5_regret": round(float(np.mean(r5)), 3)} for name, (r1, r5) in results.items()
        }
        report["suggest"]["targets"] = targets_count
        report["suggest"]["median_seconds"] = round(statistics.median(seconds), 3)
        on_config = cluster_runs(MODEL, on="config", k=n_families, snapshot=snapshot)
        joined = on_config.assignments.join(labels, on="run_id")
        on_env = cluster_runs(MODEL, on="env", snapshot=snapshot)
        joined_env = on_env.assignments.join(labels, on="run_id")
        report["cluster"] = {
            "config, k = families": round(float(normalized_mutual_info_score(joined["family"], joined["cluster"])), 4),
            "env, k by silhouette": round(float(normalized_mutual_info_score(joined_env["env"], joined_env["cluster"])), 4),
            "env k chosen": on_env.k,
        }
        space.close()
    return report


def distinct_global_best(space, metric, family, k):
    """The families of the best runs overall as distinct configs (leaders by config cosine)."""
    start, stop = space.slices["config"]
    order = np.argsort(-np.nan_to_num(metric, nan=-np.inf))
    leaders, fams = [], []
    for i in order.tolist():  # a walk down the ranking until k distinct configs
        v = np.asarray(space.matrix[space.rows[i], start:stop], np.float64)
        v /= np.linalg.norm(v) or 1.0
        if any(float(v @ u) >= DUPLICATE_COSINE for u in leaders):
            continue
        leaders.append(v)
        fams.append(int(family[i]))
        if len(leaders) == k:
            break
    return fams


def _peak_rss_run(args: list[str]) -> tuple[float, float, str]:
    """Run a command; (seconds, peak RSS in MB from its VmHWM, stdout)."""
    code = (
        "import runpy, sys, resource\n"
        f"sys.argv = {['metabatch', *args]!r}\n"
        "try:\n    runpy.run_module('metabatch', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('PEAK_RSS_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)\n"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    if done.returncode != 0 or not peak:
        raise RuntimeError(done.stderr[-2000:])
    return seconds, int(peak[-1].split()[1]) / 1024, done.stdout


def speed(snapshot: Path, model_id: str) -> dict:
    space = open_space(model_id, snapshot=snapshot)
    run_ids = space.runs.get_column("run_id")
    rng = np.random.default_rng(0)
    targets = [run_ids[int(i)] for i in rng.choice(len(run_ids), 11, replace=False)]
    plan_suggestions(model_id, like_run=targets[0], snapshot=snapshot)  # warms the session (caches)
    warm = []
    for target in targets[1:]:
        started = time.perf_counter()
        plan_suggestions(model_id, like_run=target, snapshot=snapshot)
        warm.append(time.perf_counter() - started)
    report = {"runs": len(run_ids), "suggest_warm_median_seconds": round(statistics.median(warm), 3)}
    seconds, rss, _ = _peak_rss_run(["suggest", "--snapshot", str(snapshot), "--model-id", model_id, "--like-run", targets[1], "--format", "json"])
    report["suggest_cli_seconds"], report["suggest_cli_peak_rss_mb"] = round(seconds, 2), round(rss)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "clusters.parquet"
        seconds, rss, _ = _peak_rss_run(["cluster", "--snapshot", str(snapshot), "--model-id", model_id, "--on", "config", "--k", "40", "--out", str(out), "--quiet"])
        report["cluster_config_k40_seconds"], report["cluster_peak_rss_mb"] = round(seconds, 1), round(rss)
        page = Path(tmp) / "landscape.html"
        seconds, rss, _ = _peak_rss_run(["landscape", "--snapshot", str(snapshot), "--model-id", model_id, "--out", str(page)])
        report["landscape_html_seconds"], report["landscape_peak_rss_mb"] = round(seconds, 1), round(rss)
        report["landscape_html_mb"] = round(page.stat().st_size / 1e6, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--targets", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--speed-snapshot", type=Path)
    parser.add_argument("--speed-model", default="joint-meta-config-env-v2")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    report = {}
    if not args.skip_quality:
        report["quality"] = quality(args.runs, args.targets, args.seed)
        print(json.dumps(report["quality"], indent=2))
    if args.speed_snapshot:
        report["speed"] = speed(args.speed_snapshot, args.speed_model)
        print(json.dumps(report["speed"], indent=2))
    (OUT / "workflows.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
