-- neighbour_runs(target_run, k): nearest(target_run, k) joined with the runs the
-- neighbours came from: dates, config and metrics JSON, and every top-level
-- numeric metric as a column (sharpe, max_drawdown, ...).
--   SELECT run_id, cosine, sharpe FROM neighbour_runs('BT_S7_00000042', 50)
--   ORDER BY sharpe DESC LIMIT 5;
CREATE OR REPLACE MACRO neighbour_runs(target_run, k, model := 'joint-meta-config-env-v1') AS TABLE
    SELECT n.*, r.* EXCLUDE (run_id, strategy_id, universe_id)
    FROM nearest(target_run, k, model := model) n
    LEFT JOIN runs r USING (run_id)
    ORDER BY n.cosine DESC, n.euclidean ASC, n.joint_id DESC;
