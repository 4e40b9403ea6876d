-- The runs metabatch reads. Same names and types as the seeds' workflow.
CREATE TABLE IF NOT EXISTS backtest_runs (
    run_id       varchar(64) PRIMARY KEY,
    strategy_id  varchar(64),
    config_json  jsonb,
    start_date   date,
    end_date     date,
    universe_id  varchar(64),
    metrics_json jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);
