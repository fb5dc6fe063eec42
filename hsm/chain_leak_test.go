package hsm

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"errors"
	"fmt"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// TestNoObjectLeftBehind runs 1,000 imports per token, most of them with
// an injected failure, and requires that the token holds exactly the
// session objects it held before. Failures:
//
//   - bad c: right length, but not a ciphertext of the key (random bytes
//     below n: the RSA-OAEP unwrap fails in the token — rsa-raw has no
//     such thing, every c below n decrypts; for ECDH, not a point:
//     refused before the token);
//   - wrong length: c one byte short;
//   - wrong profile: a c made for another profile of the same key type
//     (rsa-raw under an OAEP profile fails in the token; the others pass
//     the token, with another K_I);
//   - secret of the wrong length: an OAEP c carrying 16 bytes;
//   - invalid handle: an issuer key or KEK handle that does not exist
//     (K_I is derived, the wrap fails: ImportCard must destroy K_I);
//   - closed session: the pool session is closed under the chain after
//     its first step; the token layer reopens it and runs the import
//     again (With's contract: the chain is idempotent).
func TestNoObjectLeftBehind(t *testing.T) {
	const n = 1000
	for _, kind := range testTokenKinds {
		t.Run(kind, func(t *testing.T) {
			tt := openTestToken(t, kind, 2)
			keys := map[bool]generatedKey{false: tt.generateIssuerKey(t, false), true: tt.generateIssuerKey(t, true)}
			type fixture struct {
				p     protocol.Profile
				key   generatedKey
				cards []softCard
			}
			var fx []fixture
			for _, name := range briefRunnable[kind] {
				p := mustProfile(t, name)
				f := fixture{p: p, key: keys[p.Transport == protocol.ECDHP256]}
				for range 3 {
					f.cards = append(f.cards, newSoftCard(t, p, f.key.pub))
				}
				fx = append(fx, f)
			}
			before := tt.sessionObjects(t)
			outcomes := map[string]int{}
			closed, wantClosed := 0, 0
			for i := range n {
				f := fx[i%len(fx)]
				inj := injections[(i/len(fx))%len(injections)]
				c, sk, kek := f.cards[i%len(f.cards)].c, f.key.sk, tt.kek
				if inj.c != nil {
					c = inj.c(t, f.p, f.key.pub, c)
				}
				if inj.badKey {
					sk = 0x7FFF_FFF0
				}
				if inj.badKEK {
					kek = 0x7FFF_FFF1
				}
				armed := inj.closeSession
				if armed {
					wantClosed++
				}
				auditStep = func(s Session, _ protocol.Profile, _ int, _ pkcs11.ObjectHandle) {
					if armed {
						armed = false
						if s.P.CloseSession(s.H) == nil {
							closed++
						}
					}
				}
				err := tt.with(func(s Session) error {
					_, err := ImportCard(s, f.p, sk, kek, f.key.pub.SPKI, c)
					return err
				})
				auditStep = nil
				outcome := "ok"
				if err != nil {
					outcome = "error"
					if rv, ok := RV(err); ok {
						outcome = fmt.Sprintf("%v", rv)
					}
				}
				outcomes[inj.name+": "+outcome]++
				if inj.mustFail && err == nil && !(inj.name == "bad c" && f.p.Transport == protocol.RSARaw) {
					t.Errorf("%s, %s: the import worked", f.p.Name, inj.name)
				}
				if !inj.mayFail && err != nil {
					t.Errorf("%s, %s: %v", f.p.Name, inj.name, err)
				}
			}
			if closed != wantClosed {
				t.Errorf("closed %d sessions under a chain, want %d", closed, wantClosed)
			}
			after := tt.sessionObjects(t)
			if len(after) != len(before) {
				var left []pkcs11.ObjectHandle
				for h := range after {
					if !before[h] {
						left = append(left, h)
					}
				}
				t.Errorf("%d session objects before %d imports, %d after; left behind: %v", len(before), n, len(after), left)
			}
			for o, k := range outcomes {
				t.Logf("%4d × %s", k, o)
			}
		})
	}
}

type injection struct {
	name              string
	c                 func(tb testing.TB, p protocol.Profile, k *protocol.IssuerKey, good []byte) []byte
	badKey, badKEK    bool
	closeSession      bool
	mustFail, mayFail bool
}

