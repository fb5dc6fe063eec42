package issuer

// The paper's threat model (§§3.1, 4.3, 4.5) as tests; docs/THREAT-MODEL.md
// maps each threat to the test that checks it.

import (
	"bytes"
	"context"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"math/big"
	"path/filepath"
	"strings"
	"testing"

	"blindperso/hsm"
	"blindperso/protocol"
)

// firstApproachCard is the paper's §3.1 "first approach" (Fig. 1), for
// this test only: the card draws S, keeps K_I = S[0:16] with no binding to
// the issuer key it was given, and outputs c = RSA-OAEP(PK, S) as the
// rsa-oaep profiles do. It is deliberately not a mode of the applet.
type firstApproachCard struct {
	id []byte
	ki []byte
}

func newFirstApproachCard(t *testing.T, id []byte, pk *rsa.PublicKey) (*firstApproachCard, []byte) {
	t.Helper()
	s := make([]byte, protocol.OAEPSecretLen)
	rand.Read(s)
	c, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, pk, s, nil)
	if err != nil {
		t.Fatal(err)
	}
	return &firstApproachCard{id: id, ki: s[:protocol.KeySize]}, c
}

func (c *firstApproachCard) mac(t *testing.T, challenge []byte) []byte {
	t.Helper()
	m, err := protocol.AuthMAC(c.ki, c.id, challenge)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// Fig. 2 against both protocols. Without the binding (§3.1) the insider who
// substitutes her key learns K_I and the issuer ends up with the very same
// key: the attack succeeds silently, the insider can answer for the card.
// With blindperso's binding B the issuer's key (derived in the token)
// differs from the card's, so the substituted card never authenticates:
// the binding is what defends.
func TestFirstApproachFallsToSubstitution(t *testing.T) {
	ctx := context.Background()
	attacker := readKey(t, "../testdata/keys/rsa2048-attacker.pem")
	attackerSPKI, _ := x509.MarshalPKIXPublicKey(&attacker.PublicKey)
	challenge := make([]byte, protocol.ChallengeLen)
	rand.Read(challenge)

	t.Run("first-approach", func(t *testing.T) {
		// The first approach has no in-token derivation to reuse, so its
		// issuer decrypts in software with a software key pair.
		issuerKey := readKey(t, "../testdata/keys/rsa2048.pem")
		card, c := newFirstApproachCard(t, []byte{0xFA, 1}, &attacker.PublicKey)
		// The insider opens c under her key and learns K_I ...
		s, err := rsa.DecryptOAEP(sha1.New(), nil, attacker, c, nil)
		if err != nil {
			t.Fatal(err)
		}
		stolen := s[:protocol.KeySize]
		if !bytes.Equal(stolen, card.ki) {
			t.Fatal("the insider did not learn the card's K_I")
		}
		// ... and forwards S re-encrypted under the genuine PK.
		c2, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, &issuerKey.PublicKey, s, nil)
		if err != nil {
			t.Fatal(err)
		}
		got, err := rsa.DecryptOAEP(sha1.New(), nil, issuerKey, c2, nil)
		if err != nil {
			t.Fatal(err)
		}
		issuerKI := got[:protocol.KeySize]
		if !bytes.Equal(issuerKI, card.ki) {
			t.Fatal("first approach: the issuer's key differs from the card's; want the attack to succeed")
		}
		// The card works at the issuer, and so does the insider's clone.
		want, _ := protocol.AuthMAC(issuerKI, card.id, challenge)
		clone, _ := protocol.AuthMAC(stolen, card.id, challenge)
		if !bytes.Equal(card.mac(t, challenge), want) || !bytes.Equal(clone, want) {
			t.Fatal("first approach: card or clone does not authenticate")
		}
	})

	t.Run("blindperso", func(t *testing.T) {
		p := protocol.RSAOAEPAES
		is := newIssuer(t, hsm.KindRSA2048)
		rec, a := personalize(t, p, attackerSPKI, 0xFB)
		s, err := rsa.DecryptOAEP(sha1.New(), nil, attacker, rec.C, nil)
		if err != nil {
			t.Fatal(err)
		}
		// The insider does learn the card's key: her MAC equals the card's.
		stolen, err := protocol.DeriveKey(p, s, protocol.Binding(p, attackerSPKI))
		if err != nil {
			t.Fatal(err)
		}
		cardMAC := authenticate(t, a, challenge)
		if clone, _ := protocol.AuthMAC(stolen, rec.ID, challenge); !bytes.Equal(clone, cardMAC) {
			t.Fatal("the insider did not learn the card's K_I")
		}
		// The issuer's key for the same S is bound to the genuine PK.
		honest, _ := protocol.DeriveKey(p, s, protocol.Binding(p, is.Key.Public.SPKI))
		if bytes.Equal(honest, stolen) {
			t.Fatal("binding did not separate the keys")
		}
		// In the token: the re-encrypted S imports, but the card's (and the
		// clone's) MAC never verifies.
		if rec.C, err = rsa.EncryptOAEP(sha1.New(), rand.Reader, is.Key.Public.RSA, s, nil); err != nil {
			t.Fatal(err)
		}
		fp := is.Key.Fingerprint()
		rec.Fingerprint = fp[:]
		ck, err := is.Import(ctx, rec)
		if err != nil {
			t.Fatal(err)
		}
		if ok, err := is.Verify(ctx, ck, challenge, cardMAC); err != nil || ok {
			t.Fatalf("substituted card under binding: verify = %v, %v; want false", ok, err)
		}
	})
}

