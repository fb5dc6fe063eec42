package hsm

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"math/big"
	"slices"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// opencryptoki's soft token (Debian's opencryptoki 3.8.1, slot 3, with
// its own pkcsslotd in this test process's mount namespace: hsmtest.Run)
// is a third real PKCS#11 implementation: RSA only, with no EC, no
// secret-key derivation at all and no AES key wrap or AES-CMAC. So it
// runs no profile, and the probe must say so, naming what is missing,
// while reporting the RSA steps that do work.

// ockMissing is what the probe must name per profile on opencryptoki;
// wrap is the table's RFC 5649 mechanism as the probe names it.
func ockMissing(wrap string) map[string][]string {
	return map[string][]string{
		"rsa-raw-sha1":   {"CKM_CONCATENATE_BASE_AND_DATA", "CKM_SHA1_KEY_DERIVATION", wrap, "CKM_AES_CMAC"},
		"rsa-oaep-sha1":  {"CKM_CONCATENATE_BASE_AND_DATA", "CKM_SHA1_KEY_DERIVATION", wrap, "CKM_AES_CMAC"},
		"rsa-oaep-aes":   {"CKM_AES_ECB_ENCRYPT_DATA", wrap, "CKM_AES_CMAC"},
		"ecdh-p256-x963": {"CKM_EC_KEY_PAIR_GEN", "CKM_ECDH1_DERIVE with CKD_SHA1_KDF", wrap, "CKM_AES_CMAC"},
		"ecdh-p256-aes":  {"CKM_EC_KEY_PAIR_GEN", "CKM_ECDH1_DERIVE", "CKM_AES_ECB_ENCRYPT_DATA", wrap, "CKM_AES_CMAC"},
	}
}

func openOCK(t testing.TB, sessions int) (*Token, hsmtest.Token) {
	t.Helper()
	ht := hsmtest.OpenCryptoki(t)
	tok, err := OpenURI(ht.URI, sessions)
	if err != nil {
		t.Fatalf("open opencryptoki: %v", err)
	}
	t.Cleanup(func() {
		if err := tok.Close(); err != nil {
			t.Errorf("close opencryptoki: %v", err)
		}
	})
	return tok, ht
}

