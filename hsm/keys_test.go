package hsm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// openBoth opens a fresh SoftHSM2 token and the process's NSS database,
// closed at the end of the test.
func openBoth(t *testing.T, sessions int) map[string]*Token {
	t.Helper()
	toks := map[string]*Token{}
	for name, ht := range map[string]hsmtest.Token{"SoftHSM2": hsmtest.SoftHSM(t), "NSS": hsmtest.NSS(t)} {
		tok, err := OpenURI(ht.URI, sessions)
		if err != nil {
			t.Fatalf("open %s: %v", name, err)
		}
		t.Cleanup(func() {
			if err := tok.Close(); err != nil {
				t.Errorf("close %s: %v", name, err)
			}
		})
		toks[name] = tok
	}
	return toks
}

// soPIN is the SO PIN of the hsmtest token behind tok ("" for NSS).
func soPIN(tok *Token) string {
	if tok.Mechanisms().Name == "SoftHSM2" {
		return "5678-so"
	}
	return ""
}

// uniqueLabel: the NSS database is shared by every test of the process.
func uniqueLabel(prefix string) string {
	b := make([]byte, 4)
	rand.Read(b)
	return prefix + "-" + hex.EncodeToString(b)
}

// want is an expected attribute: true/false for a CK_BBOOL, absent
// meaning the token may not know the attribute (CKR_ATTRIBUTE_TYPE_INVALID).
type attrWant map[uint]bool

// auditObject checks the CK_BBOOL attributes of an object, one by one (a token
// that does not know one answers for it alone). It never asks for
// CKA_VALUE.
func auditObject(t *testing.T, s Session, h pkcs11.ObjectHandle, what string, w attrWant) {
	t.Helper()
	for typ, v := range w {
		a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(typ, nil)})
		if err != nil {
			t.Errorf("%s: read %s: %v", what, AttrName(typ), err)
			continue
		}
		got := len(a[0].Value) == 1 && a[0].Value[0] != 0
		if got != v {
			t.Errorf("%s: %s = %v, want %v", what, AttrName(typ), got, v)
		}
	}
}

var (
	privateSecret = attrWant{pkcs11.CKA_TOKEN: true, pkcs11.CKA_PRIVATE: true, pkcs11.CKA_SENSITIVE: true,
		pkcs11.CKA_EXTRACTABLE: false, pkcs11.CKA_ALWAYS_SENSITIVE: true, pkcs11.CKA_NEVER_EXTRACTABLE: true, pkcs11.CKA_LOCAL: true}
	rsaPrivate = withAttrs(privateSecret, attrWant{pkcs11.CKA_UNWRAP: true, pkcs11.CKA_DECRYPT: false, pkcs11.CKA_SIGN: false,
		pkcs11.CKA_SIGN_RECOVER: false, pkcs11.CKA_DERIVE: false})
	ecPrivate = withAttrs(privateSecret, attrWant{pkcs11.CKA_DERIVE: true, pkcs11.CKA_UNWRAP: false, pkcs11.CKA_DECRYPT: false, pkcs11.CKA_SIGN: false})
	rsaPublic = attrWant{pkcs11.CKA_TOKEN: true, pkcs11.CKA_PRIVATE: false, pkcs11.CKA_ENCRYPT: false, pkcs11.CKA_WRAP: false,
		pkcs11.CKA_VERIFY: false, pkcs11.CKA_VERIFY_RECOVER: false, pkcs11.CKA_DERIVE: false}
	ecPublic = attrWant{pkcs11.CKA_TOKEN: true, pkcs11.CKA_PRIVATE: false, pkcs11.CKA_VERIFY: false, pkcs11.CKA_DERIVE: false}
	kekAudit = withAttrs(privateSecret, attrWant{pkcs11.CKA_WRAP: true, pkcs11.CKA_UNWRAP: true, pkcs11.CKA_ENCRYPT: false,
		pkcs11.CKA_DECRYPT: false, pkcs11.CKA_SIGN: false, pkcs11.CKA_VERIFY: false, pkcs11.CKA_DERIVE: false})
)

