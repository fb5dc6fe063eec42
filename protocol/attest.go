package protocol

import (
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"fmt"
)

// Extension A, chip attestation (docs/PROTOCOL.md §10).

// Instruction bytes of the attestation commands.
const (
	INSGetAttestationChain = 0x14
	INSReadAttestation     = 0x26
)

// StatusFlagAttested is set in the flags byte of GET STATUS when the card
// has an attestation key.
const StatusFlagAttested = 0x02

// AttestLabel starts the statement an attested card signs.
const AttestLabel = "blindperso attest v1"

// MaxAttestationChain bounds the chain a card may answer and a record may
// carry (a card certificate and two CA certificates are about 1.5 KiB).
const MaxAttestationChain = 8 << 10

// AttestMessage is A of §10.2: what an attested card signs on
// PERSONALIZE, and what the issuer verifies.
//
//	"blindperso attest v1" ‖ u8(len(Id)) ‖ Id ‖ u8(len(name)) ‖ name ‖ fingerprint(PK) ‖ SHA-256(c)
func AttestMessage(id []byte, profile string, fingerprint, cSHA256 []byte) ([]byte, error) {
	switch {
	case len(id) < 1 || len(id) > MaxIDLen:
		return nil, fmt.Errorf("attestation: card Id of %d bytes, want 1 to %d", len(id), MaxIDLen)
	case len(profile) < 1 || len(profile) > 255:
		return nil, errors.New("attestation: profile name empty or over 255 bytes")
	case len(fingerprint) != sha256.Size || len(cSHA256) != sha256.Size:
		return nil, errors.New("attestation: fingerprint and SHA-256(c) are 32 bytes each")
	}
	b := make([]byte, 0, len(AttestLabel)+2+len(id)+len(profile)+64)
	b = append(b, AttestLabel...)
	b = append(b, byte(len(id)))
	b = append(b, id...)
	b = append(b, byte(len(profile)))
	b = append(b, profile...)
	b = append(b, fingerprint...)
	return append(b, cSHA256...), nil
}

// SplitChain cuts GET ATTESTATION CHAIN's answer into its DER
// certificates (each one DER SEQUENCE), card certificate first. It checks
// only the DER framing; what the certificates say is the verifier's.
func SplitChain(b []byte) ([][]byte, error) {
	if len(b) == 0 {
		return nil, errors.New("attestation chain is empty")
	}
	if len(b) > MaxAttestationChain {
		return nil, fmt.Errorf("attestation chain of %d bytes, at most %d", len(b), MaxAttestationChain)
	}
	var out [][]byte
	for len(b) > 0 {
		var v asn1.RawValue
		rest, err := asn1.Unmarshal(b, &v)
		if err != nil {
			return nil, fmt.Errorf("attestation chain, certificate %d: %w", len(out)+1, err)
		}
		if v.Class != asn1.ClassUniversal || v.Tag != asn1.TagSequence || !v.IsCompound {
			return nil, fmt.Errorf("attestation chain, certificate %d: not a DER SEQUENCE", len(out)+1)
		}
		out = append(out, v.FullBytes)
		b = rest
	}
	return out, nil
}