// A record whose c was altered (one byte flipped, same length) is refused
// at import, or imports a key under which the genuine card never
// authenticates: never a silently wrong key that works. (For ECDH the one
// same-length change that stays on the curve, negating the point, yields
// the card's true key, since Z is the x coordinate: checked too.)
func TestTamperedCNeverYieldsAWorkingWrongKey(t *testing.T) {
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
			rec, a := personalize(t, tc.profile, is.Key.Public.SPKI, 0x7C)
			n := len(rec.C)
			for _, pos := range []int{0, 1, n / 2, n - 1} {
				bad := rec
				bad.C = bytes.Clone(rec.C)
				bad.C[pos] ^= 0x01
				ck, err := is.Import(ctx, bad)
				if err != nil {
					t.Logf("byte %d flipped: refused at import: %v", pos, err)
					continue
				}
				challenge := make([]byte, protocol.ChallengeLen)
				rand.Read(challenge)
				ok, err := is.Verify(ctx, ck, challenge, authenticate(t, a, challenge))
				if err != nil || ok {
					t.Fatalf("byte %d flipped: imported, and the genuine card's MAC verify = %v, %v; want false", pos, ok, err)
				}
				t.Logf("byte %d flipped: imported, caught at authentication", pos)
			}
			if tc.profile.Transport == protocol.ECDHP256 {
				// The one same-length change that stays on the curve
				// without knowing a secret: negate the point. Z (the x
				// coordinate of the shared point) is unchanged, so the
				// token derives the card's true key: not a wrong key.
				bad := rec
				bad.C = bytes.Clone(rec.C)
				y := new(big.Int).SetBytes(bad.C[33:])
				y.Sub(elliptic.P256().Params().P, y).FillBytes(bad.C[33:])
				ck, err := is.Import(ctx, bad)
				if err != nil {
					t.Fatalf("negated point refused: %v", err)
				}
				challenge := make([]byte, protocol.ChallengeLen)
				rand.Read(challenge)
				if ok, err := is.Verify(ctx, ck, challenge, authenticate(t, a, challenge)); err != nil || !ok {
					t.Fatalf("negated point: verify = %v, %v; want the card's true key", ok, err)
				}
			}
			// The untampered record still imports and works (the card was
			// not spoiled by the attempts above).
			ck, err := is.Import(ctx, rec)
			if err != nil {
				t.Fatal(err)
			}
			challenge := make([]byte, protocol.ChallengeLen)
			rand.Read(challenge)
			if ok, err := is.Verify(ctx, ck, challenge, authenticate(t, a, challenge)); err != nil || !ok {
				t.Fatalf("genuine record: verify = %v, %v", ok, err)
			}
		})
	}
}