func withAttrs(a, b attrWant) attrWant {
	m := attrWant{}
	for k, v := range a {
		m[k] = v
	}
	for k, v := range b {
		m[k] = v
	}
	return m
}

func TestGenerateIssuerKey(t *testing.T) {
	ctx := context.Background()
	for name, tok := range openBoth(t, 2) {
		for _, kind := range []string{KindRSA2048, KindRSA3072, KindP256} {
			t.Run(name+"/"+kind, func(t *testing.T) {
				label := uniqueLabel("issuer-" + kind)
				ref, err := tok.GenerateIssuerKey(ctx, kind, label)
				if err != nil {
					t.Fatal(err)
				}
				// The PEM is what the perso station and the cards get.
				pk, err := protocol.ParseIssuerKeyPEM(ref.PublicKeyPEM())
				if err != nil {
					t.Fatalf("exported PEM: %v", err)
				}
				if pk.Fingerprint() != ref.Fingerprint() {
					t.Error("fingerprint of the PEM differs from the ref's")
				}
				if ref.Kind != kind {
					t.Errorf("Kind = %q", ref.Kind)
				}
				if pk.RSA != nil && pk.RSA.E != tok.Mechanisms().RSAExponent {
					t.Errorf("RSA exponent %d, want the table's %d", pk.RSA.E, tok.Mechanisms().RSAExponent)
				}
				// Found again by label: same key, same kind.
				again, err := tok.FindIssuerKey(ctx, label)
				if err != nil {
					t.Fatal(err)
				}
				if again.Fingerprint() != ref.Fingerprint() || again.Kind != kind || string(again.ID) != string(ref.ID) {
					t.Errorf("FindIssuerKey: %s %x, want %s %x", again.Kind, again.Fingerprint(), kind, ref.Fingerprint())
				}
				err = tok.With(ctx, func(s Session) error {
					priv, err := again.Handle(s)
					if err != nil {
						return err
					}
					pub, err := findOne(s, publicKeyFind(ref.ID), "public key")
					if err != nil {
						return err
					}
					privWant := rsaPrivate
					if kind == KindP256 {
						privWant = ecPrivate
					}
					if name == "NSS" {
						// NSS softokn 3.87 reports CKA_LOCAL false on the token
						// objects it generates itself (measured).
						privWant = withAttrs(privWant, attrWant{pkcs11.CKA_LOCAL: false})
					}
					if kind == KindP256 {
						auditObject(t, s, priv, "EC private key", privWant)
						auditObject(t, s, pub, "EC public key", ecPublic)
					} else {
						auditObject(t, s, priv, "RSA private key", privWant)
						auditObject(t, s, pub, "RSA public key", rsaPublic)
					}
					return nil
				})
				if err != nil {
					t.Fatal(err)
				}
				// A second key with the same label is refused.
				if _, err := tok.GenerateIssuerKey(ctx, kind, label); err == nil {
					t.Error("a second key with the same label was made")
				}
			})
		}
	}
}

func TestGenerateIssuerKeyErrors(t *testing.T) {
	tok := openBoth(t, 1)["SoftHSM2"]
	ctx := context.Background()
	for _, tc := range []struct{ kind, label, want string }{
		{"rsa1024", "x", "unknown key kind"},
		{KindP256, "", "empty label"},
	} {
		if _, err := tok.GenerateIssuerKey(ctx, tc.kind, tc.label); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("GenerateIssuerKey(%q, %q) = %v, want %q", tc.kind, tc.label, err, tc.want)
		}
	}
	if _, err := tok.FindIssuerKey(ctx, "no-such-key"); err == nil || !strings.Contains(err.Error(), "no private key") {
		t.Errorf("FindIssuerKey(missing) = %v", err)
	}
	if _, err := tok.FindKEK(ctx, "no-such-kek"); err == nil || !strings.Contains(err.Error(), "no secret key") {
		t.Errorf("FindKEK(missing) = %v", err)
	}
}

