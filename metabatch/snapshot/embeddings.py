"""The snapshot's embeddings: ``embeddings/model_id=<id>/part-*.parquet`` and
``index/model_id=<id>/`` (``d<dim>.npy``, ``meta.arrow``).

Two stages, each on a thread of its own in an export: ``EmbeddingWriter.add``
turns the database's record batches into part tables and appends their
vectors to the ``.npy`` files; ``write_parts`` encodes the part tables as
Parquet and appends their other columns to ``meta.arrow``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..pipeline.embed import DIM
from .vectors import SharedVectorFile, VectorFile, l2_norms, vector_dims, vector_matrix

# Rows per Parquet row group, and per part file.
EMBEDDING_GROUP_ROWS = 65_536
EMBEDDING_PART_ROWS = 262_144

VECTOR_TYPE = pa.list_(pa.field("element", pa.float32(), nullable=False), DIM)
EMBEDDING_SCHEMA = pa.schema(
    [
        ("joint_id", pa.int64()),
        ("joint_type", pa.string()),
        ("as_of_date", pa.date32()),
        ("run_id", pa.string()),
        ("strategy_id", pa.string()),
        ("universe_id", pa.string()),
        ("source", pa.string()),
        ("dim", pa.int32()),
        ("l2_norm", pa.float64()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("vector", VECTOR_TYPE),
        ("vector_row", pa.int64()),
    ]
)


def model_dir_name(model_id: str) -> str:
    """The hive folder of a model id (percent-encoded, so any id is one safe folder name)."""
    return "model_id=" + quote(model_id, safe="")


@dataclass(frozen=True)
class Layout:
    """Where a writer puts its files: a local export writes every file whole; a
    shard of a sharded export (``snapshot.sharded``) names its part files and
    index table with ``prefix`` and writes its vectors into the ``.npy`` files
    the driver made, from the row ``first_rows[(model_id, dim)]`` on (the row
    numbers, ``vector_row``, are then the final ones)."""

    prefix: str = ""
    first_rows: dict | None = None

    @property
    def sharded(self) -> bool:
        return self.first_rows is not None


@dataclass
class Part:
    """A part file to write: its Parquet path, its model's meta.arrow, its rows."""

    parquet: Path
    meta: Path
    table: pa.Table


@dataclass
class _ModelFiles:
    """What one model id writes: Parquet part files, one .npy per dim, the index table."""

    folder: str
    vectors: dict[int, VectorFile] = field(default_factory=dict)
    parts: list[Path] = field(default_factory=list)
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    rows: int = 0


