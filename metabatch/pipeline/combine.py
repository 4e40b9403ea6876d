"""Combine: branch features -> joint vectors, as float32 array arithmetic.

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
SOURCE_TAGS = np.array(
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


def combine(branches: dict[str, Branch], weights: dict[str, float], out: np.ndarray | None = None) -> Combined:
    """Weighted average of the branches taken, in the spec's float32 order.

    The sum starts at +0.0 and a missing feature adds +0.0, which changes
    nothing (a float32 sum that starts at +0.0 is never -0.0), so each branch
    adds only the features it has: ``acc[i] += w * x`` per feature, branch
    after branch, is the spec's ``acc = acc + w * v[i]``. Only the denominator
    depends on which branches a run has. ``out``: an (n, DIM) float32 array
    to hold the vectors, instead of new memory.
    """
    n = len(next(iter(branches.values())).present)
    if out is None:
        acc = np.zeros((n, DIM), np.float32)
    else:
        acc = out
        acc.fill(0)
    flat = acc.reshape(-1)
    denominator = np.zeros(n, np.float32)
    taken_mask = np.zeros(n, np.int64)  # bit i set: branch i taken
    beyond_range = {}  # branch name -> per run: a weighted feature is not finite
    width = 0  # columns past it are all +0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for i, name in enumerate(BRANCH_NAMES):
            w = np.float32(weights[name])
            if not w > 0:
                continue
            branch = branches[name]
            bad = np.zeros(n, bool)
            for where, values in branch.parts:
                if w != 1:  # x * 1 is x, bit for bit
                    values = values * w  # float32 * float32
                flat[where] += values  # positions are unique within a branch
                bad[where[~np.isfinite(values)] // DIM] = True
            beyond_range[name] = bad
            width = max(width, branch.width)
            denominator = np.where(branch.present, denominator + w, denominator)
            taken_mask |= branch.present.astype(np.int64) << i
        skipped = taken_mask == 0
        used = acc[:, :width]
        np.divide(used, np.where(skipped, np.float32(1), denominator)[:, None], out=used)
    nonfinite = ~skipped & ~np.isfinite(used).all(axis=1)
    reasons = np.full(n, "", dtype=object)
    for row in np.flatnonzero(nonfinite):  # only the (rare) rejected runs
        culprits = [name for name, bad in beyond_range.items() if bad[row]]
        if culprits:
            reasons[row] = (
                f"a number in the {' and '.join(culprits)} branch is beyond the float32 range; "
                "the vector would not be finite"
            )
        else:
            reasons[row] = "the weighted sum overflows float32; the vector would not be finite"
    return Combined(acc, SOURCE_TAGS[taken_mask], skipped, nonfinite, reasons)
