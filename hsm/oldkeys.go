package hsm

import (
	"context"

	"github.com/miekg/pkcs11"
)

// MakeOldStyleKeys makes an RSA issuer key pair labelled label and a KEK
// labelled kekLabel with the templates this project used until
// 2026-11-28: a few usages stated, nothing read-only, no unwrap
// templates. Tests use it (here and in cmd/issuer) to stand for a
// deployment made then, as Audit and `issuer serve` see it; it needs the
// package's SO login, so it cannot live in hsmtest.
//
// On a token that enforces CKA_WRAP_WITH_TRUSTED the KEK is made as it was
// then: by the SO as a trusted session object with the unwrap template
// {CKA_SENSITIVE true, CKA_EXTRACTABLE false}, copied by the user into a
// private token object that stays modifiable.
func MakeOldStyleKeys(ctx context.Context, tok *Token, label, kekLabel, soPIN string) error {
	if tok.mech.EnforcesWrapWithTrusted {
		err := tok.exclusive(ctx, func(ps *pooled) error {
			s := tok.session(ps)
			ut, err := newCKATemplate(pkcs11.CKA_UNWRAP_TEMPLATE, map[uint]bool{pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_EXTRACTABLE: false})
			if err != nil {
				return err
			}
			defer ut.free()
			var tmp pkcs11.ObjectHandle
			err = tok.asSO(ps, soPIN, func(s Session) error {
				var err error
				tmp, err = s.P.GenerateKey(s.H, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
					attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES), attr(pkcs11.CKA_VALUE_LEN, 32),
					attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_PRIVATE, false), attr(pkcs11.CKA_LABEL, kekLabel), attr(pkcs11.CKA_ID, newID()),
					attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false), attr(pkcs11.CKA_WRAP, true), attr(pkcs11.CKA_UNWRAP, true),
					attr(pkcs11.CKA_TRUSTED, true), ut.attr})
				return Call("C_GenerateKey", nil, err)
			})
			if err != nil {
				return err
			}
			_, err = s.P.CopyObject(s.H, tmp, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, true), attr(pkcs11.CKA_PRIVATE, true)})
			s.P.DestroyObject(s.H, tmp)
			return Call("C_CopyObject", nil, err)
		})
		if err != nil {
			return err
		}
		kekLabel = ""
	}
	return tok.With(ctx, func(s Session) error {
		id := newID()
		c := func(class uint) []*pkcs11.Attribute {
			return []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, class), attr(pkcs11.CKA_TOKEN, true), attr(pkcs11.CKA_LABEL, label), attr(pkcs11.CKA_ID, id)}
		}
		pub := append(c(pkcs11.CKO_PUBLIC_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA), attr(pkcs11.CKA_MODULUS_BITS, 2048),
			attr(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}), attr(pkcs11.CKA_VERIFY, false))
		priv := append(c(pkcs11.CKO_PRIVATE_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA), attr(pkcs11.CKA_PRIVATE, true),
			attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false), attr(pkcs11.CKA_UNWRAP, true),
			attr(pkcs11.CKA_DECRYPT, false), attr(pkcs11.CKA_SIGN, false))
		m := pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)
		if _, _, err := s.P.GenerateKeyPair(s.H, []*pkcs11.Mechanism{m}, pub, priv); err != nil {
			return Call("C_GenerateKeyPair", m, err)
		}
		if kekLabel == "" {
			return nil
		}
		m = pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)
		_, err := s.P.GenerateKey(s.H, []*pkcs11.Mechanism{m}, []*pkcs11.Attribute{
			attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES), attr(pkcs11.CKA_VALUE_LEN, 32),
			attr(pkcs11.CKA_TOKEN, true), attr(pkcs11.CKA_PRIVATE, true), attr(pkcs11.CKA_LABEL, kekLabel), attr(pkcs11.CKA_ID, newID()),
			attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false), attr(pkcs11.CKA_WRAP, true), attr(pkcs11.CKA_UNWRAP, true)})
		return Call("C_GenerateKey", m, err)
	})
}
