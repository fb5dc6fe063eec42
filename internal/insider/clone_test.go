package insider_test

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/card/cardtest"
	"blindperso/chipca"
	"blindperso/hsm"
	"blindperso/internal/insider"
	"blindperso/issuer"
	"blindperso/issuer/issuertest"
	"blindperso/protocol"
)

// recorder is the insider's RNG as a test sees it: crypto/rand, with a
// copy of every byte the clone drew (r* and what it took to draw it).
type recorder struct {
	r   io.Reader
	got bytes.Buffer
}

func newRecorder() *recorder {
	rec := &recorder{}
	rec.r = io.TeeReader(rand.Reader, &rec.got)
	return rec
}

func (r *recorder) Read(p []byte) (int, error) { return r.r.Read(p) }

// issuerKeyOf is what the genuine issuer's token derives from c, computed
// in software with the test issuer's private key (testdata/keys).
func issuerKeyOf(t testing.TB, p protocol.Profile, issuerKey *insider.Key, c []byte) []byte {
	t.Helper()
	var s []byte
	switch p.Transport {
	case protocol.RSAOAEP, protocol.RSARaw:
		s = openS(t, p, issuerKey.Private.(*rsa.PrivateKey), c)
	case protocol.ECDHP256:
		priv, err := issuerKey.Private.(*ecdsa.PrivateKey).ECDH()
		if err != nil {
			t.Fatal(err)
		}
		pub, err := ecdh.P256().NewPublicKey(c)
		if err != nil {
			t.Fatalf("c is not a P-256 point: %v", err)
		}
		if s, err = priv.ECDH(pub); err != nil {
			t.Fatal(err)
		}
	}
	k, err := protocol.DeriveKey(p, s, protocol.Binding(p, issuerKey.Public.SPKI))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func splitLines(t testing.TB, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.SplitAfter(strings.TrimSuffix(string(b), "\n"), "\n")
}

// The attack in software, for every profile: Clone replaces a genuine
// card's line by c* = E_PK(r*) and reseals, the other lines and manifest
// members untouched; the insider, from the bytes she drew, knows the key
// K* that the issuer derives from c* (computed here with the issuer's
// private key), and the clone holds it; the genuine card does not. An
// injected Id gets a record the same way.
func TestCloneForgesASealedBatch(t *testing.T) {
	for _, p := range protocol.Profiles() {
		t.Run(p.Name, func(t *testing.T) {
			issuerKey := loadKey(t, testKeys[p.Transport][0])
			genuine := issuerKey.Public
			fp := genuine.Fingerprint()
			cards := cardtest.Cards(t, p, genuine.SPKI, 1, 2, 3)
			path := cardtest.BatchOf(t, p, fp[:], cards...)
			before := splitLines(t, path)
			m0, _, err := batch.ReadManifest(path)
			if err != nil {
				t.Fatal(err)
			}
			victim := cards[1]
			dir := t.TempDir()
			rng := newRecorder()
			res, err := insider.Clone(path, genuine, victim.Rec.ID, filepath.Join(dir, "clone.json"), insider.CloneOptions{Rand: rng})
			if err != nil {
				t.Fatal(err)
			}

			// The batch: line 2 replaced, lines 1 and 3 byte for byte, the
			// manifest resealed with only count, bytes and sha256 changed.
			m, recs, err := readBatch(path)
			if err != nil {
				t.Fatalf("forged batch does not verify against its resealed manifest: %v", err)
			}
			after := splitLines(t, path)
			want, _ := batch.MarshalRecord(res.Forged)
			if len(after) != 3 || after[0] != before[0] || after[2] != before[2] || after[1] != string(want) || after[1] == before[1] {
				t.Fatalf("forged batch lines:\n%q\nbefore:\n%q", after, before)
			}
			if res.Line != 2 || res.Upgraded || res.Original == nil || !bytes.Equal(res.Original.C, victim.Rec.C) {
				t.Fatalf("result: line %d, original %+v", res.Line, res.Original)
			}
			f := recs[1]
			if !bytes.Equal(f.ID, victim.Rec.ID) || !bytes.Equal(f.Fingerprint, fp[:]) || f.Profile != p.Name ||
				f.Reader != victim.Rec.Reader || !f.Time.Equal(victim.Rec.Time) || bytes.Equal(f.C, victim.Rec.C) {
				t.Fatalf("forged record %+v: want the genuine record's Id, key, profile, reader and time with another c", f)
			}
			if err := protocol.ValidCiphertext(p, genuine, f.C); err != nil {
				t.Fatalf("c* is not a ciphertext under the genuine key: %v", err)
			}
			m0.Count, m0.Bytes, m0.SHA256 = m.Count, m.Bytes, m.SHA256
			if !reflect.DeepEqual(m, m0) || !reflect.DeepEqual(res.Manifest, m) {
				t.Fatalf("manifest %+v: want the original with only count, bytes, sha256 changed: %+v", m, m0)
			}

			// The clone: the genuine card's Id, locked, no attestation key.
			st := cardStatus(t, res.Card)
			if !bytes.Equal(res.Card.ID(), victim.Rec.ID) || st.State != protocol.Locked || st.Attested {
				t.Fatalf("clone %x: status %+v; want the victim's Id %x, locked, no attestation key", res.Card.ID(), st, []byte(victim.Rec.ID))
			}

			// She knows K*: c* and K* from the bytes her RNG gave, without
			// the card.
			s, c, err := protocol.Encapsulate(p, genuine, bytes.NewReader(rng.got.Bytes()))
			if err != nil {
				t.Fatal(err)
			}
			kStar, _ := protocol.DeriveKey(p, s, protocol.Binding(p, genuine.SPKI))
			if !bytes.Equal(c, f.C) || !bytes.Equal(kStar, cardtest.KI(t, res.CardPath)) {
				t.Fatal("the insider's r* does not give c* and the clone's key")
			}
			// The issuer derives exactly K* from c*; not the genuine card's key.
			ki := issuerKeyOf(t, p, issuerKey, f.C)
			if !bytes.Equal(ki, kStar) {
				t.Fatal("the issuer's key from c* is not K*")
			}
			if bytes.Equal(ki, cardtest.KI(t, victim.A.Path())) {
				t.Fatal("the genuine card holds K*")
			}
			ch := make([]byte, protocol.ChallengeLen)
			rand.Read(ch)
			mac, _ := protocol.AuthMAC(ki, victim.Rec.ID, ch)
			if !bytes.Equal(cardtest.Authenticate(t, res.Card, ch), mac) || bytes.Equal(cardtest.Authenticate(t, victim.A, ch), mac) {
				t.Fatal("want the clone's MAC to be the issuer's, the genuine card's not")
			}

			// Injection: an Id no card carries, appended, stamped now.
			injected := []byte{0xEE, 0x01}
			stamp := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
			inj, err := insider.Clone(path, genuine, injected, filepath.Join(dir, "injected.json"),
				insider.CloneOptions{Inject: true, Now: func() time.Time { return stamp }})
			if err != nil {
				t.Fatal(err)
			}
			m, recs, err = readBatch(path)
			if err != nil || m.Count != 4 || inj.Line != 4 {
				t.Fatalf("after injection: count %d, line %d, %v", m.Count, inj.Line, err)
			}
			r := recs[3]
			if inj.Original != nil || !bytes.Equal(r.ID, injected) || r.Reader != victim.Rec.Reader || !r.Time.Equal(stamp) {
				t.Fatalf("injected record %+v", r)
			}
			if !bytes.Equal(issuerKeyOf(t, p, issuerKey, r.C), cardtest.KI(t, inj.CardPath)) {
				t.Fatal("the issuer's key for the injected Id is not the clone's")
			}
		})
	}
}

func cardStatus(t testing.TB, a *card.Applet) protocol.Status {
	t.Helper()
	cl := &card.Client{T: a.Local()}
	if err := cl.Select(); err != nil {
		t.Fatal(err)
	}
	st, err := cl.Status()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// Every refusal leaves the batch, its manifest and the clone's path as
// they were.
func TestCloneRefuses(t *testing.T) {
	p := protocol.ECDHP256AES
	genuine := loadKey(t, "p256.pem").Public
	fp := genuine.Fingerprint()
	cards := cardtest.Cards(t, p, genuine.SPKI, 1, 2)
	path := cardtest.BatchOf(t, p, fp[:], cards...)
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing.json")
	os.WriteFile(existing, []byte("mine"), 0o600)
	b0, _ := os.ReadFile(path)
	m0, _ := os.ReadFile(batch.ManifestPath(path))
	id := cards[0].Rec.ID

	for _, tc := range []struct {
		name, want string
		key        *protocol.IssuerKey
		id         []byte
		card       string
		o          insider.CloneOptions
	}{
		{"unknown Id without inject", "is not in the batch (--inject", genuine, []byte{0xEE}, "", insider.CloneOptions{}},
		{"known Id with inject", "is in the batch", genuine, id, "", insider.CloneOptions{Inject: true}},
		{"inject and keep attestation", "an injected record has none", genuine, []byte{0xEE}, "", insider.CloneOptions{Inject: true, KeepAttestation: true}},
		{"other issuer key", "not the given issuer key", loadKey(t, "p256-attacker.pem").Public, id, "", insider.CloneOptions{}},
		{"RSA key for an ECDH batch", "not the given issuer key", loadKey(t, "rsa2048.pem").Public, id, "", insider.CloneOptions{}},
		{"Id too long", "card id of 17 bytes", genuine, make([]byte, 17), "", insider.CloneOptions{}},
		{"clone path exists", "already exists", genuine, id, existing, insider.CloneOptions{}},
		{"clone directory missing", "clone", genuine, id, filepath.Join(dir, "no", "clone.json"), insider.CloneOptions{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := tc.card
			if out == "" {
				out = filepath.Join(dir, "clone.json")
			}
			_, err := insider.Clone(path, tc.key, tc.id, out, tc.o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v; want one containing %q", err, tc.want)
			}
			b, _ := os.ReadFile(path)
			m, _ := os.ReadFile(batch.ManifestPath(path))
			if !bytes.Equal(b, b0) || !bytes.Equal(m, m0) {
				t.Fatal("a refused forgery changed the batch or its manifest")
			}
			if out == existing {
				if got, _ := os.ReadFile(existing); string(got) != "mine" {
					t.Fatal("the existing file was overwritten")
				}
			} else if _, err := os.Stat(out); err == nil {
				t.Fatal("a refused forgery left a clone")
			}
		})
	}

	// A batch that no longer matches its manifest is not forged.
	os.WriteFile(path, append(b0, b0[:len(b0)/2]...), 0o644)
	if _, err := insider.Clone(path, genuine, id, filepath.Join(dir, "clone.json"), insider.CloneOptions{}); err == nil ||
		!strings.Contains(err.Error(), "does not verify against its manifest") {
		t.Fatalf("mismatched batch: %v", err)
	}
	// Replace refuses a record for another key or profile.
	rec := cards[0].Rec
	rec.Profile = protocol.ECDHP256X963.Name
	os.WriteFile(path, b0, 0o644)
	if _, err := insider.Replace(path, rec, false); err == nil || !strings.Contains(err.Error(), "profile") {
		t.Fatalf("record of another profile: %v", err)
	}
	b, _ := os.ReadFile(path)
	if !bytes.Equal(b, b0) {
		t.Fatal("a refused replacement changed the batch")
	}
}

// THE ATTACK WORKS WITHOUT THE DEFENCE. On the real stack — a fresh
// SoftHSM2 token, the issuer's importer, a SQLite store, the
// Authenticator with the issuer verifying MACs in its token — and with
// no chip attestation checked (Importer.Attest nil: policy off;
// PROTOCOL.md §10 is what closes this): the
// batch the insider forged imports with no reject; her clone of a genuine
// card authenticates, again and again, while the genuine card fails; an
// injected Id no card carries authenticates; the cards she left alone
// authenticate as before.
func TestCloneWithoutAttestation(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		p    protocol.Profile
		kind string
	}{{protocol.RSAOAEPAES, hsm.KindRSA2048}, {protocol.ECDHP256AES, hsm.KindP256}} {
		t.Run(tc.p.Name, func(t *testing.T) {
			is := issuertest.New(t, tc.kind, 2)
			genuine := is.Key.Public
			fp := genuine.Fingerprint()
			cards := cardtest.Cards(t, tc.p, genuine.SPKI, 1, 2, 3)
			path := cardtest.BatchOf(t, tc.p, fp[:], cards...)
			victim := cards[1]
			dir := t.TempDir()
			clone, err := insider.Clone(path, genuine, victim.Rec.ID, filepath.Join(dir, "clone.json"), insider.CloneOptions{})
			if err != nil {
				t.Fatal(err)
			}
			injectedID := []byte{0xEE, 0x01}
			injected, err := insider.Clone(path, genuine, injectedID, filepath.Join(dir, "injected.json"), insider.CloneOptions{Inject: true})
			if err != nil {
				t.Fatal(err)
			}

			st, err := issuer.OpenSQLite(ctx, filepath.Join(dir, "data"))
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			rep, err := (&issuer.Importer{Issuer: is, Store: st, Workers: 2}).ImportFile(ctx, path)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Status != "done" || rep.Imported != 4 || rep.Rejects != 0 {
				t.Fatalf("import report %+v: want done, 4 imported, no reject", rep)
			}

			auth := &issuer.Authenticator{Verifier: is, Store: st, MaxFailures: 3}
			try := func(a *card.Applet) issuer.AuthResult {
				t.Helper()
				ch, err := auth.Challenge(ctx, a.ID())
				if err != nil {
					t.Fatalf("challenge for %x: %v", a.ID(), err)
				}
				res, err := auth.Verify(ctx, a.ID(), ch.Challenge, cardtest.Authenticate(t, a, ch.Challenge))
				if err != nil {
					t.Fatalf("verify %x: %v", a.ID(), err)
				}
				return res
			}
			for i := range 3 {
				if r := try(clone.Card); !r.OK || r.Result != issuer.AuthOK {
					t.Fatalf("clone of %x, try %d: %+v; want ok (the attack works)", clone.Card.ID(), i+1, r)
				}
			}
			if r := try(victim.A); r.OK || r.Result != issuer.AuthFailed || r.State != issuer.StateActive {
				t.Fatalf("genuine card %x: %+v; want failed (its record was replaced), still active", victim.A.ID(), r)
			}
			if r := try(clone.Card); !r.OK || r.FailedAuth != 0 {
				t.Fatalf("clone after the genuine card's failure: %+v; want ok, failures reset", r)
			}
			if r := try(injected.Card); !r.OK {
				t.Fatalf("injected Id %x: %+v; want ok (the attack works)", injectedID, r)
			}
			for _, c := range []cardtest.Card{cards[0], cards[2]} {
				if r := try(c.A); !r.OK {
					t.Fatalf("untouched genuine card %x: %+v; want ok", c.A.ID(), r)
				}
			}
			for _, id := range [][]byte{victim.Rec.ID, injectedID} {
				sc, err := st.Card(ctx, id)
				if err != nil || sc.State != issuer.StateActive {
					t.Fatalf("card %x in the store: %+v, %v; want active", id, sc, err)
				}
				if c := injected.Forged.C; bytes.Equal(id, injectedID) && !bytes.Equal(sc.CSHA256, sha(c)) {
					t.Fatalf("injected card: the store holds another c")
				}
				if bytes.Equal(id, victim.Rec.ID) && !bytes.Equal(sc.CSHA256, sha(clone.Forged.C)) {
					t.Fatalf("victim: the store holds the genuine c, not c*")
				}
			}
		})
	}
}

func sha(b []byte) []byte { s := sha256.Sum256(b); return s[:] }

// With a version-2 batch of attested cards (a test chip vendor's CA,
// chipca): --keep-attestation copies the genuine record's attestation
// into the forged one unchanged — its signature verifies over A with
// SHA-256 of the genuine c and not with c*'s, the mismatch PROTOCOL.md
// §10.4 check 5 catches — and by default the forged record is
// unattested. The clone itself has no attestation key.
func TestCloneKeepAttestation(t *testing.T) {
	p := protocol.ECDHP256AES
	genuine := loadKey(t, "p256.pem").Public
	fp := genuine.Fingerprint()
	ca, err := chipca.New("")
	if err != nil {
		t.Fatal(err)
	}
	cards := cardtest.AttestedCards(t, ca, p, genuine.SPKI, 1, 2)
	for _, c := range cards {
		if c.Rec.Attestation == nil {
			t.Fatalf("card %x: no attestation in its record", []byte(c.Rec.ID))
		}
	}
	for _, keep := range []bool{true, false} {
		path := cardtest.BatchOf(t, p, fp[:], cards...)
		if _, _, err := readBatch(path); err != nil {
			t.Fatalf("the attested batch does not verify before the attack: %v", err)
		}
		victim := cards[1]
		res, err := insider.Clone(path, genuine, victim.Rec.ID, filepath.Join(t.TempDir(), "clone.json"),
			insider.CloneOptions{KeepAttestation: keep})
		if err != nil {
			t.Fatal(err)
		}
		if cardStatus(t, res.Card).Attested {
			t.Fatal("the clone has an attestation key")
		}
		_, recs, err := readBatch(path)
		if err != nil {
			t.Fatal(err)
		}
		f := recs[1]
		if keep {
			if res.Attestation != insider.AttestationKept || !reflect.DeepEqual(f.Attestation, victim.Rec.Attestation) {
				t.Fatalf("kept attestation %+v; want the genuine record's %+v", f.Attestation, victim.Rec.Attestation)
			}
			if !signs(t, f, sha(victim.Rec.C)) || signs(t, f, sha(f.C)) || bytes.Equal(f.Attestation.CSHA256, sha(f.C)) {
				t.Fatal("want the kept attestation to sign the genuine c, not c*")
			}
		} else if res.Attestation != insider.AttestationDropped || f.Attestation != nil {
			t.Fatalf("default: attestation %q, %+v; want dropped", res.Attestation, f.Attestation)
		}
		if !reflect.DeepEqual(recs[0].Attestation, cards[0].Rec.Attestation) {
			t.Fatal("the untouched record's attestation changed")
		}
	}
}

// signs reports whether rec's attestation signature verifies under its
// card certificate's key over A for rec's Id, profile and fingerprint and
// the SHA-256(c) given.
func signs(t testing.TB, rec batch.Record, cSHA256 []byte) bool {
	t.Helper()
	cert, err := x509.ParseCertificate(rec.Attestation.Chain[0])
	if err != nil {
		t.Fatal(err)
	}
	a, err := protocol.AttestMessage(rec.ID, rec.Profile, rec.Attestation.Fingerprint, cSHA256)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(a)
	return ecdsa.VerifyASN1(cert.PublicKey.(*ecdsa.PublicKey), h[:], rec.Attestation.Sig)
}

// A version-1 batch (written before attestation): batch.MarshalRecord
// writes version 2 only, so the forged batch is the same records in
// version 2 under a version-2 manifest, and it verifies.
func TestCloneUpgradesVersion1(t *testing.T) {
	p := protocol.ECDHP256AES
	issuerKey := loadKey(t, "p256.pem")
	genuine := issuerKey.Public
	fp := genuine.Fingerprint()
	cards := cardtest.Cards(t, p, genuine.SPKI, 1, 2, 3)
	path := filepath.Join(t.TempDir(), "v1.ndjson")
	var content strings.Builder
	for _, c := range cards {
		r := c.Rec
		r.V = batch.Version1
		content.WriteString(cardtest.Line(t, r))
	}
	os.WriteFile(path, []byte(content.String()), 0o644)
	s, _ := batch.Summarize(strings.NewReader(content.String()))
	mb, err := batch.MarshalManifest(batch.Manifest{Format: batch.Format1, Batch: filepath.Base(path), Count: s.Lines,
		Bytes: s.Bytes, SHA256: s.SHA256, Profile: p.Name, IssuerFingerprint: fp[:], Station: "old", Written: time.Unix(0, 0)})
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(batch.ManifestPath(path), mb, 0o644)
	if m, _, err := readBatch(path); err != nil || m.Version() != batch.Version1 {
		t.Fatalf("the version-1 batch: %+v, %v", m, err)
	}
	res, err := insider.Clone(path, genuine, cards[0].Rec.ID, filepath.Join(t.TempDir(), "clone.json"), insider.CloneOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m, recs, err := readBatch(path)
	if err != nil || !res.Upgraded || m.Format != batch.Format2 || m.Station != "old" || len(recs) != 3 {
		t.Fatalf("forged batch: upgraded %v, %+v, %d records, %v", res.Upgraded, m, len(recs), err)
	}
	for i, r := range recs {
		c := cards[i].Rec.C
		if i == 0 {
			c = res.Forged.C
		}
		if r.V != batch.Version2 || !bytes.Equal(r.ID, cards[i].Rec.ID) || !bytes.Equal(r.C, c) || !r.Time.Equal(cards[i].Rec.Time) {
			t.Fatalf("line %d: %+v", i+1, r)
		}
	}
	if !bytes.Equal(issuerKeyOf(t, p, issuerKey, recs[0].C), cardtest.KI(t, res.CardPath)) {
		t.Fatal("the issuer's key is not the clone's")
	}
}
