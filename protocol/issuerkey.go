package protocol

import (
	"bytes"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
)

// RSA modulus sizes a card accepts, in bits.
const (
	MinRSABits = 2048
	MaxRSABits = 4096
)

// IssuerKey is a parsed issuer public key in its canonical encoding.
type IssuerKey struct {
	// SPKI is the DER SubjectPublicKeyInfo. It is canonical: re-encoding
	// the parsed key gives these exact bytes, so card and issuer bind the
	// same bytes into B.
	SPKI []byte
	RSA  *rsa.PublicKey  // set for RSA keys
	EC   *ecdh.PublicKey // set for P-256 keys
}

// ParseIssuerKey parses a DER SubjectPublicKeyInfo and checks that it is an
// RSA key of 2048 to 4096 bits with an odd exponent, or a P-256 key, in
// canonical DER.
func ParseIssuerKey(spki []byte) (*IssuerKey, error) {
	pub, err := x509.ParsePKIXPublicKey(spki)
	if err != nil {
		return nil, fmt.Errorf("issuer key: not a DER SubjectPublicKeyInfo: %w", err)
	}
	canon, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("issuer key: %w", err)
	}
	if !bytes.Equal(canon, spki) {
		return nil, errors.New("issuer key: SubjectPublicKeyInfo is not in canonical DER")
	}
	k := &IssuerKey{SPKI: canon}
	switch pub := pub.(type) {
	case *rsa.PublicKey:
		bits := pub.N.BitLen()
		if bits < MinRSABits || bits > MaxRSABits || bits%8 != 0 {
			return nil, fmt.Errorf("issuer key: RSA modulus of %d bits (want a multiple of 8 from %d to %d)", bits, MinRSABits, MaxRSABits)
		}
		if pub.N.Bit(0) == 0 {
			// A product of two odd primes is odd; Go's RSA refuses an
			// even modulus at encryption.
			return nil, errors.New("issuer key: RSA modulus is even (not a product of two odd primes)")
		}
		if pub.E < 3 || pub.E%2 == 0 {
			return nil, fmt.Errorf("issuer key: RSA public exponent %d (want odd, at least 3)", pub.E)
		}
		k.RSA = pub
	case *ecdsa.PublicKey:
		if pub.Curve != elliptic.P256() {
			return nil, fmt.Errorf("issuer key: EC curve %s (want P-256)", pub.Curve.Params().Name)
		}
		if k.EC, err = pub.ECDH(); err != nil {
			return nil, fmt.Errorf("issuer key: %w", err)
		}
	default:
		return nil, fmt.Errorf("issuer key: unsupported key type %T (want RSA or EC P-256)", pub)
	}
	return k, nil
}

// ParseIssuerKeyPEM parses a PEM "PUBLIC KEY" block (SubjectPublicKeyInfo).
func ParseIssuerKeyPEM(data []byte) (*IssuerKey, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("issuer key: no PEM block found")
	}
	if block.Type != "PUBLIC KEY" {
		return nil, fmt.Errorf("issuer key: PEM block is %q, want \"PUBLIC KEY\" (SubjectPublicKeyInfo)", block.Type)
	}
	return ParseIssuerKey(block.Bytes)
}

// PEM returns the key as a PEM "PUBLIC KEY" block.
func (k *IssuerKey) PEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: k.SPKI})
}

// Fingerprint is SHA-256 of the DER SubjectPublicKeyInfo: the value pinned
// in a card's ROM (§4.4) and checked by the perso station.
func (k *IssuerKey) Fingerprint() [32]byte { return sha256.Sum256(k.SPKI) }

// CiphertextLen is the exact length of c that a card personalized under
// this key with a profile of transport t sends.
func (k *IssuerKey) CiphertextLen(t Transport) int {
	switch t {
	case RSARaw, RSAOAEP:
		if k.RSA != nil {
			return k.RSA.Size()
		}
	case ECDHP256:
		if k.EC != nil {
			return 65
		}
	}
	return 0
}

// Fits reports whether the key can be used with profile p.
func (k *IssuerKey) Fits(p Profile) error {
	switch {
	case p.Transport == ECDHP256 && k.EC == nil:
		return fmt.Errorf("profile %s needs an EC P-256 issuer key, got RSA", p.Name)
	case p.Transport != ECDHP256 && k.RSA == nil:
		return fmt.Errorf("profile %s needs an RSA issuer key, got EC", p.Name)
	}
	return nil
}

// BindingLabel opens B. It separates this protocol's hash inputs from any
// other use of the same issuer key.
const BindingLabel = "blindperso binding v1"

// Binding returns B, the data bound into K_I:
//
//	B = BindingLabel ‖ u8(len(name)) ‖ name ‖ u16be(len(spki)) ‖ spki
//
// Substituting either the profile or the issuer key changes B, and so K_I:
// that is the defence against the man in the middle of the paper's Fig. 2.
func Binding(p Profile, spki []byte) []byte {
	b := make([]byte, 0, len(BindingLabel)+1+len(p.Name)+2+len(spki))
	b = append(b, BindingLabel...)
	b = append(b, byte(len(p.Name)))
	b = append(b, p.Name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(spki)))
	return append(b, spki...)
}
