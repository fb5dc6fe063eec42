package pinholder

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// On opencryptoki's soft token (3.8.1) the adversary cannot make its
// keys as the ceremony makes them: the token refuses the issuer key's
// CKA_UNWRAP_TEMPLATE (and has no EC for the other two), as it refuses
// the ceremony itself. What a PIN holder can do to an RSA issuer key
// there is measured on the best key the token allows: token objects,
// the private key read-only, sensitive, not extractable, unwrap only.
//
// The matrix's S paths state attributes 3.8.1 refuses in C_UnwrapKey
// (CKA_WRAP_WITH_TRUSTED: unknown; CKA_SENSITIVE false or
// CKA_EXTRACTABLE true: "read-only"), so its "closed" there is the
// attacker's template, not the token's defence: the same attacks without
// those attributes all work, because 3.8.1 makes every unwrapped secret
// non-sensitive and extractable whatever the template asks.

// ockMatrixOpen are the paths the matrix finds open on that key.
var ockMatrixOpen = []string{SKCopyDecrypt, SKCopyModifiable}

// ockArtefacts are the matrix's S paths closed by the attacker's own
// template on 3.8.1, with the return code.
var ockArtefacts = map[string]string{
	SUnwrapExtractable: "CKR_ATTRIBUTE_READ_ONLY",
	SUnwrapEncrypt:     "CKR_ATTRIBUTE_TYPE_INVALID",
	SUnwrapOwnWrap:     "CKR_ATTRIBUTE_TYPE_INVALID",
	SDeriveExtractable: "CKR_ATTRIBUTE_TYPE_INVALID",
	SDigestKey:         "CKR_ATTRIBUTE_TYPE_INVALID",
}

