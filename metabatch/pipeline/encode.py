"""Encode: positioned leaves -> branch features (sparse, float32).

Takes the ``Unnested`` leaves of a batch and returns, per branch, its
features (truncated to 384 per run; the padding is implicit: +0.0) and whether
the branch is present for each run.
Strings are hashed with the spec's SHA-1 rule, once per distinct token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .unnest import BranchLeaves

DIM = 384
_M = np.uint64(2**63 - 1)


@dataclass
class Branch:
    """One branch of a batch, sparse: the features each run has, as parts of
    (flat position ``row * DIM + position``, float32 value), and per run
    whether the branch is present. A (row, position) occurs at most once."""

    parts: list[tuple[np.ndarray, np.ndarray]]  # (int64 flat positions, float32 values)
    present: np.ndarray  # (n,) bool
    width: int  # 1 + the highest position of any feature (0 when none)


def hash_tokens(tokens: pa.Array) -> np.ndarray:
    """h("path=value") for each token, as doubles: SHA-1, first 8 bytes, mod 2^63-1.
    Of a dictionary array, only the dictionary is hashed (once per entry)."""
    encoded = tokens if isinstance(tokens, pa.DictionaryArray) else pc.dictionary_encode(tokens)
    unique = encoded.dictionary.to_pylist()
    digests = b"".join(hashlib.sha1(t.encode("utf-8")).digest()[:8] for t in unique)
    v = np.frombuffer(digests, dtype=">u8").astype(np.uint64)
    # v mod M for v < 2^64 = 2M + 2, without leaving uint64
    v = v - _M * (v >= _M).astype(np.uint64)
    v = v - _M * (v >= _M).astype(np.uint64)
    h = 2.0 * (v.astype(np.float64) / float(_M)) - 1.0
    return h[np.asarray(encoded.indices.to_numpy(zero_copy_only=False), np.int64)]


def to_branch(leaves: BranchLeaves, counts: np.ndarray) -> Branch:
    """The leaves of one branch as its sparse features (numbers rounded to
    float32, strings hashed); ``counts``: the features per run (0: absent).

    Sparse, because a run has tens of features out of 384: a dense (n, 384)
    matrix per branch cost more to clear and add up than the features did.
    """
    parts = []
    width = 0
    with np.errstate(over="ignore"):
        for rows, positions, values in zip(leaves.rows, leaves.positions, leaves.values):
            # numbers are doubles here; the spec rounds each to float32
            parts.append((rows * DIM + positions, values.astype(np.float32)))
            width = max(width, int(positions.max()) + 1)
        for rows, positions, tokens in zip(leaves.string_rows, leaves.string_positions, leaves.string_tokens):
            parts.append((rows * DIM + positions, hash_tokens(tokens).astype(np.float32)))
            width = max(width, int(positions.max()) + 1)
    return Branch(parts, counts > 0, width)
