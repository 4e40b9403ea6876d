"""Snapshots: joint_embeddings and the runs they came from, as Parquet for DuckDB.

``export_parquet(out, ...)`` streams the selected META_CONFIG_ENV_V0 embeddings
(historical store) and their runs (runtime store) into a folder::

    DIR/manifest.json                          what, when, from where, row counts
    DIR/embeddings/model_id=<id>/part-00000.parquet ...
    DIR/runs/part-00000.parquet ...
    DIR/index/model_id=<id>/d384.npy           the vectors again, raw float32
    DIR/index/model_id=<id>/meta.arrow         the other embedding columns, Arrow IPC

- ``embeddings``: joint_id, joint_type, as_of_date, run_id, strategy_id,
  universe_id, source (from entity_scope), dim, l2_norm (float64), created_at,
  ``vector`` as FixedSizeList<float32>[384] (DuckDB reads FLOAT[], castable to
  FLOAT[384]; Polars reads Array(Float32, 384)) and ``vector_row``, the row of
  the vector in the model's ``.npy``. Hive-partitioned by model id (the folder
  value is percent-encoded; DuckDB, Polars and PyArrow decode it), so
  ``model_id`` comes from the path. A NULL vector, or one whose byte length is
  not a multiple of 4, has vector, dim, l2_norm and vector_row NULL; a vector
  of another dimension than 384 has its dim and norm, a NULL ``vector`` (the
  column has one type) and its bytes in ``index/.../d<dim>.npy``.
- ``runs``: run_id, strategy_id, universe_id, start_date, end_date,
  config_json and metrics_json (JSON text, exactly as the database prints
  it), then one DOUBLE column per top-level metric key that is a number in
  some run: keys made of ``a-z0-9_`` (starting with a letter or ``_``) that
  are not one of the columns above; a run whose value is not a number has
  NULL there. Only runs that have an exported embedding are written. A part
  file holds the metric columns known when it was written: read the folder
  with ``union_by_name`` (DuckDB) or ``missing_columns="insert"`` (Polars).
- ``index``: what ``similar`` and ``show`` load, in forms that map into memory
  without decoding: one ``.npy`` per (model id, dim), the vectors' bytes
  exactly as in ``joint_embeddings`` (little-endian float32) behind a 128-byte
  NumPy header (``numpy.load(path, mmap_mode="r")``), and ``meta.arrow``, the
  Parquet columns but the vector, as one uncompressed Arrow record batch. So
  the first ``similar`` of a process costs little more than reading the vector
  bytes (decoding the Parquet list column takes seconds at 1M rows, and its
  strings a good part of a second).

One module per part: ``export`` (``export_parquet``: the threads, the
retries), ``embeddings`` (the part files and the index), ``vectors`` (raw
vectors and ``.npy`` files), ``runs``, ``manifest`` and ``swap`` (the
atomic replacement of ``DIR``).
"""

from .embeddings import EMBEDDING_SCHEMA, model_dir_name
from .export import ExportSummary, export_parquet
from .manifest import FORMAT, MANIFEST, SCHEMA_VERSION, describe_url, read_manifest
from .runs import extract_metrics, metric_keys
from .swap import check_out_folder, swap_in
from .vectors import l2_norms, vector_dims, vector_matrix

__all__ = [
    "EMBEDDING_SCHEMA", "FORMAT", "MANIFEST", "SCHEMA_VERSION", "ExportSummary", "check_out_folder",
    "describe_url", "export_parquet", "extract_metrics", "l2_norms", "metric_keys", "model_dir_name",
    "read_manifest", "swap_in", "vector_dims", "vector_matrix",
]
