package main

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
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
	"blindperso/export"
	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// Commands the scripts use besides issuer: the station and the cards,
// in process (virtual cards, no PC/SC), so a script can make a batch and
// answer challenges.
var scriptCmds = map[string]func(ts *testscript.TestScript, neg bool, args []string){
	"personalize": cmdPersonalize,
	"cardmac":     cmdCardMAC,
	"capture":     cmdCapture,
	"fault":       cmdFault,
	"tlscert":     cmdTLSCert,
	"importktk":   cmdImportKTK,
	"receive":     cmdReceive,
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

// faults are the p11fault members of the scripts that have one, by
// script name (TestScripts).
var faults = map[string]*hsmtest.Fault{}

// fault [RULE ...]: replace the rules of the script's p11fault member
// ($SOFTHSM_COPY_URI) by these control-file lines; none: clear them.
func cmdFault(ts *testscript.TestScript, neg bool, args []string) {
	if neg {
		ts.Fatalf("unsupported: ! fault")
	}
	f := faults[strings.TrimPrefix(filepath.Base(ts.Getenv("WORK")), "script-")]
	if f == nil {
		ts.Fatalf("fault: this script has no p11fault member")
	}
	f.Set(args...)
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

// importktk TOKEN-URI SO-PIN-FILE LABEL KEYFILE
//
// The receiving system's side of the KTK exchange, as the key ceremony
// runs it: a key-import key is generated in the token, a KTK made on the
// host (the receiver's: in a test only is it ever in the clear) is
// encrypted to it (hsm.KeyImportOAEP: RSA-OAEP SHA-1) and imported by
// the security officer as LABEL; the KTK's value goes to KEYFILE (hex),
// for receive.
func cmdImportKTK(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 4 {
		ts.Fatalf("usage: importktk TOKEN-URI SO-PIN-FILE LABEL KEYFILE")
	}
	soPIN := strings.TrimSpace(ts.ReadFile(args[1]))
	tok, err := hsm.OpenURI(args[0], 1)
	ts.Check(err)
	defer tok.Close()
	ctx := context.Background()
	ik, err := tok.GenerateKeyImportKey(ctx, "key-import-"+args[2])
	ts.Check(err)
	ktk := make([]byte, hsm.KTKLen)
	rand.Read(ktk)
	wrapped, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, ik.Public.RSA, ktk, nil)
	ts.Check(err)
	_, err = tok.ImportKTK(ctx, ik, args[2], wrapped, soPIN)
	ts.Check(err)
	ts.Check(os.WriteFile(ts.MkAbs(args[3]), []byte(hex.EncodeToString(ktk)+"\n"), 0o600))
}

// receive FILE KEYFILE CARD.json...
//
// The receiving system: reads the export FILE against its manifest
// (export.Read), unwraps every line's key with the KTK in KEYFILE (RFC
// 3394, its integrity check), and checks that it is the card's K_I: the
// card (card-ID.json) answers a fresh challenge with the MAC the
// unwrapped key computes. The lines must be exactly the cards given.
func cmdReceive(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 3 {
		ts.Fatalf("usage: receive FILE KEYFILE CARD.json...")
	}
	ktk, err := hex.DecodeString(strings.TrimSpace(ts.ReadFile(args[1])))
	ts.Check(err)
	cards := map[string]string{}
	for _, c := range args[2:] {
		id, err := hex.DecodeString(strings.TrimSuffix(strings.TrimPrefix(filepath.Base(c), "card-"), ".json"))
		ts.Check(err)
		cards[string(id)] = ts.MkAbs(c)
	}
	n := 0
	_, err = export.Read(export.ManifestPath(ts.MkAbs(args[0])), func(line int, r export.Record, err error) error {
		if err != nil {
			return err
		}
		path, ok := cards[string(r.ID)]
		if !ok {
			return fmt.Errorf("line %d: card %x was not to be exported", line, []byte(r.ID))
		}
		ki, err := aesKeyUnwrap(ktk, r.Wrapped)
		if err != nil {
			return fmt.Errorf("line %d: %w", line, err)
		}
		ch := make([]byte, protocol.ChallengeLen)
		rand.Read(ch)
		want, err := protocol.AuthMAC(ki, r.ID, ch)
		if err != nil {
			return err
		}
		got, err := cardAnswer(path, ch)
		if err != nil {
			return err
		}
		if !bytes.Equal(got, want) {
			return fmt.Errorf("line %d: card %x answers with another key than the exported one", line, []byte(r.ID))
		}
		n++
		return nil
	})
	ts.Check(err)
	if n != len(cards) {
		ts.Fatalf("%d lines, want %d cards", n, len(cards))
	}
	fmt.Fprintf(ts.Stdout(), "%d keys received and verified\n", n)
}

// aesKeyUnwrap is RFC 3394's key unwrap (§2.2.2, the index form) with the
// default initial value.
func aesKeyUnwrap(kek, c []byte) ([]byte, error) {
	if len(c) < 24 || len(c)%8 != 0 {
		return nil, fmt.Errorf("wrapped key of %d bytes", len(c))
	}
	b, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	n := len(c)/8 - 1
	a := binary.BigEndian.Uint64(c)
	r := append([]byte(nil), c[8:]...)
	var buf [16]byte
	for j := 5; j >= 0; j-- {
		for i := n; i >= 1; i-- {
			binary.BigEndian.PutUint64(buf[:8], a^uint64(n*j+i))
			copy(buf[8:], r[8*(i-1):8*i])
			b.Decrypt(buf[:], buf[:])
			a = binary.BigEndian.Uint64(buf[:8])
			copy(r[8*(i-1):8*i], buf[8:])
		}
	}
	if a != 0xA6A6A6A6A6A6A6A6 {
		return nil, fmt.Errorf("RFC 3394 integrity check failed: not wrapped under this KTK, or changed")
	}
	return r, nil
}
