"""Building nodes from JSON text: DuckDB infers the structure and parses the
texts into typed Arrow columns, which become nodes (see ``nodes``)."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .nodes import _Empty, _List, _Mixed, _Node, _Numbers, _Strings, _Struct
from .paths import LeafPath
from .structure import _keys_collide
from .text import (
    _KIND_OF_FIRST_BYTE,
    _KINDS,
    _all_numbers,
    _first_bytes,
    _json_strings,
    _too_deep,
    _valid,
    text_members,
)


ENV_NEEDLES = ("market_id", "universe_id", "assessment_strategy_id", "assessment_horizon_days")

_NUMERIC_TYPES = {
    "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT",
    "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT",
    "FLOAT", "DOUBLE", "DECIMAL",
}



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

    def objects(self, texts: pa.Array, path: LeafPath, env: bool) -> _Node:
        """Node for a column of JSON objects (null where absent)."""
        return self._objects_with(texts, self._structure(texts), path, env)

    def _structure(self, texts: pa.Array):
        """DuckDB's merged structure of the texts, or None when they nest too deep
        for it (the callers then walk the values by JSON pointer, a level at a time)."""
        if not self.shallow and _too_deep(texts):
            return None
        structure = self._query("SELECT json_group_structure(j::JSON) FROM mb_input", texts)[0].as_py()
        return json.loads(structure) if structure is not None else None

    def _objects_with(self, texts: pa.Array, structure, path: LeafPath, env: bool, raw: bool = False) -> _Node:
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

    def _objects_by_pointer(self, texts: pa.Array, path: LeafPath, env: bool) -> _Node:
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

    def _struct(self, typed: pa.Array, shape: dict, path: LeafPath, env: bool) -> _Node:
        n = len(typed)
        fields = {typed.type.field(i).name: child for i, child in enumerate(typed.flatten())}
        children = []
        for key in sorted(shape):
            child_env = env or _is_env_key(key)
            children.append(self._typed(fields[key], shape[key], path.key(key), child_env))
        return _Struct(n, children, _valid(typed))

    def _typed(self, values: pa.Array, shape, path: LeafPath, env: bool, element: bool = False) -> _Node:
        if isinstance(shape, dict):
            return self._struct(values, shape, path, env)
        if isinstance(shape, list):
            return self._list(values, shape[0], path, env)
        if shape == "DOUBLE":
            return _numbers(values, env, path)
        if shape == "BOOLEAN":
            return _numbers(pc.cast(values, pa.float64()), env, path, boolean=True)
        if shape == "VARCHAR":
            return _Strings(values, path, env)
        return self.mixed(values, path, env, element=element)

    def _list(self, values: pa.Array, element_shape, path: LeafPath, env: bool) -> _Node:
        n = len(values)
        elements = pc.list_flatten(values)
        parent = np.asarray(pc.list_parent_indices(values).to_numpy(zero_copy_only=False), np.int64)
        level = sum(1 for p in path.pieces if isinstance(p, int))
        node = self._typed(elements, element_shape, path.index(level), env, element=True)
        return _List(n, parent, _index_within(parent, n), node, _valid(values), path)

    # -- values of mixed JSON type

    def mixed(self, texts: pa.Array, path: LeafPath, env: bool, element: bool = False) -> _Node:
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
            return _numbers(numbers, env, path)
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
            return _numbers(pc.cast(texts, pa.float64()), env, path)
        if present == ["string"] and self.strings:
            return _Strings(_json_strings(texts), path, env)
        if present == ["boolean"]:
            return _numbers(pc.cast(pc.starts_with(texts, "t"), pa.float64()), env, path, boolean=True)
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
                node = _numbers(pc.cast(pc.starts_with(subset, "t"), pa.float64()), env, path, boolean=True)
            else:
                node = _numbers(pc.cast(subset, pa.float64()), env, path)
            parts.append((where, node))
        return _Mixed(n, parts, valid, members)

    def _arrays(self, texts: pa.Array, path: LeafPath, env: bool) -> _Node:
        # elements as raw JSON, sorted out by kind like any raw value: no
        # structure inference over the arrays (objects in them get their own)
        return self._list(self._transform(texts, ["JSON"]), "JSON", path, env)


def _scatter(n: int, where: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(n, values.dtype)
    out[where] = values
    return out


def _numbers(values: pa.Array, env: bool, path: LeafPath, boolean: bool = False) -> _Numbers:
    valid = np.asarray(values.is_valid().to_numpy(zero_copy_only=False), bool)
    data = np.asarray(pc.fill_null(values, 0.0).to_numpy(zero_copy_only=False), np.float64)
    return _Numbers(data, valid, env, path, boolean)


def _index_within(parent: np.ndarray, n: int) -> np.ndarray:
    """Position of each flattened list element inside its own list."""
    sizes = np.bincount(parent, minlength=n)
    starts = np.cumsum(sizes) - sizes
    return np.arange(len(parent), dtype=np.int64) - starts[parent]


def _is_env_key(key: str) -> bool:
    # A needle has no '.', '[' or digit, so it can only match inside one key.
    return any(needle in key for needle in ENV_NEEDLES)
