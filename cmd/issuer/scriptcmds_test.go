package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/card/cardtest"
	"blindperso/protocol"
)

// Commands the scripts use besides issuer: the station and the cards,
// in process (virtual cards, no PC/SC), so a script can make a batch and
// answer challenges.
var scriptCmds = map[string]func(ts *testscript.TestScript, neg bool, args []string){
	"personalize": cmdPersonalize,
	"cardmac":     cmdCardMAC,
	"capture":     cmdCapture,
	"tlscert":     cmdTLSCert,
}

// personalize PUB.pem BATCH ITEM...
//
// Writes BATCH and BATCH.manifest.json as a station would: for each ITEM
// that is a hex card Id, a new virtual card (state file card-ID.json, or
// card-ID-2.json… if the Id was used before) personalized under PUB.pem
// (profile ecdh-p256-aes for a P-256 key, rsa-oaep-aes for RSA); the ITEM
// "bad" is a line that is not a record. The manifest matches the file.
func cmdPersonalize(ts *testscript.TestScript, neg bool, args []string) {
	if neg {
		ts.Fatalf("unsupported: ! personalize")
	}
	if len(args) < 3 {
		ts.Fatalf("usage: personalize PUB.pem BATCH ITEM...")
	}
	sum, err := stationBatch([]byte(ts.ReadFile(args[0])), ts.MkAbs(args[1]), args[2:])
	ts.Check(err)
	fmt.Fprintf(ts.Stdout(), "%x\n", sum)
}

// stationBatch writes batch (and its manifest) as personalize does, the
// card state files beside it, and returns the batch's SHA-256.
func stationBatch(pubPEM []byte, batchPath string, items []string) ([]byte, error) {
	key, err := protocol.ParseIssuerKeyPEM(pubPEM)
	if err != nil {
		return nil, err
	}
	p := protocol.ECDHP256AES
	if key.RSA != nil {
		p = protocol.RSAOAEPAES
	}
	dir := filepath.Dir(batchPath)
	var lines strings.Builder
	for _, item := range items {
		if item == "bad" {
			lines.WriteString("{this is not a record\n")
			continue
		}
		id, err := hex.DecodeString(item)
		if err != nil {
			return nil, fmt.Errorf("card Id %q is not hex", item)
		}
		path := filepath.Join(dir, "card-"+item+".json")
		for n := 2; fileExists(path); n++ {
			path = filepath.Join(dir, fmt.Sprintf("card-%s-%d.json", item, n))
		}
		a, err := card.Manufacture(path, card.Options{ID: id})
		if err != nil {
			return nil, err
		}
		rec, err := cardtest.Personalize(a, p, key, "script")
		if err != nil {
			return nil, err
		}
		b, err := batch.MarshalRecord(rec)
		if err != nil {
			return nil, err
		}
		lines.Write(b)
	}
	content := lines.String()
	if err := os.WriteFile(batchPath, []byte(content), 0o644); err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(content))
	fp := key.Fingerprint()
	m := batch.Manifest{Format: batch.Format, Batch: filepath.Base(batchPath), Count: strings.Count(content, "\n"),
		Bytes: int64(len(content)), SHA256: sum[:], Profile: p.Name, IssuerFingerprint: fp[:], Station: "script",
		Written: time.Now().UTC()}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	return sum[:], os.WriteFile(batch.ManifestPath(batchPath), b, 0o644)
}

// cardAnswer is the card's AES-CMAC answer to challenge.
func cardAnswer(path string, challenge []byte) ([]byte, error) {
	a, err := card.Open(path)
	if err != nil {
		return nil, err
	}
	c := &card.Client{T: a.Local()}
	if err := c.Select(); err != nil {
		return nil, err
	}
	return c.Authenticate(challenge)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// cardmac CARD.json CHALLENGE: the card's answer (AES-CMAC under its K_I)
// to the hex challenge, in hex on stdout.
func cmdCardMAC(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: cardmac CARD.json CHALLENGE")
	}
	ch, err := hex.DecodeString(args[1])
	ts.Check(err)
	mac, err := cardAnswer(ts.MkAbs(args[0]), ch)
	ts.Check(err)
	fmt.Fprintf(ts.Stdout(), "%x\n", mac)
}

// capture VAR: set VAR to the previous command's stdout, trimmed.
func cmdCapture(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: capture VAR")
	}
	ts.Setenv(args[0], strings.TrimSpace(ts.ReadFile("stdout")))
}

// tlscert CERT KEY: a self-signed P-256 server certificate for localhost
// and 127.0.0.1, valid for a day, and its key (PEM).
func cmdTLSCert(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: tlscert CERT KEY")
	}
	certPEM, keyPEM, err := selfSigned("localhost")
	ts.Check(err)
	ts.Check(os.WriteFile(ts.MkAbs(args[0]), certPEM, 0o644))
	ts.Check(os.WriteFile(ts.MkAbs(args[1]), keyPEM, 0o600))
}

func selfSigned(cn string) (certPEM, keyPEM []byte, err error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true, IsCA: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		return nil, nil, err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), nil
}
