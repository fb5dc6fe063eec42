package issuer

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"sync/atomic"
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
	if os.Getenv(authChildEnv) != "" {
		os.Exit(authChild())
	}
	if os.Getenv(exportChildEnv) != "" {
		os.Exit(exportChild())
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

// Token kinds for newIssuerOn.
const (
	tokSoftHSM2 = "softhsm2"
	tokNSS      = "nss"
)

var nssIssuers atomic.Int32

// newIssuerOn is newIssuer on a token of the given kind: tokSoftHSM2 (a
// new SoftHSM2 token, as newIssuer) or tokNSS (the process's NSS softokn
// database, where the profiles SoftHSM2 cannot run in-token run: the
// kbkdf ones). NSS keeps one database per process, so labels differ per
// call.
func newIssuerOn(t *testing.T, token, kind string) *Issuer {
	t.Helper()
	if token == tokSoftHSM2 {
		return newIssuer(t, kind)
	}
	tt := hsmtest.NSS(t)
	tok, err := hsm.OpenURI(tt.URI, 2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tok.Close() })
	ctx := context.Background()
	prefix := fmt.Sprintf("issuer-test%d-", nssIssuers.Add(1))
	key, err := tok.GenerateIssuerKey(ctx, kind, prefix+"issuer")
	if err != nil {
		t.Fatal(err)
	}
	kek, err := tok.GenerateKEK(ctx, prefix+"kek", tt.SOPIN)
	if err != nil {
		t.Fatal(err)
	}
	return &Issuer{Token: tok, Key: key, KEK: kek}
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
// runs, and on NSS softokn for the kbkdf profiles (SP800_108_COUNTER_KDF,
// which SoftHSM2 lacks): every genuine card authenticates in the token.
func TestImportAndAuthenticate(t *testing.T) {
	// Recycle the token every other operation: imports and
	// verifications go on across it (the session copies are made again).
	for _, tc := range []struct {
		profile protocol.Profile
		kind    string
		token   string
	}{
		{protocol.RSAOAEPAES, hsm.KindRSA2048, tokSoftHSM2},
		{protocol.ECDHP256AES, hsm.KindP256, tokSoftHSM2},
		{protocol.RSAOAEPKBKDF, hsm.KindRSA2048, tokNSS},
		{protocol.ECDHP256KBKDF, hsm.KindP256, tokNSS},
	} {
		t.Run(tc.profile.Name, func(t *testing.T) {
			ctx := context.Background()
			is := newIssuerOn(t, tc.token, tc.kind)
			is.RecycleEvery = 2
			for i := range 3 {
				rec, a := personalize(t, tc.profile, is.Key.Public.SPKI, byte(i))
				ck, err := is.Import(ctx, rec)
				if err != nil {
					t.Fatal(err)
				}
				if len(ck.Blob.Wrapped) != 24 || ck.Blob.KEK != is.KEK.Label {
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

// A card that an insider personalized under her own key (paper Fig. 2),
// whose S she then re-encrypted to the issuer, never authenticates: per
// RSA-OAEP profile, on a token that runs it.
func TestSubstitutedKeyIsCaught(t *testing.T) {
	for _, tc := range []struct {
		profile protocol.Profile
		token   string
	}{
		{protocol.RSAOAEPAES, tokSoftHSM2},
		{protocol.RSAOAEPKBKDF, tokNSS},
	} {
		t.Run(tc.profile.Name, func(t *testing.T) {
			ctx := context.Background()
			is := newIssuerOn(t, tc.token, hsm.KindRSA2048)
			attacker := readKey(t, "../testdata/keys/rsa2048-attacker.pem")
			attackerSPKI, _ := x509.MarshalPKIXPublicKey(&attacker.PublicKey)
			rec, a := personalize(t, tc.profile, attackerSPKI, 9)
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
		})
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
