package hsm

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// DeriveCardKey runs profile p's chain (chain.go) in the token: from the
// card's c and the issuer key sk (an RSA private key with CKA_UNWRAP, or an
// EC P-256 private key with CKA_DERIVE) to K_I, an AES-128 session object.
// issuerSPKI is the issuer public key the card was sent (its canonical DER
// SubjectPublicKeyInfo): it goes into B, and it fixes the shape c must have
// (protocol.ValidCiphertext), which is checked before the token sees c.
// It must be sk's own public key: the chain cannot check that (a private
// key object need not expose its public half), and with another key the
// token derives a K_I that no card holds.
//
// The caller owns the returned handle and must destroy it; on error
// nothing the call made is left in the token. S, S ‖ B and Z never leave
// the token, and are destroyed as soon as the next step has run.
//
// Object attributes, and why:
//
//   - Intermediates (S, S ‖ B, Z): CKA_TOKEN false, CKA_PRIVATE true,
//     CKA_SENSITIVE true, CKA_EXTRACTABLE false, CKA_DERIVE true and every
//     other usage false. They only feed the next derivation; nothing may
//     wrap, encrypt with or read them.
//   - K_I: CKA_TOKEN false, CKA_SENSITIVE true, no usage at all (not even
//     CKA_DERIVE: a derivable key can be turned into extractable bits by
//     mechanisms such as EXTRACT_KEY_FROM_KEY), but CKA_EXTRACTABLE true,
//     because PKCS#11 refuses C_WrapKey on a non-extractable key and K_I
//     has to be stored wrapped. To keep "extractable" from meaning
//     "extractable under any key", K_I has CKA_WRAP_WITH_TRUSTED true: it
//     can then be wrapped only by a key with CKA_TRUSTED, which only the
//     security officer can set (the KEK). SoftHSM2 enforces this; NSS
//     softokn accepts the attribute but does not enforce it
//     (Mechanisms.EnforcesWrapWithTrusted), so there the guarantee rests
//     on K_I being a short-lived session object of the issuer's own
//     session, wrapped and destroyed at once (ImportCard).
//   - K_I of the kbkdf profiles (CKM_SP800_108_COUNTER_KDF): no
//     CKA_EXTRACTABLE in the template, the token decides. NSS softokn
//     refuses to derive an extractable key from a non-extractable S by
//     SP 800-108 (CKR_KEY_FUNCTION_NOT_PERMITTED) and, unasked, makes
//     K_I non-extractable like S; it wraps such keys all the same
//     (measured, NSS softokn 3.87). A token that does not refuse and
//     defaults to extractable gives the K_I of the other chains. The
//     probe's trial wraps what the step makes, so a token whose K_I
//     then cannot be wrapped is reported as missing the step.
//
// kek is the trusted KEK, used only on tokens that do not report the
// length of an unwrapped key (Mechanisms.UnwrapLenSilent: SoftHSM2): there
// S is unwrapped extractable-only-under-trusted-keys and its length is
// read from the size of its RFC 3394 wrap under kek, which is discarded.
// Elsewhere kek may be 0.
func DeriveCardKey(s Session, p protocol.Profile, sk, kek pkcs11.ObjectHandle, issuerSPKI, c []byte) (pkcs11.ObjectHandle, error) {
	chain, err := chainFor(p)
	if err != nil {
		return 0, fmt.Errorf("derive K_I: %w", err)
	}
	ib, err := bindingFor(p, issuerSPKI)
	if err != nil {
		return 0, fmt.Errorf("derive K_I (%s): %w", p.Name, err)
	}
	if err := protocol.ValidCiphertext(p, ib.key, c); err != nil {
		return 0, fmt.Errorf("derive K_I (%s): %w", p.Name, err)
	}
	in := chainInput{c: c, b: ib.b, block: ib.block}

	base := sk
	var owned pkcs11.ObjectHandle // base, when this call made it
	for i, st := range chain {
		h, err := st.run(s, base, &in, i == len(chain)-1, st.lenByWrap(s.M))
		if err != nil {
			h = 0 // never destroy what a failed call may have written there
		}
		if owned != 0 {
			if derr := s.P.DestroyObject(s.H, owned); derr != nil {
				err = errors.Join(err, fmt.Errorf("destroy the previous intermediate: %w", Call("C_DestroyObject", nil, derr)))
			}
			owned = 0
		}
		if err == nil && st.wantLen != 0 {
			err = checkLen(s, st, kek, h, len(c))
		}
		if err != nil {
			if h != 0 {
				if derr := s.P.DestroyObject(s.H, h); derr != nil {
					err = errors.Join(err, fmt.Errorf("destroy the step's object: %w", Call("C_DestroyObject", nil, derr)))
				}
			}
			return 0, fmt.Errorf("derive K_I (%s) step %d %s: %w", p.Name, i+1, st.name, err)
		}
		if auditStep != nil {
			auditStep(s, p, i, h)
		}
		base, owned = h, h
	}
	return owned, nil
}

