package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"math/big"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// receiver is the receiving system's HSM in these tests: a second token
// driven with plain PKCS#11 calls, none of this package's key code.
type receiver struct {
	tok *Token
	ktk pkcs11.ObjectHandle
}

// newReceiver opens the receiver's token (made before any token is
// opened: SoftHSM2 lists its tokens once, at C_Initialize) and generates
// its KTK (AES-256, a session object that can unwrap, extractable only to
// be sent).
func newReceiver(t *testing.T, tt hsmtest.Token) *receiver {
	t.Helper()
	tok, err := OpenURI(tt.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tok.Close() })
	r := &receiver{tok: tok}
	err = tok.With(context.Background(), func(s Session) error {
		m := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)
		r.ktk, err = s.P.GenerateKey(s.H, []*pkcs11.Mechanism{m}, []*pkcs11.Attribute{
			attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			attr(pkcs11.CKA_VALUE_LEN, KTKLen), attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_SENSITIVE, true),
			attr(pkcs11.CKA_EXTRACTABLE, true), attr(pkcs11.CKA_UNWRAP, true), attr(pkcs11.CKA_WRAP, false),
			attr(pkcs11.CKA_ENCRYPT, false), attr(pkcs11.CKA_DECRYPT, false)})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// send wraps the receiver's KTK to the issuer's key-import public key, in
