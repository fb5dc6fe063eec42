package attest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"math/big"
	"strings"
	"testing"
	"time"

	"blindperso/batch"
	"blindperso/protocol"
)

// ca is a certificate with its key, for building test chains.
type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

var serial int64

func issue(t testing.TB, parent *ca, tmpl *x509.Certificate) *ca {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	tmpl.SerialNumber = big.NewInt(serial)
	if tmpl.NotBefore.IsZero() {
		tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)
	}
	signer, signCert := k, tmpl
	if parent != nil {
		signer, signCert = parent.key, parent.cert
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signCert, &k.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &ca{c, k}
}

func caTmpl(cn string) *x509.Certificate {
	return &x509.Certificate{Subject: pkix.Name{CommonName: cn}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
}

func cardTmpl(id string) *x509.Certificate {
	return &x509.Certificate{Subject: pkix.Name{CommonName: "blindperso card " + id,
		ExtraNames: []pkix.AttributeTypeAndValue{{Type: asn1.ObjectIdentifier{2, 5, 4, 5}, Value: id}}},
		KeyUsage: x509.KeyUsageDigitalSignature}
}

type vendor struct {
	root, inter *ca
	roots       *Roots
}

func newVendor(t testing.TB, name string) vendor {
	root := issue(t, nil, caTmpl(name+" root"))
	it := caTmpl(name + " intermediate")
	it.MaxPathLenZero = true
	v := vendor{root: root, inter: issue(t, root, it)}
	r, err := ParseRoots(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.cert.Raw}))
	if err != nil {
		t.Fatal(err)
	}
	v.roots = r
	return v
}

// record is a record with the attestation a genuine card would make
// under issuer fingerprint fp.
func (v vendor) record(t testing.TB, id []byte, fp []byte, c []byte, card *ca) batch.Record {
	t.Helper()
	ch := sha256.Sum256(c)
	msg, err := protocol.AttestMessage(id, "ecdh-p256-aes", fp, ch[:])
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(msg)
	sig, err := ecdsa.SignASN1(rand.Reader, card.key, h[:])
	if err != nil {
		t.Fatal(err)
	}
	return batch.Record{V: 2, ID: id, C: c, Profile: "ecdh-p256-aes", Fingerprint: fp,
		Attestation: &batch.Attestation{Chain: []protocol.Hex{card.cert.Raw, v.inter.cert.Raw}, Fingerprint: fp, CSHA256: ch[:], Sig: sig}}
}

