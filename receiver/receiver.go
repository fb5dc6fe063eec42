// Package receiver is the receiving system's side of the export of card
// keys (docs/EXPORT.md), as a second token would do it: it generates the
// key-transport key (KTK) and sends it wrapped to the issuer's key-import
// key, unwraps every exported K_I into its own token (sensitive, never
// extractable, able to verify a MAC and nothing else), and verifies a
// card's MAC in the token. It uses the token through plain PKCS#11 calls
// (hsm.Token only opens the session: URI, PIN source, pool) and none of
// the issuer's key code, so a test through it checks the issuer from
// outside.
package receiver

import (
	"bytes"
	"context"
	"crypto/rsa"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"

	"github.com/miekg/pkcs11"

	"blindperso/export"
	"blindperso/hsm"
	"blindperso/protocol"
)

func attr(t uint, v any) *pkcs11.Attribute { return pkcs11.NewAttribute(t, v) }

// oaep is the KTK's encryption to the key-import key: RSA-OAEP, SHA-1,
// MGF1-SHA1, empty label (docs/EXPORT.md).
func oaep() *pkcs11.Mechanism {
	return pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP,
		pkcs11.NewOAEPParams(pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, pkcs11.CKZ_DATA_SPECIFIED, nil))
}

// KTK is a KTK the receiver made.
type KTK struct {
	Label string
	// Wrapped is the KTK under the issuer's key-import key: what is sent.
	Wrapped []byte
	// CheckValue is the token's CKA_CHECK_VALUE of the KTK, nil if it
	// gives none.
	CheckValue []byte
}

func find(s hsm.Session, class uint, label string) (pkcs11.ObjectHandle, error) {
	if err := s.P.FindObjectsInit(s.H, []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, class), attr(pkcs11.CKA_LABEL, label)}); err != nil {
		return 0, err
	}
	hs, _, err := s.P.FindObjects(s.H, 2)
	s.P.FindObjectsFinal(s.H)
	switch {
	case err != nil:
		return 0, err
	case len(hs) != 1:
		return 0, fmt.Errorf("%d objects labelled %q, want 1", len(hs), label)
	}
	return hs[0], nil
}

func checkValue(s hsm.Session, h pkcs11.ObjectHandle) []byte {
	a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_CHECK_VALUE, nil)})
	if err != nil || len(a[0].Value) == 0 {
		return nil
	}
	return a[0].Value
}

// MakeKTK generates an AES-256 KTK labelled label as a private token
// object that can unwrap and nothing else, wraps it to the issuer's
// key-import public key pub in the token, and then makes it
// non-extractable: after this call it can never leave the token again.
func MakeKTK(ctx context.Context, tok *hsm.Token, label string, pub *rsa.PublicKey) (KTK, error) {
	out := KTK{Label: label}
	err := tok.With(ctx, func(s hsm.Session) error {
		if _, err := find(s, pkcs11.CKO_SECRET_KEY, label); err == nil {
			return fmt.Errorf("an object labelled %q already exists", label)
		}
		m := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)
		k, err := s.P.GenerateKey(s.H, []*pkcs11.Mechanism{m}, []*pkcs11.Attribute{
			attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			attr(pkcs11.CKA_VALUE_LEN, 32), attr(pkcs11.CKA_TOKEN, true), attr(pkcs11.CKA_PRIVATE, true),
			attr(pkcs11.CKA_LABEL, label), attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, true),
			attr(pkcs11.CKA_UNWRAP, true), attr(pkcs11.CKA_WRAP, false), attr(pkcs11.CKA_ENCRYPT, false),
			attr(pkcs11.CKA_DECRYPT, false), attr(pkcs11.CKA_SIGN, false), attr(pkcs11.CKA_VERIFY, false),
			attr(pkcs11.CKA_DERIVE, false)})
		if err != nil {
			return hsm.Call("C_GenerateKey", m, err)
		}
		pk, err := s.P.CreateObject(s.H, []*pkcs11.Attribute{
			attr(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
			attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_WRAP, true),
			attr(pkcs11.CKA_MODULUS, pub.N.Bytes()), attr(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(pub.E)).Bytes())})
		if err != nil {
			s.P.DestroyObject(s.H, k)
			return hsm.Call("C_CreateObject", nil, err)
		}
		defer s.P.DestroyObject(s.H, pk)
		if out.Wrapped, err = s.P.WrapKey(s.H, []*pkcs11.Mechanism{oaep()}, pk, k); err != nil {
			s.P.DestroyObject(s.H, k)
			return fmt.Errorf("wrap the KTK to the key-import key: %w", hsm.Call("C_WrapKey", oaep(), err))
		}
		if err := s.P.SetAttributeValue(s.H, k, []*pkcs11.Attribute{attr(pkcs11.CKA_EXTRACTABLE, false)}); err != nil {
			return fmt.Errorf("make the KTK non-extractable: %w", hsm.Call("C_SetAttributeValue", nil, err))
		}
		out.CheckValue = checkValue(s, k)
		return nil
	})
	if err != nil {
		return KTK{}, fmt.Errorf("receiver: make KTK %q: %w", label, err)
	}
	return out, nil
}

