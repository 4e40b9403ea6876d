-- strategy_drift(strategy, period): how a strategy's embeddings move over time.
-- Per period (a date_trunc part: 'month', 'quarter', 'year'): how many runs,
-- their mean L2 norm, and the cosine of the period's centroid (the mean vector)
-- to the previous period's and to the first period's centroid.
--   SELECT * FROM strategy_drift('US_EQ_CORE_LONG_EQ', period := 'quarter');
CREATE OR REPLACE MACRO strategy_drift(strategy, period := 'month', model := 'joint-meta-config-env-v1') AS TABLE
    WITH rows AS (
        SELECT date_trunc(period, as_of_date)::DATE AS period_start, vector::FLOAT[] AS v, l2_norm
        FROM embeddings
        WHERE strategy_id = strategy AND model_id = model AND vector IS NOT NULL AND as_of_date IS NOT NULL
    ),
    parts AS (
        -- unnest a LIST: unnesting the FLOAT[384] ARRAY is ~15x slower in DuckDB 2.0
        SELECT period_start, unnest(v) AS x, generate_subscripts(v, 1) AS i FROM rows
    ),
    centroids AS (
        SELECT period_start, list(mean_v ORDER BY i) AS centroid
        FROM (SELECT period_start, i, avg(x) AS mean_v FROM parts GROUP BY period_start, i)
        GROUP BY period_start
    ),
    stats AS (
        SELECT period_start, count(*) AS runs, avg(l2_norm) AS mean_norm FROM rows GROUP BY period_start
    )
    SELECT s.period_start, s.runs, s.mean_norm,
           list_cosine_similarity(c.centroid, lag(c.centroid) OVER (ORDER BY s.period_start)) AS cosine_to_previous,
           list_cosine_similarity(c.centroid, first_value(c.centroid) OVER (ORDER BY s.period_start)) AS cosine_to_first
    FROM stats s JOIN centroids c USING (period_start)
    ORDER BY s.period_start;
