// Package batch owns the batch wire format of docs/BATCH.md: the record
// lines a perso station writes (its journal, which is also the batch the
// issuer imports), the manifest beside them, their file names, and the one
// strict parser every reader uses — the station reading its journal back,
// the issuer's importer and its API upload. It depends on nothing of the
// station or the issuer (no PC/SC, no PKCS#11).
package batch

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"blindperso/protocol"
)

// The batch format's versions (docs/BATCH.md, "Versioning"). The
// manifest's format names the version, and every record of the batch
// carries its number in "v": they change together. Version 2 adds the
// optional attestation member (PROTOCOL.md §10); readers still read
// version 1 batches.
const (
	Format1  = "blindperso-batch/1"
	Version1 = 1
	Format2  = "blindperso-batch/2"
	Version2 = 2
)

// Format and Version are the version the station writes now: what
// MarshalRecord and MarshalManifest write.
const (
	Format  = Format2
	Version = Version2
)

// FormatOf returns the manifest format of record version v, or "" for a
// version this package does not know.
func FormatOf(v int) string {
	switch v {
	case Version1:
		return Format1
	case Version2:
		return Format2
	}
	return ""
}

// VersionOf returns the record version of manifest format f, or 0 for a
// format this package does not know.
func VersionOf(f string) int {
	switch f {
	case Format1:
		return Version1
	case Format2:
		return Version2
	}
	return 0
}

// Limits of a version 2 record's attestation (docs/BATCH.md, "Version
// 2"): the number of certificates in the chain, their total size
// (protocol.MaxAttestationChain) and the size of the signature, which is
// DER (an ECDSA-P256 one is 70 to 72 bytes; the bounds leave room for
// other curves without admitting an arbitrary blob).
const (
	MaxChainCerts = 8
	MinSigLen     = 8
	MaxSigLen     = 80
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
// form ParseRecord accepts: V set to Version (MarshalRecord writes
// version 2 only), Time in UTC. A record that ParseRecord would refuse (no
// Id, an Id over 16 bytes, no c, no profile, a fingerprint that is not 32
// bytes, an attestation that breaks a rule of "Version 2") is an error:
// nothing is written that cannot be read back.
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
	if rec.Attestation != nil {
		if err := rec.Attestation.Check(); err != nil {
			return nil, fmt.Errorf("record for card %x: %w", []byte(rec.ID), err)
		}
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// Check reports whether a is of the shape a version 2 record's
// attestation must have (docs/BATCH.md, "Version 2"): 1 to MaxChainCerts
// non-empty certificates of at most protocol.MaxAttestationChain bytes in
// all, a 32-byte fingerprint and SHA-256(c), a signature of MinSigLen to
// MaxSigLen bytes. It checks no certificate and no signature: that is the
// issuer's (PROTOCOL.md §10.4).
func (a *Attestation) Check() error {
	if len(a.Chain) < 1 || len(a.Chain) > MaxChainCerts {
		return fieldErr("attestation.chain", "%d certificates, want 1 to %d", len(a.Chain), MaxChainCerts)
	}
	total := 0
	for i, c := range a.Chain {
		if len(c) == 0 {
			return fieldErr(fmt.Sprintf("attestation.chain[%d]", i), "empty")
		}
		total += len(c)
	}
	if total > protocol.MaxAttestationChain {
		return fieldErr("attestation.chain", "%d bytes in all, at most %d", total, protocol.MaxAttestationChain)
	}
	if len(a.Fingerprint) != FingerprintLen {
		return fieldErr("attestation.fingerprint", "%d bytes, want %d", len(a.Fingerprint), FingerprintLen)
	}
	if len(a.CSHA256) != FingerprintLen {
		return fieldErr("attestation.c_sha256", "%d bytes, want %d", len(a.CSHA256), FingerprintLen)
	}
	if len(a.Sig) < MinSigLen || len(a.Sig) > MaxSigLen {
		return fieldErr("attestation.sig", "%d bytes, want %d to %d", len(a.Sig), MinSigLen, MaxSigLen)
	}
	return nil
}

// MarshalManifest returns m as the manifest file's content (indented,
// ending in '\n'), Format filled in if empty (with Format, the version
// the station writes) and Written in UTC. A format this package does not
// know is an error.
func MarshalManifest(m Manifest) ([]byte, error) {
	if m.Format == "" {
		m.Format = Format
	}
	if VersionOf(m.Format) == 0 {
		return nil, fmt.Errorf("manifest: unknown format %q", m.Format)
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

// Version is the record version the manifest's format names (0 for a
// format this package does not know; ParseManifest refuses those).
func (m Manifest) Version() int { return VersionOf(m.Format) }

// CheckRecord refuses a record that does not belong to the batch m
// describes: a record version other than the manifest format's, another
// profile, another issuer key. Every reader that matches records with
// their manifest (Verify, the issuer's importer) checks these.
func (m Manifest) CheckRecord(rec Record) error {
	switch {
	case rec.V != m.Version():
		return fmt.Errorf("record version %d in a %s batch (every record's \"v\" is the manifest format's version, %d)", rec.V, m.Format, m.Version())
	case rec.Profile != m.Profile:
		return fmt.Errorf("profile %q differs from the manifest's %q", rec.Profile, m.Profile)
	case !bytes.Equal(rec.Fingerprint, m.IssuerFingerprint):
		return fmt.Errorf("issuer_fingerprint %x differs from the manifest's %x", []byte(rec.Fingerprint), []byte(m.IssuerFingerprint))
	}
	return nil
}