// keyLabel is the label of a card's imported K_I.
func keyLabel(id []byte) string { return "card-" + hex.EncodeToString(id) }

// Result is what became of one line of an export file.
type Result struct {
	Line   int
	ID     []byte
	Err    error  // why the line was refused; nil: imported
	KCV    string // "match", "absent" (the file has none), "not given" (this token computes none)
	Exists bool   // the card's key was already in the token (same value: a re-run)
}

// ErrKCVMismatch is an imported key whose check value differs from the
// file's: the key is destroyed, the line refused.
var ErrKCVMismatch = errors.New("the key's check value differs from the file's")

// Import reads the export at manifestPath (export.Read) and unwraps each
// K_I under the KTK labelled ktkLabel into a private token object
// labelled card-<id hex> that is sensitive, never extractable, can verify
// a MAC and nothing else. A line that does not parse, whose wrapped key
// the token refuses (RFC 3394's integrity check) or whose check value
// differs, is refused with its reason; the others land. fn, if set, gets
// every line's result. It returns the manifest and the counts; a file
// that is not the one its manifest describes is the error (after every
// line was tried).
func Import(ctx context.Context, tok *hsm.Token, ktkLabel, manifestPath string, fn func(Result)) (m export.Manifest, imported, refused int, err error) {
	m, err = export.Read(manifestPath, func(line int, r export.Record, perr error) error {
		res := Result{Line: line, ID: r.ID, Err: perr}
		if perr == nil {
			res.Err = tok.With(ctx, func(s hsm.Session) error { return importOne(s, ktkLabel, r, &res) })
		}
		if res.Err != nil {
			refused++
		} else {
			imported++
		}
		if fn != nil {
			fn(res)
		}
		return nil
	})
	return m, imported, refused, err
}

func importOne(s hsm.Session, ktkLabel string, r export.Record, res *Result) error {
	ktk, err := find(s, pkcs11.CKO_SECRET_KEY, ktkLabel)
	if err != nil {
		return fmt.Errorf("the KTK: %w", err)
	}
	label := keyLabel(r.ID)
	if _, err := find(s, pkcs11.CKO_SECRET_KEY, label); err == nil {
		res.Exists = true
		return nil
	}
	h, err := unwrapKey(s, ktk, r.Wrapped, attr(pkcs11.CKA_TOKEN, true), attr(pkcs11.CKA_LABEL, label))
	if err != nil {
		return err
	}
	got := checkValue(s, h)
	switch {
	case r.KCV == nil:
		res.KCV = "absent"
	case got == nil:
		res.KCV = "not given"
	case bytes.Equal(got, r.KCV):
		res.KCV = "match"
	default:
		s.P.DestroyObject(s.H, h)
		return fmt.Errorf("%w (file %x, token %x)", ErrKCVMismatch, []byte(r.KCV), got)
	}
	return nil
}