class EmbeddingWriter:
    """Turns stream_embeddings batches into part tables and ``.npy`` vectors.

    ``add(batch)`` returns the parts that are full; ``finish()`` the rest.
    ``run_ids`` holds the run id of every embedding added.
    """

    def __init__(self, root: Path, layout: Layout = Layout()):
        self.root = root
        self.layout = layout
        self.models: dict[str, _ModelFiles] = {}
        self.run_ids: list[pa.Array] = []
        # model id -> (start, stop) of its env slice (v2 models): written again,
        # L2-normalised, as index/<model>/env.npy, all ``suggest`` reads
        self.env_slices: dict[str, tuple[int, int]] = {}

    def _files(self, model_id: str) -> _ModelFiles:
        if model_id not in self.models:
            self.models[model_id] = _ModelFiles(model_dir_name(model_id))
        return self.models[model_id]

    def _vector_file(self, model_id: str, dim: int | str, width: int | None = None) -> VectorFile:
        files = self._files(model_id)
        if dim not in files.vectors:
            name = f"d{dim}.npy" if isinstance(dim, int) else f"{dim}.npy"
            path = self.root / "index" / model_dir_name(model_id) / name
            if self.layout.sharded:
                # the env slices have the rows of the model's DIM vectors
                first = self.layout.first_rows[(model_id, dim if isinstance(dim, int) else DIM)]
                files.vectors[dim] = SharedVectorFile(path, width or dim, first)
            else:
                files.vectors[dim] = VectorFile(path, width or dim)
        return files.vectors[dim]

    def _append(self, model_id: str, dim: int, matrix: np.ndarray) -> int:
        """Append vectors to the model's .npy of ``dim`` (and its env slice); returns the first row."""
        first = self._vector_file(model_id, dim).append(matrix)
        if dim == DIM and model_id in self.env_slices:
            start, stop = self.env_slices[model_id]
            block = matrix[:, start:stop].astype(np.float64)
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))
            unit = (block / np.where(norms > 0, norms, 1.0)[:, None]).astype("<f4")
            self._vector_file(model_id, "env", stop - start).append(unit)
        return first

    def add(self, batch: pa.RecordBatch) -> list[Part]:
        table = pa.Table.from_batches([batch])
        models = table.column("model_id")
        distinct = pc.unique(models).to_pylist()
        parts = []
        for model_id in distinct:
            rows = table if len(distinct) == 1 else table.filter(pc.equal(models, model_id))
            parts.extend(self._add_model(model_id, rows))
        return parts

    def _add_model(self, model_id: str, table: pa.Table) -> list[Part]:
        files = self._files(model_id)
        n = table.num_rows
        vectors = table.column("vector").combine_chunks()
        dims = vector_dims(vectors)
        if dims.null_count == 0 and pc.all(pc.equal(dims, DIM)).as_py():
            # The usual batch: every vector has DIM components.
            matrix = vector_matrix(vectors, DIM)
            first = self._append(model_id, DIM, matrix)
            norms = pa.array(l2_norms(matrix))
            vector_row = pa.array(np.arange(first, first + n, dtype=np.int64))
            parquet_vector = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), type=VECTOR_TYPE)
        else:
            # Vectors of other dims go to their own .npy (Parquet's column is FLOAT[DIM]:
            # NULL there); NULL vectors and byte lengths that are not a multiple of 4 have
            # no vector at all.
            dim_values = np.asarray(pc.fill_null(dims, -1).to_numpy(zero_copy_only=False))
            norm_values = np.zeros(n)
            row_values = np.zeros(n, dtype=np.int64)
            full = np.zeros((n, DIM), dtype="<f4")
            for dim in sorted(set(dim_values.tolist()) - {-1}):
                where = np.flatnonzero(dim_values == dim)
                matrix = vector_matrix(vectors.take(pa.array(where)), dim)
                first = self._append(model_id, dim, matrix)
                norm_values[where] = l2_norms(matrix)
                row_values[where] = np.arange(first, first + len(where))
                if dim == DIM:
                    full[where] = matrix
            has = dim_values >= 0
            norms = pa.array(norm_values, mask=~has)
            vector_row = pa.array(row_values, mask=~has)
            parquet_vector = pa.FixedSizeListArray.from_arrays(
                pa.array(full.reshape(-1)), type=VECTOR_TYPE, mask=pa.array(dim_values != DIM)
            )
        out = pa.table(
            [
                table.column("joint_id"), table.column("joint_type"), table.column("as_of_date"),
                table.column("run_id"), table.column("strategy_id"), table.column("universe_id"),
                table.column("source"), dims, norms,
                table.column("created_at").cast(pa.timestamp("us", tz="UTC")), parquet_vector, vector_row,
            ],
            schema=EMBEDDING_SCHEMA,
        )
        files.pending.append(out)
        files.pending_rows += n
        files.rows += n
        self.run_ids.append(table.column("run_id").combine_chunks())
        return [self._flush(files)] if files.pending_rows >= EMBEDDING_PART_ROWS else []

    def _flush(self, files: _ModelFiles) -> Part:
        path = self.root / "embeddings" / files.folder / f"part-{self.layout.prefix}{len(files.parts):05d}.parquet"
        files.parts.append(path)
        meta = f"meta-{self.layout.prefix.rstrip('-')}.arrow" if self.layout.prefix else "meta.arrow"
        part = Part(path, self.root / "index" / files.folder / meta, pa.concat_tables(files.pending))
        files.pending, files.pending_rows = [], 0
        return part

    def finish(self) -> list[Part]:
        """The parts not written yet; closes the .npy files."""
        parts = [self._flush(files) for files in self.models.values() if files.pending_rows]
        for files in self.models.values():
            for vector_file in files.vectors.values():
                vector_file.close()
        return parts

    def run_id_set(self) -> pa.Array:
        """The run ids of every embedding added, as one array."""
        ids = [a for a in self.run_ids if len(a)]
        return pa.concat_arrays(ids) if ids else pa.array([], pa.string())

    def section(self) -> dict:
        """The manifest's ``embeddings`` section (once every part is written)."""
        models: dict[str, dict] = {}
        for model_id, files in sorted(self.models.items()):
            models[model_id] = {
                "rows": files.rows,
                "path": f"embeddings/{files.folder}",
                "files": [path.relative_to(self.root).as_posix() for path in files.parts],
                "meta": f"index/{files.folder}/" + (f"meta-{self.layout.prefix.rstrip('-')}.arrow" if self.layout.prefix else "meta.arrow"),
                "vectors": {
                    str(dim): {"path": v.path.relative_to(self.root).as_posix(), "rows": v.rows - getattr(v, "first", 0)}
                    for dim, v in sorted((d, v) for d, v in files.vectors.items() if isinstance(d, int))
                },
            }
            if "env" in files.vectors:
                v = files.vectors["env"]
                models[model_id]["env_unit"] = {
                    "path": v.path.relative_to(self.root).as_posix(), "rows": v.rows - getattr(v, "first", 0), "width": v.dim,
                }
        return {"rows": sum(m["rows"] for m in models.values()), "models": models}

    def abort(self) -> None:
        """Close the open files of a failed export."""
        for files in self.models.values():
            for vector_file in files.vectors.values():
                vector_file.abort()


