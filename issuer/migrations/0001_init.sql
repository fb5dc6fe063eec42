-- The issuer's store, version 1. One file for SQLite and PostgreSQL:
-- only types and statements both accept (TEXT, BIGINT, CHECK, partial
-- defaults none). Binary values are lower-case hex TEXT, times are
-- RFC 3339 UTC TEXT. Nothing secret is stored: no K_I, no r, no S. The
-- wrapped K_I is only ever usable inside the token that holds the KEK.

CREATE TABLE batches (
	id         TEXT PRIMARY KEY,          -- SHA-256 of the batch file (the manifest's sha256), hex
	manifest   TEXT NOT NULL,             -- the manifest JSON as read
	records    BIGINT NOT NULL DEFAULT 0, -- lines in the batch
	imported   BIGINT NOT NULL DEFAULT 0, -- cards whose first record is in this batch
	duplicates BIGINT NOT NULL DEFAULT 0, -- records whose (Id, c) was already stored
	conflicts  BIGINT NOT NULL DEFAULT 0, -- records with a stored Id but another c
	rejects    BIGINT NOT NULL DEFAULT 0, -- records refused, see rejects
	status     TEXT NOT NULL CHECK (status IN ('importing', 'done', 'refused')),
	reason     TEXT NOT NULL DEFAULT '',  -- why refused
	created_at TEXT NOT NULL,
	updated_at TEXT NOT NULL
);

CREATE TABLE cards (
	id                 TEXT PRIMARY KEY,   -- card Id, hex
	profile            TEXT NOT NULL,
	issuer_key_label   TEXT NOT NULL,
	issuer_fingerprint TEXT NOT NULL,      -- SHA-256 of the issuer SPKI, hex
	blob_scheme        TEXT NOT NULL,      -- hsm.WrapRFC5649
	blob_mechanism     BIGINT NOT NULL,    -- the token's mechanism code for the scheme
	blob_kek           TEXT NOT NULL,      -- label of the KEK it is wrapped under
	blob_wrapped       TEXT NOT NULL,      -- K_I wrapped under the KEK, hex
	c_sha256           TEXT NOT NULL,      -- SHA-256 of the card's c, hex: recognises the same (Id, c)
	batch_id           TEXT NOT NULL REFERENCES batches (id),
	line               BIGINT NOT NULL,    -- line of the record in that batch
	state              TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'blocked', 'conflict')),
	failed_auth        BIGINT NOT NULL DEFAULT 0,
	created_at         TEXT NOT NULL,
	updated_at         TEXT NOT NULL
);
CREATE INDEX cards_batch ON cards (batch_id);

-- A second c for a known Id: kept aside, never replacing the first.
CREATE TABLE conflicts (
	card_id    TEXT NOT NULL,
	c_sha256   TEXT NOT NULL,
	batch_id   TEXT NOT NULL REFERENCES batches (id),
	line       BIGINT NOT NULL,
	created_at TEXT NOT NULL,
	PRIMARY KEY (batch_id, line)
);
CREATE INDEX conflicts_card ON conflicts (card_id);

CREATE TABLE rejects (
	batch_id   TEXT NOT NULL REFERENCES batches (id),
	line       BIGINT NOT NULL,
	reason     TEXT NOT NULL,
	created_at TEXT NOT NULL,
	PRIMARY KEY (batch_id, line)
);