// auditStep, when set (by tests only), sees every object a chain step
// makes while it still exists: the attribute audit of chain_audit_test.go
// inspects intermediates through it.
var auditStep func(s Session, p protocol.Profile, step int, h pkcs11.ObjectHandle)

// chainInput holds the public bytes a chain feeds the token.
type chainInput struct {
	c, b  []byte
	block []byte // SHA-256(B)[0:16], computed on first use
}

func (in *chainInput) get(i input) []byte {
	switch i {
	case inC:
		return in.c
	case inBinding:
		return in.b
	case inAESBlock:
		if in.block == nil {
			in.block = protocol.AESKDFInput(in.b)
		}
		return in.block
	}
	return nil
}

// run makes the step's PKCS#11 call on base and returns the new object.
// extractable makes an intermediate extractable (under trusted keys only),
// for lenByWrap.
func (st step) run(s Session, base pkcs11.ObjectHandle, in *chainInput, final, extractable bool) (pkcs11.ObjectHandle, error) {
	m, mem, err := st.mechanism(in)
	if err != nil {
		return 0, err
	}
	defer mem.free() // after the call: the module reads it during the call
	switch st.op {
	case opUnwrap:
		h, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, base, in.get(st.data), st.template(s.M, final, extractable))
		return h, Call("C_UnwrapKey", m, err)
	case opDerive:
		h, err := s.P.DeriveKey(s.H, []*pkcs11.Mechanism{m}, base, st.template(s.M, final, extractable))
		return h, Call("C_DeriveKey", m, err)
	}
	return 0, fmt.Errorf("unknown step operation %d", st.op)
}

// mechanism builds the step's CK_MECHANISM. mem, if not nil, is C memory
// the parameter points into; it must be freed after the call.
func (st step) mechanism(in *chainInput) (m *pkcs11.Mechanism, mem *cMem, err error) {
	switch st.param {
	case paramNone:
		return pkcs11.NewMechanism(st.mech, nil), nil, nil
	case paramOAEPSHA1:
		// SoftHSM2 insists on CKZ_DATA_SPECIFIED with a NULL, empty label.
		return pkcs11.NewMechanism(st.mech, pkcs11.NewOAEPParams(pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, pkcs11.CKZ_DATA_SPECIFIED, nil)), nil, nil
	case paramECDH:
		// miekg/pkcs11 copies shared and public data into C memory and
		// leaves pSharedData NULL when it is empty (CKD_NULL requires it).
		return pkcs11.NewMechanism(st.mech, pkcs11.NewECDH1DeriveParams(st.kdf, in.get(st.data), in.c)), nil, nil
	case paramStringData:
		p, mem, err := derivationStringData(in.get(st.data))
		if err != nil {
			return nil, nil, err
		}
		return pkcs11.NewMechanism(st.mech, p), mem, nil
	case paramKBKDF:
		p, mem, err := sp800108CounterParams(kbkdfPRF, []byte(protocol.KBKDFLabel), in.get(st.data))
		if err != nil {
			return nil, nil, err
		}
		return pkcs11.NewMechanism(st.mech, p), mem, nil
	}
	return nil, nil, fmt.Errorf("unknown parameter kind %d", st.param)
}

