-- Version 4: exports of card keys to a receiving system (docs/EXPORT.md,
-- issuer export). Same rules as 0001: TEXT and BIGINT only; binary as
-- lower-case hex; times as RFC 3339 UTC TEXT. Nothing secret: the keys
-- went into the file wrapped under the receiver's KTK, and are not here.

-- One row per export: started when the command begins, finished when the
-- file and its manifest are whole. An interrupted export stays 'running'
-- until a rerun with the same arguments finishes it, or is 'abandoned'
-- when its partial file is gone and another export is started to the
-- same file.
CREATE TABLE exports (
	id              TEXT PRIMARY KEY,           -- random 16 bytes, hex
	started_at      TEXT NOT NULL,
	finished_at     TEXT NOT NULL DEFAULT '',   -- '' until finished
	status          TEXT NOT NULL CHECK (status IN ('running', 'done', 'abandoned')),
	operator        TEXT NOT NULL,              -- who ran it (--operator, else $USER)
	issuer_token    TEXT NOT NULL,              -- the token's label
	kek_label       TEXT NOT NULL,              -- the KEK the keys were under
	ktk_label       TEXT NOT NULL,              -- the receiver's KTK they went under
	ktk_check_value TEXT NOT NULL DEFAULT '',   -- its CKA_CHECK_VALUE, hex; '' where the token gives none
	selection       TEXT NOT NULL,              -- in words, as in the manifest
	file            TEXT NOT NULL,              -- the export file, absolute path
	count           BIGINT NOT NULL DEFAULT 0,  -- cards written so far, then in all
	sha256          TEXT NOT NULL DEFAULT ''    -- of the finished file, hex
);
CREATE INDEX exports_file ON exports (file, status);

-- Every card of every export, written with its line (in the same group
-- as the line is synced to the file, after it).
CREATE TABLE export_cards (
	export_id TEXT NOT NULL REFERENCES exports (id),
	card_id   TEXT NOT NULL REFERENCES cards (id),
	PRIMARY KEY (export_id, card_id)
);
CREATE INDEX export_cards_card ON export_cards (card_id);

-- The selections read cards in Id order, from a cursor, in pages.
CREATE INDEX cards_batch_id ON cards (batch_id, id);
CREATE INDEX cards_state_id ON cards (state, id);
