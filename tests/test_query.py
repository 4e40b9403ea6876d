"""show, similar, meta_ctx_norms and sql on real PostgreSQL and DuckDB: the same
answers from a snapshot and from the database, agreeing with a plain NumPy
computation; the seeds' CSV formats; filters; errors; hostile ids."""

from __future__ import annotations

import datetime as dt
import json
import re
import warnings

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import metabatch
from helpers import embeddings
from metabatch.snapshot import query
from metabatch.cli import main
from metabatch.pipeline.embed import JOINT_TYPE
from metabatch.errors import BadInput, MetabatchError
from metabatch.snapshot import export_parquet
from test_snapshot import MODEL, database, snapshot  # noqa: F401 (shared module fixtures)

SHOW_HEADER = "as_of_date,run_id,strategy_id,universe_id,model_id,dim,l2_norm"
SIMILAR_HEADER = "cosine,euclidean,run_id,strategy_id,universe_id,as_of_date,source"




@pytest.fixture(scope="module")
def rows(database) -> list[dict]:
    """joint_embeddings as the seeds' scripts would read them (entity_scope parsed)."""
    out = []
    for r in embeddings(database):
        scope = r["entity_scope"] if isinstance(r["entity_scope"], dict) else {}
        out.append({**r, "strategy_id": scope.get("strategy_id"), "universe_id": scope.get("universe_id"),
                    "source": scope.get("source")})
    return out


@pytest.fixture(params=["snapshot", "database"])
def source(request, snapshot, database) -> dict:
    """Where show/similar read: keyword arguments for the API, options for the CLI."""
    if request.param == "snapshot":
        return {"api": {"snapshot": snapshot}, "cli": ["--snapshot", str(snapshot)]}
    return {"api": {"historical_url": database}, "cli": ["--historical-url", database]}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def embedded_run_ids(rows, k=None):
    ids = [r["run_id"] for r in rows if r["joint_type"] == JOINT_TYPE and r["model_id"] == MODEL
           and r["run_id"] and r["run_id"].startswith("BT_")]
    return ids[:k] if k else ids


# --------------------------------------------------------------------------
# similar: against NumPy


def reference_similar(rows, run_id, strategies=(), start=None, end=None, candidate_limit=None, top_k=10):
    """The seeds' find_similar, in float64 over every candidate."""
    mine = [r for r in rows if r["joint_type"] == JOINT_TYPE and r["model_id"] == MODEL]
    target = max((r for r in mine if r["run_id"] == run_id), key=lambda r: r["joint_id"])
    q = np.frombuffer(target["vector"], "<f4").astype(np.float64)
    candidates = [
        r for r in mine
        if r["run_id"] is not None and r["run_id"] != run_id
        and (not strategies or r["strategy_id"] in strategies)
        and (start is None or r["as_of_date"] >= start) and (end is None or r["as_of_date"] <= end)
    ]
    candidates.sort(key=lambda r: -r["joint_id"])
    if candidate_limit:
        candidates = candidates[:candidate_limit]
    candidates = [r for r in candidates if r["vector"] is not None and len(r["vector"]) == len(target["vector"])]
    if not candidates:
        return []
    matrix = np.array([np.frombuffer(r["vector"], "<f4") for r in candidates], dtype=np.float64)
    norms, q_norm = np.linalg.norm(matrix, axis=1), np.linalg.norm(q)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((norms > 0) & (q_norm > 0), matrix @ q / (norms * q_norm), 0.0)
    euc = np.linalg.norm(matrix - q, axis=1)
    order = sorted(range(len(candidates)), key=lambda i: (-cos[i], euc[i], -candidates[i]["joint_id"]))[:top_k]
    return [(cos[i], euc[i], candidates[i]["run_id"]) for i in order]


def assert_same_neighbours(frame: pl.DataFrame, want: list[tuple]):
    got = list(zip(frame["cosine"], frame["euclidean"], frame["run_id"]))
    assert len(got) == len(want)
    for (gc, ge, grun), (wc, we, wrun) in zip(got, want):
        assert gc == pytest.approx(wc, abs=1e-6) and ge == pytest.approx(we, abs=1e-6, rel=1e-12)
    # Same order, except that neighbours tied to float64 noise (1e-12) may come in either order.
    assert _groups(got) == _groups(want)


