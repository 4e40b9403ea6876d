"""Facts read off JSON text columns without parsing them: member counts,
nesting depth, the kind of each value by its first byte, string literals."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import polars as pl


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
