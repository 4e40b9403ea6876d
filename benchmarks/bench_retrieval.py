"""Benchmark: do a run's nearest neighbours share its config family and environment?

On labelled campaign runs (``metabatch.synthetic.campaigns``: config families drawn from
shared templates, environments, a known skill per (family, environment), and
the noise real configs carry), each case goes through the real pipeline on a
DuckDB file (migrate, insert the runs, ``fit``, ``backfill``) and reports
recall@10: the share of a query run's 10 cosine neighbours (among every other
run) with the same family and environment, over 2,000 query runs (chance is
about 1 / (families x environments)).

Cases (all in one run, same data per case):
- main: v1 (``joint-meta-config-env-v1``), v2 with no model file, v2 with a
  model file that declares the noise paths as ``ignore``, and the fit's
  alternatives (``fit.FitOptions``): the outcome branch at its full weight
  (not shrunk by its fitted reliability), no weights, presence indicators on
  every path, outcome groups weighted too; per-branch recall of family /
  environment;
- held-out families: fitted on 30 of the 40 families, the other 10 backfilled
  afterwards with the same model; recall of their runs;
- fixed shapes: the case v1 already handles (a config shape per family, a few
  categorical noise fields, the environment only in the metrics);
- other draws: other seeds, more families or environments (120 x 12: about 14
  runs per (family, environment), where per-run luck in the outcomes has the
  most room to pull neighbours across).
Prints a Markdown table and writes benchmarks/out/retrieval.json.

    python benchmarks/bench_retrieval.py [--runs 20000] [--queries 2000]
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
import pyarrow as pa

from metabatch.pipeline.backfill import backfill
from metabatch.synthetic.campaigns import campaign_runs
from metabatch.models.encoders.v2 import SLICES
from metabatch.models.fitting import FitOptions
from metabatch.stores.migrate import migrate
from metabatch.models.modelfile import ModelSpec, parse_model_file
from metabatch.models import fit, registered
from metabatch.snapshot.query import set_from_database
from metabatch.stores import open_store
from metabatch.stores.base import EmbeddingFilter
from metabatch.urls import parse_url

OUT = Path(__file__).resolve().parent / "out"
NOISE_PATHS = ["seed", "initial_capital", "notes", "git_commit", "request_id", "submitted_by", "submitted_at", "ensemble_weights", "debug"]
IGNORE_FILE = "[paths]\nignore = " + json.dumps(NOISE_PATHS) + "\n"


class Case:
    """One labelled data set in its own DuckDB file."""

    def __init__(self, folder: Path, name: str, runs: pa.Table):
        self.url = parse_url(f"duckdb://{folder / name}.duckdb")
        migrate(self.url)
        store = open_store(self.url)
        try:
            store.insert_runs(runs)
        finally:
            store.close()

    def vectors(self, model_id: str, run_ids: list[str]) -> np.ndarray:
        data = set_from_database(self.url, EmbeddingFilter(model_id))
        meta = data.sql("SELECT run_id, vector_row FROM embeddings", {})
        row_of = dict(zip(meta.column("run_id").to_pylist(), meta.column("vector_row").to_pylist()))
        matrix = np.asarray(data.matrices[384])
        out = np.zeros((len(run_ids), 384), np.float32)
        for i, run_id in enumerate(run_ids):  # a benchmark's bookkeeping, not the pipeline
            if run_id in row_of:
                out[i] = matrix[row_of[run_id]]
        data.close()
        return out

    def embed(self, model_id: str, spec: ModelSpec | None = None, options: FitOptions = FitOptions(), fit_runs=None, selection=None):
        """Fit (v2) then backfill; returns (fit seconds, backfill seconds)."""
        from metabatch.stores.base import RunSelection

        t0 = time.perf_counter()
        if spec is not None:
            fit(self.url, self.url, model_id, spec, selection or RunSelection(), options=options)
        t1 = time.perf_counter()
        backfill(self.url, model_id=model_id)
        return t1 - t0, time.perf_counter() - t1


def recall_at(vectors: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Share of each query's k cosine neighbours (itself excluded) with its label."""
    norms = np.linalg.norm(vectors, axis=1)
    x = vectors / np.where(norms > 0, norms, 1)[:, None]
    hits = 0
    for start in range(0, len(queries), 500):
        q = queries[start : start + 500]
        sims = x[q] @ x.T
        sims[np.arange(len(q)), q] = -np.inf
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        hits += int((labels[top] == labels[q][:, None]).sum())
    return hits / (len(queries) * k)