def _groups(items):
    """Run ids grouped by (cosine, euclidean) equal to 1e-12 (relative for the distance)."""
    out = []
    for cos, euc, run in items:
        if out and abs(out[-1][0] - cos) <= 1e-12 and abs(out[-1][1] - euc) <= 1e-12 * max(1.0, euc):
            out[-1][2].add(run)
        else:
            out.append((cos, euc, {run}))
    return [group for *_, group in out]


def test_similar_agrees_with_numpy(rows, source):
    targets = embedded_run_ids(rows)[::97][:8] + ["ZERO_RUN", "TWIN_RUN", embedded_run_ids(rows)[7]]
    for run_id in targets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", query.DimensionMismatch)
            frame = metabatch.similar(run_id, top_k=12, **source["api"])
        assert frame.columns == list(query.SIMILAR_COLUMNS)
        assert_same_neighbours(frame, reference_similar(rows, run_id, top_k=12))
        assert run_id not in frame["run_id"].to_list()


def test_similar_filters_agree_with_numpy(rows, source):
    run_id = embedded_run_ids(rows)[11]
    cases = [
        {"strategy_id": ["US_EQ_CORE_LONG_EQ"]},
        {"strategy_id": ["JP_EQ_QUALITY", "CRYPTO_TREND"], "start": dt.date(2024, 1, 1)},
        {"start": dt.date(2025, 1, 1), "end": dt.date(2025, 6, 30)},
        {"candidate_limit": 50},
        {"candidate_limit": 500, "strategy_id": ["EU_EQ_VALUE_LONG"]},
        {"strategy_id": ["NO_SUCH_STRATEGY"]},
    ]
    for case in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", query.DimensionMismatch)
            frame = metabatch.similar(run_id, top_k=7, **case, **source["api"])
        want = reference_similar(
            rows, run_id, strategies=case.get("strategy_id", ()), start=case.get("start"), end=case.get("end"),
            candidate_limit=case.get("candidate_limit"), top_k=7,
        )
        assert_same_neighbours(frame, want)
        if "strategy_id" in case:
            assert set(frame["strategy_id"]) <= set(case["strategy_id"])


def test_zero_vectors_have_cosine_zero_and_other_dimensions_are_skipped(rows, source):
    with pytest.warns(query.DimensionMismatch, match="1 of another dimension than 384, 1 without a usable vector"):
        frame = metabatch.similar("ZERO_RUN", top_k=3000, **source["api"])
    assert (frame["cosine"] == 0).all()
    assert frame["euclidean"].is_sorted()  # all cosines tie: nearest by distance, i.e. smallest norm
    assert "WIDE_RUN" not in frame["run_id"].to_list() and "NULL_VECTOR" not in frame["run_id"].to_list()
    # A 768-dim target compares with 768-dim candidates only (there are none).
    with pytest.warns(query.DimensionMismatch):
        assert metabatch.similar("WIDE_RUN", **source["api"]).height == 0