// unwrapKey unwraps an exported K_I under ktk into a private key that is sensitive, never extractable and can verify a
// MAC and nothing else; where is CKA_TOKEN and, for a token object, its
// label.
func unwrapKey(s hsm.Session, ktk pkcs11.ObjectHandle, wrapped []byte, where ...*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	m := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP, nil)
	h, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, ktk, wrapped, append([]*pkcs11.Attribute{
		attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		attr(pkcs11.CKA_PRIVATE, true), attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false),
		attr(pkcs11.CKA_VERIFY, true), attr(pkcs11.CKA_SIGN, false), attr(pkcs11.CKA_ENCRYPT, false),
		attr(pkcs11.CKA_DECRYPT, false), attr(pkcs11.CKA_WRAP, false), attr(pkcs11.CKA_UNWRAP, false),
		attr(pkcs11.CKA_DERIVE, false)}, where...))
	if err != nil {
		return 0, fmt.Errorf("the token refused the wrapped key (RFC 3394 integrity check, or not under this KTK): %w", hsm.Call("C_UnwrapKey", m, err))
	}
	return h, nil
}

// verifyMAC checks mac over the card's message for challenge with key k
// (C_Verify, AES-CMAC, PROTOCOL.md §4).
func verifyMAC(s hsm.Session, k pkcs11.ObjectHandle, id, challenge, mac []byte) (bool, error) {
	msg, err := protocol.AuthMessage(id, challenge)
	if err != nil {
		return false, err
	}
	m := pkcs11.NewMechanism(pkcs11.CKM_AES_CMAC, nil)
	if err := s.P.VerifyInit(s.H, []*pkcs11.Mechanism{m}, k); err != nil {
		return false, hsm.Call("C_VerifyInit", m, err)
	}
	switch err := s.P.Verify(s.H, msg, mac); {
	case err == nil:
		return true, nil
	case hsm.IsRV(err, pkcs11.CKR_SIGNATURE_INVALID), hsm.IsRV(err, pkcs11.CKR_SIGNATURE_LEN_RANGE):
		return false, nil
	default:
		return false, hsm.Call("C_Verify", m, err)
	}
}

// Check verifies a card's MAC over challenge with the K_I of one export
// record, unwrapped under the KTK into a session key that is destroyed
// afterwards: a spot check of a file before (or without) its import.
func Check(ctx context.Context, tok *hsm.Token, ktkLabel string, r export.Record, challenge, mac []byte) (bool, error) {
	var ok bool
	err := tok.With(ctx, func(s hsm.Session) error {
		ktk, err := find(s, pkcs11.CKO_SECRET_KEY, ktkLabel)
		if err != nil {
			return fmt.Errorf("the KTK: %w", err)
		}
		k, err := unwrapKey(s, ktk, r.Wrapped, attr(pkcs11.CKA_TOKEN, false))
		if err != nil {
			return err
		}
		defer s.P.DestroyObject(s.H, k)
		ok, err = verifyMAC(s, k, r.ID, challenge, mac)
		return err
	})
	return ok, err
}

// Verify checks a card's MAC over challenge with its imported K_I, in the
// token (C_Verify, AES-CMAC over the message of PROTOCOL.md §4).
func Verify(ctx context.Context, tok *hsm.Token, id, challenge, mac []byte) (bool, error) {
	var ok bool
	err := tok.With(ctx, func(s hsm.Session) error {
		k, err := find(s, pkcs11.CKO_SECRET_KEY, keyLabel(id))
		if err != nil {
			return fmt.Errorf("card %x has no key here: %w", id, err)
		}
		ok, err = verifyMAC(s, k, id, challenge, mac)
		return err
	})
	return ok, err
}
