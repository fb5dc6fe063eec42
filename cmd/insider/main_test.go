package main

import (
	"bytes"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/internal/insider"
	"blindperso/protocol"
)

// The command as a user meets it: testdata/script/*.txtar. The Fig. 2
// attack itself runs through PC/SC in the e2e test (scripts/demo.sh) and
// in process in internal/insider's tests, which also run the clone attack
// against a real issuer (TestCloneWithoutAttestation).
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){"insider": main})
}

func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{Dir: "testdata/script", Cmds: map[string]func(*testscript.TestScript, bool, []string){
		"mkbatch":     mkbatch,
		"verifybatch": verifybatch,
		"cardinfo":    cardinfo,
		"issuerauth":  issuerauth,
	}})
}

// mkbatch ISSUER.pub.pem PROFILE BATCH N: an honest station's sealed
// batch of N genuine cards (Ids b101, b102, …, state files
// card-b101.json, … beside BATCH), personalized under the key.
func mkbatch(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 4 {
		ts.Fatalf("usage: mkbatch ISSUER.pub.pem PROFILE BATCH N")
	}
	key, err := protocol.ParseIssuerKeyPEM([]byte(ts.ReadFile(args[0])))
	ts.Check(err)
	p, err := protocol.ProfileByName(args[1])
	ts.Check(err)
	path := ts.MkAbs(args[2])
	n, err := strconv.Atoi(args[3])
	ts.Check(err)
	fp := key.Fingerprint()
	var content []byte
	for i := 1; i <= n; i++ {
		id := []byte{0xB1, byte(i)}
		a, err := card.Manufacture(filepath.Join(filepath.Dir(path), fmt.Sprintf("card-%x.json", id)), card.Options{ID: id})
		ts.Check(err)
		cl := &card.Client{T: a.Local()}
		ts.Check(cl.Select())
		c, err := cl.Personalize(p, key.SPKI)
		ts.Check(err)
		ts.Check(cl.Lock(c))
		line, err := batch.MarshalRecord(batch.Record{ID: id, C: c, Profile: p.Name, Fingerprint: fp[:],
			Reader: "Virtual PCD 00 00", Time: time.Now()})
		ts.Check(err)
		content = append(content, line...)
	}
	ts.Check(os.WriteFile(path, content, 0o644))
	s, err := batch.Summarize(bytes.NewReader(content))
	ts.Check(err)
	mb, err := batch.MarshalManifest(batch.Manifest{Batch: filepath.Base(path), Count: s.Lines, Bytes: s.Bytes,
		SHA256: s.SHA256, Profile: p.Name, IssuerFingerprint: fp[:], Station: "honest-station", Written: time.Now()})
	ts.Check(err)
	ts.Check(os.WriteFile(batch.ManifestPath(path), mb, 0o644))
}

// verifybatch BATCH: batch.Verify (the batch matches its manifest, every
// line a record); prints the manifest's count and station and one line
// per record: its Id and SHA-256(c).
func verifybatch(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 1 {
		ts.Fatalf("usage: verifybatch BATCH")
	}
	var out strings.Builder
	m, err := batch.Verify(ts.MkAbs(args[0]), func(_ int, r batch.Record) error {
		fmt.Fprintf(&out, "record %x c_sha256 %x\n", []byte(r.ID), sha256Of(r.C))
		return nil
	})
	if neg {
		if err == nil {
			ts.Fatalf("batch verifies")
		}
		fmt.Fprintln(ts.Stdout(), err)
		return
	}
	ts.Check(err)
	fmt.Fprintf(ts.Stdout(), "count %d station %s format %s\n%s", m.Count, m.Station, m.Format, out.String())
}

// cardinfo CARD.json: the card's Id, life cycle, whether it has an
// attestation key, and its state file's mode.
func cardinfo(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: cardinfo CARD.json")
	}
	a, err := card.Open(ts.MkAbs(args[0]))
	ts.Check(err)
	fi, err := os.Stat(ts.MkAbs(args[0]))
	ts.Check(err)
	fmt.Fprintf(ts.Stdout(), "id %x %s attested %v mode %v\n", a.ID(), a.LifeCycle(), a.Attested(), fi.Mode().Perm())
}

// issuerauth ISSUER.pem BATCH CARD.json: the issuer's check in software
// (test keys only; the real issuer does this in its token): derive the
// key from the batch record of the card's Id with the issuer's private
// key, challenge the card, and print "auth ok" or "auth failed".
func issuerauth(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 3 {
		ts.Fatalf("usage: issuerauth ISSUER.pem BATCH CARD.json")
	}
	k, err := insider.ParseKeyPEM([]byte(ts.ReadFile(args[0])))
	ts.Check(err)
	a, err := card.Open(ts.MkAbs(args[2]))
	ts.Check(err)
	var rec *batch.Record
	m, err := batch.Verify(ts.MkAbs(args[1]), func(_ int, r batch.Record) error {
		if bytes.Equal(r.ID, a.ID()) {
			rec = &r
		}
		return nil
	})
	ts.Check(err)
	if rec == nil {
		ts.Fatalf("card %x is not in the batch", a.ID())
	}
	p, err := protocol.ProfileByName(m.Profile)
	ts.Check(err)
	if p.Transport != protocol.ECDHP256 {
		ts.Fatalf("issuerauth does ECDH profiles only")
	}
	priv, err := k.Private.(*ecdsa.PrivateKey).ECDH()
	ts.Check(err)
	pub, err := ecdh.P256().NewPublicKey(rec.C)
	ts.Check(err)
	z, err := priv.ECDH(pub)
	ts.Check(err)
	ki, err := protocol.DeriveKey(p, z, protocol.Binding(p, k.Public.SPKI))
	ts.Check(err)
	ch := make([]byte, protocol.ChallengeLen)
	rand.Read(ch)
	want, err := protocol.AuthMAC(ki, a.ID(), ch)
	ts.Check(err)
	cl := &card.Client{T: a.Local()}
	ts.Check(cl.Select())
	mac, err := cl.Authenticate(ch)
	ts.Check(err)
	if bytes.Equal(mac, want) {
		fmt.Fprintf(ts.Stdout(), "auth ok %s\n", hex.EncodeToString(a.ID()))
	} else {
		fmt.Fprintf(ts.Stdout(), "auth failed %s\n", hex.EncodeToString(a.ID()))
	}
}

func sha256Of(b []byte) []byte {
	h := sha256.Sum256(b)
	return h[:]
}
