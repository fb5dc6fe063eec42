package hsm

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// TestSessionCopy: the session copies of the issuer key and the KEK are
// session objects with the originals' protections (sensitive, not
// extractable, the same usages; on SoftHSM2 the KEK's CKA_TRUSTED and
// its unwrap template), they run the chain and the MAC check from every
// session of the pool, and Destroy removes them.
func TestSessionCopy(t *testing.T) {
	ctx := context.Background()
	for name, tok := range openBoth(t, 2) {
		t.Run(name, func(t *testing.T) {
			if copiesRefused(tok) {
				t.Skip("SoftHSM2 refuses every copy of the read-only keys: TestSessionCopyRefused")
			}
			p := protocol.ECDHP256AES
			key, kek := p256Keys(t, tok, "copy-ec")
			skc, kekc := key.SessionCopy(), kek.SessionCopy()
			// Every session of the pool (2) uses the copies made in one.
			var handles [2][2]pkcs11.ObjectHandle
			for i := range 4 {
				card := newSoftCard(t, p, key.Public)
				challenge := []byte("challenge-012345")
				mac, err := protocol.AuthMAC(card.ki, card.id, challenge)
				if err != nil {
					t.Fatal(err)
				}
				err = tok.With(ctx, func(s Session) error {
					sk, err := skc.Handle(s)
					if err != nil {
						return err
					}
					kh, err := kekc.Handle(s)
					if err != nil {
						return err
					}
					if i == 0 {
						handles[0] = [2]pkcs11.ObjectHandle{sk, kh}
						origSK, _ := key.Handle(s)
						origKEK, _ := kek.Handle(s)
						handles[1] = [2]pkcs11.ObjectHandle{origSK, origKEK}
						if sk == origSK || kh == origKEK {
							t.Fatalf("no copy made (%v, %v)", skc.Err(), kekc.Err())
						}
						w := withAttrs(ecPrivate, attrWant{pkcs11.CKA_TOKEN: false})
						kw := withAttrs(kekAudit, attrWant{pkcs11.CKA_TOKEN: false})
						for _, a := range []attrWant{w, kw} {
							delete(a, pkcs11.CKA_LOCAL) // a copy was not generated as such
							if name == "NSS" {
								// NSS softokn 3.87 resets these two on a
								// copy; CKA_SENSITIVE and CKA_EXTRACTABLE,
								// the protections, are kept (checked).
								delete(a, pkcs11.CKA_ALWAYS_SENSITIVE)
								delete(a, pkcs11.CKA_NEVER_EXTRACTABLE)
							}
						}
						auditObject(t, s, sk, "issuer key copy", w)
						if kek.Trusted {
							kw[pkcs11.CKA_TRUSTED] = true
						}
						auditObject(t, s, kh, "KEK copy", kw)
						if tok.Mechanisms().EnforcesWrapWithTrusted {
							checkUnwrapTemplate(t, s, kh)
						}
					} else if handles[0] != [2]pkcs11.ObjectHandle{sk, kh} {
						t.Errorf("call %d: a new copy (%v, %v), want the first (%v)", i, sk, kh, handles[0])
					}
					blob, err := ImportCard(s, p, sk, kh, key.Public.SPKI, card.c)
					if err != nil {
						return err
					}
					ok, err := VerifyCardMAC(s, kh, blob, card.id, challenge, mac)
					if err != nil || !ok {
						t.Errorf("the card's MAC does not verify under the copies: %v %v", ok, err)
					}
					// The original KEK unwraps what the copy wrapped.
					origKEK, err := kek.Handle(s)
					if err != nil {
						return err
					}
					if ok, err := VerifyCardMAC(s, origKEK, blob, card.id, challenge, mac); err != nil || !ok {
						t.Errorf("the original KEK does not unwrap the copy's blob: %v %v", ok, err)
					}
					return nil
				})
				if err != nil {
					t.Fatal(err)
				}
			}
			for _, c := range []*SessionCopy{skc, kekc} {
				if err := c.Destroy(ctx); err != nil {
					t.Fatal(err)
				}
			}
			err := tok.With(ctx, func(s Session) error {
				for i, h := range handles[0] {
					if _, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, nil)}); !IsRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID) {
						t.Errorf("copy %d after Destroy: %v, want CKR_OBJECT_HANDLE_INVALID", i, err)
					}
				}
				// After Destroy, Handle gives the token objects.
				sk, err := skc.Handle(s)
				if err != nil {
					return err
				}
				kh, err := kekc.Handle(s)
				if err != nil {
					return err
				}
				if handles[1] != [2]pkcs11.ObjectHandle{sk, kh} {
					t.Errorf("after Destroy: handles %v, %v, want the originals %v", sk, kh, handles[1])
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// checkUnwrapTemplate: the copy of a trusted KEK keeps its unwrap
// template: what it unwraps is sensitive and not extractable.
func checkUnwrapTemplate(t *testing.T, s Session, kek pkcs11.ObjectHandle) {
	t.Helper()
	gen := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}
	key, err := s.P.GenerateKey(s.H, gen, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_VALUE_LEN, 16),
		attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, true), attr(pkcs11.CKA_WRAP_WITH_TRUSTED, true)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.P.DestroyObject(s.H, key)
	wm := []*pkcs11.Mechanism{pkcs11.NewMechanism(s.M.KeyWrapRFC5649, nil)}
	blob, err := s.P.WrapKey(s.H, wm, kek, key)
	if err != nil {
		t.Fatalf("wrap a CKA_WRAP_WITH_TRUSTED key under the KEK copy: %v", err)
	}
	base := []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_VERIFY, true)}
	if _, err := s.P.UnwrapKey(s.H, wm, kek, blob, append(base, attr(pkcs11.CKA_SENSITIVE, false), attr(pkcs11.CKA_EXTRACTABLE, true))); !IsRV(err, pkcs11.CKR_TEMPLATE_INCONSISTENT) {
		t.Errorf("unwrap as an extractable key under the KEK copy: %v, want CKR_TEMPLATE_INCONSISTENT", err)
	}
	k, err := s.P.UnwrapKey(s.H, wm, kek, blob, append(base, attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false)))
	if err != nil {
		t.Errorf("unwrap with KEKUnwrapTemplate under the KEK copy: %v", err)
	} else {
		s.P.DestroyObject(s.H, k)
	}
	// An untrusted key still cannot wrap it.
	other, err := s.P.GenerateKey(s.H, gen, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_VALUE_LEN, 32), attr(pkcs11.CKA_WRAP, true)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.P.DestroyObject(s.H, other)
	if _, err := s.P.WrapKey(s.H, wm, other, key); !IsRV(err, pkcs11.CKR_KEY_NOT_WRAPPABLE) {
		t.Errorf("wrap under an untrusted key: %v, want CKR_KEY_NOT_WRAPPABLE", err)
	}
}