def embedding_parts(writer: EmbeddingWriter, batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[int, list[Part]]]:
    """(rows added, parts that are full) per batch of ``batches``, then (0, the last parts)."""
    for batch in batches:
        yield batch.num_rows, writer.add(batch)
    yield 0, writer.finish()


def write_parts(items: Iterable[tuple[int, list[Part]]]) -> Iterator[int]:
    """Write the parts of ``embedding_parts``: Parquet, and every column but the
    vector appended to the model's ``meta.arrow``; yields the rows of each item.

    Polars writes the Parquet: it encodes the FixedSizeList vector column about
    3x cheaper than PyArrow (measured: 0.38 s vs 1.0 s of CPU per 250k rows),
    the largest CPU cost of an export after the database read.
    """
    import polars as pl

    index: dict[Path, tuple[pa.OSFile, pa.ipc.RecordBatchFileWriter]] = {}
    try:
        for rows, parts in items:
            for part in parts:
                part.parquet.parent.mkdir(parents=True, exist_ok=True)
                # zstd for the vectors too: ~90% of their components are the zero
                # padding of short branches, so they shrink ~15x and write faster.
                pl.from_arrow(part.table, rechunk=False).write_parquet(
                    part.parquet, compression="zstd", compression_level=1, row_group_size=EMBEDDING_GROUP_ROWS
                )
                meta = part.table.drop_columns(["vector"])
                if part.meta not in index:
                    part.meta.parent.mkdir(parents=True, exist_ok=True)
                    sink = pa.OSFile(str(part.meta), "wb")
                    index[part.meta] = (sink, pa.ipc.new_file(sink, meta.schema))
                index[part.meta][1].write_table(meta, max_chunksize=max(meta.num_rows, 1))
            yield rows
    except BaseException:
        for sink, _writer in index.values():
            sink.close()  # the files are thrown away with the build folder
        raise
    for sink, writer in index.values():
        writer.close()
        sink.close()
