// Package attest is the issuer's check of chip attestations
// (docs/PROTOCOL.md §10.4): the chip-vendor roots it trusts, the import
// policy of an issuer key (required, optional, off), and the verification
// of a batch record's attestation — the chain to a trusted root, the card
// certificate's Id, the signature over exactly A, and that the card
// signed this issuer's key fingerprint and this record's c.
//
// Every check uses public data only and runs before the token sees c, so
// a refusal says nothing about c's decryption (no oracle, paper §4.5).
package attest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"blindperso/batch"
	"blindperso/protocol"
)

// Policy is what an issuer key's import asks of records' attestations.
type Policy string

const (
	// Required: a record without a valid attestation is refused.
	Required Policy = "required"
	// Optional: a valid attestation marks the card attested; a record
	// without one is imported unattested; an invalid one is refused.
	Optional Policy = "optional"
	// Off: attestations are neither checked nor required; every card is
	// unattested.
	Off Policy = "off"
)

// ParsePolicy reads a policy name.
func ParsePolicy(s string) (Policy, error) {
	switch p := Policy(s); p {
	case Required, Optional, Off:
		return p, nil
	}
	return "", fmt.Errorf("attestation policy %q: want required, optional or off", s)
}

// Roots are the chip-vendor root certificates the issuer trusts.
type Roots struct {
	pool  *x509.CertPool
	certs []*x509.Certificate
}

// ParseRoots reads PEM CERTIFICATE blocks; each must be a CA certificate.
// Anything else in the PEM (a key, trailing junk) is an error: a roots
// file holds roots only.
func ParseRoots(b []byte) (*Roots, error) {
	r := &Roots{pool: x509.NewCertPool()}
	for n := 1; ; n++ {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %d is %q: a roots file holds CERTIFICATE blocks only", n, blk.Type)
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", n, err)
		}
		if !c.IsCA {
			return nil, fmt.Errorf("certificate %d (%q) is not a CA certificate", n, c.Subject.String())
		}
		r.pool.AddCert(c)
		r.certs = append(r.certs, c)
	}
	if len(r.certs) == 0 {
		return nil, errors.New("roots file: no PEM certificate in it")
	}
	if len(bytes.TrimSpace(b)) > 0 {
		return nil, errors.New("roots file: bytes after the last PEM block")
	}
	return r, nil
}

