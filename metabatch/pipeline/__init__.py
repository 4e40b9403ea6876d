"""The batch job's stages, in the order a batch goes through them.

``read`` (runs from the runtime store in bounded batches) -> ``unnest`` (JSON
into leaves: v1's positions, v2's paths) -> ``encode`` and ``combine`` (the
spec's hashing encoders and the branches' combination, v1) -> ``embed``
(a batch of runs -> vectors, with the model's encoder) -> ``write`` (COPY into
joint_embeddings, one transaction a batch). ``backfill`` is the job that runs
them over a selection; ``pipes`` overlaps reading and writing with encoding,
``retry`` reconnects after a lost connection, and ``distributed`` runs the
job's shards as Ray tasks.
"""
