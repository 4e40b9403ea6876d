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
    """Weighted average of the branches taken, in the spec's float32 order.

    An absent branch's row is all +0.0, and adding +0.0 to a sum that starts
    at +0.0 changes nothing, so every branch with weight > 0 is added to every
    row (no masking); only the denominator depends on which branches a run has.
    The branch matrices are consumed (scaled in place).
    """
    n = len(next(iter(branches.values())).present)
    acc = None
    denominator = np.zeros(n, np.float32)
    taken_mask = np.zeros(n, np.int64)  # bit i set: branch i taken
    taken = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for i, name in enumerate(BRANCH_NAMES):
            w = np.float32(weights[name])
            if not w > 0:
                continue
            branch = branches[name]
            taken[name] = branch
            if w != 1:  # x * 1 is x, bit for bit
                np.multiply(branch.matrix, w, out=branch.matrix)  # float32 * float32
            if acc is None:
                # the sum starts at +0.0, and 0.0 + x turns a -0.0 into +0.0
                acc = np.add(branch.matrix, np.float32(0), dtype=np.float32)
            else:
                np.add(acc, branch.matrix, out=acc)
            denominator = np.where(branch.present, denominator + w, denominator)
            taken_mask |= branch.present.astype(np.int64) << i
        if acc is None:  # no weight > 0
            acc = np.zeros((n, DIM), np.float32)
        skipped = taken_mask == 0
        np.divide(acc, np.where(skipped, np.float32(1), denominator)[:, None], out=acc)
    # a row of finite float32 values cannot overflow a float64 sum, and an inf or
    # nan in the row makes it non-finite: one pass, no (n, DIM) mask
    with np.errstate(invalid="ignore"):  # inf + -inf
        nonfinite = ~skipped & ~np.isfinite(acc.sum(axis=1, dtype=np.float64))
    reasons = np.full(n, "", dtype=object)
    for row in np.flatnonzero(nonfinite):  # only the (rare) rejected runs
        culprits = [name for name, b in taken.items() if b.present[row] and not np.isfinite(b.matrix[row]).all()]
        if culprits:
            reasons[row] = (
                f"a number in the {' and '.join(culprits)} branch is beyond the float32 range; "
                "the vector would not be finite"
            )
        else:
            reasons[row] = "the weighted sum overflows float32; the vector would not be finite"
    return Combined(acc, _SOURCE_TAGS[taken_mask], skipped, nonfinite, reasons)
