-- Embeddings metabatch writes: the same names as on PostgreSQL (JSON for
-- jsonb, BLOB for bytea, a sequence for bigserial).
CREATE SEQUENCE IF NOT EXISTS joint_embeddings_joint_id_seq;
CREATE TABLE IF NOT EXISTS joint_embeddings (
    joint_id     BIGINT PRIMARY KEY DEFAULT nextval('joint_embeddings_joint_id_seq'),
    joint_type   VARCHAR NOT NULL,
    as_of_date   DATE,
    entity_scope JSON,
    model_id     VARCHAR NOT NULL,
    vector       BLOB,
    vector_ref   VARCHAR,
    created_at   TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);
