-- Deletions not yet reported to the keyservice (keyed ids, as in `tombstones`): each
-- delete writes one in its transaction; any vault on the database sends them and
-- removes those the keyservice has kept. A database restored from an older copy
-- erases them again at start-up (see docs/operations.md).
CREATE TABLE unsent_erasures (
    key bytea PRIMARY KEY,
    deleted_at_unix_ms bigint NOT NULL
);
-- Deletions made before this migration are sent too, so that a backup from before it
-- does not bring them back either.
INSERT INTO unsent_erasures (key, deleted_at_unix_ms)
    SELECT key, deleted_at_unix_ms FROM tombstones;
