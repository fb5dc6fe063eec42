package issuer

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"encoding/pem"
	"os"
	"testing"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/card/cardtest"
	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/internal/pgtest"
	"blindperso/protocol"
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(importChild())
	}
	code := m.Run()
	pgtest.Stop()
	hsmtest.Cleanup()
	os.Exit(code)
}

// newIssuer makes a SoftHSM2 token with an issuer key of kind and a
// trusted KEK, as the key ceremony does.
func newIssuer(t *testing.T, kind string) *Issuer {
	t.Helper()
	is, _ := newIssuerToken(t, kind)
	return is
}

// newIssuerToken is newIssuer that also returns the token's URI.
func newIssuerToken(t *testing.T, kind string) (*Issuer, string) {
	t.Helper()
	tt := hsmtest.SoftHSM(t)
	tok, err := hsm.OpenURI(tt.URI, 2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tok.Close() })
	ctx := context.Background()
	key, err := tok.GenerateIssuerKey(ctx, kind, "issuer")
	if err != nil {
		t.Fatal(err)
	}
	kek, err := tok.GenerateKEK(ctx, "kek", tt.SOPIN)
	if err != nil {
		t.Fatal(err)
	}
	return &Issuer{Token: tok, Key: key, KEK: kek}, tt.URI
}

// personalize runs a virtual card through the station's one-card flow
// under spki and returns its record and the card.
func personalize(t *testing.T, p protocol.Profile, spki []byte, id byte) (batch.Record, *card.Applet) {
	c := cardtest.Cards(t, p, spki, id)[0]
	return c.Rec, c.A
}

func authenticate(t *testing.T, a *card.Applet, challenge []byte) []byte {
	return cardtest.Authenticate(t, a, challenge)
}

// The main job in process on a fresh SoftHSM2 token, for both profiles it
// runs: every genuine card authenticates in the token; a card that an
// insider personalized under her own key (paper Fig. 2), whose S she then
// re-encrypted to the issuer, never does.
func TestImportAndAuthenticate(t *testing.T) {
	// Recycle the token every other operation: imports and
	// verifications go on across it (the session copies are made again).
	for _, tc := range []struct {
		profile protocol.Profile
		kind    string
	}{
		{protocol.RSAOAEPAES, hsm.KindRSA2048},
		{protocol.ECDHP256AES, hsm.KindP256},
	} {
		t.Run(tc.profile.Name, func(t *testing.T) {
			ctx := context.Background()
			is := newIssuer(t, tc.kind)
			is.RecycleEvery = 2
			for i := range 3 {
				rec, a := personalize(t, tc.profile, is.Key.Public.SPKI, byte(i))
				ck, err := is.Import(ctx, rec)
				if err != nil {
					t.Fatal(err)
				}
				if len(ck.Blob.Wrapped) != 24 || ck.Blob.KEK != "kek" {
					t.Fatalf("blob %+v", ck.Blob)
				}
				challenge := make([]byte, 16)
				rand.Read(challenge)
				ok, err := is.Verify(ctx, ck, challenge, authenticate(t, a, challenge))
				if err != nil || !ok {
					t.Fatalf("genuine card %x: verify = %v, %v", []byte(rec.ID), ok, err)
				}
				other := make([]byte, 16)
				if ok, _ := is.Verify(ctx, ck, other, authenticate(t, a, challenge)); ok {
					t.Fatal("a MAC over another challenge verified")
				}
			}
		})
	}
}

func TestSubstitutedKeyIsCaught(t *testing.T) {
	ctx := context.Background()
	is := newIssuer(t, hsm.KindRSA2048)
	attacker := readKey(t, "../testdata/keys/rsa2048-attacker.pem")
	attackerSPKI, _ := x509.MarshalPKIXPublicKey(&attacker.PublicKey)
	rec, a := personalize(t, protocol.RSAOAEPAES, attackerSPKI, 9)
	// The insider opens c with her key and re-encrypts S to the issuer.
	s, err := rsa.DecryptOAEP(sha1.New(), nil, attacker, rec.C, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rec.C, err = rsa.EncryptOAEP(sha1.New(), rand.Reader, is.Key.Public.RSA, s, nil); err != nil {
		t.Fatal(err)
	}
	fp := is.Key.Fingerprint()
	rec.Fingerprint = fp[:] // and claims the genuine key in the batch
	ck, err := is.Import(ctx, rec)
	if err != nil {
		t.Fatal(err)
	}
	challenge := make([]byte, 16)
	rand.Read(challenge)
	if ok, err := is.Verify(ctx, ck, challenge, authenticate(t, a, challenge)); err != nil || ok {
		t.Fatalf("substituted-key card: verify = %v, %v; want false", ok, err)
	}
}

func TestImportRefusesOtherKeys(t *testing.T) {
	ctx := context.Background()
	is := newIssuer(t, hsm.KindP256)
	rec, _ := personalize(t, protocol.ECDHP256AES, is.Key.Public.SPKI, 1)
	bad := rec
	bad.Fingerprint = make([]byte, 32)
	if _, err := is.Import(ctx, bad); err == nil {
		t.Error("record for another issuer key imported")
	}
	bad = rec
	bad.Profile = "rsa-raw-md5"
	if _, err := is.Import(ctx, bad); err == nil {
		t.Error("record with an unknown profile imported")
	}
	bad = rec
	bad.C = rec.C[:64]
	if _, err := is.Import(ctx, bad); err == nil {
		t.Error("short c imported")
	}
}

func readKey(t *testing.T, path string) *rsa.PrivateKey {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return k.(*rsa.PrivateKey)
}