// template is the attribute template of the object the step makes; see
// DeriveCardKey for the reasons. final marks the step that makes K_I.
// Every object states SecretUnwrapTemplate's attributes (the issuer key
// requires them of S) and is read-only (sessionLocked).
func (st step) template(m *Mechanisms, final, extractable bool) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, st.keyType),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP_WITH_TRUSTED, true),
	}
	if !st.extractableByToken {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, final || extractable))
	}
	if final {
		t = append(t, usages(secretUsages)...)
	} else {
		t = append(t, usages(secretUsages, pkcs11.CKA_DERIVE)...)
	}
	if st.op == opUnwrap {
		t = append(t, sessionLocked...)
	}
	if st.valueLen != 0 {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, st.valueLen))
	}
	return t
}

// lenByWrap reports whether the step's object has its length checked by
// a wrap under the KEK: an unwrap step with a required length, on a token
// that reports CKA_VALUE_LEN 0 for unwrapped keys.
func (st step) lenByWrap(m *Mechanisms) bool {
	return st.op == opUnwrap && st.wantLen != 0 && m != nil && m.UnwrapLenSilent
}

// checkLen requires the step's new object h to be wantLen bytes (lenOfC:
// lenC bytes), without reading it. Where the token reports CKA_VALUE_LEN
// (the length, which is not sensitive) that is read; where it reports 0
// (SoftHSM2 for unwrapped keys) h is wrapped under the trusted kek with
// RFC 3394 key wrap (CKM_AES_KEY_WRAP, the same code on every token),
// whose output is 8 bytes longer than the key, or refused when the key is
// not a multiple of 8 bytes; the wrapped bytes are dropped. An OAEP c
// that carries 16 or 48 bytes instead of 32 is refused on every token.
func checkLen(s Session, st step, kek, h pkcs11.ObjectHandle, lenC int) error {
	want := st.wantLen
	if want == lenOfC {
		want = lenC
	}
	if st.lenByWrap(s.M) {
		if kek == 0 {
			return errors.New("the token does not report the length of an unwrapped key: the KEK is needed to check it")
		}
		m := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP, nil)
		w, err := s.P.WrapKey(s.H, []*pkcs11.Mechanism{m}, kek, h)
		if IsRV(err, pkcs11.CKR_KEY_SIZE_RANGE) || IsRV(err, pkcs11.CKR_DATA_LEN_RANGE) {
			return fmt.Errorf("the token made a secret that is not %d bytes: c does not carry a secret of this profile (%w)", want, Call("C_WrapKey", m, err))
		}
		if err != nil {
			return fmt.Errorf("check the length of the new object by a wrap under the KEK: %w", Call("C_WrapKey", m, err))
		}
		if len(w) != want+8 {
			return fmt.Errorf("the token made a %d-byte secret, want %d: c does not carry a secret of this profile", len(w)-8, want)
		}
		return nil
	}
	got, err := valueLen(s, h)
	if err != nil {
		return fmt.Errorf("read the length of the new object: %w", err)
	}
	if got != uint64(want) {
		return fmt.Errorf("the token made a %d-byte secret, want %d: c does not carry a secret of this profile", got, want)
	}
	return nil
}

func valueLen(s Session, h pkcs11.ObjectHandle) (uint64, error) {
	a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil)})
	if err != nil {
		return 0, Call("C_GetAttributeValue", nil, err)
	}
	return ckULong(a[0].Value)
}

// ckULong decodes a CK_ULONG attribute value (native byte order, the
// platform's unsigned long).
func ckULong(b []byte) (uint64, error) {
	switch len(b) {
	case 8:
		return binary.NativeEndian.Uint64(b), nil
	case 4:
		return uint64(binary.NativeEndian.Uint32(b)), nil
	}
	return 0, fmt.Errorf("CK_ULONG attribute of %d bytes", len(b))
}

// StringDataMechanism builds a mechanism whose parameter is a
// CK_KEY_DERIVATION_STRING_DATA (CONCATENATE_BASE_AND_DATA,
// AES_ECB_ENCRYPT_DATA), for code outside this package that tries such
// derivations (the PIN-holder adversary). Call free after the call.
func StringDataMechanism(mech uint, data []byte) (*pkcs11.Mechanism, func(), error) {
	p, mem, err := derivationStringData(data)
	if err != nil {
		return nil, nil, err
	}
	return pkcs11.NewMechanism(mech, p), mem.free, nil
}
