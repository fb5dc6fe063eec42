package hsm

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/card"
	"blindperso/protocol"
)

// The paper's Fig. 2 on real tokens and the virtual card (package card,
// driven through its APDU interface): an insider substitutes her key PK′
// for the issuer's PK on the way to the card, learns S (she can decrypt
// under PK′), and hands the issuer a c″ that carries the same S under PK.
// The issuer's token derives K_I from c″ and PK; the card holds K_I′ from
// S and PK′. Because B binds the key, they differ: the card's MACs never
// verify. A card personalized under the genuine key verifies. Only MACs
// are compared; nothing reads the token's key.

// Files of the TEST keys: the issuer's, and the insider's.
var fig2Keys = map[protocol.Transport][2]string{
	protocol.RSARaw:   {"keys/rsa2048.pem", "keys/rsa2048-attacker.pem"},
	protocol.RSAOAEP:  {"keys/rsa2048.pem", "keys/rsa2048-attacker.pem"},
	protocol.ECDHP256: {"keys/p256.pem", "keys/p256-attacker.pem"},
}

func TestFig2Substitution(t *testing.T) {
	for _, kind := range testTokenKinds {
		t.Run(kind, func(t *testing.T) {
			tt := openTestToken(t, kind, 1)
			for _, name := range briefRunnable[kind] {
				p := mustProfile(t, name)
				t.Run(name, func(t *testing.T) { fig2(t, tt, p) })
			}
		})
	}
}

func fig2(t *testing.T, tt *testToken, p protocol.Profile) {
	files := fig2Keys[p.Transport]
	sk, err := tt.issuerKey(t, files[0])
	if err != nil {
		t.Fatal(err)
	}
	genuine := publicKeyOf(t, files[0])
	attacker := readPrivateKey(t, files[1])
	attackerPK := publicKeyOf(t, files[1])

	// A genuine card: personalized under PK, it authenticates.
	c, cl := personalizedCard(t, p, genuine.SPKI)
	if !authenticates(t, tt, p, sk, genuine.SPKI, c, cl) {
		t.Error("a card personalized under the genuine key does not authenticate")
	}

	// The substituted card: personalized under PK′; the insider turns c′
	// into c″ for the issuer.
	var cSub []byte
	var cl2 *card.Client
	// rsa-raw: r drawn below n′ must also be below n. And for the
	// control below, c″ must also fit under n′.
	for range 40 {
		var c2 []byte
		c2, cl2 = personalizedCard(t, p, attackerPK.SPKI)
		cSub = reencrypt(t, p, attacker, genuine, c2)
		if cSub != nil && protocol.ValidCiphertext(p, attackerPK, cSub) == nil {
			break
		}
		cSub = nil
	}
	if cSub == nil {
		t.Fatal("could not re-encrypt S under the genuine key")
	}
	if authenticates(t, tt, p, sk, genuine.SPKI, cSub, cl2) {
		t.Error("a card personalized under a substituted key authenticates: B does not bind the key")
	}
	// Control: S did reach the issuer's token. Bound with PK′ — which the
	// issuer never does — the same c″ gives the card's K_I. So it is B
	// alone that defeats the attack. (For ECDH the issuer's Z differs
	// already: there is nothing to control.)
	if p.Transport != protocol.ECDHP256 && !authenticates(t, tt, p, sk, attackerPK.SPKI, cSub, cl2) {
		t.Error("control: the transplanted S does not give the card's K_I under B′")
	}
}

// reencrypt is the insider: she decrypts c′ under her own key and
// re-encrypts S to the genuine key. For ECDH she cannot (S = Z is not
// sent), so she forwards c′, and the issuer computes another Z. nil means
// "try another card" (rsa-raw: r not below the genuine n).
func reencrypt(t *testing.T, p protocol.Profile, attacker any, genuine *protocol.IssuerKey, c []byte) []byte {
	switch p.Transport {
	case protocol.RSAOAEP:
		s, err := rsa.DecryptOAEP(sha1.New(), nil, attacker.(*rsa.PrivateKey), c, nil)
		if err != nil {
			t.Fatal(err)
		}
		c2, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, genuine.RSA, s, nil)
		if err != nil {
			t.Fatal(err)
		}
		return c2
	case protocol.RSARaw:
		k := attacker.(*rsa.PrivateKey)
		r := new(big.Int).Exp(new(big.Int).SetBytes(c), k.D, k.N)
		if r.Cmp(genuine.RSA.N) >= 0 {
			return nil
		}
		c2 := new(big.Int).Exp(r, big.NewInt(int64(genuine.RSA.E)), genuine.RSA.N)
		return c2.FillBytes(make([]byte, genuine.RSA.Size()))
	case protocol.ECDHP256:
		return c
	}
	t.Fatalf("transport %v", p.Transport)
	return nil
}

// personalizedCard manufactures a virtual card, personalizes it under
// spki and locks it, through its APDU interface.
func personalizedCard(t *testing.T, p protocol.Profile, spki []byte) ([]byte, *card.Client) {
	t.Helper()
	id := make([]byte, 8)
	rand.Read(id)
	a, err := card.Manufacture(filepath.Join(t.TempDir(), "card.json"), card.Options{ID: id})
	if err != nil {
		t.Fatal(err)
	}
	cl := &card.Client{T: a.Local()}
	if err := cl.Select(); err != nil {
		t.Fatal(err)
	}
	c, err := cl.Personalize(p, spki)
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Lock(c); err != nil {
		t.Fatal(err)
	}
	return c, cl
}

// authenticates imports c in the token and checks the card's answer to a
// fresh challenge there.
func authenticates(t *testing.T, tt *testToken, p protocol.Profile, sk pkcs11.ObjectHandle, spki, c []byte, cl *card.Client) bool {
	t.Helper()
	id, err := cl.ID()
	if err != nil {
		t.Fatal(err)
	}
	challenge := make([]byte, protocol.ChallengeLen)
	rand.Read(challenge)
	mac, err := cl.Authenticate(challenge)
	if err != nil {
		t.Fatal(err)
	}
	var ok bool
	err = tt.with(func(s Session) error {
		blob, err := ImportCard(s, p, sk, tt.kek, spki, c)
		if err != nil {
			return err
		}
		ok, err = VerifyCardMAC(s, tt.kek, blob, id, challenge, mac)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

func readPrivateKey(tb testing.TB, file string) any {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join("..", "testdata", file))
	if err != nil {
		tb.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		tb.Fatalf("%s: no PEM", file)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

func publicKeyOf(tb testing.TB, file string) *protocol.IssuerKey {
	tb.Helper()
	var pub any
	switch k := readPrivateKey(tb, file).(type) {
	case *rsa.PrivateKey:
		pub = &k.PublicKey
	case *ecdsa.PrivateKey:
		pub = &k.PublicKey
	default:
		tb.Fatalf("%s: %T", file, k)
	}
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		tb.Fatal(err)
	}
	ik, err := protocol.ParseIssuerKey(spki)
	if err != nil {
		tb.Fatal(err)
	}
	return ik
}
