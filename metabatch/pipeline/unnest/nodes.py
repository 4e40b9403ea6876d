"""Nodes: what one node of a JSON structure holds, for every instance at once.

A node covers n instances (runs, or list elements) and knows, per instance,
how many features its subtree holds; ``place`` puts its leaves at their v1
positions (prefix sums of those counts) into a ``Sink``, and ``collect`` hands
them to a ``PathLeaves`` by path, list indices dropped (the v2 encoder's input).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .leaves import PathLeaves, Sink
from .paths import LeafPath, _text
from .text import _valid


class _Node:
    """A structure node over n instances (runs, or list elements).

    ``count`` / ``env_count``: features in the subtree per instance, for the
    config and env branches. ``valid``: the instance holds a non-null value of
    the node's kind. ``members``: non-null object members found in the
    subtree, and ``suspicious``: a list of objects had a null or non-object
    element; both let ``root_objects`` check that a reused structure dropped
    nothing.
    """

    count: np.ndarray
    env_count: np.ndarray
    valid: np.ndarray
    members: np.ndarray
    suspicious: np.ndarray | None = None

    def place(self, sink, rows, offset, env_offset, indices):  # pragma: no cover
        raise NotImplementedError

    def collect(self, sink: PathLeaves, rows: np.ndarray) -> None:  # pragma: no cover
        """Hand the subtree's leaves to ``sink``; ``rows[i]``: the run of instance i."""
        raise NotImplementedError


class _Empty(_Node):
    def __init__(self, n: int, valid: np.ndarray | None = None, members: np.ndarray | None = None):
        self.count = np.zeros(n, np.int64)
        self.env_count = self.count
        self.valid = valid if valid is not None else np.zeros(n, bool)
        self.members = members if members is not None else self.count

    def place(self, sink, rows, offset, env_offset, indices):
        pass

    def collect(self, sink, rows):
        pass


class _Numbers(_Node):
    def __init__(self, values: np.ndarray, valid: np.ndarray, env: bool, path: LeafPath, boolean: bool = False):
        self.values, self.valid, self.env = values, valid, env
        self.path, self.boolean = path, boolean  # booleans are 1.0 / 0.0 here
        self.count = valid.astype(np.int64)
        self.env_count = self.count if env else np.zeros_like(self.count)
        self.members = np.zeros_like(self.count)

    def place(self, sink, rows, offset, env_offset, indices):
        v = self.valid
        sink.numbers("config", rows[v], offset[v], self.values[v])
        if self.env:
            sink.numbers("env", rows[v], env_offset[v], self.values[v])

    def collect(self, sink, rows):
        v = self.valid
        if v.any():
            sink.add_numbers(self.path.plain(), rows[v], self.values[v], self.boolean)


class _Strings(_Node):
    def __init__(self, values: pa.Array, path: LeafPath, env: bool):
        self.values, self.path, self.env = values, path, env
        self.valid = _valid(values)
        self.count = self.valid.astype(np.int64)
        self.env_count = self.count if env else np.zeros_like(self.count)
        self.members = np.zeros_like(self.count)

    def place(self, sink, rows, offset, env_offset, indices):
        v = self.valid
        if not v.any():
            return
        tokens = self.tokens(self.values.filter(pa.array(v)), [ix[v] for ix in indices])
        sink.strings("config", rows[v], offset[v], tokens)
        if self.env:
            sink.strings("env", rows[v], env_offset[v], tokens)

    def collect(self, sink, rows):
        v = self.valid
        if v.any():
            sink.add_strings(self.path.plain(), rows[v], self.values.filter(pa.array(v)))

    def tokens(self, values: pa.Array, indices: list[np.ndarray]) -> pa.DictionaryArray:
        """The ``path=value`` token of every instance, dictionary-encoded: only
        the distinct (list indices, value) pairs are rendered (and later hashed)."""
        encoded = pc.dictionary_encode(values)
        key = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), np.int64)
        radix = len(encoded.dictionary)
        sizes = [int(ix.max(initial=0)) + 1 for ix in indices]
        for ix, size in zip(indices, sizes):  # one integer per (value, list indices), in mixed radix
            if radix * size >= 2**62:  # too many combinations to number: render each instance
                return pc.dictionary_encode(pc.binary_join_element_wise(self.path.render(indices, len(values)), values, _text("=")))
            key, radix = key * size + ix, radix * size
        if not indices:
            unique, inverse = np.arange(radix), key
        else:
            unique, inverse = np.unique(key, return_inverse=True)
        digits, rest = [], unique
        for size in reversed(sizes):
            digits.append(rest % size)
            rest = rest // size
        paths = self.path.render(digits[::-1], len(unique))
        rendered = pc.binary_join_element_wise(paths, encoded.dictionary.take(pa.array(rest)), _text("="))
        return pa.DictionaryArray.from_arrays(pa.array(inverse, pa.int32()), rendered)


