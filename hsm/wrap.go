package hsm

import (
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// WrapRFC5649 names AES key wrap with padding as RFC 5649 defines it: the
// only form in which K_I leaves the token (to the issuer's store).
const WrapRFC5649 = "aes-kwp-rfc5649"

// Blob is K_I as the issuer stores it: wrapped under a KEK that never
// leaves the token. It records which wrapping produced it, by name and by
// the token's mechanism code, because the code alone is ambiguous: 0x210A
// is RFC 5649 in SoftHSM2 but RFC 3394 with PKCS#7 padding in NSS softokn,
// whose RFC 5649 is 0x210B. (SoftHSM2 2.6.1 also zero-pads a key to a
// multiple of 8 bytes before wrapping, which departs from RFC 5649 for
// other lengths; K_I is 16 bytes, where its output is RFC 5649 exactly —
// wrap_test.go checks both tokens against the RFC's arithmetic.)
type Blob struct {
	Scheme    string `json:"scheme"`    // WrapRFC5649
	Mechanism uint   `json:"mechanism"` // the token's code for Scheme when it wrapped
	// KEK identifies the wrapping key (for example its CKA_LABEL or
	// CKA_ID); WrapCardKey leaves it empty for the caller to fill.
	KEK     string `json:"kek"`
	Wrapped []byte `json:"wrapped"` // 24 bytes for an AES-128 K_I
}

// WrapCardKey wraps K_I (from DeriveCardKey) under kek with the token's
// RFC 5649 mechanism (s.M.KeyWrapRFC5649). K_I has CKA_WRAP_WITH_TRUSTED,
// so on tokens that enforce it kek must be CKA_TRUSTED. ki is not
// destroyed.
func WrapCardKey(s Session, kek, ki pkcs11.ObjectHandle) (Blob, error) {
	mech, err := rfc5649(s)
	if err != nil {
		return Blob{}, fmt.Errorf("wrap K_I: %w", err)
	}
	m := pkcs11.NewMechanism(mech, nil)
	// One call with our own buffer (wrap_cgo.go: NSS softokn misreports
	// the RFC 5649 output length); miekg/pkcs11's two-call WrapKey if the
	// module's function list cannot be reached.
	w, direct, err := wrapKeyDirect(s, mech, kek, ki)
	if !direct {
		w, err = s.P.WrapKey(s.H, []*pkcs11.Mechanism{m}, kek, ki)
	}
	if err != nil {
		// CKR_KEY_NOT_WRAPPABLE here means the KEK is not CKA_TRUSTED
		// (K_I is CKA_WRAP_WITH_TRUSTED); Explain says so.
		return Blob{}, fmt.Errorf("wrap K_I (%s): %w", WrapRFC5649, Call("C_WrapKey", m, err))
	}
	if len(w) != wrappedKILen {
		return Blob{}, fmt.Errorf("wrap K_I (%s): the token returned %d bytes, want %d (is ki a K_I from DeriveCardKey?)", WrapRFC5649, len(w), wrappedKILen)
	}
	return Blob{Scheme: WrapRFC5649, Mechanism: mech, Wrapped: w}, nil
}

// wrappedKILen is RFC 5649's output for a 16-byte key: the 8-byte
// integrity block and two 8-byte blocks.
const wrappedKILen = 8 + protocol.KeySize

// ImportCard is the issuer's import of one card: derive K_I from c in the
// token, wrap it under kek, destroy it. Only the wrapped blob comes out.
func ImportCard(s Session, p protocol.Profile, sk, kek pkcs11.ObjectHandle, issuerSPKI, c []byte) (Blob, error) {
	ki, err := DeriveCardKey(s, p, sk, kek, issuerSPKI, c)
	if err != nil {
		return Blob{}, err
	}
	b, err := WrapCardKey(s, kek, ki)
	if derr := s.P.DestroyObject(s.H, ki); derr != nil {
		// A K_I left in the session would outlive this call: report it
		// even when the wrap worked.
		err = errors.Join(err, fmt.Errorf("destroy K_I: %w", Call("C_DestroyObject", nil, derr)))
	}
	if err != nil {
		return Blob{}, fmt.Errorf("import card (%s): %w", p.Name, err)
	}
	return b, nil
}

// rfc5649 is the token's mechanism code for RFC 5649 key wrap.
func rfc5649(s Session) (uint, error) {
	if s.M == nil || s.M.KeyWrapRFC5649 == 0 {
		return 0, errors.New("the token's mechanism table has no RFC 5649 key wrap")
	}
	return s.M.KeyWrapRFC5649, nil
}
