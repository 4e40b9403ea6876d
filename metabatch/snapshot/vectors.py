"""Raw vectors: joint_embeddings' binary vectors as float32 matrices, their
dims and norms, and the ``.npy`` files of the snapshot's index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.lib import format as npy


def vector_matrix(vectors: pa.Array, dim: int) -> np.ndarray:
    """The (n, dim) float32 view of a binary array whose values are all dim*4 bytes long."""
    vectors = vectors.combine_chunks() if isinstance(vectors, pa.ChunkedArray) else vectors
    n = len(vectors)
    if n == 0:
        return np.empty((0, dim), dtype="<f4")
    offsets_type = np.int64 if pa.types.is_large_binary(vectors.type) else np.int32
    offsets = np.frombuffer(vectors.buffers()[1], dtype=offsets_type, count=n + 1, offset=vectors.offset * np.dtype(offsets_type).itemsize)
    start = int(offsets[0])
    if vectors.null_count or int(offsets[-1]) - start != n * dim * 4:
        raise ValueError("vectors are not all of one length")
    data = np.frombuffer(vectors.buffers()[2], dtype=np.uint8, count=n * dim * 4, offset=start)
    return data.view("<f4").reshape(n, dim)


def vector_dims(vectors: pa.Array) -> pa.Array:
    """dim per vector: byte length / 4, NULL when NULL or not a multiple of 4."""
    lengths = pc.binary_length(vectors)
    whole = pc.equal(pc.bit_wise_and(lengths, 3), 0)
    return pc.if_else(whole, pc.cast(pc.divide(lengths, 4), pa.int32()), pa.scalar(None, pa.int32()))


def l2_norms(matrix: np.ndarray) -> np.ndarray:
    """Row norms in float64 (the float32 values, squared and summed in double)."""
    return np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64))


class VectorFile:
    """A (rows, dim) little-endian float32 ``.npy`` file written by appending
    rows; ``close`` writes the row count into its header.

    NumPy's header leaves room for the row count to grow, so the header
    written at close has the length of the first one (128 bytes) and the rows
    stay where they are; ``numpy.load(path, mmap_mode="r")`` reads the file.
    """

    def __init__(self, path: Path, dim: int):
        self.path, self.dim, self.rows = path, dim, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "wb")
        self._write_header()
        self.data_offset = self.file.tell()

    def _write_header(self) -> None:
        header = npy.header_data_from_array_1_0(np.empty((0, self.dim), dtype="<f4"))
        header["shape"] = (self.rows, self.dim)
        npy.write_array_header_1_0(self.file, header)

    def append(self, matrix: np.ndarray) -> int:
        """Write the rows; returns the row index of the first one."""
        first = self.rows
        if len(matrix):
            self.file.write(memoryview(np.ascontiguousarray(matrix, dtype="<f4")).cast("B"))
        self.rows += len(matrix)
        return first

    def close(self) -> None:
        self.file.seek(0)
        self._write_header()
        if self.file.tell() != self.data_offset:  # NumPy's room for the row count ran out
            raise ValueError(f"the .npy header of {self.path} changed length")
        self.file.close()

    def abort(self) -> None:
        """Close without finishing the header (the file is being thrown away)."""
        self.file.close()

    @staticmethod
    def allocate(path: Path, dim: int, rows: int) -> None:
        """Make a ``.npy`` of ``rows`` x ``dim`` float32 (its header written, its data
        not), which shards fill at their offsets (``SharedVectorFile``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as file:
            header = npy.header_data_from_array_1_0(np.empty((0, dim), dtype="<f4"))
            header["shape"] = (rows, dim)
            npy.write_array_header_1_0(file, header)
            file.truncate(file.tell() + rows * dim * 4)


class SharedVectorFile(VectorFile):
    """Rows ``first`` onwards of a ``.npy`` that ``VectorFile.allocate`` made: a
    shard of a sharded export appends its vectors there (row numbers are the
    file's), and leaves the header alone."""

    def __init__(self, path: Path, dim: int, first: int):
        self.path, self.dim, self.rows, self.first = path, dim, first, first
        self.file = open(path, "r+b")
        self.file.seek(0)
        npy.read_magic(self.file)
        npy.read_array_header_1_0(self.file)
        self.data_offset = self.file.tell()
        self.file.seek(self.data_offset + first * dim * 4)

    def close(self) -> None:
        self.file.close()
