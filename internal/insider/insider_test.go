package insider_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/card/cardtest"
	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/internal/insider"
	"blindperso/issuer"
	"blindperso/issuer/issuertest"
	"blindperso/perso"
	"blindperso/perso/persotest"
	"blindperso/protocol"
)

func TestMain(m *testing.M) {
	code := m.Run()
	hsmtest.Cleanup()
	os.Exit(code)
}

// Test keys (testdata/keys): the genuine issuer's and the insider's.
var testKeys = map[protocol.Transport][2]string{
	protocol.RSARaw:   {"rsa2048.pem", "rsa2048-attacker.pem"},
	protocol.RSAOAEP:  {"rsa2048.pem", "rsa2048-attacker.pem"},
	protocol.ECDHP256: {"p256.pem", "p256-attacker.pem"},
}

func readPEM(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "testdata", "keys", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func loadKey(t testing.TB, name string) *insider.Key {
	t.Helper()
	k, err := insider.ParseKeyPEM(readPEM(t, name))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func manufacture(t testing.TB, dir string, n int) []string {
	t.Helper()
	var paths []string
	for i := range n {
		p := filepath.Join(dir, fmt.Sprintf("card-%02d.json", i))
		if _, err := card.Manufacture(p, card.Options{ID: []byte{0xA1, 0, 0, byte(i)}}); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	return paths
}

// attack runs the insider's station over n in-process cards (two slots)
// into batch, whose journal is opened for the genuine key, and writes the
// manifest. It returns the cards' state files.
func attack(t testing.TB, p protocol.Profile, attacker *insider.Key, genuine *protocol.IssuerKey, batch string, n int) []string {
	t.Helper()
	paths := manufacture(t, t.TempDir(), n)
	job, err := insider.Job(p, attacker)
	if err != nil {
		t.Fatal(err)
	}
	fp := genuine.Fingerprint()
	j, err := perso.OpenJournal(batch, p.Name, fp[:], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	l, err := insider.NewLedger(j, p, attacker, genuine, nil)
	if err != nil {
		t.Fatal(err)
	}
	h := make(persotest.Hopper, n)
	for _, path := range paths {
		a, err := card.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		h <- persotest.AppletCard(a)
	}
	close(h)
	st := &perso.Station{Job: job, Ledger: l, Count: n}
	if err := st.Run(context.Background(), persotest.LocalSlots{N: 2, Hopper: h}); err != nil {
		t.Fatal(err)
	}
	if st.Done() != n {
		t.Fatalf("%d cards locked, want %d", st.Done(), n)
	}
	if _, err := perso.WriteManifest(j, "insider-test"); err != nil {
		t.Fatal(err)
	}
	return paths
}

// openS is the genuine issuer opening a forged record in software (test
// keys only): the S the insider carried to it.
func openS(t testing.TB, p protocol.Profile, issuerPriv *rsa.PrivateKey, c []byte) []byte {
	t.Helper()
	switch p.Transport {
	case protocol.RSAOAEP:
		s, err := rsa.DecryptOAEP(sha1.New(), nil, issuerPriv, c, nil)
		if err != nil {
			t.Fatalf("forged c does not open under the issuer key: %v", err)
		}
		return s
	case protocol.RSARaw:
		r := new(big.Int).Exp(new(big.Int).SetBytes(c), issuerPriv.D, issuerPriv.N)
		return r.FillBytes(make([]byte, issuerPriv.Size()))
	}
	t.Fatalf("transport %v", p.Transport)
	return nil
}

// The station under PK′ with the insider's ledger writes a batch that
// names the genuine key; for RSA it carries the card's very S to the
// issuer, and yet KDF(S, B(PK)) is not the card's key: B binds PK′.
func TestForgedBatchLooksGenuine(t *testing.T) {
	for _, p := range protocol.Profiles() {
		t.Run(p.Name, func(t *testing.T) {
			files := testKeys[p.Transport]
			genuineKey := loadKey(t, files[0])
			genuine := genuineKey.Public
			attacker := loadKey(t, files[1])
			if p.Transport == protocol.RSARaw {
				// The test attacker's modulus is above the issuer's: some r
				// could not be carried (TestRawRBeyondN). A fresh key below.
				var err error
				if attacker, err = insider.GenerateKey(insider.KindRSA2048, genuine); err != nil {
					t.Fatal(err)
				}
			}
			batchPath := filepath.Join(t.TempDir(), "batch.ndjson")
			cards := attack(t, p, attacker, genuine, batchPath, 4)

			m, recs, err := readBatch(batchPath)
			if err != nil {
				t.Fatalf("the insider's batchPath does not verify against its manifest: %v", err)
			}
			fp := genuine.Fingerprint()
			if !bytes.Equal(m.IssuerFingerprint, fp[:]) || m.Profile != p.Name || m.Count != len(cards) {
				t.Fatalf("manifest %+v: want the genuine key's fingerprint %x, profile %s, %d records", m, fp, p.Name, len(cards))
			}
			byID := map[string]batch.Record{}
			for _, r := range recs {
				if !bytes.Equal(r.Fingerprint, fp[:]) {
					t.Errorf("record %x names key %x, want the genuine %x", []byte(r.ID), []byte(r.Fingerprint), fp)
				}
				if err := protocol.ValidCiphertext(p, genuine, r.C); err != nil {
					t.Errorf("record %x: c is not a ciphertext under the genuine key: %v", []byte(r.ID), err)
				}
				byID[fmt.Sprintf("%x", []byte(r.ID))] = r
			}
			for _, path := range cards {
				a, err := card.Open(path)
				if err != nil {
					t.Fatal(err)
				}
				if a.LifeCycle() != protocol.Locked {
					t.Errorf("%s: %v, want locked", path, a.LifeCycle())
				}
				rec, ok := byID[fmt.Sprintf("%x", a.ID())]
				if !ok {
					t.Fatalf("card %x not in the batch", a.ID())
				}
				ki := cardtest.KI(t, path)
				if p.Transport == protocol.ECDHP256 {
					continue // c′ forwarded; nothing to open in software
				}
				s := openS(t, p, genuineKey.Private.(*rsa.PrivateKey), rec.C)
				stolen, _ := protocol.DeriveKey(p, s, protocol.Binding(p, attacker.Public.SPKI))
				if !bytes.Equal(stolen, ki) {
					t.Errorf("card %x: the forged c does not carry the card's S", a.ID())
				}
				honest, _ := protocol.DeriveKey(p, s, protocol.Binding(p, genuine.SPKI))
				if bytes.Equal(honest, ki) {
					t.Errorf("card %x: KDF(S, B(PK)) equals the card's key: B does not bind the key", a.ID())
				}
			}
		})
	}
}

// rsa-raw with a modulus n′ above n: an r in [n, n′) cannot reach the
// issuer; the insider sends r mod n, a valid c under PK all the same.
func TestRawRBeyondN(t *testing.T) {
	p := protocol.RSARawSHA1
	genuineKey := loadKey(t, "rsa2048.pem")
	genuine := genuineKey.Public
	attacker := loadKey(t, "rsa2048-attacker.pem")
	if attacker.Public.RSA.N.Cmp(genuine.RSA.N) <= 0 {
		t.Fatal("test keys: want the attacker's modulus above the issuer's")
	}
	l, err := insider.NewLedger(nil, p, attacker, genuine, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := new(big.Int).Add(genuine.RSA.N, big.NewInt(5))
	c, err := protocol.EncryptSecret(p, attacker.Public, r.FillBytes(make([]byte, 256)), nil)
	if err != nil {
		t.Fatal(err)
	}
	afp := attacker.Public.Fingerprint()
	f, err := l.Forge(batch.Record{V: 1, ID: []byte{1}, C: c, Profile: p.Name, Fingerprint: afp[:]})
	if err != nil {
		t.Fatal(err)
	}
	s := openS(t, p, genuineKey.Private.(*rsa.PrivateKey), f.C)
	if new(big.Int).SetBytes(s).Cmp(big.NewInt(5)) != 0 {
		t.Errorf("forged c opens to %x, want r mod n = 5", s)
	}
}

// A card read back (a crash or a pull between the commit and LOCK) gives
// the same c′, so the insider forges the same c and the journal takes it
// as the record it already holds: the card is recovered, not set aside as
// a duplicate.
func TestForgeIsAFunctionOfC(t *testing.T) {
	p := protocol.RSAOAEPAES
	genuine := loadKey(t, "rsa2048.pem").Public
	attacker := loadKey(t, "rsa2048-attacker.pem")
	dir := t.TempDir()
	batchPath := filepath.Join(dir, "batch.ndjson")
	fp := genuine.Fingerprint()
	j, err := perso.OpenJournal(batchPath, p.Name, fp[:], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	l, err := insider.NewLedger(j, p, attacker, genuine, nil)
	if err != nil {
		t.Fatal(err)
	}
	a, err := card.Manufacture(filepath.Join(dir, "card.json"), card.Options{ID: []byte{0xA1, 9}})
	if err != nil {
		t.Fatal(err)
	}
	cl := &card.Client{T: a.Local()}
	if err := cl.Select(); err != nil {
		t.Fatal(err)
	}
	c1, err := cl.Personalize(p, attacker.Public.SPKI)
	if err != nil {
		t.Fatal(err)
	}
	afp := attacker.Public.Fingerprint()
	rec := batch.Record{V: batch.Version, ID: a.ID(), C: c1, Profile: p.Name, Fingerprint: afp[:]}
	f1, err := l.Forge(rec)
	if err != nil {
		t.Fatal(err)
	}
	f2, _ := l.Forge(rec)
	if !bytes.Equal(f1.C, f2.C) || bytes.Equal(f1.C, c1) {
		t.Fatal("forging one c′ twice gave two c (or c′ itself)")
	}
	// Committed, then the card "leaves" before LOCK.
	if err := l.Commit(rec); err != nil {
		t.Fatal(err)
	}
	// The station sees it again, personalized: READ CIPHERTEXT, commit, LOCK.
	job, _ := insider.Job(p, attacker)
	_, outcome, err := job.Personalize(&card.Client{T: a.Local()}, "test", l)
	if err != nil || outcome != perso.Recovered {
		t.Fatalf("read-back card: outcome %v, %v; want recovered", outcome, err)
	}
	if j.Len() != 1 {
		t.Fatalf("batch holds %d records, want 1", j.Len())
	}
	if _, err := os.Stat(batch.RejectsPath(batchPath)); err == nil {
		t.Fatal("the read-back card was rejected as a duplicate")
	}
}

// The batchPath the insider writes is one the issuer imports — every record,
// no reject — and yet none of its cards authenticates in the token, while
// a card personalized under the genuine key does (real SoftHSM2 token,
// real SQLite store, the issuer's importer).
func TestIssuerImportsButCatches(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		p    protocol.Profile
		kind string
	}{{protocol.RSAOAEPAES, hsm.KindRSA2048}, {protocol.ECDHP256AES, hsm.KindP256}} {
		t.Run(tc.p.Name, func(t *testing.T) {
			is := issuertest.New(t, tc.kind, 2)
			genuine := is.Key.Public
			var attacker *insider.Key
			var err error
			if tc.kind == hsm.KindRSA2048 {
				attacker, err = insider.GenerateKey(insider.KindRSA2048, genuine)
			} else {
				attacker, err = insider.GenerateKey(insider.KindP256, nil)
			}
			if err != nil {
				t.Fatal(err)
			}
			batchPath := filepath.Join(t.TempDir(), "batch.ndjson")
			cards := attack(t, tc.p, attacker, genuine, batchPath, 3)

			st, err := issuer.OpenSQLite(ctx, filepath.Join(t.TempDir(), "data"))
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			im := &issuer.Importer{Issuer: is, Store: st, Workers: 2}
			rep, err := im.ImportFile(ctx, batchPath)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Status != "done" || rep.Imported != len(cards) || rep.Rejects != 0 {
				t.Fatalf("import report %+v: want done, %d imported, no reject", rep, len(cards))
			}
			for _, path := range cards {
				a, err := card.Open(path)
				if err != nil {
					t.Fatal(err)
				}
				sc, err := st.Card(ctx, a.ID())
				if err != nil {
					t.Fatal(err)
				}
				ch := make([]byte, protocol.ChallengeLen)
				rand.Read(ch)
				if ok, err := is.Verify(ctx, sc.CardKey, ch, macOf(t, a, ch)); err != nil || ok {
					t.Errorf("attacked card %x: verify = %v, %v; want false", a.ID(), ok, err)
				}
			}

			// Control: an honest card under the same token verifies.
			a, err := card.Manufacture(filepath.Join(t.TempDir(), "honest.json"), card.Options{ID: []byte{0xB1, 1}})
			if err != nil {
				t.Fatal(err)
			}
			job, _ := perso.NewJob(tc.p, genuine, nil)
			var rec batch.Record
			ml := memLedger{&rec}
			if _, _, err := job.Personalize(&card.Client{T: a.Local()}, "test", ml); err != nil {
				t.Fatal(err)
			}
			ck, err := is.Import(ctx, rec)
			if err != nil {
				t.Fatal(err)
			}
			ch := make([]byte, protocol.ChallengeLen)
			rand.Read(ch)
			if ok, err := is.Verify(ctx, ck, ch, macOf(t, a, ch)); err != nil || !ok {
				t.Fatalf("control: honest card verify = %v, %v; want true", ok, err)
			}
		})
	}
}

type memLedger struct{ rec *batch.Record }

func (l memLedger) Commit(r batch.Record) error { *l.rec = r; return nil }
func (l memLedger) Lookup([]byte) ([]byte, bool) {
	return l.rec.C, len(l.rec.C) > 0
}

func macOf(t testing.TB, a *card.Applet, ch []byte) []byte {
	t.Helper()
	cl := &card.Client{T: a.Local()}
	if err := cl.Select(); err != nil {
		t.Fatal(err)
	}
	mac, err := cl.Authenticate(ch)
	if err != nil {
		t.Fatal(err)
	}
	return mac
}

func TestKeys(t *testing.T) {
	if _, err := insider.ParseKeyPEM([]byte("not a key")); err == nil || !strings.Contains(err.Error(), "no PEM block") {
		t.Errorf("garbage: %v", err)
	}
	pub := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: loadKey(t, "rsa2048.pem").Public.SPKI})
	if _, err := insider.ParseKeyPEM(pub); err == nil || !strings.Contains(err.Error(), `"PUBLIC KEY"`) {
		t.Errorf("public key: %v", err)
	}
	k := loadKey(t, "p256-attacker.pem")
	if k2, err := insider.ParseKeyPEM(k.PEM()); err != nil || !bytes.Equal(k2.Public.SPKI, k.Public.SPKI) {
		t.Errorf("PEM round trip: %v", err)
	}
	if _, err := insider.GenerateKey("dsa", nil); err == nil {
		t.Error("unknown kind accepted")
	}
	genuine := loadKey(t, "rsa2048.pem").Public
	g, err := insider.GenerateKey(insider.KindRSA2048, genuine)
	if err != nil {
		t.Fatal(err)
	}
	if g.Public.RSA.N.Cmp(genuine.RSA.N) >= 0 || g.Public.RSA.Size() != genuine.RSA.Size() {
		t.Error("GenerateKey with below: modulus not below the issuer's")
	}
	if _, err := x509.ParsePKCS8PrivateKey(mustBlock(t, g.PEM())); err != nil {
		t.Errorf("generated key is not PKCS#8: %v", err)
	}
	// An issuer modulus just above 2^2047, below every modulus crypto/rsa
	// makes (≥ 1.125·2^2047): drawing keys until one is below it failed
	// the NSS demo now and then.
	low := new(big.Int).Add(new(big.Int).Lsh(big.NewInt(1), 2047), new(big.Int).Lsh(big.NewInt(1), 1040))
	g, err = insider.GenerateKey(insider.KindRSA2048, &protocol.IssuerKey{RSA: &rsa.PublicKey{N: low, E: 65537}})
	if err != nil {
		t.Fatal(err)
	}
	if g.Public.RSA.N.Cmp(low) >= 0 || g.Public.RSA.N.BitLen() != 2048 {
		t.Errorf("modulus of %d bits, not below %x", g.Public.RSA.N.BitLen(), low)
	}

	// The ledger refuses what cannot be an attack.
	if _, err := insider.NewLedger(nil, protocol.RSAOAEPAES, loadKey(t, "rsa2048.pem"), genuine, nil); err == nil {
		t.Error("attacker key = issuer key accepted")
	}
	if _, err := insider.NewLedger(nil, protocol.ECDHP256AES, loadKey(t, "rsa2048-attacker.pem"), genuine, nil); err == nil {
		t.Error("RSA keys with an ECDH profile accepted")
	}
}

func mustBlock(t testing.TB, b []byte) []byte {
	t.Helper()
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatal("no PEM")
	}
	return blk.Bytes
}

// readBatch checks the batch at path against its manifest (batch.Verify)
// and returns its records.
func readBatch(path string) (batch.Manifest, []batch.Record, error) {
	var recs []batch.Record
	m, err := batch.Verify(path, func(_ int, r batch.Record) error { recs = append(recs, r); return nil })
	return m, recs, err
}
