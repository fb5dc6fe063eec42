package hsm

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"sync"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// VerifyCardMAC checks a card's answer to a challenge (docs/PROTOCOL.md
// §4) inside the token: it unwraps the stored blob under kek into a
// session key that can do nothing but verify (sensitive, not extractable,
// CKA_VERIFY only), runs C_Verify with CKM_AES_CMAC over
// protocol.AuthMessage(id, challenge), and destroys the key.
//
// NSS softokn 3.87 lists CKM_AES_CMAC with CKF_VERIFY but its
// C_VerifyInit refuses it (CKR_MECHANISM_INVALID). On such a token the
// key is unwrapped with CKA_SIGN only instead, the token computes the MAC
// with C_Sign, and the host compares it with the card's in constant time:
// the expected MAC of this one challenge reaches the host, K_I does not.
// The fallback is remembered per token.
//
// A MAC that does not verify, including one of the wrong length, is
// (false, nil): a failed authentication, which the caller counts. An error
// means the check could not be made (bad id or challenge, unusable blob,
// token failure).
func VerifyCardMAC(s Session, kek pkcs11.ObjectHandle, blob Blob, id, challenge, mac []byte) (bool, error) {
	msg, err := protocol.AuthMessage(id, challenge)
	if err != nil {
		return false, fmt.Errorf("verify card MAC: %w", err)
	}
	if blob.Scheme != WrapRFC5649 {
		return false, fmt.Errorf("verify card MAC: blob wrapped with %q, want %q", blob.Scheme, WrapRFC5649)
	}
	// The token's own code for the scheme, not blob.Mechanism: the same
	// scheme has different codes in different tokens.
	mech, err := rfc5649(s)
	if err != nil {
		return false, fmt.Errorf("verify card MAC: %w", err)
	}
	if len(mac) != protocol.MACLen {
		return false, nil
	}
	_, bySign := cmacBySign.Load(s.M)
	ok, err := verifyOnce(s, kek, mech, blob, msg, mac, bySign)
	if errors.Is(err, errVerifyRefused) {
		cmacBySign.Store(s.M, true)
		ok, err = verifyOnce(s, kek, mech, blob, msg, mac, true)
	}
	if err != nil {
		return false, fmt.Errorf("verify card MAC: %w", err)
	}
	return ok, nil
}

// cmacBySign holds the mechanism tables (one per open Token) of tokens
// whose C_VerifyInit refused CKM_AES_CMAC.
var cmacBySign sync.Map // *Mechanisms → true

// errVerifyRefused marks C_VerifyInit(CKM_AES_CMAC) answering
// CKR_MECHANISM_INVALID.
var errVerifyRefused = errors.New("the token refuses CKM_AES_CMAC in C_VerifyInit")

// verifyOnce unwraps K_I for one use (verify, or sign if bySign), checks
// the MAC and destroys K_I.
func verifyOnce(s Session, kek pkcs11.ObjectHandle, mech uint, blob Blob, msg, mac []byte, bySign bool) (bool, error) {
	m := pkcs11.NewMechanism(mech, nil)
	ki, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, kek, blob.Wrapped, macKeyTemplate(bySign))
	if err != nil {
		return false, fmt.Errorf("unwrap K_I (%s): %w", blob.Scheme, Call("C_UnwrapKey", m, err))
	}
	var ok bool
	if bySign {
		ok, err = cmacSignCompare(s, ki, msg, mac)
	} else {
		ok, err = cmacVerify(s, ki, msg, mac)
	}
	if derr := s.P.DestroyObject(s.H, ki); derr != nil {
		err = errors.Join(err, fmt.Errorf("destroy K_I: %w", Call("C_DestroyObject", nil, derr)))
	}
	return ok, err
}

func cmacVerify(s Session, ki pkcs11.ObjectHandle, msg, mac []byte) (bool, error) {
	m := pkcs11.NewMechanism(pkcs11.CKM_AES_CMAC, nil)
	if err := s.P.VerifyInit(s.H, []*pkcs11.Mechanism{m}, ki); err != nil {
		if IsRV(err, pkcs11.CKR_MECHANISM_INVALID) {
			return false, fmt.Errorf("%w: %w", errVerifyRefused, Call("C_VerifyInit", m, err))
		}
		return false, Call("C_VerifyInit", m, err)
	}
	// C_Verify ends the operation whatever it returns.
	err := s.P.Verify(s.H, msg, mac)
	switch {
	case err == nil:
		return true, nil
	case IsRV(err, pkcs11.CKR_SIGNATURE_INVALID), IsRV(err, pkcs11.CKR_SIGNATURE_LEN_RANGE):
		return false, nil
	}
	return false, Call("C_Verify", m, err)
}

func cmacSignCompare(s Session, ki pkcs11.ObjectHandle, msg, mac []byte) (bool, error) {
	m := pkcs11.NewMechanism(pkcs11.CKM_AES_CMAC, nil)
	if err := s.P.SignInit(s.H, []*pkcs11.Mechanism{m}, ki); err != nil {
		return false, Call("C_SignInit", m, err)
	}
	want, err := s.P.Sign(s.H, msg)
	if err != nil {
		return false, Call("C_Sign", m, err)
	}
	return subtle.ConstantTimeCompare(want, mac) == 1, nil
}

// macKeyTemplate is the template of K_I unwrapped for one check: verify
// only (or sign only, for tokens without CMAC verification), never
// extractable, and KEKUnwrapTemplate's attributes stated (the KEK
// requires them). No CKA_VALUE_LEN: C_UnwrapKey takes the length from the
// blob.
func macKeyTemplate(sign bool) []*pkcs11.Attribute {
	use := uint(pkcs11.CKA_VERIFY)
	if sign {
		use = pkcs11.CKA_SIGN
	}
	return append(append([]*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP_WITH_TRUSTED, true),
	}, usages(secretUsages, use)...), sessionLocked...)
}
