-- Deleted tokens' keyed ids (never the token), kept `tombstone_days`: a lookup of a
-- deleted token is not counted as a probe.
CREATE TABLE tombstones (
    key bytea PRIMARY KEY,
    deleted_at_unix_ms bigint NOT NULL
);
CREATE INDEX tombstones_by_age ON tombstones (deleted_at_unix_ms);
