// Package chipca is a test chip vendor's certification authority for
// Extension A (docs/PROTOCOL.md §10): a root, an intermediate under it,
// and the card certificates of §10.1. A real vendor certifies cards in
// its own factory, outside the personalization centre; this one exists so
// that tests, the demo and vcard can make attested virtual cards whose
// chains an issuer verifies exactly as it would a real vendor's.
package chipca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"

	"blindperso/protocol"
)

// The files of a CA directory. Keys are PKCS#8 PEM, mode 0600.
const (
	RootFile            = "root.pem"
	RootKeyFile         = "root.key.pem"
	IntermediateFile    = "intermediate.pem"
	IntermediateKeyFile = "intermediate.key.pem"
)

// DefaultVendor is the organization name New uses when given none.
const DefaultVendor = "blindperso test chip vendor"

// Validity periods. The card's outlives any card in service; the CAs'
// outlive the cards they issue.
const (
	RootValidity         = 40 * 365 * 24 * time.Hour
	IntermediateValidity = 30 * 365 * 24 * time.Hour
	CardValidity         = 20 * 365 * 24 * time.Hour
	// backdate allows for clocks a little behind the CA's.
	backdate = time.Hour
)

// CA is a chip vendor's root and intermediate. Cards are issued by the
// intermediate, so the root key can stay offline: RootKey is nil when
// the directory holds no root key.
type CA struct {
	Root            *x509.Certificate
	RootKey         *ecdsa.PrivateKey
	Intermediate    *x509.Certificate
	IntermediateKey *ecdsa.PrivateKey
}

// Card is what pre-personalization gives one card: its attestation key
// and its chain (card certificate, then the intermediate; no root). Its
// fields are those of card.Attestation, so card.Attestation(c) converts
// it without this package depending on the card's.
type Card struct {
	Key   *ecdsa.PrivateKey
	Chain [][]byte
}

// CertOptions set a card certificate's validity; zero values mean from an
// hour ago for CardValidity. Tests set them to make an expired
// certificate.
type CertOptions struct {
	NotBefore, NotAfter time.Time
}

// New makes a fresh CA: a self-signed P-256 root and a P-256
// intermediate that may issue only end-entity certificates (path length
// 0). vendor is the organization in both names (DefaultVendor if empty);
// two CAs of one vendor name are still unrelated.
func New(vendor string) (*CA, error) {
	if vendor == "" {
		vendor = DefaultVendor
	}
	now := time.Now()
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	rootTmpl := &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{vendor}, CommonName: vendor + " root"},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(RootValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	root, err := sign(rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	if err != nil {
		return nil, fmt.Errorf("chip CA root: %w", err)
	}
	intKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	intTmpl := &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{vendor}, CommonName: vendor + " intermediate"},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(IntermediateValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
	}
	inter, err := sign(intTmpl, root, &intKey.PublicKey, rootKey)
	if err != nil {
		return nil, fmt.Errorf("chip CA intermediate: %w", err)
	}
	return &CA{Root: root, RootKey: rootKey, Intermediate: inter, IntermediateKey: intKey}, nil
}

// sign issues tmpl under parent with a fresh random serial number and
// returns the parsed certificate.
func sign(tmpl, parent *x509.Certificate, pub *ecdsa.PublicKey, key *ecdsa.PrivateKey) (*x509.Certificate, error) {
	serial := make([]byte, 16)
	if _, err := rand.Read(serial); err != nil {
		return nil, err
	}
	serial[0] &= 0x7F // positive, at most 16 octets (RFC 5280 allows 20)
	tmpl.SerialNumber = new(big.Int).SetBytes(serial)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// CardSubject is the subject of the card certificate for id (§10.1): the
// serialNumber attribute is the Id in lower-case hex, which is what the
// issuer matches against a record's Id.
func CardSubject(id []byte) pkix.Name {
	h := hex.EncodeToString(id)
	return pkix.Name{SerialNumber: h, CommonName: "blindperso card " + h}
}

// IssueCard certifies pub as the attestation key of the card id, under
// the intermediate: a certificate of §10.1's form (digitalSignature only,
// not a CA).
func (ca *CA) IssueCard(id []byte, pub *ecdsa.PublicKey, o CertOptions) (*x509.Certificate, error) {
	if len(id) < 1 || len(id) > protocol.MaxIDLen {
		return nil, fmt.Errorf("card certificate: Id of %d bytes, want 1 to %d", len(id), protocol.MaxIDLen)
	}
	if pub == nil || pub.Curve != elliptic.P256() {
		return nil, errors.New("card certificate: the attestation key must be ECDSA P-256")
	}
	if ca.IntermediateKey == nil {
		return nil, errors.New("card certificate: the CA has no intermediate key")
	}
	now := time.Now()
	if o.NotBefore.IsZero() {
		o.NotBefore = now.Add(-backdate)
	}
	if o.NotAfter.IsZero() {
		o.NotAfter = o.NotBefore.Add(CardValidity)
	}
	if !o.NotAfter.After(o.NotBefore) {
		return nil, errors.New("card certificate: NotAfter is not after NotBefore")
	}
	tmpl := &x509.Certificate{
		Subject:               CardSubject(id),
		NotBefore:             o.NotBefore,
		NotAfter:              o.NotAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  false,
	}
	c, err := sign(tmpl, ca.Intermediate, pub, ca.IntermediateKey)
	if err != nil {
		return nil, fmt.Errorf("card certificate: %w", err)
	}
	return c, nil
}

// NewCard draws a fresh attestation key for the card id and certifies
// it: what card.Options.Attestation needs. On a chip the key would be
// drawn inside it; a virtual card gets it from here.
func (ca *CA) NewCard(id []byte, o CertOptions) (Card, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Card{}, err
	}
	cert, err := ca.IssueCard(id, &key.PublicKey, o)
	if err != nil {
		return Card{}, err
	}
	return Card{Key: key, Chain: ca.Chain(cert)}, nil
}

