"""Dates: ISO-8601 dates and timestamps written as JSON strings, as numbers.

JSON has no date type, so configs carry windows and timestamps as strings
(``"2024-01-05"``, ``"2024-01-05T10:20:30Z"``). As tokens, two runs a day
apart share nothing; as numbers (days since 1970-01-01, UTC, a fraction for
the time of day) they are near. ``days_of(con, strings)`` takes an Arrow
string array and returns float64 days, NaN where a value is not an ISO-8601
date or timestamp (``YYYY-MM-DD``, then optionally ``T`` or a space, ``HH:MM``,
``:SS``, a fraction, and ``Z`` or an offset ``+HH:MM`` / ``+HHMM`` / ``+HH``).
A timestamp without an offset is taken as UTC.

The distinct values are parsed once each (by DuckDB), so a batch costs one
small query per date path, whatever the number of runs.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ISO_DATE = r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}(:?\d{2})?)?"
_OFFSET = r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}(:?\d{2})?)"
SECONDS_PER_DAY = 86_400.0


def days_of(con: duckdb.DuckDBPyConnection, strings: pa.Array) -> np.ndarray:
    """Days since 1970-01-01 UTC of each string (float64; NaN for non-dates)."""
    if not len(strings):
        return np.zeros(0, np.float64)
    encoded = pc.dictionary_encode(strings.cast(pa.string()))
    distinct = encoded.dictionary
    con.register("mb_dates", pa.table({"s": distinct}))
    try:
        # epoch() of a TIMESTAMP (no zone) counts as if UTC, so the session's
        # TimeZone setting never enters; with an offset, TIMESTAMPTZ applies it
        parsed = con.sql(
            "SELECT CASE WHEN NOT regexp_full_match(s, $1) THEN NULL"
            " WHEN regexp_full_match(s, $2) THEN epoch(try_cast(s AS TIMESTAMPTZ))"
            " ELSE epoch(try_cast(s AS TIMESTAMP)) END AS seconds FROM mb_dates",
            params=[ISO_DATE, _OFFSET],
        ).to_arrow_table().column(0)
    finally:
        con.unregister("mb_dates")
    days = np.asarray(pc.fill_null(parsed.cast(pa.float64()), np.nan).to_numpy(), np.float64) / SECONDS_PER_DAY
    codes = np.asarray(pc.fill_null(encoded.indices, len(days)).to_numpy(), np.int64)
    return np.append(days, np.nan)[codes]  # a null string is not a date
