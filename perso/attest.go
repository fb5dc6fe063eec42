package perso

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"

	"blindperso/batch"
	"blindperso/protocol"
)

// ErrAttestationInvalid: a card's attestation, as the card gave it, does
// not verify under its own certificate. The station warns and records it
// as given; the issuer will refuse the record (PROTOCOL.md §10.4).
var ErrAttestationInvalid = errors.New("attestation does not verify")

// CheckAttestation is the station's own look at a record's attestation,
// for its operator (docs/STATION.md, "Attested cards"): the card
// certificate (the chain's first) parses with crypto/x509, names the
// record's Id as its serialNumber and holds a P-256 key; the signed
// fingerprint and SHA-256(c) are the record's; and sig verifies under
// that key over A (protocol.AttestMessage) of the record's Id and
// profile. It does not verify the chain to a root: the station has none,
// and is not trusted with the verdict anyway — the issuer checks it all
// again. A record without attestation is nil.
func CheckAttestation(rec batch.Record) error {
	a := rec.Attestation
	if a == nil {
		return nil
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("card %x: %w: %s", []byte(rec.ID), ErrAttestationInvalid, fmt.Sprintf(format, args...))
	}
	if len(a.Chain) == 0 {
		return bad("no certificate")
	}
	cert, err := x509.ParseCertificate(a.Chain[0])
	if err != nil {
		return bad("card certificate: %v", err)
	}
	if want := hex.EncodeToString(rec.ID); cert.Subject.SerialNumber != want {
		return bad("card certificate is for serialNumber %q, the card's Id is %s", cert.Subject.SerialNumber, want)
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return bad("card certificate does not hold an ECDSA P-256 key")
	}
	if !bytes.Equal(a.Fingerprint, rec.Fingerprint) {
		return bad("signed fingerprint %x is not the issuer key's %x", []byte(a.Fingerprint), []byte(rec.Fingerprint))
	}
	if ch := sha256.Sum256(rec.C); !bytes.Equal(a.CSHA256, ch[:]) {
		return bad("signed SHA-256(c) is not that of the record's c")
	}
	msg, err := protocol.AttestMessage(rec.ID, rec.Profile, a.Fingerprint, a.CSHA256)
	if err != nil {
		return bad("%v", err)
	}
	h := sha256.Sum256(msg)
	if !ecdsa.VerifyASN1(pub, h[:], a.Sig) {
		return bad("the signature does not verify under the card certificate's key")
	}
	return nil
}