// Every check of §10.4 refuses its own attack, with its own reason,
// and a genuine record passes; the policies decide about a record with
// no attestation.
func TestCheck(t *testing.T) {
	v, other := newVendor(t, "chip vendor"), newVendor(t, "other vendor")
	own, foreign := sha256.Sum256([]byte("issuer spki")), sha256.Sum256([]byte("insider spki"))
	id := []byte{0xb1, 0x01}
	c := []byte("c of the genuine card")
	card := issue(t, v.inter, cardTmpl("b101"))
	expired := cardTmpl("b101")
	expired.NotBefore, expired.NotAfter = time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour)
	oldCard := issue(t, v.inter, expired)
	otherID := issue(t, v.inter, cardTmpl("b102"))
	foreignCard := issue(t, other.inter, cardTmpl("b101"))
	good := func() batch.Record { return v.record(t, id, own[:], c, card) }

	for _, tc := range []struct {
		name   string
		policy Policy
		rec    func() batch.Record
		check  string // "" accepted
		reason string
	}{
		{"genuine", Required, good, "", ""},
		{"genuine, optional", Optional, good, "", ""},
		{"none, required", Required, func() batch.Record { r := good(); r.Attestation = nil; return r }, CheckMissing, "requires one"},
		{"none, optional", Optional, func() batch.Record { r := good(); r.Attestation = nil; return r }, "", ""},
		{"certificate for another Id", Required, func() batch.Record { return v.record(t, id, own[:], c, otherID) }, CheckID, "for card b102, not this record's b101"},
		{"signature over another c", Required, func() batch.Record {
			r := good()
			x := sha256.Sum256([]byte("another c"))
			r.Attestation.CSHA256 = x[:]
			return r
		}, CheckSignature, "does not verify"},
		{"record replaced (c*)", Required, func() batch.Record { r := good(); r.C = []byte("c* of the insider"); return r }, CheckReplaced, "the record was replaced"},
		{"PK substitution", Required, func() batch.Record { return v.record(t, id, foreign[:], c, card) }, CheckSubstitution, "personalized under another issuer key"},
		{"untrusted root", Required, func() batch.Record {
			r := other.record(t, id, own[:], c, foreignCard)
			return r
		}, CheckChain, "untrusted root"},
		{"expired certificate", Required, func() batch.Record { return v.record(t, id, own[:], c, oldCard) }, CheckChain, "expired"},
		{"truncated chain", Required, func() batch.Record { r := good(); r.Attestation.Chain = r.Attestation.Chain[:1]; return r }, CheckChain, "truncated"},
		{"junk certificate", Required, func() batch.Record { r := good(); r.Attestation.Chain[0] = []byte{0x30, 0x00}; return r }, CheckChain, "does not parse"},
		{"signature by another key", Required, func() batch.Record {
			r := good()
			r.Attestation.Sig = v.record(t, id, own[:], c, otherID).Attestation.Sig
			return r
		}, CheckSignature, "does not verify"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ck := &Checker{Policy: tc.policy, Roots: v.roots, Issuer: own}
			rec := tc.rec()
			attested, err := ck.Check(rec)
			if tc.check == "" {
				if err != nil || attested != (rec.Attestation != nil) {
					t.Fatalf("attested %v, %v", attested, err)
				}
				return
			}
			e, ok := err.(*Error)
			if !ok || e.Check != tc.check || !strings.Contains(e.Reason, tc.reason) || attested {
				t.Fatalf("got %v (%#v), want check %s with %q", err, err, tc.check, tc.reason)
			}
		})
	}
	// Off checks nothing: even a forged attestation is no refusal, and
	// no card is attested.
	r := good()
	r.C = []byte("c*")
	if attested, err := (&Checker{Policy: Off}).Check(r); attested || err != nil {
		t.Errorf("off: %v, %v", attested, err)
	}
}

func TestParseRoots(t *testing.T) {
	v := newVendor(t, "v")
	leaf := issue(t, v.inter, cardTmpl("01"))
	for _, tc := range []struct {
		name, pem, err string
	}{
		{"root", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: v.root.cert.Raw})), ""},
		{"empty", "", "no PEM certificate"},
		{"a key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "CERTIFICATE blocks only"},
		{"not a CA", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.cert.Raw})), "not a CA"},
		{"junk after", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: v.root.cert.Raw})) + "junk", "after the last PEM block"},
	} {
		r, err := ParseRoots([]byte(tc.pem))
		if tc.err == "" {
			if err != nil || len(r.List()) != 1 || r.List()[0].Fingerprint != sha256.Sum256(v.root.cert.Raw) {
				t.Errorf("%s: %v", tc.name, err)
			}
		} else if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.err)
		}
	}
	if _, err := ParsePolicy("sometimes"); err == nil {
		t.Error("ParsePolicy(sometimes) accepted")
	}
}

// BenchmarkCheck is the host's cost of one genuine record's check (the
// import runs it beside the token's work; docs/BENCHMARKS.md).
func BenchmarkCheck(b *testing.B) {
	v := newVendor(b, "v")
	own := sha256.Sum256([]byte("issuer"))
	card := issue(b, v.inter, cardTmpl("b101"))
	rec := v.record(b, []byte{0xb1, 0x01}, own[:], []byte("c"), card)
	ck := &Checker{Policy: Required, Roots: v.roots, Issuer: own}
	for b.Loop() {
		if _, err := ck.Check(rec); err != nil {
			b.Fatal(err)
		}
	}
}
