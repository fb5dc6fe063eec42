package chipca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var cardID = []byte{0xB1, 0, 0, 0, 0, 0, 0, 0x2A}

// rdnSET is one RelativeDistinguishedName read raw, so that a test sees
// the string type of each value (encoding/asn1 reads a type named *SET
// as SET OF).
type rdnSET []struct {
	Type  asn1.ObjectIdentifier
	Value asn1.RawValue
}

func newCA(t *testing.T) *CA {
	t.Helper()
	ca, err := New("")
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func writePEM(t *testing.T, path string, der ...[]byte) {
	t.Helper()
	var b []byte
	for _, d := range der {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: d})...)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func openssl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command("openssl", args...).CombinedOutput()
	return string(out), err
}

// The CA survives a trip through its directory, with the key files
// private, and a second Write into the same directory is refused.
func TestWriteLoad(t *testing.T) {
	ca := newCA(t)
	dir := filepath.Join(t.TempDir(), "ca")
	if err := ca.Write(dir); err != nil {
		t.Fatal(err)
	}
	for name, mode := range map[string]os.FileMode{RootFile: 0o644, IntermediateFile: 0o644, RootKeyFile: 0o600, IntermediateKeyFile: 0o600} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s: mode %v, want %v", name, fi.Mode().Perm(), mode)
		}
	}
	back, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !back.Root.Equal(ca.Root) || !back.Intermediate.Equal(ca.Intermediate) ||
		!back.RootKey.Equal(ca.RootKey) || !back.IntermediateKey.Equal(ca.IntermediateKey) {
		t.Fatal("loaded CA differs from the written one")
	}
	if err := newCA(t).Write(dir); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("second Write into %s: %v", dir, err)
	}
	if again, err := Load(dir); err != nil || !again.Root.Equal(ca.Root) {
		t.Fatalf("refused Write changed the CA: %v", err)
	}

	// The root key may be kept offline: Load needs only the intermediate's.
	if err := os.Remove(filepath.Join(dir, RootKeyFile)); err != nil {
		t.Fatal(err)
	}
	offline, err := Load(dir)
	if err != nil || offline.RootKey != nil {
		t.Fatalf("Load without root key: %v", err)
	}
	if _, err := offline.NewCard(cardID, CertOptions{}); err != nil {
		t.Fatal(err)
	}

	// An intermediate key that is not the intermediate's is caught.
	other := filepath.Join(t.TempDir(), "other")
	if err := newCA(t).Write(other); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(other, IntermediateKeyFile))
	if err := os.WriteFile(filepath.Join(dir, IntermediateKeyFile), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(dir); err == nil || !strings.Contains(err.Error(), "not the key of intermediate.pem") {
		t.Fatalf("Load with a foreign intermediate key: %v", err)
	}
}

// Root, intermediate and card certificate have the shape §10.1 asks for,
// as crypto/x509 reads them, and the chain verifies to the root.
func TestCertificates(t *testing.T) {
	ca := newCA(t)
	if !ca.Root.IsCA || ca.Root.CheckSignatureFrom(ca.Root) != nil || ca.Root.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Fatal("root is not a self-signed CA")
	}
	if !ca.Intermediate.IsCA || ca.Intermediate.MaxPathLen != 0 || !ca.Intermediate.MaxPathLenZero {
		t.Fatal("intermediate is not a CA of path length 0")
	}
	c, err := ca.NewCard(cardID, CertOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Chain) != 2 {
		t.Fatalf("chain of %d certificates, want card and intermediate", len(c.Chain))
	}
	cert, err := x509.ParseCertificate(c.Chain[0])
	if err != nil {
		t.Fatal(err)
	}
	if !c.Key.PublicKey.Equal(cert.PublicKey) {
		t.Fatal("card certificate does not certify the card's key")
	}
	if cert.IsCA || cert.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Fatalf("card certificate: IsCA %v, key usage %b", cert.IsCA, cert.KeyUsage)
	}
	if cert.Subject.SerialNumber != "b10000000000002a" || cert.Subject.CommonName != "blindperso card b10000000000002a" {
		t.Fatalf("card subject %v", cert.Subject)
	}
	if d := cert.NotAfter.Sub(cert.NotBefore); d != CardValidity {
		t.Fatalf("card validity %v", d)
	}
	// Exactly one serialNumber, and it is a PrintableString.
	var name []rdnSET
	if _, err := asn1.Unmarshal(cert.RawSubject, &name); err != nil {
		t.Fatal(err)
	}
	var serials []asn1.RawValue
	for _, rdn := range name {
		for _, a := range rdn {
			if a.Type.Equal(asn1.ObjectIdentifier{2, 5, 4, 5}) {
				serials = append(serials, a.Value)
			}
		}
	}
	if len(serials) != 1 || serials[0].Tag != asn1.TagPrintableString {
		t.Fatalf("serialNumber attributes %+v, want one PrintableString", serials)
	}

	inter := x509.NewCertPool()
	inter.AddCert(ca.Intermediate)
	opts := x509.VerifyOptions{Roots: ca.Roots(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}
	if _, err := cert.Verify(opts); err != nil {
		t.Fatalf("card certificate does not verify: %v", err)
	}
	// Not under another vendor's root, and not once it has expired.
	opts.Roots = newCA(t).Roots()
	if _, err := cert.Verify(opts); err == nil {
		t.Fatal("card certificate verifies under an unrelated root")
	}
	opts.Roots, opts.CurrentTime = ca.Roots(), cert.NotAfter.Add(time.Second)
	if _, err := cert.Verify(opts); err == nil {
		t.Fatal("card certificate verifies after NotAfter")
	}
	fp := ca.RootFingerprint()
	if fp != sha256.Sum256(ca.Root.Raw) {
		t.Fatal("RootFingerprint is not SHA-256 of the root's DER")
	}
}

