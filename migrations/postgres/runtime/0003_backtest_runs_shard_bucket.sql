-- The runs a backfill selects (metrics_json not NULL), by shard bucket (the first
-- byte of the MD5 of run_id: metabatch/stores/shards.py) and run_id. With it
--   * a shard of a job sharded over a cluster (`--ray`) reads its runs through it
--     instead of hashing every run of the table once per shard (1M runs: a shard of
--     1/8 in 0.7 s instead of 3.2 s);
--   * counting the selected runs, and finding those with no embedding yet
--     (`backfill --missing`), read the index alone (1M runs: 0.1 s and 1.0 s
--     instead of 0.6 s and 2.1 s scanning the table).
-- The expression must stay the one of shards.bucket_sql, or the planner cannot use it.
CREATE INDEX IF NOT EXISTS backtest_runs_shard_run
    ON backtest_runs ((('x' || substr(md5(run_id), 1, 2))::bit(8)::int), run_id)
    WHERE metrics_json IS NOT NULL;
