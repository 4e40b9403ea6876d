"""The v1 encoder (``joint-meta-config-env-v1``): the spec's flatten + pad, bit for bit.

An adapter to the ``Encoder`` interface over ``metabatch.pipeline.embed`` (the v1
stages: unnest to positions, encode, combine as a weighted average).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from ...pipeline.embed import DEFAULT_MODEL_ID, EmbeddedBatch, PreparedRuns, Weights, embed_batch, prepare_runs
from ...pipeline.unnest import ShapeCache


@dataclass
class V1Encoder:
    weights: Weights = Weights()
    model_id: str = DEFAULT_MODEL_ID
    kind: str = "v1"

    def prepare(self, runs: pa.Table, con: duckdb.DuckDBPyConnection, cache: ShapeCache) -> PreparedRuns:
        return prepare_runs(runs, con, cache)

    def embed(self, prepared, con, cache: ShapeCache, vectors_out: np.ndarray | None = None) -> EmbeddedBatch:
        return embed_batch(prepared, self.weights, self.model_id, con, cache, vectors_out)