// LoadRoots reads a roots file (ParseRoots).
func LoadRoots(path string) (*Roots, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	r, err := ParseRoots(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

// Root is a trusted root as a transcript or a log names it.
type Root struct {
	Subject     string
	Fingerprint [sha256.Size]byte // SHA-256 of the certificate's DER
	NotAfter    time.Time
}

// List names the roots, in the file's order.
func (r *Roots) List() []Root {
	out := make([]Root, len(r.certs))
	for i, c := range r.certs {
		out[i] = Root{Subject: c.Subject.String(), Fingerprint: sha256.Sum256(c.Raw), NotAfter: c.NotAfter}
	}
	return out
}

// Checks of §10.4, as an Error names them.
const (
	CheckMissing      = "missing"      // no attestation, policy required
	CheckChain        = "chain"        // 1: the chain to a trusted root
	CheckID           = "id"           // 2: the card certificate and its Id
	CheckSignature    = "signature"    // 3: sig over A
	CheckSubstitution = "substitution" // 4: the card signed another issuer key
	CheckReplaced     = "replaced"     // 5: the card signed another c
)

// Error is a refused attestation: which check and why, in words for the
// record's reject reason.
type Error struct {
	Check  string
	Reason string
}

func (e *Error) Error() string { return "attestation: " + e.Reason }

func refuse(check, format string, a ...any) *Error {
	return &Error{Check: check, Reason: fmt.Sprintf(format, a...)}
}

// Checker checks the attestations of one issuer key's records.
type Checker struct {
	Policy Policy
	Roots  *Roots            // needed unless Policy is Off
	Issuer [sha256.Size]byte // fingerprint(PK) of the issuer's own key
	// Now is the time certificates must be valid at; nil means
	// time.Now (import time: the station's record time is not trusted).
	Now func() time.Time

	mu      sync.Mutex
	issuers map[[sha256.Size]byte]verifiedCA // by SHA-256 of a chain's CA certificates
}

// verifiedCA is a card certificate's issuer whose own chain to a trusted
// root verified once, and when that chain is valid: a batch's cards share
// a vendor intermediate, so the check of each card need not verify it
// again (BenchmarkCheck: 216 → 133 µs per card; docs/BENCHMARKS.md).
type verifiedCA struct {
	cert          *x509.Certificate
	after, before time.Time // the chain's CA certificates are all valid in [after, before]
}

// maxIssuers bounds the cache: real deployments have a few intermediates.
const maxIssuers = 64

// Check verifies rec's attestation under the policy: attested reports a
// card whose attestation verified; a refusal is an *Error.
func (c *Checker) Check(rec batch.Record) (attested bool, err error) {
	if c == nil || c.Policy == Off {
		return false, nil
	}
	a := rec.Attestation
	if a == nil {
		if c.Policy == Required {
			return false, refuse(CheckMissing, "the record carries none and this issuer key's import policy requires one (a card without an attestation key, or a station that dropped it)")
		}
		return false, nil
	}
	if c.Roots == nil {
		return false, errors.New("attestation: no trusted chip-vendor roots configured")
	}
	leaf, err := c.verifyChain(a.Chain)
	if err != nil {
		return false, err
	}
	pub, err := cardKey(leaf, rec.ID)
	if err != nil {
		return false, err
	}
	msg, err := protocol.AttestMessage(rec.ID, rec.Profile, a.Fingerprint, a.CSHA256)
	if err != nil {
		return false, refuse(CheckSignature, "%v", err)
	}
	h := sha256.Sum256(msg)
	if !ecdsa.VerifyASN1(pub, h[:], a.Sig) {
		return false, refuse(CheckSignature, "the signature does not verify over this record's Id and profile with the fingerprint and SHA-256(c) it carries, under the certified card key: not what a genuine chip signed")
	}
	if !bytes.Equal(a.Fingerprint, c.Issuer[:]) {
		return false, refuse(CheckSubstitution, "the card was personalized under another issuer key (fingerprint %x): the station is under attack (PK substitution, paper Fig. 2)", []byte(a.Fingerprint))
	}
	if ch := sha256.Sum256(rec.C); !bytes.Equal(a.CSHA256, ch[:]) {
		return false, refuse(CheckReplaced, "the record's c is not the one the chip made (it signed SHA-256(c) = %x, the record's is %x): the record was replaced", []byte(a.CSHA256), ch[:])
	}
	return true, nil
}

// verifyChain parses the chain and verifies the card certificate to a
// trusted root through the chain's CA certificates.
func (c *Checker) verifyChain(chain []protocol.Hex) (*x509.Certificate, error) {
	if len(chain) == 0 {
		return nil, refuse(CheckChain, "the chain is empty")
	}
	certs := make([]*x509.Certificate, len(chain))
	for i, der := range chain {
		x, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, refuse(CheckChain, "certificate %d of the chain does not parse: %v", i+1, err)
		}
		certs[i] = x
	}
	now := time.Now()
	if c.Now != nil {
		now = c.Now()
	}
	key := caKey(chain[1:])
	c.mu.Lock()
	ca, hit := c.issuers[key]
	c.mu.Unlock()
	if hit && cachedOK(certs[0], ca, now) {
		return certs[0], nil
	}
	inter := x509.NewCertPool()
	for _, x := range certs[1:] {
		inter.AddCert(x)
	}
	chains, err := certs[0].Verify(x509.VerifyOptions{Roots: c.Roots.pool, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err == nil {
		c.remember(key, chains[0])
		return certs[0], nil
	}
	var inv x509.CertificateInvalidError
	var ua x509.UnknownAuthorityError
	switch {
	case errors.As(err, &inv) && inv.Reason == x509.Expired:
		return nil, refuse(CheckChain, "certificate %q is expired or not yet valid at %s (valid %s to %s)",
			inv.Cert.Subject.String(), now.UTC().Format(time.RFC3339),
			inv.Cert.NotBefore.UTC().Format(time.RFC3339), inv.Cert.NotAfter.UTC().Format(time.RFC3339))
	case errors.As(err, &ua):
		last := certs[len(certs)-1]
		if len(certs) == 1 || !last.IsCA {
			return nil, refuse(CheckChain, "the chain is truncated: the card certificate's issuer %q is neither in the chain nor a trusted root", certs[0].Issuer.String())
		}
		return nil, refuse(CheckChain, "the chain is under an untrusted root: it ends at CA %q, issued by %q, which is not one of the trusted chip-vendor roots", last.Subject.String(), last.Issuer.String())
	}
	return nil, refuse(CheckChain, "the card certificate does not verify to a trusted root: %v", err)
}

func caKey(cas []protocol.Hex) [sha256.Size]byte {
	h := sha256.New()
	for _, der := range cas {
		h.Write(der)
	}
	var k [sha256.Size]byte
	h.Sum(k[:0])
	return k
}

// remember caches the issuer of a verified chain (leaf, CAs…, root),
// unless a CA of it has name constraints, which x509.Verify applies to
// each leaf.
func (c *Checker) remember(key [sha256.Size]byte, chain []*x509.Certificate) {
	ca := verifiedCA{cert: chain[1], after: chain[1].NotBefore, before: chain[1].NotAfter}
	for _, x := range chain[1:] {
		if len(x.PermittedDNSDomains)+len(x.ExcludedDNSDomains)+len(x.PermittedIPRanges)+len(x.ExcludedIPRanges)+
			len(x.PermittedEmailAddresses)+len(x.ExcludedEmailAddresses)+len(x.PermittedURIDomains)+len(x.ExcludedURIDomains) > 0 {
			return
		}
		if x.NotBefore.After(ca.after) {
			ca.after = x.NotBefore
		}
		if x.NotAfter.Before(ca.before) {
			ca.before = x.NotAfter
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.issuers == nil {
		c.issuers = map[[sha256.Size]byte]verifiedCA{}
	}
	if len(c.issuers) < maxIssuers {
		c.issuers[key] = ca
	}
}

// cachedOK is what x509.Verify checks of the card certificate itself,
// given its issuer's chain verified before: the issuer's signature, its
// validity now, its issuer's name, no critical extension it does not
// know. Anything else goes to the full verification (and its reasons).
func cachedOK(leaf *x509.Certificate, ca verifiedCA, now time.Time) bool {
	return now.After(ca.after) && now.Before(ca.before) &&
		now.After(leaf.NotBefore) && now.Before(leaf.NotAfter) &&
		bytes.Equal(leaf.RawIssuer, ca.cert.RawSubject) &&
		len(leaf.UnhandledCriticalExtensions) == 0 &&
		leaf.CheckSignatureFrom(ca.cert) == nil
}

var oidSerialNumber = asn1.ObjectIdentifier{2, 5, 4, 5}

// cardKey checks the card certificate's form (§10.1) and Id and returns
// its P-256 key.
func cardKey(leaf *x509.Certificate, id []byte) (*ecdsa.PublicKey, error) {
	if leaf.IsCA || leaf.KeyUsage&x509.KeyUsageCertSign != 0 {
		return nil, refuse(CheckID, "the card certificate %q is a CA certificate", leaf.Subject.String())
	}
	if leaf.KeyUsage != 0 && leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		return nil, refuse(CheckID, "the card certificate %q does not allow digitalSignature", leaf.Subject.String())
	}
	pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, refuse(CheckID, "the card certificate's key is not an ECDSA P-256 key")
	}
	var serials []string
	for _, n := range leaf.Subject.Names {
		if n.Type.Equal(oidSerialNumber) {
			s, _ := n.Value.(string)
			serials = append(serials, s)
		}
	}
	if len(serials) != 1 {
		return nil, refuse(CheckID, "the card certificate %q has %d serialNumber attributes, want exactly one (the card Id)", leaf.Subject.String(), len(serials))
	}
	if want := hex.EncodeToString(id); serials[0] != want {
		return nil, refuse(CheckID, "the card certificate is for card %s, not this record's %s", serials[0], want)
	}
	return pub, nil
}
