-- Macros for `metabatch sql`, loaded in file order after the views `embeddings`
-- (vector is FLOAT[384]) and `runs` are made. Cosine follows the seeds: 0 when
-- either vector is zero.

-- cosine(a, b): cosine similarity of two FLOAT[384] vectors, 0 if either is zero.
CREATE OR REPLACE MACRO cosine(a, b) AS
    CASE WHEN array_inner_product(a, a) = 0 OR array_inner_product(b, b) = 0 THEN 0.0
         ELSE array_cosine_similarity(a, b) END;

-- nearest(target_run, k): the k embeddings closest to the run's latest embedding
-- (same model, the run itself excluded), best first: cosine descending, then
-- euclidean ascending, then joint_id descending (the order of `metabatch similar`).
-- Computed in FLOAT (float32) here; `metabatch similar` is exact to 1e-6.
--   SELECT * FROM nearest('BT_S7_00000042', 10);
--   SELECT * FROM nearest('BT_S7_00000042', 10, model := 'joint-meta-config-env-v2');
CREATE OR REPLACE MACRO nearest(target_run, k, model := 'joint-meta-config-env-v1') AS TABLE
    WITH target AS (
        SELECT vector, l2_norm FROM embeddings
        WHERE run_id = target_run AND model_id = model AND vector IS NOT NULL
        ORDER BY joint_id DESC LIMIT 1
    )
    SELECT e.run_id, e.strategy_id, e.universe_id, e.as_of_date, e.source, e.joint_id,
           CASE WHEN e.l2_norm = 0 OR t.l2_norm = 0 THEN 0.0
                ELSE array_cosine_similarity(e.vector, t.vector) END AS cosine,
           array_distance(e.vector, t.vector) AS euclidean
    FROM embeddings e, target t
    WHERE e.model_id = model AND e.run_id <> target_run AND e.vector IS NOT NULL
    ORDER BY cosine DESC, euclidean ASC, e.joint_id DESC
    LIMIT k;
