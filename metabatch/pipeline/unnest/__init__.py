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

Modules, in the order a batch goes through them: ``text`` (facts read off the
texts before any parse), ``structure`` (JSON structures and the cache a job
keeps across batches), ``reuse`` (parsing a batch with that cache, checking
every run), ``builder`` (DuckDB's parse into typed columns, turned
into nodes), ``nodes`` (what each structure node holds per run), ``paths``
(leaf paths with list indices), ``leaves`` (the placed leaves returned here).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import duckdb
import numpy as np
import pyarrow as pa

from .builder import ENV_NEEDLES, _Builder
from .leaves import BranchLeaves, PathLeaves, Sink, Unnested
from .nodes import _Node
from .paths import LeafPath
from .reuse import parse_root, root_objects
from .structure import RootParse, ShapeCache
from .text import TextFacts, _too_deep, max_depth, text_facts, text_members
from .text import _all_numbers, _first_bytes, _json_strings  # noqa: F401 (used by the tests)

__all__ = [
    "ENV_NEEDLES", "BranchLeaves", "PathLeaves", "RootParse", "ShapeCache", "TextFacts", "Unnested",
    "collect_config", "collect_metrics", "max_depth", "parse_config", "text_facts", "text_members",
    "unnest_config", "unnest_metrics",
]


def unnest_config(
    con: duckdb.DuckDBPyConnection,
    objects: pa.Array,
    limit: int,
    cache: ShapeCache | None = None,
    facts: TextFacts | None = None,
    parsed: RootParse | None = None,
) -> Unnested:
    """Config and env leaves of a column of JSON objects (null for no object),
    at their v1 positions (see ``_config_root`` for the other arguments)."""
    with _config_root(con, objects, cache, facts, parsed) as root:
        return _place(root, len(objects), limit, ("config", "env"), {"config": root.count, "env": root.env_count})


def collect_config(
    con: duckdb.DuckDBPyConnection,
    objects: pa.Array,
    cache: ShapeCache | None = None,
    facts: TextFacts | None = None,
    parsed: RootParse | None = None,
) -> PathLeaves:
    """Every leaf of a column of JSON objects by path, list indices dropped
    (the v2 encoder's input; see ``_config_root`` for the other arguments)."""
    with _config_root(con, objects, cache, facts, parsed) as root:
        leaves = PathLeaves()
        root.collect(leaves, np.arange(len(objects), dtype=np.int64))
        return leaves


@contextmanager
def _config_root(con, objects, cache, facts, parsed):
    """The root node of a column of config objects, with room to recurse into it.

    Pass the same ``cache`` for every batch of a job: later batches then reuse
    the structure of earlier ones (see ``reuse.root_objects``). ``facts``:
    the ``text_facts`` of ``objects``, when already computed; ``parsed``:
    their ``parse_config`` with the same cache, when already done.
    """
    deep = facts.deep if facts is not None else _too_deep(objects)
    builder = _Builder(con, strings=True, descend=True, shallow=not deep)
    with _recursion_room(objects, deep):
        if cache is None:
            yield builder.objects(objects, LeafPath(), False)
        else:
            yield root_objects(builder, objects, cache, facts, parsed)


def parse_config(con: duckdb.DuckDBPyConnection, objects: pa.Array, cache: ShapeCache) -> RootParse | None:
    """The DuckDB parse that ``unnest_config`` starts with (see ``reuse.parse_root``),
    done ahead, e.g. on a reader thread with its own connection."""
    return parse_root(_Builder(con, strings=True, descend=True), objects, cache)


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
    root = _metrics_root(con, objects, cache, facts)
    result = _place(root, len(objects), limit, ("config", "env"), {"outcome": root.count})
    return Unnested(result.counts, {"outcome": result.leaves["config"]})


def collect_metrics(
    con: duckdb.DuckDBPyConnection,
    objects: pa.Array,
    cache: ShapeCache | None = None,
    facts: TextFacts | None = None,
) -> PathLeaves:
    """The top-level numbers and booleans of each JSON object, by key (v2)."""
    leaves = PathLeaves()
    _metrics_root(con, objects, cache, facts).collect(leaves, np.arange(len(objects), dtype=np.int64))
    return leaves


def _metrics_root(con, objects, cache, facts) -> _Node:
    builder = _Builder(con, strings=False, descend=False, shallow=facts is not None and not facts.deep)
    if cache is None:
        return builder.objects(objects, LeafPath(), False)
    return root_objects(builder, objects, cache, facts)


def _place(root: _Node, n: int, limit: int, branches, counts) -> Unnested:
    sink = Sink(limit, branches)
    zeros = np.zeros(n, np.int64)
    root.place(sink, np.arange(n, dtype=np.int64), zeros, zeros.copy(), [])
    return Unnested(counts, sink.leaves)