func TestMatrixOpenCryptoki(t *testing.T) {
	ht := hsmtest.OpenCryptoki(t)
	ctx := context.Background()
	tok, err := hsm.OpenURI(ht.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	before, err := tok.CountObjects(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Run(ctx, tok, Options{UserPIN: ht.PIN, SOPIN: ht.SOPIN}); !hsm.IsRV(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID) ||
		!strings.Contains(err.Error(), "generate issuer key") {
		t.Errorf("Run: %v, want the issuer key's generation refused with CKR_ATTRIBUTE_TYPE_INVALID", err)
	}
	if after, _ := tok.CountObjects(ctx); after != before {
		t.Errorf("%d objects before Run, %d after", before, after)
	}

	e := &env{tok: tok, opt: Options{UserPIN: ht.PIN}, ctx: ctx}
	defer func() {
		e.cleanup(ctx)
		if after, _ := tok.CountObjects(ctx); after != before {
			t.Errorf("%d objects before, %d after: throwaway keys left", before, after)
		}
	}()
	if err := e.ockSetupRSA(ctx); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, p := range paths {
		if p.target == "issuer key (RSA)" || p.target == "S (RSA)" || p.id == SOLoginUserPIN {
			ids = append(ids, p.id)
		}
	}
	rep, err := e.runPaths(ctx, ids)
	if err != nil {
		t.Fatal(err)
	}
	var sb strings.Builder
	rep.WriteText(&sb)
	t.Log(sb.String())
	if got := rep.OpenIDs(); !slices.Equal(got, ockMatrixOpen) {
		t.Errorf("open paths %v, want %v", got, ockMatrixOpen)
	}
	for _, r := range rep.Results {
		switch {
		case !r.Tried:
			t.Errorf("%s not tried: %s", r.ID, r.Detail)
		case r.Open && !strings.Contains(r.Detail, "on the host"):
			t.Errorf("%s: open without a secret on the host: %q", r.ID, r.Detail)
		case !r.Open && !strings.HasPrefix(r.Refusal, "CKR_"):
			t.Errorf("%s: closed without the token's refusal: %q", r.ID, r.Refusal)
		case ockArtefacts[r.ID] != "" && r.Refusal != ockArtefacts[r.ID]:
			t.Errorf("%s: closed by %s, want %s (the attacker's template)", r.ID, r.Refusal, ockArtefacts[r.ID])
		}
	}

	// The S attacks with templates 3.8.1 takes: each gets S or K_I out.
	err = tok.With(ctx, func(s hsm.Session) error {
		e.made = e.made[:0]
		defer func() {
			for _, h := range e.made {
				s.P.DestroyObject(s.H, h)
			}
		}()
		value := func(k pkcs11.ObjectHandle) []byte {
			a, err := s.P.GetAttributeValue(s.H, k, []*pkcs11.Attribute{attr(pkcs11.CKA_VALUE, nil)})
			if err != nil {
				return nil
			}
			return a[0].Value
		}
		// The chain's own template (sensitive, not extractable) is ignored.
		k, err := e.unwrapS(s, attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false), attr(pkcs11.CKA_DERIVE, true))
		if err != nil {
			return err
		}
		a, err := s.P.GetAttributeValue(s.H, k, []*pkcs11.Attribute{attr(pkcs11.CKA_SENSITIVE, nil), attr(pkcs11.CKA_EXTRACTABLE, nil)})
		if err != nil {
			return err
		}
		if a[0].Value[0] != 0 || a[1].Value[0] != 1 {
			t.Errorf("unwrapped S asked sensitive and not extractable: CKA_SENSITIVE %v, CKA_EXTRACTABLE %v", a[0].Value, a[1].Value)
		}
		if !bytes.Equal(value(k), e.s32) {
			t.Errorf("S unwrapped as the chain asks: CKA_VALUE is not S")
		}
		// The attacker's minimal template: S readable.
		if k, err = e.unwrapS(s); err != nil {
			return err
		}
		if !bytes.Equal(value(k), e.s32) {
			t.Errorf("S unwrapped with a minimal template: CKA_VALUE is not S")
		}
		// CKA_ENCRYPT without CKA_WRAP_WITH_TRUSTED: K_I of the aes KDF.
		if k, err = e.unwrapS(s, attr(pkcs11.CKA_ENCRYPT, true)); err != nil {
			return err
		}
		m := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_ECB, nil)}
		if err := s.P.EncryptInit(s.H, m, k); err != nil {
			return err
		}
		out, err := s.P.Encrypt(s.H, e.blockRSA)
		if err != nil || !bytes.Equal(out[:protocol.KeySize], e.kiAES) {
			t.Errorf("AES-ECB with an unwrapped S: %v, not K_I", err)
		}
		// C_DigestKey of S, then B: K_I of the sha1 KDF.
		md := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_SHA_1, nil)}
		if err := s.P.DigestInit(s.H, md); err != nil {
			return err
		}
		if err := s.P.DigestKey(s.H, k); err != nil {
			s.P.DigestFinal(s.H)
			return err
		}
		if err := s.P.DigestUpdate(s.H, protocol.Binding(protocol.RSAOAEPSHA1, e.rsa.Public.SPKI)); err != nil {
			s.P.DigestFinal(s.H)
			return err
		}
		d, err := s.P.DigestFinal(s.H)
		if err != nil || !bytes.Equal(d[:protocol.KeySize], e.kiSHA1) {
			t.Errorf("C_DigestKey(S) ‖ B: %v, not the sha1 K_I", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// ockSetupRSA is setup's RSA half with a key pair made by hand: token
// objects, the private key read-only, sensitive, not extractable, for
// C_UnwrapKey only.
func (e *env) ockSetupRSA(ctx context.Context) error {
	label := e.label("ock-rsa")
	id := make([]byte, 8)
	rand.Read(id)
	err := e.tok.With(ctx, func(s hsm.Session) error {
		common := []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, true), attr(pkcs11.CKA_LABEL, label), attr(pkcs11.CKA_ID, id),
			attr(pkcs11.CKA_MODIFIABLE, false)}
		pub := append([]*pkcs11.Attribute{attr(pkcs11.CKA_MODULUS_BITS, 2048), attr(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
			attr(pkcs11.CKA_PRIVATE, false), attr(pkcs11.CKA_ENCRYPT, false), attr(pkcs11.CKA_VERIFY, false),
			attr(pkcs11.CKA_VERIFY_RECOVER, false), attr(pkcs11.CKA_WRAP, false)}, common...)
		priv := append([]*pkcs11.Attribute{attr(pkcs11.CKA_PRIVATE, true), attr(pkcs11.CKA_SENSITIVE, true),
			attr(pkcs11.CKA_EXTRACTABLE, false), attr(pkcs11.CKA_UNWRAP, true), attr(pkcs11.CKA_DECRYPT, false),
			attr(pkcs11.CKA_SIGN, false), attr(pkcs11.CKA_SIGN_RECOVER, false), attr(pkcs11.CKA_DERIVE, false)}, common...)
		m := pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)
		_, _, err := s.P.GenerateKeyPair(s.H, []*pkcs11.Mechanism{m}, pub, priv)
		return err
	})
	if err != nil {
		return err
	}
	if e.rsa, err = e.tok.FindIssuerKey(ctx, label); err != nil {
		return err
	}
	e.s32 = make([]byte, protocol.OAEPSecretLen)
	rand.Read(e.s32)
	if e.cRSA, err = protocol.EncryptSecret(protocol.RSAOAEPAES, e.rsa.Public, e.s32, rand.Reader); err != nil {
		return err
	}
	e.bRSA = protocol.Binding(protocol.RSAOAEPAES, e.rsa.Public.SPKI)
	e.blockRSA = protocol.AESKDFInput(e.bRSA)
	if e.kiAES, err = protocol.DeriveKey(protocol.RSAOAEPAES, e.s32, e.bRSA); err != nil {
		return err
	}
	h := sha1.Sum(append(append([]byte{}, e.s32...), protocol.Binding(protocol.RSAOAEPSHA1, e.rsa.Public.SPKI)...))
	e.kiSHA1 = h[:protocol.KeySize]
	return nil
}

// runPaths is Run's loop over the paths named, on an env already set up.
func (e *env) runPaths(ctx context.Context, ids []string) (*Report, error) {
	rep := &Report{Token: e.tok.Info().Label, Table: e.tok.Mechanisms().Name}
	for _, p := range paths {
		if !slices.Contains(ids, p.id) {
			continue
		}
		res := Result{ID: p.id, Target: p.target, Attack: p.attack, Yields: p.yields, Closable: p.closable, Tried: true}
		var out string
		var err error
		if p.needs == needPIN {
			out, err = p.try(e, hsm.Session{})
		} else {
			err = e.tok.With(ctx, func(s hsm.Session) error {
				e.made = e.made[:0]
				var err error
				out, err = p.try(e, s)
				for _, h := range e.made {
					s.P.DestroyObject(s.H, h)
				}
				return err
			})
		}
		var refused *refusal
		switch {
		case err == nil:
			res.Open, res.Detail = true, out
			rep.Open++
		case errors.As(err, &refused):
			res.Refusal, res.Detail = refused.rv, refused.step
			rep.Closed++
		default:
			return nil, err
		}
		rep.Results = append(rep.Results, res)
	}
	return rep, nil
}
