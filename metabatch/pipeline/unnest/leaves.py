"""Leaves, as the encoders take them.

v1: ``Sink`` collects, per branch, parallel arrays (row, position, value) for
numbers and (row, position, ``path=string`` token) for strings, dropping the
leaves past the truncation limit; ``unnest_config`` / ``unnest_metrics``
return them as ``Unnested``.

v2: ``PathLeaves`` collects the leaves by path, list indices dropped, with no
position and no limit (``collect_config`` / ``collect_metrics``).
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


@dataclass
class PathLeaves:
    """A batch's leaves by path (list indices dropped), one chunk per structure node.

    ``numbers``: (path, rows, float64 values, from booleans?) -- booleans are
    1.0 / 0.0; ``strings``: (path, rows, Arrow string values); ``lists``:
    (path, rows, lengths) for every array value, empty ones included. A path
    may have several chunks (nodes of mixed JSON type), and a row several
    values in one chunk (the elements of its lists). ``dates``: (path, rows,
    days since 1970) for strings already read as ISO dates (the fit's sample).
    """

    numbers: list[tuple[str, np.ndarray, np.ndarray, bool]] = field(default_factory=list)
    strings: list[tuple[str, np.ndarray, pa.Array]] = field(default_factory=list)
    lists: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    dates: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)

    def add_numbers(self, path: str, rows: np.ndarray, values: np.ndarray, boolean: bool) -> None:
        self.numbers.append((path, rows, values, boolean))

    def add_strings(self, path: str, rows: np.ndarray, values: pa.Array) -> None:
        self.strings.append((path, rows, values))

    def add_list(self, path: str, rows: np.ndarray, lengths: np.ndarray) -> None:
        self.lists.append((path, rows, lengths))

    def add_dates(self, path: str, rows: np.ndarray, days: np.ndarray) -> None:
        self.dates.append((path, rows, days))

    def only(self, keep: np.ndarray) -> "PathLeaves":
        """A view that passes on only the leaves of the runs where ``keep`` is true."""
        return _KeptLeaves(self, keep)


class _KeptLeaves(PathLeaves):
    def __init__(self, leaves: PathLeaves, keep: np.ndarray):
        self.leaves, self.keep = leaves, keep

    def add_numbers(self, path, rows, values, boolean):
        k = self.keep[rows]
        if k.any():
            self.leaves.add_numbers(path, rows[k], values[k], boolean)

    def add_strings(self, path, rows, values):
        k = self.keep[rows]
        if k.any():
            self.leaves.add_strings(path, rows[k], values.filter(pa.array(k)))

    def add_list(self, path, rows, lengths):
        k = self.keep[rows]
        if k.any():
            self.leaves.add_list(path, rows[k], lengths[k])

    def add_dates(self, path, rows, days):
        k = self.keep[rows]
        if k.any():
            self.leaves.add_dates(path, rows[k], days[k])

    def only(self, keep):
        return _KeptLeaves(self.leaves, self.keep & keep)
