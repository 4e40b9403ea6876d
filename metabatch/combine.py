"""Combine: branch matrices -> joint vectors, as float32 matrix arithmetic.

Takes the config, env and outcome ``Branch`` of a batch and the three weights;
returns the joint vectors, the source tag of each run, which runs were skipped
(no branch taken) and which were rejected (non-finite vector) with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .encode import DIM, Branch

BRANCH_NAMES = ("config", "env", "outcome")
# the source tag for every set of branches taken, indexed by bit mask
_SOURCE_TAGS = np.array(
    ["+".join(name for i, name in enumerate(BRANCH_NAMES) if mask >> i & 1) for mask in range(8)],
    dtype=object,
)


@dataclass
class Combined:
    vectors: np.ndarray  # (n, DIM) float32; rows of skipped/rejected runs are meaningless
    source: np.ndarray  # (n,) object: "config+env+outcome", ... or "" when skipped
    skipped: np.ndarray  # (n,) bool: no branch taken
    nonfinite: np.ndarray  # (n,) bool: the vector has a non-finite component
    reasons: np.ndarray  # (n,) object: why a non-finite run is rejected


def combine(branches: dict[str, Branch], weights: dict[str, float]) -> Combined:
    """Weighted average of the branches taken, in the spec's float32 order."""
    n = len(next(iter(branches.values())).present)
    acc = np.zeros((n, DIM), np.float32)
    denominator = np.zeros(n, np.float32)
    taken_any = np.zeros(n, bool)
    taken_mask = np.zeros(n, np.int64)  # bit i set: branch i taken
    branch_bad = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for name in BRANCH_NAMES:
            w = np.float32(weights[name])
            if not w > 0:
                continue
            branch = branches[name]
            taken = branch.present
            term = w * branch.matrix  # float32 * float32 -> float32
            acc = np.where(taken[:, None], acc + term, acc)
            denominator = np.where(taken, denominator + w, denominator)
            taken_mask |= taken.astype(np.int64) << BRANCH_NAMES.index(name)
            taken_any |= taken
            branch_bad[name] = taken & ~np.isfinite(branch.matrix).all(axis=1)
        vectors = acc / np.where(taken_any, denominator, np.float32(1))[:, None]
    source = _SOURCE_TAGS[taken_mask]
    nonfinite = taken_any & ~np.isfinite(vectors).all(axis=1)
    reasons = np.full(n, "", dtype=object)
    for i in np.flatnonzero(nonfinite):  # only the (rare) rejected runs
        culprits = [name for name, bad in branch_bad.items() if bad[i]]
        if culprits:
            reasons[i] = (
                f"a number in the {' and '.join(culprits)} branch is beyond the float32 range; "
                "the vector would not be finite"
            )
        else:
            reasons[i] = "the weighted sum overflows float32; the vector would not be finite"
    return Combined(vectors.astype(np.float32, copy=False), source, ~taken_any, nonfinite, reasons)
