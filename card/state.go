package card

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"blindperso/internal/atomicfile"
	"blindperso/protocol"
)

// stateFormat names the layout of a card's state file. The attestation
// fields of §10 are optional additions, so files written before them load
// unchanged and the name stays.
const stateFormat = "blindperso-vcard/1"

// state is what a real card keeps in EEPROM. It is the only place K_I
// lives on the card side.
type state struct {
	Format string       `json:"format"`
	ID     protocol.Hex `json:"id"`
	// Pinned is SHA-256 of the one issuer SubjectPublicKeyInfo this card
	// accepts, set at manufacture (§4.4's ROM mask). Empty: any key.
	Pinned    protocol.Hex       `json:"pinned_fingerprint,omitempty"`
	LifeCycle protocol.LifeCycle `json:"life_cycle"`
	// ProfileID and IssuerKey (the SPKI fingerprint) are kept after LOCK
	// so GET STATUS can say what the card was personalized for.
	ProfileID byte         `json:"profile_id,omitempty"`
	IssuerKey protocol.Hex `json:"issuer_fingerprint,omitempty"`
	KI        protocol.Hex `json:"k_i,omitempty"`
	// C is kept only between PERSONALIZE and LOCK, so a station that
	// crashed can read it back.
	C protocol.Hex `json:"c,omitempty"`

	// AttestKey (PKCS#8 DER) and AttestChain (DER certificates, the
	// card's first) are the chip vendor's pre-personalization (§10.1);
	// both are absent on a card without attestation. A chip would keep
	// the key in protected memory: this is a test card.
	AttestKey   protocol.Hex   `json:"attestation_key,omitempty"`
	AttestChain []protocol.Hex `json:"attestation_chain,omitempty"`
	// AttestSig is the signature over A (§10.2). Like C it exists only
	// between PERSONALIZE and LOCK, and is written in the same state
	// change as C, so a station that crashed recovers both.
	AttestSig protocol.Hex `json:"attestation_sig,omitempty"`

	// attestKey is AttestKey parsed by validate.
	attestKey *ecdsa.PrivateKey
}

func (s *state) validate() error {
	if s.Format != stateFormat {
		return fmt.Errorf("format %q, want %q", s.Format, stateFormat)
	}
	if len(s.ID) == 0 || len(s.ID) > protocol.MaxIDLen {
		return fmt.Errorf("id of %d bytes, want 1 to %d", len(s.ID), protocol.MaxIDLen)
	}
	if len(s.Pinned) != 0 && len(s.Pinned) != 32 {
		return fmt.Errorf("pinned fingerprint of %d bytes, want 32", len(s.Pinned))
	}
	switch s.LifeCycle {
	case protocol.Blank:
		if len(s.KI) != 0 || len(s.C) != 0 {
			return errors.New("blank card holds key material")
		}
	case protocol.Personalized, protocol.Locked:
		if len(s.KI) != protocol.KeySize {
			return fmt.Errorf("%s card has a K_I of %d bytes", s.LifeCycle, len(s.KI))
		}
		if s.LifeCycle == protocol.Personalized && len(s.C) == 0 {
			return errors.New("personalized card has no c to read back")
		}
		if s.LifeCycle == protocol.Locked && len(s.C) != 0 {
			return errors.New("locked card still holds c")
		}
	default:
		return fmt.Errorf("unknown life cycle %d", s.LifeCycle)
	}
	return s.validateAttestation()
}

// validateAttestation checks the §10 fields: a key and a chain together,
// a key that is the one the card certificate certifies, and a signature
// exactly while c is held.
func (s *state) validateAttestation() error {
	s.attestKey = nil
	if len(s.AttestKey) == 0 && len(s.AttestChain) == 0 {
		if len(s.AttestSig) != 0 {
			return errors.New("attestation signature on a card without an attestation key")
		}
		return nil
	}
	key, err := checkAttestation(s.AttestKey, s.AttestChain)
	if err != nil {
		return err
	}
	if (s.LifeCycle == protocol.Personalized) != (len(s.AttestSig) != 0) {
		return fmt.Errorf("%s attested card with %d bytes of attestation signature", s.LifeCycle, len(s.AttestSig))
	}
	s.attestKey = key
	return nil
}

// checkAttestation parses an attestation key and its chain, and checks
// that the chain's first certificate certifies that key, so that a card
// is never made (or loaded) signing statements nobody can verify.
func checkAttestation(keyDER []byte, chain []protocol.Hex) (*ecdsa.PrivateKey, error) {
	if len(keyDER) == 0 || len(chain) == 0 {
		return nil, errors.New("attestation needs both a key and a certificate chain")
	}
	k, err := x509.ParsePKCS8PrivateKey(keyDER)
	if err != nil {
		return nil, fmt.Errorf("attestation key: %w", err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok || key.Curve != elliptic.P256() {
		return nil, errors.New("attestation key is not an ECDSA P-256 key")
	}
	var all []byte
	for _, c := range chain {
		all = append(all, c...)
	}
	certs, err := protocol.SplitChain(all)
	if err != nil {
		return nil, err
	}
	if len(certs) != len(chain) {
		return nil, errors.New("attestation chain: an entry is not exactly one DER certificate")
	}
	cert, err := x509.ParseCertificate(certs[0])
	if err != nil {
		return nil, fmt.Errorf("attestation chain, card certificate: %w", err)
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(&key.PublicKey) {
		return nil, errors.New("attestation chain: the card certificate does not certify the attestation key")
	}
	return key, nil
}

// chainBytes is GET ATTESTATION CHAIN's answer: the DER certificates
// concatenated, card certificate first.
func (s *state) chainBytes() []byte {
	return bytes.Join(hexSlices(s.AttestChain), nil)
}

func hexSlices(h []protocol.Hex) [][]byte {
	out := make([][]byte, len(h))
	for i, b := range h {
		out[i] = b
	}
	return out
}

func (s *state) load(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, s); err != nil {
		return fmt.Errorf("card state %s: %w", path, err)
	}
	if err := s.validate(); err != nil {
		return fmt.Errorf("card state %s: %w", path, err)
	}
	// The card answers from this state from now on, but it may be only
	// what an earlier process wrote: atomicfile.Write syncs the new file
	// before its rename, and the rename with the directory sync after it,
	// and a process killed between the two leaves a rename in the page
	// cache only. A card that read back a PERSONALIZE whose rename a power
	// loss then undoes would be blank again under a c already recorded.
	if err := syncState(path); err != nil {
		return fmt.Errorf("card state %s: make it durable: %w", path, err)
	}
	return nil
}

// writeState is how state reaches the file, and syncState how a loaded
// state file (and its directory entry) is made durable. Only the fuzz
// test replaces them (with a write that skips fsync and no sync, to run
// thousands of cards a second).
var (
	writeState = atomicfile.Write
	syncState  = atomicfile.Sync
)