def test_twin_vector_is_nearest_with_cosine_one(rows, source):
    twin_of = [r for r in rows if r["run_id"] == "TWIN_RUN"][0]["vector"]
    original = [r["run_id"] for r in rows if r["vector"] == twin_of and r["run_id"] != "TWIN_RUN"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", query.DimensionMismatch)
        frame = metabatch.similar(original, top_k=1, **source["api"])
    assert frame.row(0)[:3] == (pytest.approx(1.0), 0.0, "TWIN_RUN")


def test_similar_cli_csv_and_errors(rows, source):
    run_id = embedded_run_ids(rows)[20]
    result = invoke("similar", *source["cli"], "--run-id", run_id, "--top-k", 5)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == SIMILAR_HEADER and len(lines) == 6
    want = reference_similar(rows, run_id, top_k=5)
    for line, (cos, euc, _run) in zip(lines[1:], want):
        fields = line.split(",")
        assert len(fields) == 7
        assert fields[0] == f"{cos:.6f}" and fields[1] == f"{euc:.6f}"
        dt.date.fromisoformat(fields[5])
    assert "Warning: similar: skipped 2 candidate(s)" in result.stderr

    missing = invoke("similar", *source["cli"], "--run-id", "NO_SUCH_RUN")
    assert missing.exit_code == 1
    assert "Error: run `NO_SUCH_RUN` has no META_CONFIG_ENV_V0 embedding" in missing.stderr
    with pytest.raises(MetabatchError, match="NO_SUCH_RUN"):
        metabatch.similar("NO_SUCH_RUN", **source["api"])
    assert invoke("similar", *source["cli"], "--run-id", run_id, "--top-k", 0).exit_code == 2
    assert invoke("similar", *source["cli"]).exit_code == 2
    table = invoke("similar", *source["cli"], "--run-id", run_id, "--top-k", 3, "--format", "table").stdout
    assert table.splitlines()[0].split() == SIMILAR_HEADER.split(",") and "(3 rows)" in table
    data = json.loads(invoke("similar", *source["cli"], "--run-id", run_id, "--top-k", 3, "--format", "json").stdout)
    assert [d["run_id"] for d in data] == [w[2] for w in reference_similar(rows, run_id, top_k=3)]


# --------------------------------------------------------------------------
# show


def reference_show(rows, as_of=None, start=None, end=None, run_ids=(), strategies=(), universes=(), model=MODEL, limit=1000):
    """The seeds' show script, line by line."""
    picked = [
        r for r in rows
        if r["joint_type"] == JOINT_TYPE and r["model_id"] == model
        and (as_of is None or r["as_of_date"] == as_of)
        and (start is None or r["as_of_date"] >= start) and (end is None or r["as_of_date"] <= end)
        and (not run_ids or r["run_id"] in run_ids)
        and (not strategies or r["strategy_id"] in strategies)
        and (not universes or r["universe_id"] in universes)
    ]
    picked.sort(key=lambda r: (r["as_of_date"], r["joint_id"]))
    if limit:
        picked = picked[:limit]
    lines = [SHOW_HEADER]
    for r in picked:
        vec = np.frombuffer(r["vector"], "<f4") if r["vector"] is not None else np.zeros(0, "<f4")
        norm = float(np.linalg.norm(vec.astype(np.float64)))
        universe = r["universe_id"] or ""
        if "," in universe:
            universe = f'"{universe}"'
        lines.append(f"{r['as_of_date']},{r['run_id'] or ''},{r['strategy_id'] or ''},{universe},{model},{len(vec)},{norm:.6f}")
    return lines


@pytest.mark.parametrize(
    "options, kwargs",
    [
        ([], {}),
        (["--limit", "0"], {"limit": 0}),
        (["--limit", "7"], {"limit": 7}),
        (["--strategy-id", "ODD"], {"strategies": ("ODD",)}),
        (["--strategy-id", "ODD", "--strategy-id", "FX_CARRY_G10"], {"strategies": ("ODD", "FX_CARRY_G10")}),
        (["--as-of", "2025-02-01"], {"as_of": dt.date(2025, 2, 1)}),
        (["--start", "2025-01-01", "--end", "2025-03-31", "--limit", "0"], {"start": dt.date(2025, 1, 1), "end": dt.date(2025, 3, 31), "limit": 0}),
        (["--run-id", "ZERO_RUN", "--run-id", "NULL_VECTOR"], {"run_ids": ("ZERO_RUN", "NULL_VECTOR")}),
        (["--universe-id", "U,1"], {"universes": ("U,1",)}),
        (["--model-id", "other-model"], {"model": "other-model"}),
        (["--model-id", "no-such-model"], {"model": "no-such-model"}),
    ],
)
def test_show_prints_the_seeds_csv(rows, source, options, kwargs):
    result = invoke("show", *source["cli"], *options)
    assert result.exit_code == 0, result.output
    assert_same_show(result.stdout.splitlines(), reference_show(rows, **kwargs))


def assert_same_show(got: list[str], want: list[str]):
    """Equal lines; the norm (float64, 6 decimals) may differ in the last digit where
    two float64 summation orders round differently (norms reach 1e9: ulp 1e-7)."""
    assert len(got) == len(want) and got[0] == want[0]
    for g, w in zip(got[1:], want[1:]):
        g_head, g_norm = g.rsplit(",", 1)
        w_head, w_norm = w.rsplit(",", 1)
        assert g_head == w_head
        assert re.fullmatch(r"\d+\.\d{6}", g_norm), g
        assert abs(float(g_norm) - float(w_norm)) <= 1.5e-6 + 1e-15 * float(w_norm), (g, w)


def test_show_details(rows, source, snapshot, database):
    frame = metabatch.show(run_id="NULL_VECTOR", **source["api"])
    assert frame.columns == list(query.SHOW_COLUMNS)
    assert frame.row(0)[1:] == ("NULL_VECTOR", "ODD", None, MODEL, 0, 0.0)  # as the seeds: dim 0, norm 0
    line = [l for l in invoke("show", *source["cli"], "--run-id", "ZERO_RUN").stdout.splitlines()][1]
    assert line == f"2025-02-01,ZERO_RUN,ODD,,{MODEL},384,0.000000"
    # the snapshot and the database give the same output
    a = invoke("show", "--snapshot", snapshot, "--limit", 0).stdout
    b = invoke("show", "--historical-url", database, "--limit", 0).stdout
    assert a == b and len(a.splitlines()) > 1900
    usage = invoke("show", *source["cli"], "--as-of", "2025-01-01", "--start", "2025-01-01")
    assert usage.exit_code == 2 and "--as-of" in usage.output
    with pytest.raises(BadInput):
        metabatch.show(as_of="2025-01-01", end="2025-02-01", **source["api"])
    assert invoke("show", *source["cli"], "--limit", -1).exit_code == 2
    table = invoke("show", *source["cli"], "--limit", 2, "--format", "table").stdout
    assert table.splitlines()[0].split() == SHOW_HEADER.split(",")
    data = json.loads(invoke("show", *source["cli"], "--limit", 2, "--format", "json").stdout)
    assert list(data[0]) == list(query.SHOW_COLUMNS)


# --------------------------------------------------------------------------
# meta_ctx_norms


def test_meta_ctx_norms(rows, source):
    norms = metabatch.meta_ctx_norms("US_EQ_CORE_LONG_EQ", **source["api"])
    latest = {}
    for r in sorted(rows, key=lambda r: r["joint_id"]):
        if r["joint_type"] == JOINT_TYPE and r["model_id"] == MODEL and r["strategy_id"] == "US_EQ_CORE_LONG_EQ" and r["run_id"]:
            latest[r["run_id"]] = float(np.linalg.norm(np.frombuffer(r["vector"], "<f4").astype(np.float64)))
    assert norms.keys() == latest.keys() and len(norms) > 100
    for run_id, norm in latest.items():
        assert norms[run_id] == pytest.approx(norm, rel=1e-12)
    some = list(latest)[:3]
    assert metabatch.meta_ctx_norms("US_EQ_CORE_LONG_EQ", MODEL, run_id=some, **source["api"]).keys() == set(some)
    assert metabatch.meta_ctx_norms("NO_SUCH", **source["api"]) == {}


# --------------------------------------------------------------------------
# Hostile input


HOSTILE = ["x' OR '1'='1", "'; DROP TABLE joint_embeddings; --", "US_EQ_CORE_LONG_EQ' --", "$run_id", "\\' OR 1=1 --"]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_ids_are_inert(rows, source, database, hostile):
    before = len(embeddings(database))
    for option in ("--run-id", "--strategy-id", "--universe-id", "--model-id"):
        result = invoke("show", *source["cli"], option, hostile)
        assert result.exit_code == 0 and result.stdout == SHOW_HEADER + "\n", (option, result.output)
    result = invoke("similar", *source["cli"], "--run-id", hostile)
    assert result.exit_code == 1 and "has no META_CONFIG_ENV_V0 embedding" in result.stderr
    run_id = embedded_run_ids(rows)[3]
    for option in ("--strategy-id", "--model-id"):
        result = invoke("similar", *source["cli"], "--run-id", run_id, option, hostile)
        assert result.exit_code in (0, 1)
        assert result.stdout in ("", SIMILAR_HEADER + "\n")
    assert metabatch.meta_ctx_norms(hostile, **source["api"]) == {}
    assert len(embeddings(database)) == before


# --------------------------------------------------------------------------
# Snapshot cache


def test_repeated_calls_reuse_the_loaded_snapshot(rows, database, tmp_path, monkeypatch):
    out = tmp_path / "snap"
    export_parquet(out, database)
    run_id = embedded_run_ids(rows)[5]
    first = metabatch.similar(run_id, snapshot=out, strategy_id="US_EQ_CORE_LONG_EQ")
    loads = []
    original = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(a) or original(*a, **k))
    for _ in range(3):
        assert metabatch.similar(run_id, snapshot=out, strategy_id="US_EQ_CORE_LONG_EQ").equals(first)
    assert loads == []  # nothing read again
    assert query.open_snapshot(out) is query.open_snapshot(str(out))
    old = query.open_snapshot(out)
    export_parquet(out, database, strategy_id="ODD")  # replaced: the next call sees the new one
    assert query.open_snapshot(out) is not old
    assert set(metabatch.show(snapshot=out, limit=0)["strategy_id"]) == {"ODD"}
    assert loads  # loaded again, once


