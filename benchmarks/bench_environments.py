"""Benchmark: does v2, with no model file, learn where runs were tried?

For each labelled shape of runs (``metabatch.synthetic.shapes``: the campaigns, runs
shaped like the reference's catalog, environments nested in markets, env
keys and figures under other names, an id that follows the strategy under an
env-looking name), through the real pipeline on a DuckDB file (fit with no
model file, backfill, export-parquet):

- recall@10 of (family, environment) over the joint vectors, against its
  ceiling (a run whose cell holds fewer than 10 other runs cannot reach 1);
- ``suggest --like-run``: the regret of the top-1 and top-5 suggestions (the
  best skill in the target's environment minus the mean skill there of the
  suggested configs' families), beside the global-best baseline (the best
  runs overall as distinct configs, the environment ignored) and random
  configs, on the same targets; a suggested family never tried in the target's
  environment counts as a random pick there (the environment's mean skill);
- ``cluster --on env`` with k chosen by the tool: NMI against the
  environments (and, where environments are nested in markets, against the
  markets for the coarse level);
- ``cluster --on config --k F``: NMI against the F families.

    python benchmarks/bench_environments.py [--runs 20000] [--targets 200] [--shapes catalog nested ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_retrieval import ceiling, queries_of, recall_at  # noqa: E402
from bench_workflows import distinct_global_best  # noqa: E402

from metabatch.pipeline.backfill import backfill  # noqa: E402
from metabatch.workflows.cluster import cluster_runs  # noqa: E402
from metabatch.errors import BadInput  # noqa: E402
from metabatch.stores.migrate import migrate  # noqa: E402
from metabatch.models.modelfile import ModelSpec, parse_model_file  # noqa: E402
from metabatch.models import fit  # noqa: E402
from metabatch.synthetic.shapes import SHAPES, labelled_runs  # noqa: E402
from metabatch.snapshot import export_parquet  # noqa: E402
from metabatch.workflows.space import open_space  # noqa: E402
from metabatch.stores import open_store  # noqa: E402
from metabatch.workflows.suggest import plan_suggestions  # noqa: E402
from metabatch.urls import parse_url  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
MODEL = "bench-env"


def evaluate(shape: str, runs_count: int, targets_count: int, seed: int, folder: Path, model_file: str | None = None) -> dict:
    """The four measures of the module docstring on one shape."""
    from sklearn.metrics import normalized_mutual_info_score

    url = parse_url(f"duckdb://{folder / shape}.duckdb")
    migrate(url)
    runs, labels = labelled_runs(shape, runs_count, seed)
    store = open_store(url)
    try:
        store.insert_runs(runs)
    finally:
        store.close()
    spec = parse_model_file(model_file) if model_file else ModelSpec()
    started = time.perf_counter()
    fit(url, url, MODEL, spec)
    fit_seconds = time.perf_counter() - started
    backfill(url, model_id=MODEL)
    snapshot = folder / f"{shape}-snapshot"
    export_parquet(snapshot, url, url)
    space = open_space(MODEL, snapshot=snapshot)
    labels = space.runs.select("run_id").join(labels, on="run_id", how="left")
    family, env, market = (labels.get_column(c).to_numpy() for c in ("family", "env", "market"))
    n_families, n_envs = int(family.max()) + 1, int(env.max()) + 1
    report: dict = {"shape": shape, "runs": len(labels), "families": n_families, "environments": n_envs, "fit_seconds": round(fit_seconds, 2)}

    # retrieval
    cell = family * 1000 + env
    queries = queries_of(len(labels), 2000)
    vectors = space.vectors()
    report["recall_at_10"] = round(recall_at(vectors, cell, queries), 4)
    report["recall_ceiling"] = round(ceiling(cell, queries), 4)

    # suggest
    skill = np.full((n_families + 1, n_envs), np.nan)
    cells = labels.group_by("family", "env").agg(pl.col("skill").first())
    skill[cells["family"].to_numpy(), cells["env"].to_numpy()] = cells["skill"].to_numpy()
    metric = space.metric("annualised_sharpe")
    rng = np.random.default_rng(seed)
    targets = rng.choice(len(labels), size=min(targets_count, len(labels)), replace=False)
    family_of_run = dict(zip(labels.get_column("run_id").to_list(), family.tolist()))

    def regret(e: int, families, k: int) -> float:
        column = skill[:, e]
        tried = np.isfinite(column)
        picked = column[np.asarray(families[:k])]
        picked = np.where(np.isfinite(picked), picked, column[tried].mean())  # never tried there: a random pick
        return float(column[tried].max() - picked.mean())

    global_best = distinct_global_best(space, metric, family, 5)
    results = {"suggest": [[], []], "global best": [[], []], "random": [[], []]}
    failures = 0
    for t in targets.tolist():
        run_id = labels.get_column("run_id")[t]
        e = int(env[t])
        try:
            frame = plan_suggestions(MODEL, like_run=run_id, snapshot=snapshot, top_k=5).frame
            fams = [_mode([family_of_run[r] for r in ids]) for ids in frame.get_column("run_ids").to_list()]
        except BadInput:  # no environment to compare: nothing better than a random pick
            fams = []
            failures += 1
        fams = fams or [n_families] * 5  # an index past the families: the environment's mean skill
        tried = np.flatnonzero(np.isfinite(skill[:, e]))
        randoms = rng.choice(tried, size=min(5, len(tried)), replace=False)
        for name, picked in (("suggest", fams), ("global best", global_best), ("random", randoms)):
            results[name][0].append(regret(e, picked, 1))
            results[name][1].append(regret(e, picked, 5))
    for name, (top1, top5) in results.items():
        report[f"{name} top1"] = round(float(np.mean(top1)), 3)
        report[f"{name} top5"] = round(float(np.mean(top5)), 3)
    report["suggest failures"] = failures
    report["top5 / global best"] = round(report["suggest top5"] / max(report["global best top5"], 1e-9), 3)

    # clusters
    try:
        on_env = cluster_runs(MODEL, on="env", snapshot=snapshot)
    except BadInput:  # no run has an env slice
        on_env = None
        report["env NMI"], report["env k"] = 0.0, 0
    if on_env is not None:
        joined = on_env.assignments.join(labels, on="run_id")
        report["env NMI"] = round(float(normalized_mutual_info_score(joined["env"], joined["cluster"])), 4)
        report["env k"] = on_env.k
        if len(np.unique(market)) < n_envs:
            report["env NMI vs markets"] = round(float(normalized_mutual_info_score(joined["market"], joined["cluster"])), 4)
    if on_env is not None and on_env.coarse_k is not None:
        joined = on_env.assignments.join(labels, on="run_id")
        report["coarse k"] = on_env.coarse_k
        report["coarse NMI vs markets"] = round(float(normalized_mutual_info_score(joined["market"], joined["coarse"])), 4)
    on_config = cluster_runs(MODEL, on="config", k=n_families, snapshot=snapshot)
    joined = on_config.assignments.join(labels, on="run_id")
    report["config NMI"] = round(float(normalized_mutual_info_score(joined["family"], joined["cluster"])), 4)
    space.close()
    return report


def _mode(values: list[int]) -> int:
    counts = np.bincount(values)
    return int(counts.argmax())


COLUMNS = (
    "recall_at_10", "recall_ceiling", "suggest top1", "suggest top5", "global best top5", "top5 / global best", "random top1",
    "env NMI", "env k", "coarse k", "coarse NMI vs markets", "config NMI", "fit_seconds",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--targets", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--model-file", help="fit with this model file (TOML text file) instead of none")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    model_file = Path(args.model_file).read_text() if args.model_file else None
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            report = evaluate(shape, args.runs, args.targets, args.seed, Path(tmp), model_file)
            reports.append(report)
            print(json.dumps(report), file=sys.stderr)
    (OUT / "environments.json").write_text(json.dumps({"machine": f"{platform.machine()}, {platform.python_version()}", "runs": args.runs, "reports": reports}, indent=2) + "\n")
    print("| shape | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for r in reports:
        print(f"| {r['shape']} | " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
