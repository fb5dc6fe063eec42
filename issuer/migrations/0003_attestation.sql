-- Version 3: chip attestation (docs/PROTOCOL.md §10, docs/ISSUER.md).
-- Same rules as 0001: TEXT and BIGINT only.

-- 1 when the record's attestation verified at import (§10.4); cards
-- stored before this version, and cards imported unattested under the
-- optional or off policy, are 0.
ALTER TABLE cards ADD COLUMN attested BIGINT NOT NULL DEFAULT 0 CHECK (attested IN (0, 1));

-- Cards of the batch imported without a verified attestation.
ALTER TABLE batches ADD COLUMN unattested BIGINT NOT NULL DEFAULT 0;
