-- Fitted models (`metabatch fit`): the same names as on PostgreSQL (JSON for
-- jsonb; fitted_at in UTC without a zone, as created_at elsewhere).
CREATE TABLE IF NOT EXISTS joint_models (
    model_id     VARCHAR PRIMARY KEY,
    encoder      VARCHAR NOT NULL,
    model_file   VARCHAR NOT NULL,
    params       JSON NOT NULL,
    fitted_runs  BIGINT NOT NULL,
    selection    JSON NOT NULL,
    fitted_at    TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    content_hash VARCHAR NOT NULL
);