var injections = []injection{
	{name: "good"},
	{name: "bad c", c: badCiphertext, mustFail: true, mayFail: true},
	{name: "good"},
	{name: "wrong length", c: func(_ testing.TB, _ protocol.Profile, _ *protocol.IssuerKey, good []byte) []byte {
		return good[:len(good)-1]
	}, mustFail: true, mayFail: true},
	{name: "wrong profile", c: otherProfileCiphertext, mayFail: true},
	{name: "16-byte secret", c: shortSecretCiphertext, mayFail: true},
	{name: "invalid issuer key handle", badKey: true, mustFail: true, mayFail: true},
	{name: "invalid KEK handle", badKEK: true, mustFail: true, mayFail: true},
	{name: "session closed mid-chain", closeSession: true},
}

// badCiphertext is c's length and shape-valid where it can be (below n)
// but no ciphertext of the key; for ECDH, 65 bytes that are not a point.
func badCiphertext(_ testing.TB, p protocol.Profile, k *protocol.IssuerKey, good []byte) []byte {
	c := make([]byte, len(good))
	rand.Read(c)
	c[0] = 0 // below n
	if p.Transport == protocol.ECDHP256 {
		c[0] = 4
	}
	return c
}

// otherProfileCiphertext makes, for the same key, a c of another profile:
// rsa-raw's for an OAEP profile, OAEP's for rsa-raw, and for ECDH the
// other ECDH profile's (the same shape: only B differs).
func otherProfileCiphertext(tb testing.TB, p protocol.Profile, k *protocol.IssuerKey, good []byte) []byte {
	other := map[string]protocol.Profile{
		protocol.RSARawSHA1.Name:    protocol.RSAOAEPSHA1,
		protocol.RSAOAEPSHA1.Name:   protocol.RSARawSHA1,
		protocol.RSAOAEPAES.Name:    protocol.RSARawSHA1,
		protocol.ECDHP256X963.Name:  protocol.ECDHP256AES,
		protocol.ECDHP256AES.Name:   protocol.ECDHP256X963,
		protocol.RSAOAEPKBKDF.Name:  protocol.RSARawSHA1,
		protocol.ECDHP256KBKDF.Name: protocol.ECDHP256AES,
	}[p.Name]
	_, c, err := protocol.Encapsulate(other, k, rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// shortSecretCiphertext is an OAEP c of 16 random bytes instead of 32:
// anyone with PK can make one. Other transports keep the good c.
func shortSecretCiphertext(tb testing.TB, p protocol.Profile, k *protocol.IssuerKey, good []byte) []byte {
	if p.Transport != protocol.RSAOAEP {
		return good
	}
	s := make([]byte, 16)
	rand.Read(s)
	c, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, k.RSA, s, nil)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// TestDeriveRejectsBeforeTheToken: malformed inputs never reach the
// token, and the errors say what is wrong.
func TestDeriveRejectsBeforeTheToken(t *testing.T) {
	tt := openTestToken(t, kindSoftHSM2, 1)
	key := tt.generateIssuerKey(t, true)
	card := newSoftCard(t, protocol.ECDHP256AES, key.pub)
	rsaKey := tt.generateIssuerKey(t, false)
	notPoint := bytes.Clone(card.c)
	notPoint[64] ^= 1
	for _, c := range []struct {
		name string
		p    protocol.Profile
		spki []byte
		c    []byte
	}{
		{"unknown profile", protocol.Profile{Name: "x"}, key.pub.SPKI, card.c},
		{"not an SPKI", protocol.ECDHP256AES, []byte{0x30, 0}, card.c},
		{"RSA key for an ECDH profile", protocol.ECDHP256AES, rsaKey.pub.SPKI, card.c},
		{"c one byte short", protocol.ECDHP256AES, key.pub.SPKI, card.c[:64]},
		{"c not on the curve", protocol.ECDHP256AES, key.pub.SPKI, notPoint},
	} {
		before := len(tt.sessionObjects(t))
		_, err := DeriveCardKey(tt.session(), c.p, key.sk, tt.kek, c.spki, c.c)
		if err == nil {
			t.Errorf("%s: accepted", c.name)
			continue
		}
		if _, isRV := RV(err); isRV {
			t.Errorf("%s: reached the token: %v", c.name, err)
		}
		if n := len(tt.sessionObjects(t)); n != before {
			t.Errorf("%s: %d objects, want %d", c.name, n, before)
		}
		var e *CallError
		if errors.As(err, &e) {
			t.Errorf("%s: a PKCS#11 call failed: %v", c.name, err)
		}
	}
}
