"""metabatch: columnar batch engine for Meta Config+Env joint embeddings.

Python API (the CLI wraps these):
    migrate(runtime_url, historical_url)
    backfill(runtime_url, historical_url, selection, weights, model_id, batch_rows)
    embed_batch(runs_table, weights, model_id)
"""

__version__ = "0.1.0"
