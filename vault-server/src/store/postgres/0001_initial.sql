-- The vault's tables. Only tokens, keyed hashes, sealed record bytes (ciphertext and
-- the clear metadata PCI allows, see record.rs), audit entries and job state.

-- One row per token: the sealed record and what the store indexes it by.
-- Tokens compare bytewise (COLLATE "C"): no dependence on the C library's locale
-- rules, which can change under an index with an operating system upgrade.
CREATE TABLE records (
    token text COLLATE "C" PRIMARY KEY,
    value bytea NOT NULL,
    card_data_version integer NOT NULL,
    fingerprint_version integer NOT NULL,
    -- 0: never expires.
    expires_at_unix_ms bigint NOT NULL DEFAULT 0,
    -- Tenant and keyed fingerprint: every token of one card.
    card_key bytea NOT NULL
);
CREATE INDEX records_by_expiry ON records (expires_at_unix_ms) WHERE expires_at_unix_ms > 0;
CREATE INDEX records_by_card ON records (card_key);

-- Fingerprint index: (tenant, keyed fingerprint, expiry) to the card's first token.
CREATE TABLE fingerprints (
    index_key bytea PRIMARY KEY,
    token text COLLATE "C" NOT NULL
);

-- Forward outcomes under idempotency keys, for the idempotency window.
CREATE TABLE outcomes (
    key bytea PRIMARY KEY,
    value bytea NOT NULL
);

-- Small durable state of background jobs (rewrap cursor, audit anchor).
CREATE TABLE meta (
    key text PRIMARY KEY,
    value bytea NOT NULL
);

-- The audit chain: one chain for every vault-server on this database.
CREATE TABLE audit (
    sequence bigint PRIMARY KEY,
    entry bytea NOT NULL
);

-- Records per key use and version, changed in the same transaction as the records.
-- Each writer of each vault-server adds to its own slot, so that writers never wait
-- on one another's counter rows; the count is the sum over slots.
CREATE TABLE version_counts (
    slot text NOT NULL,
    key_use smallint NOT NULL,
    version integer NOT NULL,
    records bigint NOT NULL,
    PRIMARY KEY (slot, key_use, version)
);