// the receiver's token.
func (r *receiver) send(t *testing.T, pub *rsa.PublicKey) []byte {
	t.Helper()
	var w []byte
	err := r.tok.With(context.Background(), func(s Session) error {
		ph, err := s.P.CreateObject(s.H, []*pkcs11.Attribute{
			attr(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
			attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_WRAP, true),
			attr(pkcs11.CKA_MODULUS, pub.N.Bytes()), attr(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(pub.E)).Bytes())})
		if err != nil {
			return err
		}
		defer s.P.DestroyObject(s.H, ph)
		w, err = s.P.WrapKey(s.H, []*pkcs11.Mechanism{KeyImportOAEP()}, ph, r.ktk)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func (r *receiver) checkValue(t *testing.T) []byte {
	t.Helper()
	var cv []byte
	err := r.tok.With(context.Background(), func(s Session) (err error) {
		cv, err = checkValue(s, r.ktk)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return cv
}

// receive unwraps an exported K_I into the receiver's token (sensitive,
// never extractable, verify only), returns its check value, and verifies
// mac over the card's challenge with it in the token.
func (r *receiver) receive(t *testing.T, e Export, id, challenge, mac []byte) (cv []byte, ok bool) {
	t.Helper()
	msg, err := protocol.AuthMessage(id, challenge)
	if err != nil {
		t.Fatal(err)
	}
	err = r.tok.With(context.Background(), func(s Session) error {
		m := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP, nil)
		ki, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, r.ktk, e.Wrapped, []*pkcs11.Attribute{
			attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false),
			attr(pkcs11.CKA_VERIFY, true), attr(pkcs11.CKA_SIGN, false)})
		if err != nil {
			return Call("C_UnwrapKey", m, err)
		}
		defer s.P.DestroyObject(s.H, ki)
		if cv, err = checkValue(s, ki); err != nil {
			return err
		}
		ok, err = cmacVerify(s, ki, msg, mac)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return cv, ok
}

// TestExport: the receiver's KTK comes in under the key-import key,
// trusted where the token enforces CKA_WRAP_WITH_TRUSTED, with the same
// check value on both sides; a card's K_I goes out under it and the
// receiver's token, with nothing but the export, verifies the card's MAC
// over a fresh challenge (and refuses a forged one); the check values of
// K_I agree where the issuer's token computes one. SoftHSM2 and NSS as
// the sender, SoftHSM2 as the receiver.
func TestExport(t *testing.T) {
	ctx := context.Background()
	rcvToken := hsmtest.SoftHSM(t)
	for _, tt := range []hsmtest.Token{hsmtest.SoftHSM(t), hsmtest.NSS(t)} {
		t.Run(tt.Label, func(t *testing.T) {
			tok, err := OpenURI(tt.URI, 2)
			if err != nil {
				t.Fatal(err)
			}
			defer tok.Close()
			key, kek := p256Keys(t, tok, "export")
			ik, err := tok.GenerateKeyImportKey(ctx, uniqueLabel("key-import"))
			if err != nil {
				t.Fatal(err)
			}
			if again, err := tok.FindKeyImportKey(ctx, ik.Label); err != nil || again.Public.Fingerprint() != ik.Public.Fingerprint() {
				t.Fatalf("find key-import key: %v", err)
			}
			rcv := newReceiver(t, rcvToken)
			ktk, err := tok.ImportKTK(ctx, ik, uniqueLabel("ktk"), rcv.send(t, ik.Public.RSA), tt.SOPIN)
			if err != nil {
				t.Fatal(err)
			}
			if ktk.Trusted != tok.Mechanisms().EnforcesWrapWithTrusted {
				t.Errorf("KTK trusted %v on a token that enforces CKA_WRAP_WITH_TRUSTED: %v", ktk.Trusted, tok.Mechanisms().EnforcesWrapWithTrusted)
			}
			if want := rcv.checkValue(t); ktk.CheckValue != nil && !bytes.Equal(ktk.CheckValue, want) {
				t.Fatalf("KTK check value %x at the issuer, %x at the receiver", ktk.CheckValue, want)
			}
			found, err := tok.FindKTK(ctx, ktk.Label)
			if err != nil || found.Trusted != ktk.Trusted || !bytes.Equal(found.CheckValue, ktk.CheckValue) {
				t.Fatalf("find KTK: %+v, %v", found, err)
			}
			if _, err := tok.FindKTK(ctx, kek.Label); err == nil {
				t.Error("the KEK was found as a KTK")
			}

			ck := &CardKeys{Token: tok, Key: key, KEK: kek}
			defer ck.Close(ctx)
			for i := range 3 {
				card := newSoftCard(t, protocol.ECDHP256AES, key.Public)
				blob, err := ck.Import(ctx, protocol.ECDHP256AES, card.c)
				if err != nil {
					t.Fatal(err)
				}
				var e, again Export
				err = tok.With(ctx, func(s Session) error {
					kh, err := kek.Handle(s)
					if err != nil {
						return err
					}
					th, err := ktk.Handle(s)
					if err != nil {
						return err
					}
					if e, err = ExportCardKey(s, kh, th, blob); err != nil {
						return err
					}
					again, err = ExportCardKey(s, kh, th, blob)
					return err
				})
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(e.Wrapped, again.Wrapped) {
					t.Errorf("card %d: two exports under one KTK differ (RFC 3394 is deterministic)", i)
				}
				challenge := make([]byte, protocol.ChallengeLen)
				rand.Read(challenge)
				cv, ok := rcv.receive(t, e, card.id, challenge, card.answer(t, challenge))
				if !ok {
					t.Fatalf("card %d: the receiver's token does not verify the card's MAC with the exported K_I", i)
				}
				if e.CheckValue != nil && !bytes.Equal(e.CheckValue, cv) {
					t.Fatalf("card %d: K_I check value %x at the issuer, %x at the receiver", i, e.CheckValue, cv)
				}
				forged := card.answer(t, append([]byte{^challenge[0]}, challenge[1:]...))
				if _, ok := rcv.receive(t, e, card.id, challenge, forged); ok {
					t.Fatalf("card %d: a forged MAC verifies at the receiver", i)
				}
			}
		})
	}
}

// TestExportPINHolder: what a holder of the user PIN alone can do with
// the new keys. They can encrypt a KTK of their own to the key-import key
// (its public key is public) and unwrap it, untrusted; with that KTK an
// export would put K_I under a key they know. The attack works on NSS
// softokn, which does not enforce CKA_WRAP_WITH_TRUSTED (a named open
// path, docs/EXPORT.md); SoftHSM2 refuses the wrap. On both, the
// key-import key's unwrap template refuses a KTK that could unwrap or
// decrypt (an export brought back in, or opened) where the token
// enforces CKA_UNWRAP_TEMPLATE.
func TestExportPINHolder(t *testing.T) {
	ctx := context.Background()
	attacker := hsmtest.SoftHSM(t)
	for _, tt := range []hsmtest.Token{hsmtest.SoftHSM(t), hsmtest.NSS(t)} {
		t.Run(tt.Label, func(t *testing.T) {
			tok, err := OpenURI(tt.URI, 1)
			if err != nil {
				t.Fatal(err)
			}
			defer tok.Close()
			key, kek := p256Keys(t, tok, "pinholder-export")
			ik, err := tok.GenerateKeyImportKey(ctx, uniqueLabel("pinholder-import"))
			if err != nil {
				t.Fatal(err)
			}
			// The attacker's KTK: made on their host, so they know it.
			mine := make([]byte, KTKLen)
			rand.Read(mine)
			wrapped, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, ik.Public.RSA, mine, nil)
			if err != nil {
				t.Fatal(err)
			}
			card := newSoftCard(t, protocol.ECDHP256AES, key.Public)
			ck := &CardKeys{Token: tok, Key: key, KEK: kek}
			defer ck.Close(ctx)
			blob, err := ck.Import(ctx, protocol.ECDHP256AES, card.c)
			if err != nil {
				t.Fatal(err)
			}
			enforces := tok.Mechanisms().EnforcesWrapWithTrusted
			err = tok.With(ctx, func(s Session) error {
				// With more usages than the template allows.
				for _, extra := range []uint{pkcs11.CKA_UNWRAP, pkcs11.CKA_DECRYPT} {
					tmpl := ktkAttrs(uniqueLabel("wide"), newID(), false, true, false)
					for _, a := range tmpl {
						if a.Type == extra {
							*a = *attr(extra, true)
						}
					}
					h, err := unwrapKTK(s, ik, wrapped, tmpl)
					if err == nil {
						s.P.DestroyObject(s.H, h)
						if enforces {
							t.Errorf("a KTK with %s true was unwrapped under the key-import key", AttrName(extra))
						}
					}
				}
				// As the template wants, but untrusted.
				h, err := unwrapKTK(s, ik, wrapped, ktkAttrs(uniqueLabel("mine"), newID(), false, true, false))
				if err != nil {
					return err
				}
				defer s.P.DestroyObject(s.H, h)
				kh, err := kek.Handle(s)
				if err != nil {
					return err
				}
				e, err := ExportCardKey(s, kh, h, blob)
				switch {
				case enforces && err == nil:
					t.Error("SoftHSM2 wrapped K_I under an untrusted KTK")
				case enforces && !IsRV(err, pkcs11.CKR_KEY_NOT_WRAPPABLE):
					t.Errorf("the export under an untrusted KTK failed, but not as CKR_KEY_NOT_WRAPPABLE: %v", err)
				case !enforces && err != nil:
					t.Errorf("NSS refused the export under an untrusted KTK (the open path is gone? update docs/EXPORT.md): %v", err)
				case !enforces:
					// The attack, completed: K_I on the attacker's host.
					if ki := openWithKnownKey(t, attacker, mine, e.Wrapped); !bytes.Equal(ki, card.ki) {
						t.Error("the export under the attacker's KTK does not open to K_I")
					}
					t.Logf("%s: a PIN holder's own KTK receives K_I (CKA_WRAP_WITH_TRUSTED not enforced): the named open path", tt.Label)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// openWithKnownKey is the attacker's host: a token of their own (a fresh
// SoftHSM2) holding the KTK they made, which unwraps the export into a
// key they can read.
func openWithKnownKey(t *testing.T, tt hsmtest.Token, ktk, wrapped []byte) []byte {
	t.Helper()
	tok, err := OpenURI(tt.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	var ki []byte
	err = tok.With(context.Background(), func(s Session) error {
		k, err := s.P.CreateObject(s.H, []*pkcs11.Attribute{
			attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_UNWRAP, true), attr(pkcs11.CKA_VALUE, ktk)})
		if err != nil {
			return err
		}
		m := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP, nil)
		h, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, k, wrapped, []*pkcs11.Attribute{
			attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_SENSITIVE, false), attr(pkcs11.CKA_EXTRACTABLE, true)})
		if err != nil {
			return err
		}
		a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_VALUE, nil)})
		if err != nil {
			return err
		}
		ki = a[0].Value
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ki
}
