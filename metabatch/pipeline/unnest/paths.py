"""Leaf paths: static text plus list indices known only per instance."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class LeafPath:
    """A leaf path template: text pieces and list-index slots.

    ``pieces`` holds strings and ints; an int ``k`` stands for ``[i]`` where
    ``i`` is the index at the k-th enclosing list, known per instance.
    """

    pieces: tuple = ()

    def is_empty(self) -> bool:
        return all(isinstance(p, str) for p in self.pieces) and "".join(self.pieces) == ""

    def key(self, key: str) -> "LeafPath":
        # spec: a key's path is parent.key, or the key alone under an empty parent
        if self.is_empty():
            return LeafPath((key,))
        return LeafPath(self.pieces + ("." + key,))

    def plain(self) -> str:
        """The path with its list indices dropped (``engine.weights`` for
        ``engine.weights[3]``): what v2 keys a leaf by."""
        return "".join(p for p in self.pieces if isinstance(p, str))

    def index(self, level: int) -> "LeafPath":
        return LeafPath(self.pieces + (level,))

    def render(self, indices: list[np.ndarray], n: int) -> pa.Array:
        """The path of every instance, as an Arrow string array of length n."""
        if all(isinstance(p, str) for p in self.pieces):
            return pa.repeat(_text("".join(self.pieces)), n)
        parts = []
        for piece in self.pieces:
            if isinstance(piece, str):
                parts.append(_text(piece))
            else:
                text = pc.cast(pa.array(indices[piece]), pa.string())
                parts.append(pc.binary_join_element_wise(_text("["), text, _text("]"), _text("")))
        return pc.binary_join_element_wise(*parts, _text(""))


@functools.lru_cache(maxsize=4096)
def _text(value: str) -> pa.StringScalar:
    """``value`` as an Arrow string scalar, for compute functions. Given a
    Python str, pyarrow converts it each time, and the conversion tries to
    import dateutil (then pandas): where they are not installed, a failed
    import, which searches sys.path, costs ~170 us, 30x the join itself."""
    return pa.array([value], pa.string())[0]
