-- An idempotent backfill replaces the rows of (joint_type, model_id, run_id):
-- this index finds them. Not unique: tables made by other tools may already
-- hold duplicates, which backfill replaces but migrate never touches.
CREATE INDEX IF NOT EXISTS joint_embeddings_type_model_run
    ON joint_embeddings (joint_type, model_id, (entity_scope ->> 'run_id'));
