-- Version 2: card authentication (docs/PROTOCOL.md §4, docs/ISSUER.md).
-- Same rules as 0001: TEXT and BIGINT only; binary as lower-case hex.

-- Why a card is blocked (admin reason, or the failure count that did it).
ALTER TABLE cards ADD COLUMN state_reason TEXT NOT NULL DEFAULT '';

-- A challenge issued for one card: random 16 bytes, single-use, expiring.
-- expires is Unix time in nanoseconds (BIGINT, so "expires > now" compares
-- numbers, not text); used flips 0 → 1 exactly once, in the transaction
-- that records the verification's result.
CREATE TABLE challenges (
	id         TEXT PRIMARY KEY,           -- the challenge, hex
	card_id    TEXT NOT NULL REFERENCES cards (id),
	created_at TEXT NOT NULL,
	expires    BIGINT NOT NULL,            -- Unix ns
	used       BIGINT NOT NULL DEFAULT 0 CHECK (used IN (0, 1))
);
CREATE INDEX challenges_card ON challenges (card_id);
CREATE INDEX challenges_expires ON challenges (expires);

-- Every verification and every admin action on a card's state.
CREATE TABLE auth_log (
	card_id    TEXT NOT NULL,
	created_at TEXT NOT NULL,
	at_ns      BIGINT NOT NULL,            -- Unix ns, for ordering
	result     TEXT NOT NULL,              -- ok, failed, blocked, refused, challenge-refused, admin-block, admin-unblock
	detail     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX auth_log_card ON auth_log (card_id, at_ns);
