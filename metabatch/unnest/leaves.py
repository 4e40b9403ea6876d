"""Leaves placed at their v1 positions: what ``unnest_config`` / ``unnest_metrics`` return.

``Sink`` collects, per branch, parallel arrays (row, position, value) for
numbers and (row, position, ``path=string`` token) for strings, dropping the
leaves past the truncation limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass
class BranchLeaves:
    """Leaves of one branch: parallel arrays (row, position, value)."""

    rows: list[np.ndarray] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    string_rows: list[np.ndarray] = field(default_factory=list)
    string_positions: list[np.ndarray] = field(default_factory=list)
    string_tokens: list[pa.Array] = field(default_factory=list)


@dataclass
class Unnested:
    """What ``unnest_config`` / ``unnest_metrics`` return for a batch of n runs.

    ``counts`` is the number of features per run (before truncation), one
    array per branch; ``leaves`` maps branch name -> BranchLeaves.
    """

    counts: dict[str, np.ndarray]
    leaves: dict[str, BranchLeaves]


class Sink:
    """Collects placed leaves, dropping those past the truncation limit."""

    def __init__(self, limit: int, branches: tuple[str, ...]):
        self.limit = limit
        self.leaves = {b: BranchLeaves() for b in branches}

    def numbers(self, branch, rows, positions, values):
        keep = positions < self.limit
        if not keep.all():
            rows, positions, values = rows[keep], positions[keep], values[keep]
        if len(rows):
            out = self.leaves[branch]
            out.rows.append(rows)
            out.positions.append(positions)
            out.values.append(values)

    def strings(self, branch, rows, positions, tokens):
        keep = positions < self.limit
        if not keep.all():
            rows, positions = rows[keep], positions[keep]
            tokens = tokens.filter(pa.array(keep))
        if len(rows):
            out = self.leaves[branch]
            out.string_rows.append(rows)
            out.string_positions.append(positions)
            out.string_tokens.append(tokens)
