"""metabatch: columnar batch engine for Meta Config+Env joint embeddings.

Python API (the CLI wraps these):
    migrate(runtime_url, historical_url)
    backfill(runtime_url, historical_url, selection, weights, model_id, batch_rows, retries=)
    embed_batch(runs_table, weights, model_id)
    export_parquet(out, historical_url, runtime_url, model_id=, strategy_id=, start=, end=, retries=)
    show(snapshot=, as_of=, start=, end=, run_id=, strategy_id=, universe_id=, model_id=, limit=)
    similar(run_id, snapshot=, model_id=, strategy_id=, start=, end=, top_k=, candidate_limit=)
    meta_ctx_norms(strategy_id, model_id, snapshot=, run_id=, start=, end=)
    sql(query, snapshot)
    models.fit(runtime_url, historical_url, model_id, spec, selection, refit=)   fitted (v2) models
    suggest(model_id, like_run= | env=, snapshot=, metric=, top_k=, ...)      Polars DataFrames
    cluster_runs(model_id, on=, k=, snapshot=, seed=, ...)                   .assignments, .summary
    draw_landscape(model_id, out=, color=, on=, layout=, snapshot=, ...)     .coordinates
"""

__version__ = "0.1.0"


_LAZY = {
    "export_parquet": "snapshot",
    "show": "query",
    "similar": "query",
    "meta_ctx_norms": "query",
    "sql": "query",
    "suggest": "suggest",
    "plan_suggestions": "suggest",
    "cluster_runs": "cluster",
    "draw_landscape": "landscape",
}


def __getattr__(name):
    """Import the query and snapshot functions on first use: `import metabatch` stays cheap."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'metabatch' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