func TestProbeOpenCryptoki(t *testing.T) {
	tok, ht := openOCK(t, 1)
	info := tok.Info()
	if info.Manufacturer != "IBM Corp." || info.Model != "IBM SoftTok" || info.Slot != hsmtest.OpenCryptokiSlot || !info.LoginRequired || info.Label != ht.Label {
		t.Errorf("token info %+v", info)
	}
	r, err := tok.Probe(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var text bytes.Buffer
	if err := r.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	t.Logf("table %s\n%s", tok.Mechanisms().Name, text.String())

	// What it can do: RSA, both unwraps, OAEP with SHA-1 and SHA-256.
	works := []string{ckRSAGen, ckAESGen, ckX509Unwrap, ckOAEPGeneric, ckOAEPAES, ckOAEPSHA256}
	for _, c := range r.Checks {
		want := slices.Contains(works, c.ID)
		if c.Works != want {
			t.Errorf("check %s (%s): works = %v, want %v (%s)", c.ID, c.Need, c.Works, want, c.Detail)
		}
		// The list tells the truth here: no step works unlisted or is
		// listed but fails, except EC's and the derivations, which are
		// neither listed nor performed.
		if c.Listed != want {
			t.Errorf("check %s (%s): listed = %v, want %v", c.ID, c.Need, c.Listed, want)
		}
		if c.ID == ckECDHNull || c.ID == ckECDHSHA1 {
			if c.Tried {
				t.Errorf("check %s tried without an EC key", c.ID)
			}
		} else if !c.Tried {
			t.Errorf("check %s not tried", c.ID)
		}
	}
	for _, id := range works {
		if r.check(id) == nil {
			t.Errorf("no check %s in the report", id)
		}
	}
	if r.RSAExponent != 3 {
		t.Errorf("RSA exponent %d, want 3", r.RSAExponent)
	}
	if r.KeyWrapVerified || r.WrapWithTrusted || !strings.Contains(r.WrapWithTrustedDetail, "CKR_ATTRIBUTE_TYPE_INVALID") {
		t.Errorf("key wrap verified %v, CKA_WRAP_WITH_TRUSTED %v (%s)", r.KeyWrapVerified, r.WrapWithTrusted, r.WrapWithTrustedDetail)
	}
	for _, n := range r.Notes {
		if strings.Contains(n, "fix") || strings.Contains(n, "trial failed") {
			t.Errorf("note: %s", n)
		}
	}

	// No profile runs, and each verdict names exactly what is missing.
	// A profile added since (the list grows) must still be refused, at
	// least for the wrap and the MAC.
	wrap := MechName(tok.Mechanisms().KeyWrapRFC5649) + " (RFC 5649)"
	missing := ockMissing(wrap)
	seen := 0
	for _, p := range r.Profiles {
		if p.Runnable || len(p.ByTrial) != 0 {
			t.Errorf("%s: %s", p.Profile, p.Verdict())
		}
		if want, ok := missing[p.Profile]; ok {
			seen++
			if !slices.Equal(p.Missing, want) {
				t.Errorf("%s: missing %q, want %q", p.Profile, p.Missing, want)
			}
		} else if !slices.Contains(p.Missing, "CKM_AES_CMAC") || !slices.Contains(p.Missing, wrap) {
			t.Errorf("%s: missing %q", p.Profile, p.Missing)
		}
		if !strings.Contains(text.String(), p.Profile+"  ") || !strings.Contains(text.String(), p.Verdict()) {
			t.Errorf("text output lacks %s: %s", p.Profile, p.Verdict())
		}
	}
	if seen != len(missing) {
		t.Errorf("%d of the brief's %d profiles in the report", seen, len(missing))
	}
	for _, want := range []string{"CKM_RSA_PKCS_OAEP unwrap (SHA-256)", "generates e=3", "CKM_RSA_X_509 unwrap"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text output lacks %q", want)
		}
	}

	// The mechanism list agrees: no AES key wrap under any code point,
	// no CMAC, no EC, no derivation of secret keys.
	list, err := tok.mod.ctx.GetMechanismList(info.Slot)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range list {
		switch m.Mechanism {
		case pkcs11.CKM_AES_KEY_WRAP, pkcs11.CKM_AES_KEY_WRAP_PAD, MechAESKeyWrapKWP, pkcs11.CKM_AES_CMAC,
			pkcs11.CKM_EC_KEY_PAIR_GEN, pkcs11.CKM_ECDH1_DERIVE, pkcs11.CKM_CONCATENATE_BASE_AND_DATA,
			pkcs11.CKM_SHA1_KEY_DERIVATION, pkcs11.CKM_AES_ECB_ENCRYPT_DATA, mechSP800108:
			t.Errorf("opencryptoki lists %s", MechName(m.Mechanism))
		}
	}

	err = tok.With(context.Background(), func(s Session) error {
		hs, err := findObjects(s, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false)}, 10)
		if len(hs) != 0 {
			t.Errorf("%d session objects left after the probe", len(hs))
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestOpenCryptokiFacts holds the facts docs/HSM.md records about
// opencryptoki's soft token, each measured on session objects.
func TestOpenCryptokiFacts(t *testing.T) {
	tok, _ := openOCK(t, 1)
	ctx := context.Background()

	// The key generation of the ceremony asks for attributes 3.8.1 does
	// not know (CKA_UNWRAP_TEMPLATE; CKA_WRAP_WITH_TRUSTED on the KEK's):
	// refused, and nothing is left behind.
	before, err := tok.CountObjects(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tok.GenerateIssuerKey(ctx, KindRSA2048, uniqueLabel("ock-issuer")); !IsRV(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID) {
		t.Errorf("GenerateIssuerKey: %v, want CKR_ATTRIBUTE_TYPE_INVALID", err)
	}
	if _, err := tok.GenerateKEK(ctx, uniqueLabel("ock-kek"), ""); !IsRV(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID) {
		t.Errorf("GenerateKEK: %v, want CKR_ATTRIBUTE_TYPE_INVALID", err)
	}
	if _, err := tok.GenerateSigningKey(ctx, uniqueLabel("ock-transcript")); !IsRV(err, pkcs11.CKR_MECHANISM_INVALID) {
		t.Errorf("GenerateSigningKey (P-256): %v, want CKR_MECHANISM_INVALID", err)
	}
	if after, _ := tok.CountObjects(ctx); after != before {
		t.Errorf("token objects %d -> %d", before, after)
	}

	err = tok.With(ctx, func(s Session) error {
		var made []pkcs11.ObjectHandle
		defer func() {
			for _, h := range made {
				s.P.DestroyObject(s.H, h)
			}
		}()
		aes := func(extra ...*pkcs11.Attribute) error {
			h, err := s.P.GenerateKey(s.H, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, secretTemplate(pkcs11.CKK_AES, 16, extra...))
			if err == nil {
				made = append(made, h)
			}
			return err
		}
		for name, a := range map[string]*pkcs11.Attribute{
			"CKA_COPYABLE": attr(pkcs11.CKA_COPYABLE, false), "CKA_UNWRAP_TEMPLATE": attr(pkcs11.CKA_UNWRAP_TEMPLATE, []byte{}),
			"CKA_DERIVE_TEMPLATE": attr(pkcs11.CKA_DERIVE_TEMPLATE, []byte{}), "CKA_WRAP_WITH_TRUSTED": attr(pkcs11.CKA_WRAP_WITH_TRUSTED, true),
		} {
			if err := aes(a); !IsRV(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID) {
				t.Errorf("AES key with %s: %v, want CKR_ATTRIBUTE_TYPE_INVALID", name, err)
			}
		}
		// CKA_TRUSTED is the SO's: the user cannot set it.
		if err := aes(attr(pkcs11.CKA_TRUSTED, true)); !IsRV(err, pkcs11.CKR_TEMPLATE_INCONSISTENT) {
			t.Errorf("AES key with CKA_TRUSTED as the user: %v, want CKR_TEMPLATE_INCONSISTENT", err)
		}

		// An RSA key as locked as 3.8.1 allows: read-only, sensitive,
		// not extractable, unwrap only.
		pub, priv, err := ockRSAKey(s, 65537)
		if err != nil {
			return err
		}
		made = append(made, priv)
		if err := s.P.SetAttributeValue(s.H, priv, []*pkcs11.Attribute{attr(pkcs11.CKA_DECRYPT, true)}); !IsRV(err, pkcs11.CKR_ATTRIBUTE_READ_ONLY) {
			t.Errorf("set CKA_DECRYPT on a read-only key: %v, want CKR_ATTRIBUTE_READ_ONLY", err)
		}
		// ... yet a copy may change it (no CKA_COPYABLE to stop it).
		c, err := s.P.CopyObject(s.H, priv, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_DECRYPT, true)})
		if err != nil {
			t.Errorf("C_CopyObject with CKA_DECRYPT true: %v (refused: a path closed)", err)
		} else {
			made = append(made, c)
		}

		// RSA_X_509 unwrap with CKA_VALUE_LEN keeps the rightmost bytes
		// of the decrypted block; compared by HMAC, not by reading S.
		r, _ := rand.Int(rand.Reader, pub.N)
		block := r.FillBytes(make([]byte, pub.Size()))
		ct := new(big.Int).Exp(r, big.NewInt(int64(pub.E)), pub.N).FillBytes(make([]byte, pub.Size()))
		h, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_X_509, nil)}, priv, ct,
			secretTemplate(pkcs11.CKK_GENERIC_SECRET, 32, attr(pkcs11.CKA_SIGN, true)))
		if err != nil {
			return Call("C_UnwrapKey(CKM_RSA_X_509)", nil, err)
		}
		made = append(made, h)
		if got := ockHMAC(t, s, h); !hmac.Equal(got, hostHMAC(block[len(block)-32:])) {
			t.Errorf("RSA_X_509 unwrap with CKA_VALUE_LEN 32 does not keep the rightmost 32 bytes")
		}

		// OAEP with SHA-256 and MGF1-SHA256; the unwrapped length is
		// reported (CKA_VALUE_LEN), unlike SoftHSM2's.
		secret := make([]byte, protocol.OAEPSecretLen)
		rand.Read(secret)
		ct, err = rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, secret, nil)
		if err != nil {
			return err
		}
		m := pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, pkcs11.NewOAEPParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, pkcs11.CKZ_DATA_SPECIFIED, nil))
		h, err = s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, priv, ct, secretTemplate(pkcs11.CKK_GENERIC_SECRET, 0, attr(pkcs11.CKA_SIGN, true)))
		if err != nil {
			return Call("C_UnwrapKey(OAEP SHA-256)", m, err)
		}
		made = append(made, h)
		if got := ockHMAC(t, s, h); !hmac.Equal(got, hostHMAC(secret)) {
			t.Errorf("OAEP SHA-256 unwrap gave another secret")
		}
		a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_VALUE_LEN, nil)})
		if err != nil || bytesToUint(a[0].Value) != protocol.OAEPSecretLen {
			t.Errorf("CKA_VALUE_LEN of the unwrapped secret: %v %v", a, err)
		}
		// The unwrap template asked CKA_SENSITIVE true (secretTemplate),
		// or CKA_EXTRACTABLE false too: 3.8.1 makes the key non-sensitive
		// and extractable all the same; a template that asks for that
		// outright (CKA_SENSITIVE false, CKA_EXTRACTABLE true) it refuses
		// (CKR_ATTRIBUTE_READ_ONLY). package pinholder reads S out so.
		h2, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, priv, ct, secretTemplate(pkcs11.CKK_GENERIC_SECRET, 0, attr(pkcs11.CKA_EXTRACTABLE, false)))
		if err != nil {
			return Call("C_UnwrapKey(OAEP SHA-256)", m, err)
		}
		made = append(made, h2)
		for _, k := range []pkcs11.ObjectHandle{h, h2} {
			a, err = s.P.GetAttributeValue(s.H, k, []*pkcs11.Attribute{attr(pkcs11.CKA_SENSITIVE, nil), attr(pkcs11.CKA_EXTRACTABLE, nil)})
			if err != nil || a[0].Value[0] != 0 || a[1].Value[0] != 1 {
				t.Errorf("unwrapped secret asked sensitive: CKA_SENSITIVE, CKA_EXTRACTABLE = %v, %v (%v); want false, true", a[0].Value, a[1].Value, err)
			}
		}
		for _, bad := range []*pkcs11.Attribute{attr(pkcs11.CKA_SENSITIVE, false), attr(pkcs11.CKA_EXTRACTABLE, true)} {
			tmpl := []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
				attr(pkcs11.CKA_TOKEN, false), bad}
			k, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, priv, ct, tmpl)
			if err == nil {
				made = append(made, k)
			}
			if !IsRV(err, pkcs11.CKR_ATTRIBUTE_READ_ONLY) {
				t.Errorf("unwrap stating attribute 0x%X %v: %v, want CKR_ATTRIBUTE_READ_ONLY", bad.Type, bad.Value, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// ockRSAKey makes a session RSA-2048 key pair locked with the attributes
// opencryptoki 3.8.1 knows, and returns its public half.
func ockRSAKey(s Session, e int) (*rsa.PublicKey, pkcs11.ObjectHandle, error) {
	m := pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)
	pubH, privH, err := s.P.GenerateKeyPair(s.H, []*pkcs11.Mechanism{m},
		[]*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_MODULUS_BITS, 2048),
			attr(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(e)).Bytes())},
		[]*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_PRIVATE, true), attr(pkcs11.CKA_SENSITIVE, true),
			attr(pkcs11.CKA_EXTRACTABLE, false), attr(pkcs11.CKA_MODIFIABLE, false), attr(pkcs11.CKA_UNWRAP, true),
			attr(pkcs11.CKA_DECRYPT, false), attr(pkcs11.CKA_SIGN, false), attr(pkcs11.CKA_SIGN_RECOVER, false), attr(pkcs11.CKA_DERIVE, false)})
	if err != nil {
		return nil, 0, Call("C_GenerateKeyPair", m, err)
	}
	defer s.P.DestroyObject(s.H, pubH)
	a, err := s.P.GetAttributeValue(s.H, pubH, []*pkcs11.Attribute{attr(pkcs11.CKA_MODULUS, nil)})
	if err != nil {
		s.P.DestroyObject(s.H, privH)
		return nil, 0, Call("C_GetAttributeValue", nil, err)
	}
	return &rsa.PublicKey{N: new(big.Int).SetBytes(a[0].Value), E: e}, privH, nil
}

// mechSP800108 is CKM_SP800_108_COUNTER_KDF (PKCS#11 3.0).
const mechSP800108 = 0x3AC

var hmacMsg = []byte("blindperso opencryptoki test")

// ockHMAC is HMAC-SHA256 of hmacMsg under key h, computed in the token.
func ockHMAC(t *testing.T, s Session, h pkcs11.ObjectHandle) []byte {
	t.Helper()
	m := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_SHA256_HMAC, nil)}
	if err := s.P.SignInit(s.H, m, h); err != nil {
		t.Fatalf("C_SignInit(HMAC-SHA256): %v", err)
	}
	mac, err := s.P.Sign(s.H, hmacMsg)
	if err != nil {
		t.Fatalf("C_Sign(HMAC-SHA256): %v", err)
	}
	return mac
}

func hostHMAC(key []byte) []byte {
	h := hmac.New(sha256.New, key)
	h.Write(hmacMsg)
	return h.Sum(nil)
}

// bytesToUint reads a CK_ULONG attribute value (host byte order).
func bytesToUint(b []byte) int {
	n := 0
	for i := len(b) - 1; i >= 0; i-- {
		n = n<<8 | int(b[i])
	}
	return n
}
