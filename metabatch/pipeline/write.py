"""Write: embedding rows -> joint_embeddings, one transaction per batch.

Takes a store and an ``EmbeddedBatch``; replaces, for every run of the batch,
the rows of (joint_type, model_id, run_id) with the new one. Runs rejected in
the batch keep their old rows: nothing about them is known to be better.
"""

from __future__ import annotations

from .embed import JOINT_TYPE, EmbeddedBatch
from ..stores.base import Store


def write_batch(store: Store, batch: EmbeddedBatch, model_id: str, buckets=None) -> int:
    """Write one batch atomically; returns the number of rows written. ``buckets``:
    the shard buckets of the batch's runs, when the job is one shard of a sharded
    job (see ``Store.replace_embeddings``)."""
    if batch.rows.num_rows:
        store.replace_embeddings(batch.rows, JOINT_TYPE, model_id, buckets)
    return batch.rows.num_rows