func TestGenerateKEK(t *testing.T) {
	ctx := context.Background()
	for name, tok := range openBoth(t, 2) {
		t.Run(name, func(t *testing.T) {
			enforce := tok.Mechanisms().EnforcesWrapWithTrusted
			if enforce {
				if _, err := tok.GenerateKEK(ctx, uniqueLabel("kek"), ""); err == nil || !strings.Contains(err.Error(), "SO PIN") {
					t.Errorf("KEK without SO PIN on %s: %v, want a request for the SO PIN", name, err)
				}
				if _, err := tok.GenerateKEK(ctx, uniqueLabel("kek"), "wrong-so-pin"); err == nil || !strings.Contains(err.Error(), "wrong PIN") {
					t.Errorf("KEK with a wrong SO PIN: %v", err)
				}
			}
			label := uniqueLabel("kek")
			ref, err := tok.GenerateKEK(ctx, label, soPIN(tok))
			if err != nil {
				t.Fatal(err)
			}
			if ref.Trusted != enforce {
				t.Errorf("Trusted = %v, want %v", ref.Trusted, enforce)
			}
			found, err := tok.FindKEK(ctx, label)
			if err != nil {
				t.Fatal(err)
			}
			if found.Trusted != ref.Trusted || string(found.ID) != string(ref.ID) {
				t.Errorf("FindKEK = %+v, want %+v", found, ref)
			}
			// The user session works after the SO's login and logout.
			err = tok.With(ctx, func(s Session) error {
				h, err := found.Handle(s)
				if err != nil {
					return err
				}
				w := kekAudit
				if name == "NSS" {
					w = withAttrs(w, attrWant{pkcs11.CKA_LOCAL: false}) // as for key pairs
				}
				if enforce {
					w = withAttrs(w, attrWant{pkcs11.CKA_TRUSTED: true})
				}
				auditObject(t, s, h, "KEK", w)
				// Exactly one object has the label: the SO's session
				// original is gone.
				hs, err := findObjects(s, []*pkcs11.Attribute{attr(pkcs11.CKA_LABEL, label)}, 5)
				if len(hs) != 1 {
					t.Errorf("%d objects labelled %q, want 1", len(hs), label)
				}
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if enforce {
				checkTrustedKEK(t, tok, found)
			}
		})
	}
}

// checkTrustedKEK: a key with CKA_WRAP_WITH_TRUSTED wraps under the KEK
// and under no other; the KEK's unwrap template forces what it says.
func checkTrustedKEK(t *testing.T, tok *Token, kek *KEKRef) {
	err := tok.With(context.Background(), func(s Session) error {
		h, err := kek.Handle(s)
		if err != nil {
			return err
		}
		gen := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}
		key, err := s.P.GenerateKey(s.H, gen, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_VALUE_LEN, 16),
			attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, true), attr(pkcs11.CKA_WRAP_WITH_TRUSTED, true)})
		if err != nil {
			return err
		}
		defer s.P.DestroyObject(s.H, key)
		other, err := s.P.GenerateKey(s.H, gen, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_VALUE_LEN, 32), attr(pkcs11.CKA_WRAP, true)})
		if err != nil {
			return err
		}
		defer s.P.DestroyObject(s.H, other)
		wm := []*pkcs11.Mechanism{pkcs11.NewMechanism(s.M.KeyWrapRFC5649, nil)}
		if _, err := s.P.WrapKey(s.H, wm, other, key); !IsRV(err, pkcs11.CKR_KEY_NOT_WRAPPABLE) {
			t.Errorf("wrap a CKA_WRAP_WITH_TRUSTED key under an untrusted key: %v, want CKR_KEY_NOT_WRAPPABLE", err)
		}
		blob, err := s.P.WrapKey(s.H, wm, h, key)
		if err != nil {
			t.Fatalf("wrap under the trusted KEK: %v", err)
		}
		base := []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_VERIFY, true)}
		_, err = s.P.UnwrapKey(s.H, wm, h, blob, append(base, attr(pkcs11.CKA_SENSITIVE, false), attr(pkcs11.CKA_EXTRACTABLE, true)))
		if !IsRV(err, pkcs11.CKR_TEMPLATE_INCONSISTENT) {
			t.Errorf("unwrap as an extractable key: %v, want CKR_TEMPLATE_INCONSISTENT", err)
		}
		k, err := s.P.UnwrapKey(s.H, wm, h, blob, append(append(base[:3:3], attr(pkcs11.CKA_EXTRACTABLE, false), attr(pkcs11.CKA_SENSITIVE, true),
			attr(pkcs11.CKA_WRAP_WITH_TRUSTED, true)), usages(secretUsages, pkcs11.CKA_VERIFY)...))
		if err != nil {
			t.Errorf("unwrap with KEKUnwrapTemplate: %v", err)
		} else {
			s.P.DestroyObject(s.H, k)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestKeysServeTheChains: the keys GenerateIssuerKey and GenerateKEK make
// (with their narrow usages, and on SoftHSM2 the KEK's unwrap template)
// are the keys the chains need. A card computes K_I in software; the token
// derives it from c, wraps it, and verifies the card's MAC in-token.
func TestKeysServeTheChains(t *testing.T) {
	ctx := context.Background()
	for name, tok := range openBoth(t, 1) {
		probe, err := tok.Probe(ctx)
		if err != nil {
			t.Fatal(err)
		}
		kek, err := tok.GenerateKEK(ctx, uniqueLabel("chain-kek"), soPIN(tok))
		if err != nil {
			t.Fatal(err)
		}
		keys := map[protocol.Transport]*IssuerKeyRef{}
		for _, pr := range probe.Profiles {
			if !pr.Runnable {
				continue
			}
			p, _ := protocol.ProfileByName(pr.Profile)
			t.Run(name+"/"+p.Name, func(t *testing.T) {
				kind := KindRSA2048
				if p.Transport == protocol.ECDHP256 {
					kind = KindP256
				}
				key := keys[p.Transport]
				if key == nil {
					if key, err = tok.GenerateIssuerKey(ctx, kind, uniqueLabel("chain-"+kind)); err != nil {
						t.Fatal(err)
					}
					keys[p.Transport] = key
				}
				s, c, err := protocol.Encapsulate(p, key.Public, rand.Reader)
				if err != nil {
					t.Fatal(err)
				}
				ki, err := protocol.DeriveKey(p, s, protocol.Binding(p, key.Public.SPKI))
				if err != nil {
					t.Fatal(err)
				}
				id, challenge := []byte("card-0001"), []byte("challenge-012345")
				mac, err := protocol.AuthMAC(ki, id, challenge)
				if err != nil {
					t.Fatal(err)
				}
				err = tok.With(ctx, func(s Session) error {
					sk, err := key.Handle(s)
					if err != nil {
						return err
					}
					kh, err := kek.Handle(s)
					if err != nil {
						return err
					}
					blob, err := ImportCard(s, p, sk, kh, key.Public.SPKI, c)
					if err != nil {
						return err
					}
					ok, err := VerifyCardMAC(s, kh, blob, id, challenge, mac)
					if err != nil || !ok {
						t.Errorf("the card's MAC does not verify in the token: %v %v", ok, err)
					}
					mac[0] ^= 1
					if ok, err := VerifyCardMAC(s, kh, blob, id, challenge, mac); ok || err != nil {
						t.Errorf("a wrong MAC verifies: %v %v", ok, err)
					}
					return nil
				})
				if err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}