class _Struct(_Node):
    def __init__(self, n: int, children: list[_Node], valid: np.ndarray):
        self.children, self.valid = children, valid
        self.count = np.zeros(n, np.int64)
        self.env_count = np.zeros(n, np.int64)
        self.members = np.zeros(n, np.int64)
        suspicious = np.zeros(n, bool)
        any_member = np.zeros(n, bool)
        for child in children:
            self.count += child.count
            self.env_count += child.env_count
            self.members += child.valid
            self.members += child.members
            any_member |= child.valid
            if child.suspicious is not None:
                suspicious |= child.suspicious
        # json_transform turns a value that is not an object (an array, a number,
        # a string) into a struct of nulls, not a null: with a reused structure
        # that value would pass for an object without members and its features
        # would be lost, so such instances are sent back to inference
        self.memberless = valid & ~any_member
        self.suspicious = suspicious | self.memberless

    def place(self, sink, rows, offset, env_offset, indices):
        offset, env_offset = offset.copy(), env_offset.copy()
        for child in self.children:
            child.place(sink, rows, offset, env_offset, indices)
            offset += child.count
            env_offset += child.env_count

    def collect(self, sink, rows):
        for child in self.children:
            child.collect(sink, rows)


class _List(_Node):
    """Elements of lists; ``parent`` maps each element to its instance."""

    def __init__(self, n: int, parent: np.ndarray, element_index: np.ndarray, element: _Node, valid: np.ndarray, path: LeafPath):
        self.parent, self.element_index, self.element, self.valid = parent, element_index, element, valid
        self.path = path
        self.count = np.bincount(parent, weights=element.count, minlength=n).astype(np.int64)
        self.env_count = np.bincount(parent, weights=element.env_count, minlength=n).astype(np.int64)
        self.members = np.bincount(parent, weights=element.members, minlength=n).astype(np.int64)
        self.suspicious = np.zeros(n, bool)
        if isinstance(element, _Struct):  # an element that is null or not an object came out null
            self.suspicious[parent[~element.valid]] = True
        if element.suspicious is not None:
            self.suspicious[parent[element.suspicious]] = True

    def place(self, sink, rows, offset, env_offset, indices):
        p = self.parent
        if not len(p):
            return
        # start of each element within its list = exclusive prefix sum inside the segment
        def starts(counts, base):
            before = np.cumsum(counts) - counts
            first = before[self.element_index == 0]
            first_of_parent = np.zeros(len(base), np.int64)
            first_of_parent[p[self.element_index == 0]] = first
            return base[p] + before - first_of_parent[p]

        self.element.place(
            sink,
            rows[p],
            starts(self.element.count, offset),
            starts(self.element.env_count, env_offset),
            [ix[p] for ix in indices] + [self.element_index],
        )

    def collect(self, sink, rows):
        # a list's length counts the elements that give a leaf, and a list with
        # none (empty, all null, all nested lists) is absent, as {} is: whether
        # such a list gets a node at all depends on the structure a batch infers
        giving = self.element.count > 0
        lengths = np.bincount(self.parent[giving], minlength=len(self.valid))
        held = self.valid & (lengths > 0)
        if held.any():
            sink.add_list(self.path.plain(), rows[held], lengths[held])
        if len(self.parent):
            self.element.collect(sink, rows[self.parent])


class _Mixed(_Node):
    """A node whose instances hold different JSON types: one part per type."""

    def __init__(self, n: int, parts: list[tuple[np.ndarray, _Node]], valid: np.ndarray, members: np.ndarray | None = None):
        self.parts, self.valid = parts, valid
        self.count = np.zeros(n, np.int64)
        self.env_count = np.zeros(n, np.int64)
        for where, node in parts:
            self.count[where] = node.count
            self.env_count[where] = node.env_count
        # raw JSON is parsed afresh, so what it holds is what its text holds
        self.members = members if members is not None else np.zeros(n, np.int64)

    def place(self, sink, rows, offset, env_offset, indices):
        for where, node in self.parts:
            node.place(sink, rows[where], offset[where], env_offset[where], [ix[where] for ix in indices])

    def collect(self, sink, rows):
        for where, node in self.parts:
            node.collect(sink, rows[where])


class _Filtered(_Node):
    """A node over the runs (root level) with some runs left out."""

    def __init__(self, node: _Node, keep: np.ndarray):
        self.node, self.keep = node, keep
        self.count = np.where(keep, node.count, 0)
        self.env_count = np.where(keep, node.env_count, 0)
        self.valid, self.members = node.valid & keep, np.where(keep, node.members, 0)

    def place(self, sink, rows, offset, env_offset, indices):
        self.node.place(_FilterSink(sink, self.keep), rows, offset, env_offset, indices)

    def collect(self, sink, rows):
        # at the root, instance i is run rows[i]: drop the instances left out
        self.node.collect(sink.only(self.keep), rows)


class _FilterSink:
    """Passes on only the leaves of kept rows."""

    def __init__(self, sink: Sink, keep: np.ndarray):
        self.sink, self.keep = sink, keep

    def numbers(self, branch, rows, positions, values):
        k = self.keep[rows]
        self.sink.numbers(branch, rows[k], positions[k], values[k])

    def strings(self, branch, rows, positions, tokens):
        k = self.keep[rows]
        self.sink.strings(branch, rows[k], positions[k], tokens.filter(pa.array(k)))