// TestSessionCopyRecovery: when the session that made a copy is closed,
// the library re-initialized or the user logged out (the copy is then
// gone), With's retry makes a new copy and the import goes on.
func TestSessionCopyRecovery(t *testing.T) {
	ctx := context.Background()
	for name, ht := range map[string]hsmtest.Token{"SoftHSM2": hsmtest.SoftHSM(t), "NSS": hsmtest.NSS(t)} {
		tok, err := OpenURI(ht.URI, 2)
		if err != nil {
			t.Fatal(err)
		}
		defer tok.Close()
		p := protocol.ECDHP256AES
		key, kek := p256Keys(t, tok, "copy-rec")
		skc, kekc := key.SessionCopy(), kek.SessionCopy()
		imp := func() error {
			card := newSoftCard(t, p, key.Public)
			return tok.With(ctx, func(s Session) error {
				sk, err := skc.Handle(s)
				if err != nil {
					return err
				}
				kh, err := kekc.Handle(s)
				if err != nil {
					return err
				}
				_, err = ImportCard(s, p, sk, kh, key.Public.SPKI, card.c)
				return err
			})
		}
		breakers := map[string]func(s Session) error{
			"close all sessions": func(s Session) error { return s.P.CloseAllSessions(tok.Info().Slot) },
			"finalize":           func(s Session) error { return s.P.Finalize() },
		}
		if tok.Info().LoginRequired {
			breakers["logout"] = func(s Session) error { return s.P.Logout(s.H) }
		}
		for bn, brk := range breakers {
			t.Run(name+"/"+bn, func(t *testing.T) {
				if err := imp(); err != nil {
					t.Fatal(err)
				}
				if err := tok.With(ctx, brk); err != nil {
					t.Fatalf("break: %v", err)
				}
				for range 3 { // both sessions of the pool
					if err := imp(); err != nil {
						t.Fatalf("import after %s: %v", bn, err)
					}
				}
				checkCopies(t, tok, skc, kekc)
			})
		}
	}
}

