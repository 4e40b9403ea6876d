"""Test helpers: a store's tables read directly with SQL (not through metabatch),
and runs put in a fresh store (through metabatch's own migrate and insert)."""

from __future__ import annotations

import json

import adbc_driver_postgresql.dbapi as adbc
import duckdb


def _rows(url: str, sql: str) -> list[tuple]:
    if url.startswith("duckdb://"):
        con = duckdb.connect(url[len("duckdb://"):])
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()
    with adbc.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def run_texts(url: str) -> dict[str, tuple]:
    """run_id -> (config text, metrics text) as the database prints them, for runs with metrics."""
    rows = _rows(
        url,
        "SELECT run_id, CAST(config_json AS VARCHAR), CAST(metrics_json AS VARCHAR),"
        " strategy_id, universe_id, end_date FROM backtest_runs WHERE metrics_json IS NOT NULL",
    )
    return {r[0]: r[1:] for r in rows}


def embeddings(url: str, model_id: str | None = None) -> list[dict]:
    """Every joint_embeddings row, entity_scope parsed, vector as bytes."""
    where = f" WHERE model_id = '{model_id}'" if model_id else ""
    rows = _rows(
        url,
        "SELECT joint_id, joint_type, as_of_date, CAST(entity_scope AS VARCHAR), model_id, vector,"
        f" vector_ref, created_at FROM joint_embeddings{where} ORDER BY joint_id",
    )
    out = []
    for joint_id, joint_type, as_of, scope, model, vector, vector_ref, created_at in rows:
        scope = json.loads(scope) if scope is not None else None
        out.append(
            {
                "joint_id": joint_id,
                "joint_type": joint_type,
                "as_of_date": as_of,
                "entity_scope": scope,
                "run_id": scope.get("run_id") if isinstance(scope, dict) else None,
                "model_id": model,
                "vector": bytes(vector) if vector is not None else None,
                "vector_ref": vector_ref,
                "created_at": created_at,
            }
        )
    return out


def execute(url: str, sql: str) -> None:
    """Run SQL statements (separated by ';' at line ends) on a store's database."""
    if url.startswith("duckdb://"):
        con = duckdb.connect(url[len("duckdb://"):])
        try:
            con.execute(sql)
        finally:
            con.close()
        return
    with adbc.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        for statement in sql.split(";\n"):
            if statement.strip():
                cur.execute(statement)


def store_with_runs(url: str, runs) -> None:
    """The store at ``url`` migrated, with ``runs`` (an Arrow table of backtest_runs) inserted."""
    from metabatch.stores import open_store
    from metabatch.stores.migrate import migrate
    from metabatch.urls import parse_url

    migrate(parse_url(url))
    store = open_store(parse_url(url))
    try:
        store.insert_runs(runs)
    finally:
        store.close()
