package issuer

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"
	"time"

	"blindperso/attest"
	"blindperso/batch"
	"blindperso/card"
	"blindperso/card/cardtest"
	"blindperso/chipca"
	"blindperso/hsm"
	"blindperso/protocol"
)

func newChipCA(t *testing.T, vendor string) *chipca.CA {
	t.Helper()
	ca, err := chipca.New(vendor)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func checker(t *testing.T, is *Issuer, p attest.Policy, cas ...*chipca.CA) *attest.Checker {
	t.Helper()
	var b []byte
	for _, ca := range cas {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Root.Raw})...)
	}
	ck := &attest.Checker{Policy: p, Issuer: is.Key.Fingerprint()}
	if len(b) > 0 {
		r, err := attest.ParseRoots(b)
		if err != nil {
			t.Fatal(err)
		}
		ck.Roots = r
	}
	return ck
}

// attestedCard is one attested card personalized under spki, with the
// card certificate's options o.
func attestedCard(t *testing.T, ca *chipca.CA, p protocol.Profile, spki []byte, id byte, o chipca.CertOptions) vcard {
	t.Helper()
	cid := []byte{0xB1, id}
	cc, err := ca.NewCard(cid, o)
	if err != nil {
		t.Fatal(err)
	}
	at := card.Attestation(cc)
	a, err := card.Manufacture(t.TempDir()+"/card.json", card.Options{ID: cid, Attestation: &at})
	if err != nil {
		t.Fatal(err)
	}
	key, err := protocol.ParseIssuerKey(spki)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := cardtest.Personalize(a, p, key, "test")
	if err != nil {
		t.Fatal(err)
	}
	if rec.Attestation == nil {
		t.Fatal("an attested card's record has no attestation")
	}
	return vcard{rec, a}
}

// Under the required policy the importer refuses, before any token
// work, every record whose attestation fails a check of PROTOCOL.md
// §10.4 — each with its own reason — while the genuine records beside
// them land, attested, and authenticate.
func TestAttestationAtImport(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	spki := is.Key.Public.SPKI
	vendor, other := newChipCA(t, "chip vendor"), newChipCA(t, "another vendor")
	// The insider's own key (Fig. 2), in software.
	ak, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	attackerSPKI, err := x509.MarshalPKIXPublicKey(&ak.PublicKey)
	if err != nil {
		t.Fatal(err)
	}

	genuine := []vcard{attestedCard(t, vendor, p, spki, 1, chipca.CertOptions{}), attestedCard(t, vendor, p, spki, 2, chipca.CertOptions{})}
	type bad struct {
		name, reason string
		rec          batch.Record
	}
	var bads []bad
	add := func(name, reason string, rec batch.Record) { bads = append(bads, bad{name, reason, rec}) }

	// Record replacement: the insider's emulated card (no attestation key)
	// personalized under the genuine key with an r* she knows; its c*
	// replaces a genuine card's c.
	victim := attestedCard(t, vendor, p, spki, 3, chipca.CertOptions{})
	clone := makeCards(t, is, p, 3)[0]
	replaced := victim.rec
	replaced.C = clone.rec.C
	add("record replaced", "the record was replaced", replaced)
	dropped := replaced
	dropped.Attestation = nil
	add("record replaced, attestation dropped", "requires one", dropped)
	// Injection: an Id no genuine card carries.
	injected := makeCards(t, is, p, 9)[0].rec
	add("injected Id", "requires one", injected)
	// Fig. 2: the card was personalized under the insider's key, the
	// record forged for the genuine one.
	sub := attestedCard(t, vendor, p, attackerSPKI, 4, chipca.CertOptions{}).rec
	fp := is.Key.Fingerprint()
	sub.Fingerprint = fp[:]
	add("PK substitution", "personalized under another issuer key", sub)
	// A certificate for another Id.
	wrongID := attestedCard(t, vendor, p, spki, 5, chipca.CertOptions{}).rec
	wrongID.Attestation = attestedCard(t, vendor, p, spki, 6, chipca.CertOptions{}).rec.Attestation
	add("certificate for another Id", "for card b106, not this record's b105", wrongID)
	// A signature over another c.
	overOther := attestedCard(t, vendor, p, spki, 7, chipca.CertOptions{}).rec
	h := sha256.Sum256([]byte("another c"))
	overOther.Attestation.CSHA256 = h[:]
	add("signature over another c", "signature does not verify", overOther)
	add("untrusted root", "untrusted root", attestedCard(t, other, p, spki, 8, chipca.CertOptions{}).rec)
	past := chipca.CertOptions{NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-24 * time.Hour)}
	add("expired certificate", "expired", attestedCard(t, vendor, p, spki, 10, past).rec)
	truncated := attestedCard(t, vendor, p, spki, 11, chipca.CertOptions{}).rec
	truncated.Attestation.Chain = truncated.Attestation.Chain[:1]
	add("truncated chain", "truncated", truncated)

	var lines strings.Builder
	lines.WriteString(recordLine(t, genuine[0].rec))
	for _, b := range bads {
		lines.WriteString(recordLine(t, b.rec))
	}
	lines.WriteString(recordLine(t, genuine[1].rec))
	path := writeBatch(t, is, p, lines.String())

	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			db, _ := k.open(t)
			s := openStore(t, db)
			var tokenCalls int
			im := &Importer{Issuer: is, Store: s, Workers: 2, Attest: checker(t, is, attest.Required, vendor),
				TokenTime: func(time.Duration) { tokenCalls++ }}
			ctx := context.Background()
			rep, err := im.ImportFile(ctx, path)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Imported != 2 || rep.Rejects != len(bads) || rep.Unattested != 0 || tokenCalls != 2 {
				t.Fatalf("report %+v, %d token calls; want 2 imported (attested), %d rejects, the token asked only for the genuine cards", rep, tokenCalls, len(bads))
			}
			rj, err := s.Rejects(ctx, rep.ID)
			if err != nil {
				t.Fatal(err)
			}
			for i, b := range bads {
				if rj[i].Line != i+2 || !strings.HasPrefix(rj[i].Reason, "attestation: ") || !strings.Contains(rj[i].Reason, b.reason) {
					t.Errorf("%s: reject %+v, want line %d with %q", b.name, rj[i], i+2, b.reason)
				}
			}
			for _, g := range genuine {
				c, err := s.Card(ctx, g.rec.ID)
				if err != nil || !c.Attested {
					t.Fatalf("genuine card %x: %+v, %v; want attested", []byte(g.rec.ID), c, err)
				}
				ch := make([]byte, protocol.ChallengeLen)
				if ok, err := is.Verify(ctx, c.CardKey, ch, authenticate(t, g.a, ch)); err != nil || !ok {
					t.Errorf("genuine card %x does not authenticate: %v", []byte(g.rec.ID), err)
				}
			}
			if _, err := s.Card(ctx, victim.rec.ID); err == nil {
				t.Error("the replaced record's card is stored")
			}
		})
	}
}