// §4.5: with an OAEP profile, ciphertexts that fail OAEP decoding in
// different ways (leading byte not zero, as Manger's attack probes; the
// label hash wrong; no 0x01 separator) are refused by the token in the same
// words, so the issuer's reject reasons are no padding oracle. The shape
// checks before the token (length, c < n) depend only on public data.
func TestMalformedOAEPUniformRejection(t *testing.T) {
	ctx := context.Background()
	p := protocol.RSAOAEPAES
	is := newIssuer(t, hsm.KindRSA2048)
	rec, _ := personalize(t, p, is.Key.Public.SPKI, 0x45)
	pub := is.Key.Public.RSA
	k := pub.Size()
	raw := func(em []byte) []byte { // textbook RSA: em^e mod n
		m := new(big.Int).SetBytes(em)
		return new(big.Int).Exp(m, big.NewInt(int64(pub.E)), pub.N).FillBytes(make([]byte, k))
	}
	em := func(first byte, fill byte) []byte {
		b := make([]byte, k)
		b[0] = first
		for i := 1; i < k; i++ {
			b[i] = fill
		}
		return b
	}
	cases := []struct {
		name string
		c    []byte
	}{
		{"leading byte not zero", raw(em(0x01, 0x00))},
		{"label hash wrong, zero seed", raw(em(0x00, 0x00))},
		{"random encoded message", raw(append([]byte{0x00}, randBytes(k-1)...))},
		{"flipped genuine c", func() []byte { c := bytes.Clone(rec.C); c[k-1] ^= 0x80; return c }()},
	}
	// Every case is refused by the token, and the real importer records
	// them all with the one reason, whatever the token said.
	var batch strings.Builder
	for i, tc := range cases {
		bad := rec
		bad.C = tc.c
		bad.ID = []byte{0xEE, byte(i)}
		if err := protocol.ValidCiphertext(p, is.Key.Public, bad.C); err != nil {
			t.Fatalf("%s: not a well-shaped c: %v", tc.name, err)
		}
		if _, err := is.Import(ctx, bad); err == nil {
			t.Fatalf("%s: imported", tc.name)
		} else {
			t.Logf("%s: token said %v", tc.name, err)
		}
		batch.WriteString(recordLine(t, bad))
	}
	path := writeBatch(t, is, p, batch.String())
	st := openStore(t, filepath.Join(t.TempDir(), "data"))
	rep := importBatch(t, is, st, path)
	rejects, err := st.Rejects(ctx, rep.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(rejects) != len(cases) {
		t.Fatalf("%d rejects for %d malformed records", len(rejects), len(cases))
	}
	for _, r := range rejects {
		if r.Reason != ReasonTokenRefused {
			t.Errorf("line %d: reject reason %q, want the one wording %q", r.Line, r.Reason, ReasonTokenRefused)
		}
	}
	// The public shape checks: their reasons say nothing c and PK do not.
	for name, c := range map[string][]byte{
		"short":      rec.C[:k-1],
		"c = n":      pub.N.FillBytes(make([]byte, k)),
		"c all ones": bytes.Repeat([]byte{0xFF}, k),
	} {
		err := protocol.ValidCiphertext(p, is.Key.Public, c)
		if err == nil {
			t.Fatalf("%s: shape check passed", name)
		}
		if strings.Contains(strings.ToLower(err.Error()), "padding") {
			t.Errorf("%s: shape reason mentions padding: %v", name, err)
		}
	}
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}
