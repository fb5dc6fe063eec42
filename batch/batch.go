// Package batch owns the batch wire format of docs/BATCH.md: the record
// lines a perso station writes (its journal, which is also the batch the
// issuer imports), the manifest beside them, their file names, and the one
// strict parser every reader uses — the station reading its journal back,
// the issuer's importer and its API upload. It depends on nothing of the
// station or the issuer (no PC/SC, no PKCS#11).
package batch

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"blindperso/protocol"
)

// Format names the batch format in the manifest; Version is the version
// number every record carries. They change together (docs/BATCH.md,
// "Versioning").
const (
	Format  = "blindperso-batch/1"
	Version = 1
)

// FingerprintLen is the length of an issuer key fingerprint (SHA-256 of
// the issuer's SPKI) and of a manifest's sha256.
const FingerprintLen = 32

// Record is what the station keeps of one card: one line of the batch.
// Every field is public.
type Record struct {
	V           int          `json:"v"`
	ID          protocol.Hex `json:"id"`
	C           protocol.Hex `json:"c"`
	Profile     string       `json:"profile"`
	Fingerprint protocol.Hex `json:"issuer_fingerprint"`
	Reader      string       `json:"reader,omitempty"`
	Time        time.Time    `json:"time"`
	// Attestation is the chip's signed statement (version 2 only; absent
	// for a card without an attestation key).
	Attestation *Attestation `json:"attestation,omitempty"`
}

// Attestation is what an attested card said about its record, as the
// station read it (PROTOCOL.md §10): the chain from GET ATTESTATION
// CHAIN, the fingerprint and SHA-256(c) it signed, and the signature from
// READ ATTESTATION. The station is untrusted: the issuer verifies it all.
type Attestation struct {
	Chain       []protocol.Hex `json:"chain"`       // DER certificates, the card's first
	Fingerprint protocol.Hex   `json:"fingerprint"` // fingerprint(PK) in A
	CSHA256     protocol.Hex   `json:"c_sha256"`    // SHA-256(c) in A
	Sig         protocol.Hex   `json:"sig"`         // ECDSA-P256-SHA256 over A, DER
}

// Manifest describes a batch for the issuer (docs/BATCH.md). The station
// writes it beside the batch, atomically, so the issuer can check that it
// has the whole batch, the one the station meant, before importing a
// record.
type Manifest struct {
	Format            string       `json:"format"`
	Batch             string       `json:"batch"` // file name, relative to the manifest
	Count             int          `json:"count"` // lines of the batch file
	Bytes             int64        `json:"bytes"`
	SHA256            protocol.Hex `json:"sha256"`
	Profile           string       `json:"profile"`
	IssuerFingerprint protocol.Hex `json:"issuer_fingerprint"`
	Station           string       `json:"station"`
	Rejects           int          `json:"rejects,omitempty"`
	Written           time.Time    `json:"written"`
}

// Paths derived from the batch path.
func ManifestPath(batch string) string { return batch + ".manifest.json" }
func RejectsPath(batch string) string  { return batch + ".rejects.ndjson" }

// MarshalRecord returns rec as one batch line, '\n' included, in the only
// form ParseRecord accepts: V set to Version, Time in UTC. A record that
// ParseRecord would refuse (no Id, an Id over 16 bytes, no c, no profile,
// a fingerprint that is not 32 bytes) is an error: nothing is written
// that cannot be read back.
func MarshalRecord(rec Record) ([]byte, error) {
	rec.V = Version
	rec.Time = rec.Time.UTC()
	switch {
	case len(rec.ID) == 0 || len(rec.ID) > protocol.MaxIDLen:
		return nil, fmt.Errorf("record: id of %d bytes, want 1 to %d", len(rec.ID), protocol.MaxIDLen)
	case len(rec.C) == 0:
		return nil, fmt.Errorf("record for card %x: no c", []byte(rec.ID))
	case rec.Profile == "":
		return nil, fmt.Errorf("record for card %x: no profile", []byte(rec.ID))
	case len(rec.Fingerprint) != FingerprintLen:
		return nil, fmt.Errorf("record for card %x: issuer_fingerprint of %d bytes, want %d", []byte(rec.ID), len(rec.Fingerprint), FingerprintLen)
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// MarshalManifest returns m as the manifest file's content (indented,
// ending in '\n'), Format filled in if empty and Written in UTC.
func MarshalManifest(m Manifest) ([]byte, error) {
	if m.Format == "" {
		m.Format = Format
	}
	m.Written = m.Written.UTC()
	if m.Station == "" {
		return nil, errors.New("manifest: no station name")
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}
