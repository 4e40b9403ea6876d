"""Reusing the JSON structure of earlier batches: a job's batches are parsed
with the structure cached so far (``ShapeCache``), and only the runs that do
not fit it pay for DuckDB's structure inference.

``parse_root(builder, texts, cache)`` is that first parse (a reader thread
does it ahead); ``root_objects(builder, texts, cache, ...)`` checks every run
against it and returns the root node of the batch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .builder import _Builder
from .nodes import _Filtered, _Mixed, _Node, _Struct
from .paths import LeafPath
from .structure import _SAMPLE_ROWS, RootParse, ShapeCache, _merge_structures, _without_colliding_keys
from .text import TextFacts, _first_bytes, _valid, text_members


def parse_root(builder: _Builder, texts: pa.Array, cache: ShapeCache) -> RootParse | None:
    """The root texts parsed with the structure cached so far, scalars as raw
    JSON (``root_objects``' fast parse), or None before there is one. A
    reader thread calls it for the next batch while this one is encoded:
    whatever structure it found, ``root_objects`` checks every run."""
    known = cache.structures.get("config" if builder.descend else "metrics")
    if not isinstance(known, dict):
        return None
    # keys DuckDB cannot take as fields are left out: their runs fail the check
    known = _without_colliding_keys(known)
    shape = builder._shape(known, top=True, raw=True) if known else None
    if not shape:
        return None
    return RootParse(known, shape, builder._transform(texts, shape))

def root_objects(
    builder: _Builder, texts: pa.Array, cache: ShapeCache, facts: TextFacts | None = None, parsed: RootParse | None = None
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
    column = "config" if builder.descend else "metrics"
    if parsed is None:
        if cache.structures.get(column) is None and n > _SAMPLE_ROWS:
            # first batch: learn from a sample, the check below catches the rest
            cache.structures[column] = builder._structure(texts.slice(0, _SAMPLE_ROWS))
        parsed = parse_root(builder, texts, cache)
    if parsed is None:
        cache.structures[column] = builder._structure(texts)
        return builder._objects_with(texts, cache.structures[column], LeafPath(), False)
    known = parsed.structure
    fast = builder._struct(parsed.typed, parsed.shape, LeafPath(), False)
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
    structure = builder._structure(subset)
    # merge into the structure cached now (another batch may have added to it
    # since this one was parsed); the root structure is only a guess that
    # every run is checked against: keep it an object
    current = cache.structures.get(column)
    base = _without_colliding_keys(current) if isinstance(current, dict) and current else known
    merged = _merge_structures(base, structure)
    cache.structures[column] = merged if isinstance(merged, dict) else base
    slow = builder._objects_with(subset, structure, LeafPath(), False)
    return _Mixed(n, [(np.arange(n), _Filtered(fast, ~bad)), (rows, slow)], _valid(texts))