// Chain is what a card with certificate cert carries: cert, then the
// intermediate, DER each. The root is not in it; the issuer has it.
func (ca *CA) Chain(cert *x509.Certificate) [][]byte {
	return [][]byte{bytes.Clone(cert.Raw), bytes.Clone(ca.Intermediate.Raw)}
}

// RootFingerprint is SHA-256 of the root certificate's DER, the value an
// issuer's operator compares before trusting root.pem.
func (ca *CA) RootFingerprint() [32]byte { return sha256.Sum256(ca.Root.Raw) }

// Roots is a pool holding only the root, for x509.VerifyOptions.
func (ca *CA) Roots() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Root)
	return p
}

// Write stores the CA in dir (created if missing): certificates 0644,
// keys 0600. It refuses to overwrite any existing CA file, so a CA whose
// root an issuer already trusts is never replaced by accident.
func (ca *CA) Write(dir string) error {
	type file struct {
		name string
		pem  *pem.Block
		mode os.FileMode
	}
	files := []file{
		{RootFile, &pem.Block{Type: "CERTIFICATE", Bytes: ca.Root.Raw}, 0o644},
		{IntermediateFile, &pem.Block{Type: "CERTIFICATE", Bytes: ca.Intermediate.Raw}, 0o644},
	}
	for _, k := range []struct {
		name string
		key  *ecdsa.PrivateKey
	}{{RootKeyFile, ca.RootKey}, {IntermediateKeyFile, ca.IntermediateKey}} {
		if k.key == nil {
			continue
		}
		der, err := x509.MarshalPKCS8PrivateKey(k.key)
		if err != nil {
			return err
		}
		files = append(files, file{k.name, &pem.Block{Type: "PRIVATE KEY", Bytes: der}, 0o600})
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for _, f := range []string{RootFile, RootKeyFile, IntermediateFile, IntermediateKeyFile} {
		if _, err := os.Lstat(filepath.Join(dir, f)); err == nil {
			return fmt.Errorf("chip CA: %s already exists; not overwriting a CA", filepath.Join(dir, f))
		}
	}
	for _, f := range files {
		if err := writeNew(filepath.Join(dir, f.name), pem.EncodeToMemory(f.pem), f.mode); err != nil {
			return fmt.Errorf("chip CA: %w", err)
		}
	}
	return nil
}

// writeNew creates path (never replacing a file) with data, durably.
func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// Load reads the CA Write stored in dir. root.key.pem may be absent (the
// root key kept offline); the rest must be there and consistent: the
// intermediate issued by the root, and each key the one its certificate
// holds.
func Load(dir string) (*CA, error) {
	ca := &CA{}
	var err error
	if ca.Root, err = readCert(filepath.Join(dir, RootFile)); err != nil {
		return nil, err
	}
	if ca.Intermediate, err = readCert(filepath.Join(dir, IntermediateFile)); err != nil {
		return nil, err
	}
	if ca.IntermediateKey, err = readKey(filepath.Join(dir, IntermediateKeyFile)); err != nil {
		return nil, err
	}
	if ca.RootKey, err = readKey(filepath.Join(dir, RootKeyFile)); errors.Is(err, os.ErrNotExist) {
		ca.RootKey = nil
	} else if err != nil {
		return nil, err
	}
	if err := ca.check(); err != nil {
		return nil, fmt.Errorf("chip CA %s: %w", dir, err)
	}
	return ca, nil
}

// check is Load's consistency test.
func (ca *CA) check() error {
	if !ca.Root.IsCA || ca.Root.CheckSignatureFrom(ca.Root) != nil {
		return errors.New("root.pem is not a self-signed CA certificate")
	}
	if !ca.Intermediate.IsCA || ca.Intermediate.CheckSignatureFrom(ca.Root) != nil {
		return errors.New("intermediate.pem is not a CA certificate issued by root.pem")
	}
	if !ca.IntermediateKey.PublicKey.Equal(ca.Intermediate.PublicKey) {
		return errors.New("intermediate.key.pem is not the key of intermediate.pem")
	}
	if ca.RootKey != nil && !ca.RootKey.PublicKey.Equal(ca.Root.PublicKey) {
		return errors.New("root.key.pem is not the key of root.pem")
	}
	return nil
}

func readPEM(path, typ string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, rest := pem.Decode(b)
	if blk == nil || blk.Type != typ || len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%s: want exactly one PEM %s block", path, typ)
	}
	return blk.Bytes, nil
}

func readCert(path string) (*x509.Certificate, error) {
	der, err := readPEM(path, "CERTIFICATE")
	if err != nil {
		return nil, err
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// readKey reads a PKCS#8 P-256 private key.
func readKey(path string) (*ecdsa.PrivateKey, error) {
	der, err := readPEM(path, "PRIVATE KEY")
	if err != nil {
		return nil, err
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok || key.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%s: not an ECDSA P-256 key", path)
	}
	return key, nil
}
