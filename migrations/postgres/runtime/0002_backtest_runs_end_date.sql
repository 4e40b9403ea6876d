-- backfill selects by strategy and end_date, and --limit orders by end_date DESC, run_id DESC.
CREATE INDEX IF NOT EXISTS backtest_runs_strategy_end_date
    ON backtest_runs (strategy_id, end_date DESC, run_id DESC);
