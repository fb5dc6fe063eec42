-- Version 3: KEK rotation (issuer kek rotate, docs/OPERATIONS.md). The
-- rotation reads the cards whose blob is under one KEK in Id order, from
-- an Id cursor, and counts blobs per KEK: both by this index.
CREATE INDEX cards_blob_kek ON cards (blob_kek, id);
