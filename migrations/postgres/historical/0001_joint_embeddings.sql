-- Embeddings metabatch writes. Same names and types as the seeds' workflow.
CREATE TABLE IF NOT EXISTS joint_embeddings (
    joint_id     bigserial PRIMARY KEY,
    joint_type   varchar(32) NOT NULL,
    as_of_date   date,
    entity_scope jsonb,
    model_id     varchar(64) NOT NULL,
    vector       bytea,
    vector_ref   text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
