"""JSON structures (DuckDB's ``json_group_structure`` notation) and the cache of
them a job keeps across batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa


# Runs of a job's first batch whose JSON structure is inferred up front.
_SAMPLE_ROWS = 2_000


@dataclass
class RootParse:
    """Root texts parsed with a cached structure (``reuse.parse_root``)."""

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