# --------------------------------------------------------------------------
# sql


def test_sql_views_macros_and_formats(rows, snapshot):
    run_id = embedded_run_ids(rows)[30]
    near = metabatch.sql(f"SELECT * FROM nearest('{run_id}', 5)", snapshot)
    want = reference_similar(rows, run_id, top_k=5)
    assert np.allclose(near["cosine"].to_numpy(), [w[0] for w in want], atol=1e-6)  # FLOAT precision in SQL
    joined = metabatch.sql(
        f"SELECT run_id, cosine, sharpe, max_drawdown, metrics_json FROM neighbour_runs('{run_id}', 50)"
        " ORDER BY sharpe DESC NULLS LAST LIMIT 3",
        snapshot,
    )
    assert joined.height == 3
    for row in joined.iter_rows(named=True):
        assert row["sharpe"] == json.loads(row["metrics_json"])["sharpe"]
    counts = metabatch.sql("SELECT model_id, count(*) AS n FROM embeddings GROUP BY 1 ORDER BY 1", snapshot)
    assert counts.rows() == [(MODEL, sum(1 for r in rows if r["model_id"] == MODEL and r["joint_type"] == JOINT_TYPE)), ("other-model", 1)]
    drift = metabatch.sql("SELECT * FROM strategy_drift('US_EQ_CORE_LONG_EQ', period := 'year')", snapshot)
    assert drift.columns == ["period_start", "runs", "mean_norm", "cosine_to_previous", "cosine_to_first"]
    assert drift["runs"].sum() == sum(1 for r in rows if r["strategy_id"] == "US_EQ_CORE_LONG_EQ" and r["model_id"] == MODEL)
    assert metabatch.sql("SELECT cosine([0, 0]::FLOAT[2], [1, 2]::FLOAT[2]) AS c, cosine([1, 0]::FLOAT[2], [1, 0]::FLOAT[2]) AS d", snapshot).row(0) == (0.0, pytest.approx(1.0))

    csv = invoke("sql", "--snapshot", snapshot, "--format", "csv", "SELECT 1 AS a, NULL AS b, 'x,y' AS c")
    assert csv.exit_code == 0 and csv.stdout == 'a,b,c\n1,,"x,y"\n'
    data = json.loads(invoke("sql", "--snapshot", snapshot, "--format", "json", "SELECT 1 AS a").stdout)
    assert data == [{"a": 1}]
    table = invoke("sql", "--snapshot", snapshot, "--format", "table", "SELECT 1.5 AS a, 'x' AS b").stdout
    assert table.splitlines()[0].split() == ["a", "b"] and "(1 row)" in table
    piped = CliRunner().invoke(main, ["sql", "--snapshot", str(snapshot)], input="SELECT 2 AS two")
    assert piped.exit_code == 0 and piped.stdout == "two\n2\n"  # not a terminal: CSV