// TestRecycle: SoftHSM2 keeps every destroyed session object until it is
// finalized; Recycle finalizes and initializes it again, with every call
// held off. Two goroutines import through it meanwhile, with session
// copies of the keys: none fails, and the copies are made again.
func TestRecycle(t *testing.T) {
	ctx := context.Background()
	tok, err := OpenURI(hsmtest.SoftHSM(t).URI, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	if !tok.KeepsDestroyedObjects() {
		t.Fatal("SoftHSM2 is not marked as keeping destroyed objects")
	}
	p := protocol.ECDHP256AES
	key, kek := p256Keys(t, tok, "recycle")
	skc, kekc := key.SessionCopy(), kek.SessionCopy()
	cards := []softCard{newSoftCard(t, p, key.Public), newSoftCard(t, p, key.Public)}
	gen := tok.mod.gen.Load()
	const recycles = 5
	stop := make(chan struct{})
	errs := make(chan error, 2)
	for g := range 2 {
		go func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					errs <- nil
					return
				default:
				}
				err := tok.With(ctx, func(s Session) error {
					sk, err := skc.Handle(s)
					if err != nil {
						return err
					}
					kh, err := kekc.Handle(s)
					if err != nil {
						return err
					}
					_, err = ImportCard(s, p, sk, kh, key.Public.SPKI, cards[g].c)
					return err
				})
				if err != nil {
					errs <- fmt.Errorf("goroutine %d, import %d: %w", g, i, err)
					return
				}
			}
		}()
	}
	for range recycles {
		time.Sleep(20 * time.Millisecond)
		if err := tok.Recycle(); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(20 * time.Millisecond)
	close(stop)
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	// Each recycle is a finalization and an initialization.
	if got := tok.mod.gen.Load(); got != gen+2*recycles {
		t.Errorf("module generation %d, want %d", got, gen+2*recycles)
	}
	checkCopies(t, tok, skc, kekc)
	// NSS softokn keeps nothing: Recycle leaves it alone.
	nss, err := OpenURI(hsmtest.NSS(t).URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer nss.Close()
	ngen := nss.mod.gen.Load()
	if err := nss.Recycle(); err != nil || nss.mod.gen.Load() != ngen {
		t.Errorf("NSS recycled: %v, generation %d → %d", err, ngen, nss.mod.gen.Load())
	}
}

// p256Keys generates a P-256 issuer key and a trusted KEK in tok, with
// labels made unique from prefix.
func p256Keys(t *testing.T, tok *Token, prefix string) (*IssuerKeyRef, *KEKRef) {
	t.Helper()
	ctx := context.Background()
	key, err := tok.GenerateIssuerKey(ctx, KindP256, uniqueLabel(prefix))
	if err != nil {
		t.Fatal(err)
	}
	kek, err := tok.GenerateKEK(ctx, uniqueLabel(prefix+"-kek"), soPIN(tok))
	if err != nil {
		t.Fatal(err)
	}
	return key, kek
}

// copiesRefused: SoftHSM2 refuses every C_CopyObject that changes an
// attribute of a read-only object (CKA_TOKEN false included), and the
// issuer key is not even copyable there, so the issuer works with the
// token objects (docs/HSM.md §6).
func copiesRefused(tok *Token) bool { return tok.Mechanisms().Name == "SoftHSM2" }

// checkCopies: on a token that copies keys the issuer used its session
// copies; on SoftHSM2 it fell back to the token objects, because the
// token refused the copy.
func checkCopies(t *testing.T, tok *Token, skc, kekc *SessionCopy) {
	t.Helper()
	if !copiesRefused(tok) {
		if skc.Err() != nil || kekc.Err() != nil {
			t.Errorf("fell back to the token objects: %v, %v", skc.Err(), kekc.Err())
		}
		return
	}
	for _, c := range []*SessionCopy{skc, kekc} {
		rv, _ := RV(c.Err())
		if rv != pkcs11.CKR_ACTION_PROHIBITED && rv != pkcs11.CKR_ATTRIBUTE_READ_ONLY {
			t.Errorf("%s: copy not refused as a read-only key: %v", c.what, c.Err())
		}
	}
}

// TestSessionCopyRefused: on SoftHSM2 the hardened issuer key (not
// copyable) and trusted KEK (read-only) cannot be copied into session
// objects; Handle gives the token objects, which run the chain.
func TestSessionCopyRefused(t *testing.T) {
	ctx := context.Background()
	tok := openBoth(t, 1)["SoftHSM2"]
	key, kek := p256Keys(t, tok, "refused")
	skc, kekc := key.SessionCopy(), kek.SessionCopy()
	card := newSoftCard(t, protocol.ECDHP256AES, key.Public)
	err := tok.With(ctx, func(s Session) error {
		sk, err := skc.Handle(s)
		if err != nil {
			return err
		}
		kh, err := kekc.Handle(s)
		if err != nil {
			return err
		}
		if orig, _ := key.Handle(s); orig != sk {
			t.Errorf("issuer key: a copy was made")
		}
		if orig, _ := kek.Handle(s); orig != kh {
			t.Errorf("KEK: a copy was made")
		}
		_, err = ImportCard(s, protocol.ECDHP256AES, sk, kh, key.Public.SPKI, card.c)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	checkCopies(t, tok, skc, kekc)
}
