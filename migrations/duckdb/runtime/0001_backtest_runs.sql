-- The runs metabatch reads: the same names as on PostgreSQL (JSON for jsonb).
-- The primary key lets `seed` skip runs that already exist.
CREATE TABLE IF NOT EXISTS backtest_runs (
    run_id       VARCHAR PRIMARY KEY,
    strategy_id  VARCHAR,
    config_json  JSON,
    start_date   DATE,
    end_date     DATE,
    universe_id  VARCHAR,
    metrics_json JSON,
    -- UTC without a zone: a TIMESTAMPTZ would need pytz to fetch in Python.
    created_at   TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);