func TestIssueCardRefuses(t *testing.T) {
	ca := newCA(t)
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	k384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	now := time.Now()
	for name, f := range map[string]func() error{
		"empty Id":   func() error { _, err := ca.IssueCard(nil, &k.PublicKey, CertOptions{}); return err },
		"17-byte Id": func() error { _, err := ca.IssueCard(make([]byte, 17), &k.PublicKey, CertOptions{}); return err },
		"P-384 key":  func() error { _, err := ca.IssueCard(cardID, &k384.PublicKey, CertOptions{}); return err },
		"empty period": func() error {
			_, err := ca.IssueCard(cardID, &k.PublicKey, CertOptions{NotBefore: now, NotAfter: now})
			return err
		},
	} {
		if f() == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// OpenSSL, a second implementation, reads the certificates as intended
// and verifies the chain; it refuses an expired card certificate and a
// chain without its intermediate.
func TestOpenSSL(t *testing.T) {
	ca := newCA(t)
	dir := t.TempDir()
	if err := ca.Write(dir); err != nil {
		t.Fatal(err)
	}
	c, err := ca.NewCard(cardID, CertOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cardPEM := filepath.Join(dir, "card.pem")
	writePEM(t, cardPEM, c.Chain[0])
	root, inter := filepath.Join(dir, RootFile), filepath.Join(dir, IntermediateFile)

	for _, tc := range []struct {
		file string
		want []string
	}{
		{root, []string{"CA:TRUE", "Certificate Sign, CRL Sign", "ASN1 OID: prime256v1", "ecdsa-with-SHA256"}},
		{inter, []string{"CA:TRUE, pathlen:0", "Certificate Sign, CRL Sign", "ASN1 OID: prime256v1"}},
		{cardPEM, []string{"CA:FALSE", "Digital Signature", "serialNumber=b10000000000002a", "CN=blindperso card b10000000000002a", "ASN1 OID: prime256v1"}},
	} {
		out, err := openssl(t, "x509", "-noout", "-text", "-nameopt", "sep_comma_plus_space", "-in", tc.file)
		if err != nil {
			t.Fatalf("openssl x509 %s: %v\n%s", tc.file, err, out)
		}
		for _, w := range tc.want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: openssl x509 -text lacks %q:\n%s", filepath.Base(tc.file), w, out)
			}
		}
	}
	if out, err := openssl(t, "x509", "-noout", "-text", "-in", cardPEM); err != nil || strings.Contains(out, "Certificate Sign") {
		t.Fatalf("card certificate may sign certificates:\n%s", out)
	}

	if out, err := openssl(t, "verify", "-CAfile", root, "-untrusted", inter, cardPEM); err != nil || !strings.Contains(out, ": OK") {
		t.Fatalf("openssl verify: %v\n%s", err, out)
	}
	if out, err := openssl(t, "verify", "-CAfile", root, cardPEM); err == nil {
		t.Fatalf("openssl verify without the intermediate accepted:\n%s", out)
	}

	past := time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)
	old, err := ca.NewCard(cardID, CertOptions{NotBefore: past, NotAfter: past.AddDate(1, 0, 0)})
	if err != nil {
		t.Fatal(err)
	}
	oldPEM := filepath.Join(dir, "old.pem")
	writePEM(t, oldPEM, old.Chain[0])
	if out, err := openssl(t, "verify", "-CAfile", root, "-untrusted", inter, oldPEM); err == nil || !strings.Contains(out, "expired") {
		t.Fatalf("openssl verify of an expired card certificate: %v\n%s", err, out)
	}

	// The fingerprint vcard prints is the one openssl computes.
	out, err := openssl(t, "x509", "-noout", "-fingerprint", "-sha256", "-in", root)
	if err != nil {
		t.Fatal(err)
	}
	fp := ca.RootFingerprint()
	got := strings.ToLower(strings.ReplaceAll(strings.TrimSpace(out[strings.Index(out, "=")+1:]), ":", ""))
	if got != hex.EncodeToString(fp[:]) {
		t.Fatalf("openssl root fingerprint %s, RootFingerprint %x", got, fp)
	}
}
