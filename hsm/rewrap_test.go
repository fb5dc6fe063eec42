package hsm

import (
	"context"
	"crypto/rand"
	"errors"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// sessionObjectCount is the number of session objects the process can
// see in tok (session objects are visible to every session).
func sessionObjectCount(t *testing.T, tok *Token) int {
	t.Helper()
	var n int
	err := tok.With(context.Background(), func(s Session) error {
		hs, err := findObjects(s, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false)}, 10000)
		n = len(hs)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// rewrapCard is a card made on the host side (the test knows its K_I)
// and imported into tok under kek A: its blob and a MAC check.
type rewrapCard struct {
	id, ki []byte
	blob   Blob
}

func importRewrapCard(t *testing.T, tok *Token, key *IssuerKeyRef, kek *KEKRef) rewrapCard {
	t.Helper()
	p := protocol.ECDHP256AES
	sec, c, err := protocol.Encapsulate(p, key.Public, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ki, err := protocol.DeriveKey(p, sec, protocol.Binding(p, key.Public.SPKI))
	if err != nil {
		t.Fatal(err)
	}
	rc := rewrapCard{id: []byte("rewrap-card-1"), ki: ki}
	err = tok.With(context.Background(), func(s Session) error {
		sk, err := key.Handle(s)
		if err != nil {
			return err
		}
		kh, err := kek.Handle(s)
		if err != nil {
			return err
		}
		rc.blob, err = ImportCard(s, p, sk, kh, key.Public.SPKI, c)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// verifies reports whether the card's MAC of a fresh challenge verifies
// under kek with blob.
func (rc rewrapCard) verifies(t *testing.T, tok *Token, kek *KEKRef, blob Blob) (bool, error) {
	t.Helper()
	challenge := make([]byte, protocol.ChallengeLen)
	rand.Read(challenge)
	mac, err := protocol.AuthMAC(rc.ki, rc.id, challenge)
	if err != nil {
		t.Fatal(err)
	}
	var ok bool
	err = tok.With(context.Background(), func(s Session) error {
		kh, err := kek.Handle(s)
		if err != nil {
			return err
		}
		ok, err = VerifyCardMAC(s, kh, blob, rc.id, challenge, mac)
		return err
	})
	return ok, err
}

// TestRewrapCardKey: a K_I imported under KEK A, re-wrapped in the token
// to KEK B, verifies the card's MAC under B; nothing stays in the token.
func TestRewrapCardKey(t *testing.T) {
	ctx := context.Background()
	for name, tok := range openBoth(t, 1) {
		t.Run(name, func(t *testing.T) {
			key, kekA := p256Keys(t, tok, "rewrap")
			kekB, err := tok.GenerateKEK(ctx, uniqueLabel("rewrap-kek-b"), soPIN(tok))
			if err != nil {
				t.Fatal(err)
			}
			rc := importRewrapCard(t, tok, key, kekA)
			if ok, err := rc.verifies(t, tok, kekA, rc.blob); !ok || err != nil {
				t.Fatalf("the card does not verify under A before the re-wrap: %v %v", ok, err)
			}
			before := sessionObjectCount(t, tok)
			var nb Blob
			err = tok.With(ctx, func(s Session) error {
				a, err := kekA.Handle(s)
				if err != nil {
					return err
				}
				b, err := kekB.Handle(s)
				if err != nil {
					return err
				}
				nb, err = RewrapCardKey(s, a, b, rc.blob)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if after := sessionObjectCount(t, tok); after != before {
				t.Errorf("session objects: %d before the re-wrap, %d after", before, after)
			}
			if nb.Scheme != WrapRFC5649 || nb.Mechanism != tok.Mechanisms().KeyWrapRFC5649 || len(nb.Wrapped) != wrappedKILen || nb.KEK != "" {
				t.Errorf("new blob %+v", nb)
			}
			if string(nb.Wrapped) == string(rc.blob.Wrapped) {
				t.Error("the re-wrapped blob equals the old one")
			}
			if ok, err := rc.verifies(t, tok, kekB, nb); !ok || err != nil {
				t.Errorf("the card does not verify under B after the re-wrap: %v %v", ok, err)
			}
			if ok, err := rc.verifies(t, tok, kekA, nb); ok && err == nil {
				t.Error("the new blob verifies under A")
			}
			// A blob under another KEK (here: the new one, as from A) is
			// refused, and leaves nothing behind.
			err = tok.With(ctx, func(s Session) error {
				a, _ := kekA.Handle(s)
				b, _ := kekB.Handle(s)
				_, err := RewrapCardKey(s, a, b, nb)
				return err
			})
			if err == nil {
				t.Error("a blob not under the from KEK was re-wrapped")
			}
			if after := sessionObjectCount(t, tok); after != before {
				t.Errorf("session objects: %d before, %d after a refused re-wrap", before, after)
			}
		})
	}
}

// TestRewrapToUntrustedKEK: on a token that enforces
// CKA_WRAP_WITH_TRUSTED, K_I cannot be moved under a key the user made
// (not CKA_TRUSTED): the PIN holder's way to get K_I out under a key of
// their own.
func TestRewrapToUntrustedKEK(t *testing.T) {
	ctx := context.Background()
	tok := openBoth(t, 1)["SoftHSM2"]
	key, kekA := p256Keys(t, tok, "untrusted")
	rc := importRewrapCard(t, tok, key, kekA)
	before := sessionObjectCount(t, tok)
	err := tok.With(ctx, func(s Session) error {
		gen := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}
		mine, err := s.P.GenerateKey(s.H, gen, testKEKTemplate(true, false))
		if err != nil {
			return err
		}
		defer s.P.DestroyObject(s.H, mine)
		a, err := kekA.Handle(s)
		if err != nil {
			return err
		}
		_, err = RewrapCardKey(s, a, mine, rc.blob)
		if !IsRV(err, pkcs11.CKR_KEY_NOT_WRAPPABLE) {
			t.Errorf("re-wrap under an untrusted key: %v, want CKR_KEY_NOT_WRAPPABLE", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if after := sessionObjectCount(t, tok); after != before {
		t.Errorf("session objects: %d before, %d after", before, after)
	}
}

// TestRewrapOldKEK: a KEK made before KEK rotation existed (on SoftHSM2:
// trusted, unwrap template {CKA_SENSITIVE true, CKA_EXTRACTABLE false})
// holds blobs that cannot be re-wrapped; the error says so.
func TestRewrapOldKEK(t *testing.T) {
	ctx := context.Background()
	tt := openTestToken(t, kindSoftHSM2, 1)
	tok := tt.tok
	key, kekB := p256Keys(t, tok, "oldkek")
	ut, err := newCKATemplate(pkcs11.CKA_UNWRAP_TEMPLATE, map[uint]bool{pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_EXTRACTABLE: false})
	if err != nil {
		t.Fatal(err)
	}
	defer ut.free()
	gen := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}
	var public pkcs11.ObjectHandle
	err = tok.WithSO(ctx, tt.hs.SOPIN, func(Session) error {
		var err error
		public, err = tt.p.GenerateKey(tt.holder, gen, append(testKEKTemplate(false, true), ut.attr))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	old, err := tt.p.CopyObject(tt.holder, public, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true)})
	if err != nil {
		t.Fatal(err)
	}
	tt.p.DestroyObject(tt.holder, public)
	p := protocol.ECDHP256AES
	sec, c, err := protocol.Encapsulate(p, key.Public, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_ = sec
	err = tok.With(ctx, func(s Session) error {
		sk, err := key.Handle(s)
		if err != nil {
			return err
		}
		blob, err := ImportCard(s, p, sk, old, key.Public.SPKI, c)
		if err != nil {
			return err
		}
		b, err := kekB.Handle(s)
		if err != nil {
			return err
		}
		_, err = RewrapCardKey(s, old, b, blob)
		if !errors.Is(err, ErrKEKNotRewrappable) || !IsRV(err, pkcs11.CKR_TEMPLATE_INCONSISTENT) {
			t.Errorf("re-wrap from an old KEK: %v, want ErrKEKNotRewrappable with CKR_TEMPLATE_INCONSISTENT", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestDestroyKEK: the KEK goes; a second destroy finds nothing.
func TestDestroyKEK(t *testing.T) {
	ctx := context.Background()
	for name, tok := range openBoth(t, 1) {
		t.Run(name, func(t *testing.T) {
			label := uniqueLabel("destroy-kek")
			if _, err := tok.GenerateKEK(ctx, label, soPIN(tok)); err != nil {
				t.Fatal(err)
			}
			if err := tok.DestroyKEK(ctx, label); err != nil {
				t.Fatal(err)
			}
			if _, err := tok.FindKEK(ctx, label); err == nil {
				t.Error("the KEK is still there")
			}
			if err := tok.DestroyKEK(ctx, label); err == nil {
				t.Error("a second destroy succeeded")
			}
		})
	}
}