def ceiling(labels: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """The best recall@k can be: a query whose label holds fewer than k other runs
    cannot have k neighbours with it."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return float(np.minimum(counts[inverse[queries]] - 1, k).mean() / k)


def queries_of(n: int, count: int, mask: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    pool = np.arange(n) if mask is None else np.flatnonzero(mask)
    return np.random.default_rng(seed).choice(pool, size=min(count, len(pool)), replace=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=2_000)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results = []

    def row(case: str, encoder: str, recall: float, note: str = "", **extra):
        results.append({"case": case, "encoder": encoder, "recall_at_10": round(recall, 4), "note": note, **extra})
        print(f"  {case:<24} {encoder:<34} recall@10 {recall:.3f} {note}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # -- main
        runs, labels = campaign_runs(args.runs, seed=11)
        cell = (labels["family"] * 1000 + labels["env"]).to_numpy()
        family, env = labels["family"].to_numpy(), labels["env"].to_numpy()
        ids = labels["run_id"].to_list()
        case = Case(folder, "main", runs)
        q = queries_of(len(ids), args.queries)
        chance = float(np.mean([(cell == cell[i]).sum() - 1 for i in q]) / (len(ids) - 1))
        _, seconds = case.embed("joint-meta-config-env-v1")
        row("main", "v1", recall_at(case.vectors("joint-meta-config-env-v1", ids), cell, q), f"(chance {chance:.4f}, ceiling {ceiling(cell, q):.3f})", backfill_seconds=round(seconds, 2))
        variants = [
            ("v2, no model file", "v2-plain", ModelSpec(), FitOptions()),
            ("v2, noise paths ignored", "v2-ignore", parse_model_file(IGNORE_FILE), FitOptions()),
            ("v2, no file, outcome not shrunk", "v2-unshrunk", ModelSpec(), FitOptions(outcome_reliability=False)),
            ("v2, ignore file, outcome not shrunk", "v2-ignore-unshrunk", parse_model_file(IGNORE_FILE), FitOptions(outcome_reliability=False)),
            ("v2, no file, no weights", "v2-noweights", ModelSpec(), FitOptions(weigh_config="none")),
            ("v2, no file, presence always", "v2-presence", ModelSpec(), FitOptions(presence="always")),
            ("v2, no file, outcome weighted", "v2-outcomew", ModelSpec(), FitOptions(weigh_outcome=True)),
            ("v2, ignore file, outcome weight 0", "v2-ignore-noout", parse_model_file(IGNORE_FILE + "[weights]\noutcome = 0.0\n"), FitOptions()),
        ]
        for label, model_id, spec, options in variants:
            fit_seconds, seconds = case.embed(model_id, spec, options)
            vectors = case.vectors(model_id, ids)
            per_branch = {}
            for branch, (start, stop) in SLICES.items():
                per_branch[branch] = {
                    "family": round(recall_at(vectors[:, start:stop], family, q), 3),
                    "env": round(recall_at(vectors[:, start:stop], env, q), 3),
                }
            note = "; ".join(f"{b}: fam {r['family']:.2f} env {r['env']:.2f}" for b, r in per_branch.items())
            reliability = registered(case.url, model_id).v2().reliability.get("outcome", 1.0)
            note += f"; outcome reliability {reliability:.2f}"
            row("main", label, recall_at(vectors, cell, q), note, fit_seconds=round(fit_seconds, 2), backfill_seconds=round(seconds, 2), per_branch=per_branch, outcome_reliability=round(reliability, 3))
        model = registered(case.url, "v2-plain").v2()
        weights = {p: model.config_paths[p] for p in ("submitted_by.host", "submitted_by.user", "seed", "initial_capital", "notes", "model.kind", "strategy.signal.type", "portfolio.method")}
        shown = {p: (m.string.weight if m.string else m.number.weight) for p, m in weights.items()}
        print("  fitted weights (no model file): " + ", ".join(f"{p} {w:.2f}" for p, w in shown.items()), file=sys.stderr)
        results.append({"case": "main", "encoder": "v2, no model file", "fitted_weights": {p: round(w, 3) for p, w in shown.items()}})

        # -- held-out families
        held = family % 4 == 3
        runs_ids = np.array(ids)
        for label, model_id, spec in (("v2, no model file", "v2-held-plain", ModelSpec()), ("v2, noise paths ignored", "v2-held-ignore", parse_model_file(IGNORE_FILE))):
            fitted = Case(folder, f"held-{model_id}", runs.filter(pa.array(~held)))
            fit(fitted.url, fitted.url, model_id, spec)
            store = open_store(fitted.url)
            try:  # the 10 families left out arrive after the fit
                store.insert_runs(runs.filter(pa.array(held)))
            finally:
                store.close()
            backfill(fitted.url, model_id=model_id)
            vectors = fitted.vectors(model_id, list(runs_ids))
            hq = queries_of(len(ids), args.queries, held, seed=1)
            row("held-out families", label, recall_at(vectors, cell, hq), "(10 of 40 families not in the fit)")

        # -- fixed shapes: v1 already works
        runs, labels = campaign_runs(args.runs, seed=11, variant="fixed_shapes")
        cell = (labels["family"] * 1000 + labels["env"]).to_numpy()
        ids = labels["run_id"].to_list()
        case = Case(folder, "fixed", runs)
        case.embed("joint-meta-config-env-v1")
        row("fixed shapes", "v1", recall_at(case.vectors("joint-meta-config-env-v1", ids), cell, q))
        case.embed("v2-plain", ModelSpec())
        row("fixed shapes", "v2, no model file", recall_at(case.vectors("v2-plain", ids), cell, q))

        # -- other draws
        draws = (("seed 5, 80 families", 5, 80, 8), ("seed 7, 12 environments", 7, 40, 12), ("seed 9, 120 families x 12 environments", 9, 120, 12))
        for name, seed, n_families, n_envs in draws:
            runs, labels = campaign_runs(args.runs, seed=seed, n_families=n_families, n_envs=n_envs)
            cell = (labels["family"] * 1000 + labels["env"]).to_numpy()
            ids = labels["run_id"].to_list()
            case = Case(folder, f"draw{seed}", runs)
            case.embed("joint-meta-config-env-v1")
            row(name, "v1", recall_at(case.vectors("joint-meta-config-env-v1", ids), cell, q), f"(ceiling {ceiling(cell, q):.3f})")
            case.embed("v2-plain", ModelSpec())
            row(name, "v2, no model file", recall_at(case.vectors("v2-plain", ids), cell, q))
            case.embed("v2-ignore", parse_model_file(IGNORE_FILE))
            row(name, "v2, noise paths ignored", recall_at(case.vectors("v2-ignore", ids), cell, q))
            case.embed("v2-ignore-unshrunk", parse_model_file(IGNORE_FILE), FitOptions(outcome_reliability=False))
            row(name, "v2, noise paths ignored, outcome not shrunk", recall_at(case.vectors("v2-ignore-unshrunk", ids), cell, q))

    report = {"runs": args.runs, "queries": args.queries, "machine": f"{platform.machine()}, {platform.python_version()}", "results": results}
    (OUT / "retrieval.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| case | encoder | recall@10 | note |\n|---|---|---:|---|")
    for r in results:
        if "recall_at_10" in r:
            print(f"| {r['case']} | {r['encoder']} | {r['recall_at_10']:.3f} | {r['note']} |")


if __name__ == "__main__":
    main()
