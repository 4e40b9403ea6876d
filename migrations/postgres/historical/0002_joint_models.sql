-- Fitted models (`metabatch fit`): a model id listed here embeds with its
-- encoder and parameters; any other model id is v1, as the spec defines it.
CREATE TABLE IF NOT EXISTS joint_models (
    model_id     varchar(64) PRIMARY KEY,
    encoder      varchar(16) NOT NULL,
    model_file   text NOT NULL,
    params       jsonb NOT NULL,
    fitted_runs  bigint NOT NULL,
    selection    jsonb NOT NULL,
    fitted_at    timestamptz NOT NULL DEFAULT now(),
    content_hash varchar(64) NOT NULL
);
