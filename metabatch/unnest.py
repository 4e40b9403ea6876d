"""Unnest: JSON text columns -> positioned leaves, per branch.

Takes a column of JSON objects (as text, one per run) and returns, for every
leaf that gives a feature, the run's row number, the leaf's position in the
run's feature list (the spec's depth-first order, keys sorted by code point at
each level) and its value: a double for numbers and booleans, the token
``path=string`` for strings (hashed later, in ``encode``).

How: DuckDB infers the merged structure of the batch (``json_group_structure``)
and parses every document once into typed nested columns (``json_transform``,
about 6x faster than Polars' ``json_decode`` here, and exact for integers of
any size). The nested Arrow result is then walked column by column, never row
by row: each node of the structure knows how many features it holds for every
run, and positions are prefix sums of those counts. Where the structure is not
uniform (a key holding a number in one run and an object in another) DuckDB
returns raw JSON for that node, which is split by JSON type and handled
recursively the same way.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import polars as pl

ENV_NEEDLES = ("market_id", "universe_id", "assessment_strategy_id", "assessment_horizon_days")

_NUMERIC_TYPES = {
    "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT",
    "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT",
    "FLOAT", "DOUBLE", "DECIMAL",
}


# --------------------------------------------------------------------------
# Output: leaves with their positions


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


class _Sink:
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


# --------------------------------------------------------------------------
# Paths: static text plus list indices known only per instance


@dataclass(frozen=True)
class _Path:
    """A leaf path template: text pieces and list-index slots.

    ``pieces`` holds strings and ints; an int ``k`` stands for ``[i]`` where
    ``i`` is the index at the k-th enclosing list, known per instance.
    """

    pieces: tuple = ()

    def is_empty(self) -> bool:
        return all(isinstance(p, str) for p in self.pieces) and "".join(self.pieces) == ""

    def key(self, key: str) -> "_Path":
        # spec: a key's path is parent.key, or the key alone under an empty parent
        if self.is_empty():
            return _Path((key,))
        return _Path(self.pieces + ("." + key,))

    def index(self, level: int) -> "_Path":
        return _Path(self.pieces + (level,))

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


# --------------------------------------------------------------------------
# Nodes: what one structure node holds, per instance


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


class _Empty(_Node):
    def __init__(self, n: int, valid: np.ndarray | None = None, members: np.ndarray | None = None):
        self.count = np.zeros(n, np.int64)
        self.env_count = self.count
        self.valid = valid if valid is not None else np.zeros(n, bool)
        self.members = members if members is not None else self.count

    def place(self, sink, rows, offset, env_offset, indices):
        pass


class _Numbers(_Node):
    def __init__(self, values: np.ndarray, valid: np.ndarray, env: bool):
        self.values, self.valid, self.env = values, valid, env
        self.count = valid.astype(np.int64)
        self.env_count = self.count if env else np.zeros_like(self.count)
        self.members = np.zeros_like(self.count)

    def place(self, sink, rows, offset, env_offset, indices):
        v = self.valid
        sink.numbers("config", rows[v], offset[v], self.values[v])
        if self.env:
            sink.numbers("env", rows[v], env_offset[v], self.values[v])


class _Strings(_Node):
    def __init__(self, values: pa.Array, path: _Path, env: bool):
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


class _List(_Node):
    """Elements of lists; ``parent`` maps each element to its instance."""

    def __init__(self, n: int, parent: np.ndarray, element_index: np.ndarray, element: _Node, valid: np.ndarray):
        self.parent, self.element_index, self.element, self.valid = parent, element_index, element, valid
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


class _Filtered(_Node):
    """A node over the runs (root level) with some runs left out."""

    def __init__(self, node: _Node, keep: np.ndarray):
        self.node, self.keep = node, keep
        self.count = np.where(keep, node.count, 0)
        self.env_count = np.where(keep, node.env_count, 0)
        self.valid, self.members = node.valid & keep, np.where(keep, node.members, 0)

    def place(self, sink, rows, offset, env_offset, indices):
        self.node.place(_FilterSink(sink, self.keep), rows, offset, env_offset, indices)


class _FilterSink:
    """Passes on only the leaves of kept rows."""

    def __init__(self, sink: _Sink, keep: np.ndarray):
        self.sink, self.keep = sink, keep

    def numbers(self, branch, rows, positions, values):
        k = self.keep[rows]
        self.sink.numbers(branch, rows[k], positions[k], values[k])

    def strings(self, branch, rows, positions, tokens):
        k = self.keep[rows]
        self.sink.strings(branch, rows[k], positions[k], tokens.filter(pa.array(k)))


# Runs of a job's first batch whose JSON structure is inferred up front.
_SAMPLE_ROWS = 2_000


@dataclass
class RootParse:
    """Root texts parsed with a cached structure (``_Builder.parse_root``)."""

    structure: dict  # the structure used, without keys that collide
    shape: dict  # what DuckDB parsed into
    typed: pa.Array  # DuckDB's output: a struct per text


@dataclass
class ShapeCache:
    """The merged JSON structures seen so far in a job, per column (across batches).
    A backfill's reader thread unnests the metrics and parses the configs with
    the config structure it finds here, while its main thread updates that
    structure: a structure is replaced, never changed in place, and whichever
    one a parse used is only a guess that every run is checked against."""

    structures: dict = field(default_factory=dict)


def _merge_structures(a, b):
    """The structure that covers both (DuckDB's structure notation)."""
    if a is None or a == "NULL":
        return b
    if b is None or b == "NULL":
        return a
    if isinstance(a, dict) and isinstance(b, dict):
        merged = dict(a)
        for key, sub in b.items():
            merged[key] = _merge_structures(a.get(key), sub)
        return merged
    if isinstance(a, list) and isinstance(b, list):
        return [_merge_structures(a[0], b[0])]
    if a == b:
        return a
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        return "JSON"
    return "JSON" if "JSON" in (a, b) or "VARCHAR" in (a, b) or "BOOLEAN" in (a, b) else "DOUBLE"


def text_members(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per JSON text: its non-null object members, and whether that count is exact.

    Every key ends with a quote followed by a colon (``":``), unless blanks
    come between them. In a text with no backslash no quote is escaped, so a
    ``":`` inside a string can only be the start of a string value that
    begins with a colon: the count may be too high, never too low, and a run
    whose count is too high just fails the caller's check (and is parsed the
    slow way). Members whose value is ``null`` are subtracted. Texts with a
    backslash or a blank before a colon are reported as not exact. Scans
    over the whole column; the (slower) null regex only on texts that hold
    ``null``.
    """
    series = pl.Series(texts.cast(pa.string()))
    # given as a regex: polars finds this literal faster that way than as a literal
    members = series.str.count_matches('":').fill_null(0).to_numpy().astype(np.int64)
    with_null = np.flatnonzero(series.str.contains("null", literal=True).fill_null(False).to_numpy())
    if len(with_null):
        members[with_null] -= series.gather(with_null).str.count_matches(r'":\s*null').to_numpy()
    unclear = series.str.contains("\\", literal=True) | series.str.contains(r"[ \t\n\r]:")  # JSON's blanks
    return members, ~unclear.fill_null(False).to_numpy()


@dataclass
class TextFacts:
    """What the root texts of a batch show before any parse: per text its
    non-null object members and whether that count is exact (``text_members``),
    and whether any text nests too deep for a typed parse."""

    members: np.ndarray
    clean: np.ndarray
    deep: bool


def text_facts(texts: pa.Array) -> TextFacts:
    """The ``TextFacts`` of a column of JSON texts (whole-column passes, no parse:
    a reader thread computes them while the previous batch is encoded)."""
    members, clean = text_members(texts)
    return TextFacts(members, clean, _too_deep(texts))


# --------------------------------------------------------------------------
# Building nodes from DuckDB's typed output


class _Builder:
    """Turns JSON text into nodes, with one DuckDB connection."""

    def __init__(self, con: duckdb.DuckDBPyConnection, strings: bool, descend: bool, shallow: bool = False):
        self.con = con
        self.strings = strings  # False for the outcome branch: strings give no feature
        self.descend = descend  # False for the outcome branch: only top-level keys
        # True when the root texts were checked: then no value inside them nests
        # too deep either, and the (whole-column) check is not repeated
        self.shallow = shallow

    def _query(self, sql: str, texts: pa.Array, params=None) -> pa.Array:
        table = pa.table({"j": texts})
        self.con.register("mb_input", table)
        try:
            result = self.con.sql(sql, params=params).to_arrow_table()
        finally:
            self.con.unregister("mb_input")
        return result.column(0).combine_chunks()

    # -- objects

    def objects(self, texts: pa.Array, path: _Path, env: bool) -> _Node:
        """Node for a column of JSON objects (null where absent)."""
        return self._objects_with(texts, self._structure(texts), path, env)

    def _structure(self, texts: pa.Array):
        """DuckDB's merged structure of the texts, or None when they nest too deep
        for it (the callers then walk the values by JSON pointer, a level at a time)."""
        if not self.shallow and _too_deep(texts):
            return None
        structure = self._query("SELECT json_group_structure(j::JSON) FROM mb_input", texts)[0].as_py()
        return json.loads(structure) if structure is not None else None

    def _objects_with(self, texts: pa.Array, structure, path: _Path, env: bool, raw: bool = False) -> _Node:
        n = len(texts)
        if not isinstance(structure, dict) or _keys_collide(structure):
            return self._objects_by_pointer(texts, path, env)
        shape = self._shape(structure, top=True, raw=raw)
        if not shape:
            return _Empty(n, _valid(texts))
        return self._struct(self._transform(texts, shape), shape, path, env)

    def _transform(self, texts: pa.Array, shape) -> pa.Array:
        """DuckDB's parse of the texts into ``shape`` (a struct, list or type)."""
        return self._query("SELECT json_transform(j, $1::VARCHAR) FROM mb_input", texts, [json.dumps(shape, ensure_ascii=False)])

    def parse_root(self, texts: pa.Array, cache: "ShapeCache") -> "RootParse | None":
        """The root texts parsed with the structure cached so far, scalars as raw
        JSON (``root_objects``' fast parse), or None before there is one. A
        reader thread calls it for the next batch while this one is encoded:
        whatever structure it found, ``root_objects`` checks every run."""
        known = cache.structures.get("config" if self.descend else "metrics")
        if not isinstance(known, dict):
            return None
        # keys DuckDB cannot take as fields are left out: their runs fail the check
        known = _without_colliding_keys(known)
        shape = self._shape(known, top=True, raw=True) if known else None
        if not shape:
            return None
        return RootParse(known, shape, self._transform(texts, shape))

    def root_objects(
        self, texts: pa.Array, cache: "ShapeCache", facts: TextFacts | None = None, parsed: "RootParse | None" = None
    ) -> _Node:
        """Like ``objects`` for the root, reusing the structure of earlier batches.

        Inferring the structure costs DuckDB about three times the parse
        itself, so a batch is first parsed with the structure seen so far, its
        scalars parsed as raw JSON (no silent casts), and every run's feature
        count is checked against the scalars counted in its text. Only the
        runs that do not match (new keys or shapes) pay for inference.
        ``facts``: the texts' ``TextFacts`` when already known; ``parsed``: the
        texts' ``parse_root`` when already done.
        """
        n = len(texts)
        column = "config" if self.descend else "metrics"
        if parsed is None:
            if cache.structures.get(column) is None and n > _SAMPLE_ROWS:
                # first batch: learn from a sample, the check below catches the rest
                cache.structures[column] = self._structure(texts.slice(0, _SAMPLE_ROWS))
            parsed = self.parse_root(texts, cache)
        if parsed is None:
            cache.structures[column] = self._structure(texts)
            return self._objects_with(texts, cache.structures[column], _Path(), False)
        known = parsed.structure
        fast = self._struct(parsed.typed, parsed.shape, _Path(), False)
        expected, clean = (facts.members, facts.clean) if facts is not None else text_members(texts)
        bad = _valid(texts) & ((fast.members != expected) | ~clean)
        if fast.suspicious is not None:
            suspicious = fast.suspicious
            if isinstance(fast, _Struct):
                # a root text that starts with '{' is an object: without members it is just empty
                suspicious = suspicious & ~(fast.memberless & (_first_bytes(texts) == ord("{")))
            bad |= suspicious
        if not bad.any():
            return fast
        rows = np.flatnonzero(bad)
        subset = texts.take(pa.array(rows))
        structure = self._structure(subset)
        # merge into the structure cached now (another batch may have added to it
        # since this one was parsed); the root structure is only a guess that
        # every run is checked against: keep it an object
        current = cache.structures.get(column)
        base = _without_colliding_keys(current) if isinstance(current, dict) and current else known
        merged = _merge_structures(base, structure)
        cache.structures[column] = merged if isinstance(merged, dict) else base
        slow = self._objects_with(subset, structure, _Path(), False)
        return _Mixed(n, [(np.arange(n), _Filtered(fast, ~bad)), (rows, slow)], _valid(texts))

    def _objects_by_pointer(self, texts: pa.Array, path: _Path, env: bool) -> _Node:
        # DuckDB struct field names are case-insensitive: keys such as "a" and "A"
        # cannot both be fields, so each key's value is extracted by JSON pointer.
        n = len(texts)
        keys = self._query("SELECT DISTINCT unnest(json_keys(j)) FROM mb_input", texts).to_pylist()
        keys = sorted(k for k in keys if k is not None)
        if not keys:
            return _Empty(n, _valid(texts))
        pointers = ["/" + k.replace("~", "~0").replace("/", "~1") for k in keys]
        values = self._query("SELECT json_extract(j, $1::VARCHAR[]) FROM mb_input", texts, [pointers])
        rows_with = np.flatnonzero(np.asarray(values.is_valid().to_numpy(zero_copy_only=False), bool))
        flat = pc.list_flatten(values)
        children = []
        for j, key in enumerate(keys):
            column = flat.take(pa.array(np.arange(len(rows_with), dtype=np.int64) * len(keys) + j))
            node = self.mixed(column, path.key(key), env or _is_env_key(key))
            children.append(_Mixed(n, [(rows_with, node)], _scatter(n, rows_with, node.valid)))
        return _Struct(n, children, _valid(texts))

    def _shape(self, structure, top: bool = False, element: bool = False, raw: bool = False):
        """The structure DuckDB should parse into, or None when it holds no feature.

        Every number becomes DOUBLE (DuckDB rounds integers of any size to the
        nearest double, and gives inf beyond the range); an object whose keys
        collide case-insensitively becomes JSON (handled by pointer).
        """
        # raw: parse every value that is not walked as raw JSON text, and keep
        # every key (even one without features) so its members can be checked
        nothing = "JSON" if raw else None
        if isinstance(structure, dict):
            if not (top or self.descend):
                return nothing
            if _keys_collide(structure):
                return "JSON"
            shape = {}
            for key, sub in structure.items():
                sub_shape = self._shape(sub, raw=raw)
                if sub_shape is not None:
                    shape[key] = sub_shape
            return shape or nothing
        if isinstance(structure, list):
            # a list inside a list is a leaf that gives no feature
            if element or not self.descend:
                return nothing
            element_shape = self._shape(structure[0], element=True, raw=raw)
            return [element_shape] if element_shape is not None else nothing
        if raw:
            # raw JSON text: a reused structure must not cast silently (5 -> "5")
            return "JSON"
        if structure in _NUMERIC_TYPES:
            return "DOUBLE"
        if structure == "BOOLEAN":
            return "BOOLEAN"
        if structure == "VARCHAR":
            return "VARCHAR" if self.strings else None
        if structure == "JSON":
            return "JSON"
        return None  # NULL: no feature anywhere below

    def _struct(self, typed: pa.Array, shape: dict, path: _Path, env: bool) -> _Node:
        n = len(typed)
        fields = {typed.type.field(i).name: child for i, child in enumerate(typed.flatten())}
        children = []
        for key in sorted(shape):
            child_env = env or _is_env_key(key)
            children.append(self._typed(fields[key], shape[key], path.key(key), child_env))
        return _Struct(n, children, _valid(typed))

    def _typed(self, values: pa.Array, shape, path: _Path, env: bool, element: bool = False) -> _Node:
        if isinstance(shape, dict):
            return self._struct(values, shape, path, env)
        if isinstance(shape, list):
            return self._list(values, shape[0], path, env)
        if shape == "DOUBLE":
            return _numbers(values, env)
        if shape == "BOOLEAN":
            return _numbers(pc.cast(values, pa.float64()), env)
        if shape == "VARCHAR":
            return _Strings(values, path, env)
        return self.mixed(values, path, env, element=element)

    def _list(self, values: pa.Array, element_shape, path: _Path, env: bool) -> _Node:
        n = len(values)
        elements = pc.list_flatten(values)
        parent = np.asarray(pc.list_parent_indices(values).to_numpy(zero_copy_only=False), np.int64)
        level = sum(1 for p in path.pieces if isinstance(p, int))
        node = self._typed(elements, element_shape, path.index(level), env, element=True)
        return _List(n, parent, _index_within(parent, n), node, _valid(values))

    # -- values of mixed JSON type

    def mixed(self, texts: pa.Array, path: _Path, env: bool, element: bool = False) -> _Node:
        """Node for raw JSON values of any type (null where absent).

        Scalars are parsed here with Arrow (exact: Arrow's string-to-double
        cast rounds correctly, and gives inf past the range); objects and
        arrays go back to DuckDB. ``element``: the values are list elements,
        where a nested array is a leaf that gives no feature.
        """
        n = len(texts)
        if n == 0 or texts.null_count == n:
            return _Empty(n)
        numbers = _all_numbers(texts)
        if numbers is not None:
            return _numbers(numbers, env)
        codes = _KIND_OF_FIRST_BYTE[_first_bytes(texts)]
        valid = codes != _KINDS.index("null")
        json_null = codes == _KINDS.index("null")
        if json_null.sum() > texts.null_count:
            # a JSON null (the text 'null', e.g. from json_extract) gives no feature:
            # make it an absent value, or the one-kind paths below would parse it
            texts = pc.if_else(pa.array(json_null), pa.scalar(None, texts.type), texts)
        present = [_KINDS[c] for c in np.flatnonzero(np.bincount(codes, minlength=len(_KINDS))) if c]
        # the common case, one kind of scalar: no take, nulls stay nulls
        if present == ["number"]:
            return _numbers(pc.cast(texts, pa.float64()), env)
        if present == ["string"] and self.strings:
            return _Strings(_json_strings(texts), path, env)
        if present == ["boolean"]:
            return _numbers(pc.cast(pc.starts_with(texts, "t"), pa.float64()), env)
        parts = []
        members = np.zeros(n, np.int64)
        for kind in present:
            where = np.flatnonzero(codes == _KINDS.index(kind))
            subset = texts.take(pa.array(where))
            if kind in ("object", "array"):
                # the members a raw object or array holds, for root_objects' check
                members[where] = text_members(subset)[0]
                if not self.descend or (kind == "array" and element):
                    continue
                lengths = pc.utf8_length(pc.utf8_trim_whitespace(subset)).to_numpy(zero_copy_only=False)
                if (lengths == 2).all():  # {} or []
                    continue
            if kind == "string" and not self.strings:
                continue
            if kind == "object":
                node = self.objects(subset, path, env)
            elif kind == "array":
                node = self._arrays(subset, path, env)
            elif kind == "string":
                node = _Strings(_json_strings(subset), path, env)
            elif kind == "boolean":
                node = _numbers(pc.cast(pc.starts_with(subset, "t"), pa.float64()), env)
            else:
                node = _numbers(pc.cast(subset, pa.float64()), env)
            parts.append((where, node))
        return _Mixed(n, parts, valid, members)

    def _arrays(self, texts: pa.Array, path: _Path, env: bool) -> _Node:
        # elements as raw JSON, sorted out by kind like any raw value: no
        # structure inference over the arrays (objects in them get their own)
        return self._list(self._transform(texts, ["JSON"]), "JSON", path, env)


# Nesting that DuckDB's structure inference and typed parse may see. Past 128
# levels json_group_structure fails with a *fatal* error (the connection is
# invalidated for good), and Arrow refuses nested types past 64 levels (a
# struct level and a list level each count), so a column that nests deeper is
# walked by JSON pointer (json_keys / json_extract / json_transform to JSON,
# which have no depth limit) until what is left is shallow enough.
MAX_TYPED_DEPTH = 24


def max_depth(texts: pa.Array) -> int:
    """The deepest nesting of objects and arrays in a column of JSON texts.

    Brackets inside strings do not count: a quote opens or closes a string
    unless an odd run of backslashes precedes it. Works on the bytes of the
    whole column at once (every text is a whole JSON value, so the running
    depth is back to 0 at the end of each text).
    """
    data, _ = _column_bytes(texts)
    if not len(data):
        return 0
    opens = (data == ord("{")) | (data == ord("["))
    quotes = np.flatnonzero(data == ord('"'))
    backslash = data == ord("\\")
    if backslash.any() and len(quotes):
        index = np.arange(len(data))
        last_other = np.maximum.accumulate(np.where(backslash, -1, index))
        before = np.maximum(quotes - 1, 0)
        run = np.where(quotes > 0, before - last_other[before], 0)
        quotes = quotes[run % 2 == 0]
    closes = (data == ord("}")) | (data == ord("]"))
    brackets = np.flatnonzero(opens | closes)
    outside = np.searchsorted(quotes, brackets) % 2 == 0
    brackets = brackets[outside]
    step = np.where(opens[brackets], 1, -1)
    return int(np.cumsum(step).max(initial=0))


_SCAN_CHUNK = 1 << 20
_scan_buffers = threading.local()


def _positions_of(data: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    """Positions of the bytes of ``data`` equal to one of ``values``.

    Works a chunk at a time in buffers this thread reuses: a comparison over a
    whole batch (25 MB) makes a new mask each time, and new memory costs the
    kernel a page fault and a zeroing per page, more than the comparison.
    """
    if not hasattr(_scan_buffers, "hit"):
        _scan_buffers.hit, _scan_buffers.other = np.empty(_SCAN_CHUNK, bool), np.empty(_SCAN_CHUNK, bool)
    found = []
    for start in range(0, len(data), _SCAN_CHUNK):
        part = data[start : start + _SCAN_CHUNK]
        hit, other = _scan_buffers.hit[: len(part)], _scan_buffers.other[: len(part)]
        np.equal(part, values[0], out=hit)
        for value in values[1:]:
            np.equal(part, value, out=other)
            hit |= other
        found.append(np.flatnonzero(hit) + start)
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def _too_deep(texts: pa.Array) -> bool:
    """max_depth(texts) > MAX_TYPED_DEPTH, with a cheap bound first: a text
    cannot nest deeper than its count of opening brackets."""
    opening = pl.Series(texts.cast(pa.string())).str.count_matches(r"[\[{]").max()
    if opening is None or opening <= MAX_TYPED_DEPTH:
        return False
    return max_depth(texts) > MAX_TYPED_DEPTH


# What a JSON value is, by its first byte (0: null or absent).
_KINDS = ("null", "number", "string", "boolean", "object", "array")
_KIND_OF_FIRST_BYTE = np.full(256, _KINDS.index("number"), dtype=np.uint8)
_KIND_OF_FIRST_BYTE[0] = _KIND_OF_FIRST_BYTE[ord("n")] = _KINDS.index("null")
_KIND_OF_FIRST_BYTE[ord('"')] = _KINDS.index("string")
_KIND_OF_FIRST_BYTE[ord("t")] = _KIND_OF_FIRST_BYTE[ord("f")] = _KINDS.index("boolean")
_KIND_OF_FIRST_BYTE[ord("{")] = _KINDS.index("object")
_KIND_OF_FIRST_BYTE[ord("[")] = _KINDS.index("array")


# Bytes a JSON number starts with.
_NUMBER_START = np.zeros(256, bool)
_NUMBER_START[[ord(c) for c in "-0123456789"]] = True


def _first_bytes(texts: pa.Array) -> np.ndarray:
    """The first byte of each text (DuckDB prints JSON with no leading blank), 0 where null or empty."""
    data, starts = _column_bytes(texts)
    begin, end = starts[:-1], starts[1:]
    first = np.zeros(len(begin), np.uint8)
    holds = (end > begin) & _valid(texts)
    first[holds] = data[begin[holds]]
    return first


def _json_strings(literals: pa.Array) -> pa.Array:
    """Decode JSON string literals ("...", as DuckDB prints them: no blanks
    around) to their text; escapes only through json.loads, once per distinct
    literal that has a backslash."""
    inner = pc.utf8_slice_codeunits(literals, 1, -1)
    data, starts = _column_bytes(literals)
    backslashes = _positions_of(data, (ord("\\"),))
    if not len(backslashes):
        return inner
    escaped = np.zeros(len(literals), bool)
    escaped[np.searchsorted(starts, backslashes, side="right") - 1] = True
    which = np.flatnonzero(escaped)
    encoded = pc.dictionary_encode(literals.take(pa.array(which)))
    decoded = pa.array([json.loads(t) for t in encoded.dictionary.to_pylist()], pa.string())
    return pc.replace_with_mask(inner, pa.array(escaped), decoded.take(encoded.indices))


def _column_bytes(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of a string column's texts, back to back, and where each text
    starts in them (n + 1 int64 offsets, the last one the end). A null's span
    is usually empty, but Arrow does not promise it: a caller must not read a
    null's bytes as its text."""
    texts = texts.cast(pa.string())
    n = len(texts)
    buffer = texts.buffers()[2]
    offsets = np.frombuffer(texts.buffers()[1], np.int32)[texts.offset : texts.offset + n + 1]
    if buffer is None or n == 0:
        return np.zeros(0, np.uint8), np.zeros(n + 1, np.int64)
    return np.frombuffer(buffer, np.uint8)[offsets[0] : offsets[-1]], (offsets - offsets[0]).astype(np.int64)


def _valid(values: pa.Array) -> np.ndarray:
    return np.asarray(values.is_valid().to_numpy(zero_copy_only=False), bool)


def _scatter(n: int, where: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(n, values.dtype)
    out[where] = values
    return out


def _all_numbers(texts: pa.Array) -> pa.Array | None:
    """The texts as doubles when every one is a JSON number (the common case
    for a leaf), else None. Arrow's cast refuses every other JSON text (a
    quote, true, false, null, a bracket) except 'nan', which JSON null would
    become here: a result with a NaN is refused too. One cast, no kind scan."""
    if not _NUMBER_START[_first_valid_byte(texts)]:
        return None
    try:
        numbers = pc.cast(texts, pa.float64())
    except pa.ArrowInvalid:
        return None
    return None if pc.any(pc.is_nan(numbers)).as_py() else numbers


def _first_valid_byte(texts: pa.Array) -> int:
    """The first byte of the first non-null, non-empty text (0 if none)."""
    texts = texts.cast(pa.string())
    first = pc.index(pc.is_valid(texts), True).as_py()
    if first < 0:
        return 0
    value = texts[first].as_buffer()
    return value[0] if value is not None and len(value) else 0


def _numbers(values: pa.Array, env: bool) -> _Numbers:
    valid = np.asarray(values.is_valid().to_numpy(zero_copy_only=False), bool)
    data = np.asarray(pc.fill_null(values, 0.0).to_numpy(zero_copy_only=False), np.float64)
    return _Numbers(data, valid, env)


def _index_within(parent: np.ndarray, n: int) -> np.ndarray:
    """Position of each flattened list element inside its own list."""
    sizes = np.bincount(parent, minlength=n)
    starts = np.cumsum(sizes) - sizes
    return np.arange(len(parent), dtype=np.int64) - starts[parent]


def _keys_collide(structure: dict) -> bool:
    """True when DuckDB cannot make these keys struct fields: an empty key, or
    two keys equal but for case (field names are case-insensitive)."""
    if "" in structure:
        return True
    seen = set()
    for key in structure:
        for folded in {key.lower(), key.casefold(), key.upper()}:
            if folded in seen:
                return True
        seen.update({key.lower(), key.casefold(), key.upper()})
    return False


def _without_colliding_keys(structure: dict) -> dict:
    """The structure keeping, of keys that ``_keys_collide`` objects to, only the
    first of each group (json_transform matches keys case-sensitively, so a run
    holding a dropped key shows a missing member)."""
    kept, seen = {}, set()
    for key, sub in structure.items():
        folds = {key.lower(), key.casefold(), key.upper()}
        if key and not folds & seen:
            kept[key] = sub
            seen |= folds
    return kept


def _is_env_key(key: str) -> bool:
    # A needle has no '.', '[' or digit, so it can only match inside one key.
    return any(needle in key for needle in ENV_NEEDLES)


# --------------------------------------------------------------------------
# Entry points


def unnest_config(
    con: duckdb.DuckDBPyConnection,
    objects: pa.Array,
    limit: int,
    cache: ShapeCache | None = None,
    facts: TextFacts | None = None,
    parsed: RootParse | None = None,
) -> Unnested:
    """Config and env leaves of a column of JSON objects (null for no object).

    Pass the same ``cache`` for every batch of a job: later batches then reuse
    the structure of earlier ones (see ``_Builder.root_objects``). ``facts``:
    the ``text_facts`` of ``objects``, when already computed; ``parsed``:
    their ``parse_config`` with the same cache, when already done.
    """
    deep = facts.deep if facts is not None else _too_deep(objects)
    builder = _Builder(con, strings=True, descend=True, shallow=not deep)
    with _recursion_room(objects, deep):
        if cache is None:
            root = builder.objects(objects, _Path(), False)
        else:
            root = builder.root_objects(objects, cache, facts, parsed)
        return _place(root, len(objects), limit, ("config", "env"), {"config": root.count, "env": root.env_count})


def parse_config(con: duckdb.DuckDBPyConnection, objects: pa.Array, cache: ShapeCache) -> RootParse | None:
    """The DuckDB parse that ``unnest_config`` starts with (see ``_Builder.parse_root``),
    done ahead, e.g. on a reader thread with its own connection."""
    return _Builder(con, strings=True, descend=True).parse_root(objects, cache)


@contextmanager
def _recursion_room(texts: pa.Array, deep: bool):
    """Building and placing nodes recurse a few frames per level of nesting, so a
    config nested a few hundred levels deep (valid jsonb) would exceed Python's
    default limit: raise it for the deepest text of the batch, then restore it.
    (Python-to-Python calls use no C stack since 3.11, so this is safe.)"""
    if not deep:
        yield
        return
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(old + 8 * max_depth(texts))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def unnest_metrics(
    con: duckdb.DuckDBPyConnection,
    objects: pa.Array,
    limit: int,
    cache: ShapeCache | None = None,
    facts: TextFacts | None = None,
) -> Unnested:
    """Outcome leaves: top-level numbers and booleans of each JSON object."""
    builder = _Builder(con, strings=False, descend=False, shallow=facts is not None and not facts.deep)
    if cache is None:
        root = builder.objects(objects, _Path(), False)
    else:
        root = builder.root_objects(objects, cache, facts)
    result = _place(root, len(objects), limit, ("config", "env"), {"outcome": root.count})
    return Unnested(result.counts, {"outcome": result.leaves["config"]})


def _place(root: _Node, n: int, limit: int, branches, counts) -> Unnested:
    sink = _Sink(limit, branches)
    zeros = np.zeros(n, np.int64)
    root.place(sink, np.arange(n, dtype=np.int64), zeros, zeros.copy(), [])
    return Unnested(counts, sink.leaves)