# Every kind of nested value, and values Polars cannot hold (they come as DuckDB's text).
NESTED_SQL = (
    "SELECT 'r1' AS id, [1, 2, NULL] AS list, [0.5, -1.25]::DOUBLE[2] AS array,"
    " {'a': 1, 'b c': ['x', 'y\"z,']} AS struct, MAP {'k': [1.5::DOUBLE], 'j': NULL} AS map,"
    " MAP {7: 'seven'} AS int_map, [{'m': MAP {'x': 1}}] AS deep, NULL::INTEGER[] AS none, [] AS empty,"
    " '2 days'::INTERVAL AS span, union_value(n := 3) AS tagged, 'ab'::BLOB AS bytes,"
    " {'w': ['1 hour'::INTERVAL]} AS nested_span"
)
NESTED_VALUES = {
    "id": "r1", "list": [1, 2, None], "array": [0.5, -1.25], "struct": {"a": 1, "b c": ["x", 'y"z,']},
    "map": {"k": [1.5], "j": None}, "int_map": {"7": "seven"}, "deep": [{"m": {"x": 1}}], "none": None,
    "empty": [], "span": "2 days", "tagged": "3", "bytes": "ab", "nested_span": {"w": ["01:00:00"]},
}


def test_sql_prints_lists_arrays_structs_and_maps_in_every_format(snapshot):
    import csv
    import io

    as_json = invoke("sql", "--snapshot", snapshot, "--format", "json", NESTED_SQL)
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == [NESTED_VALUES]
    as_csv = invoke("sql", "--snapshot", snapshot, "--format", "csv", NESTED_SQL)
    assert as_csv.exit_code == 0, as_csv.output
    [row] = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert list(row) == list(NESTED_VALUES)
    for name, want in NESTED_VALUES.items():
        if want is None:
            assert row[name] == "", name  # NULL: an empty field, as for any column
        elif isinstance(want, (list, dict)):
            assert json.loads(row[name]) == want, name  # nested: the JSON text that --format json writes
        else:
            assert row[name] == want, name
    table = invoke("sql", "--snapshot", snapshot, "--format", "table", NESTED_SQL)
    assert table.exit_code == 0, table.output
    header, rule, line, footer = table.stdout.splitlines()
    assert header.split() == list(NESTED_VALUES) and footer == "(1 row)"
    for name in ("list", "array", "struct", "map", "int_map", "deep", "empty"):
        assert json.dumps(NESTED_VALUES[name], separators=(",", ":")) in line, name
    frame = metabatch.sql(NESTED_SQL, snapshot)  # the Python API: nested types kept
    assert frame.schema["list"] == pl.List(pl.Int32) and frame.schema["map"] == pl.Map(pl.String, pl.List(pl.Float64))
    assert frame.schema["span"] == pl.String and frame.schema["int_map"] == pl.Map(pl.String, pl.String)