// The policies decide what happens to a record without an attestation:
// optional imports it marked unattested (and still refuses a forged
// attestation), off checks nothing — there the emulated clone of a
// replaced record is imported, and authenticates: the attack the
// required policy stops.
func TestAttestationPolicies(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	vendor := newChipCA(t, "chip vendor")
	att := attestedCard(t, vendor, p, is.Key.Public.SPKI, 1, chipca.CertOptions{})
	plain := makeCards(t, is, p, 2)[0]
	victim := attestedCard(t, vendor, p, is.Key.Public.SPKI, 3, chipca.CertOptions{})
	clone := makeCards(t, is, p, 3)[0]
	replaced := victim.rec
	replaced.C = clone.rec.C
	path := writeBatch(t, is, p, recordLine(t, att.rec)+recordLine(t, plain.rec)+recordLine(t, replaced))
	ctx := context.Background()
	for _, tc := range []struct {
		policy              attest.Policy
		imported, rejects   int
		unattested          int
		attested, cloneLive bool
	}{
		{attest.Optional, 2, 1, 1, true, false},
		{attest.Off, 3, 0, 3, false, true},
	} {
		t.Run(string(tc.policy), func(t *testing.T) {
			s := openStore(t, t.TempDir()+"/data")
			im := &Importer{Issuer: is, Store: s, Workers: 1, Attest: checker(t, is, tc.policy, vendor)}
			rep, err := im.ImportFile(ctx, path)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Imported != tc.imported || rep.Rejects != tc.rejects || rep.Unattested != tc.unattested {
				t.Fatalf("report %+v", rep)
			}
			c, _ := s.Card(ctx, att.rec.ID)
			u, _ := s.Card(ctx, plain.rec.ID)
			if c.Attested != tc.attested || u.Attested {
				t.Errorf("attested card %v, unattested card %v", c.Attested, u.Attested)
			}
			k, err := s.Card(ctx, victim.rec.ID)
			live := false
			if err == nil {
				ch := make([]byte, protocol.ChallengeLen)
				live, _ = is.Verify(ctx, k.CardKey, ch, authenticate(t, clone.a, ch))
			}
			if live != tc.cloneLive {
				t.Errorf("the emulated clone authenticates: %v, want %v", live, tc.cloneLive)
			}
		})
	}
}