def test_sql_prints_the_vectors_as_csv_when_piped(snapshot):
    import csv
    import io

    query_text = "SELECT run_id, vector FROM embeddings ORDER BY joint_id LIMIT 3"
    piped = CliRunner().invoke(main, ["sql", "--snapshot", str(snapshot), query_text])  # not a terminal: CSV
    assert piped.exit_code == 0, piped.output
    rows = list(csv.DictReader(io.StringIO(piped.stdout)))
    want = metabatch.sql(query_text, snapshot)
    assert [r["run_id"] for r in rows] == want["run_id"].to_list()
    for r, vector in zip(rows, want["vector"].to_list()):
        got = np.array(json.loads(r["vector"]), dtype=np.float32)
        assert got.shape == (384,) and np.array_equal(got, np.array(vector, dtype=np.float32))


def test_sql_is_read_only(snapshot, tmp_path):
    from test_snapshot import tree_digest

    before = tree_digest(snapshot)
    for statement in (
        f"COPY (SELECT 1) TO '{snapshot}/x.csv'",
        f"COPY (SELECT * FROM embeddings) TO '{snapshot}/embeddings/model_id={MODEL}/part-00000.parquet'",
        f"EXPORT DATABASE '{snapshot}/dump'",
        f"ATTACH '{tmp_path}/x.duckdb'",
        "SELECT 1; COPY (SELECT 1) TO '/tmp/x.csv'",
    ):
        result = invoke("sql", "--snapshot", snapshot, statement)
        assert result.exit_code == 1, statement
        assert "not allowed" in result.stderr or "disabled by configuration" in result.stderr
    outside = invoke("sql", "--snapshot", snapshot, "SELECT * FROM read_csv('/etc/passwd')")
    assert outside.exit_code == 1 and "disabled by configuration" in outside.stderr
    assert invoke("sql", "--snapshot", snapshot, "SET enable_external_access = true").exit_code == 1
    bad = invoke("sql", "--snapshot", snapshot, "SELEC 1")
    assert bad.exit_code in (1, 2) and "Error" in bad.stderr
    assert tree_digest(snapshot) == before


def test_sql_on_a_folder_with_a_quote_in_its_name(database, tmp_path):
    out = tmp_path / "it's a snapshot"
    export_parquet(out, database, strategy_id="ODD")
    frame = metabatch.sql("SELECT count(*) AS n FROM embeddings", out)
    assert frame["n"][0] == metabatch.show(snapshot=out, limit=0).height


def test_errors_name_the_snapshot(tmp_path):
    result = invoke("show", "--snapshot", tmp_path / "missing")
    assert result.exit_code == 1 and "does not exist" in result.stderr
    (tmp_path / "empty").mkdir()
    result = invoke("similar", "--snapshot", tmp_path / "empty", "--run-id", "X")
    assert result.exit_code == 1 and "not a metabatch snapshot" in result.stderr


def test_import_metabatch_stays_cheap():
    import subprocess
    import sys

    code = "import sys, metabatch; print(any(m in sys.modules for m in ('duckdb', 'polars', 'numpy')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    assert callable(metabatch.similar) and callable(metabatch.export_parquet)
