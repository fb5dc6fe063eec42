package hsm

import (
	"context"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// ErrKEKNotRewrappable marks a KEK whose CKA_UNWRAP_TEMPLATE forbids the
// extractable K_I a re-wrap needs: a KEK made on SoftHSM2 before KEK
// rotation existed has the unwrap template {CKA_SENSITIVE true,
// CKA_EXTRACTABLE false}, so the token refuses the unwrap
// (CKR_TEMPLATE_INCONSISTENT) and its blobs can never move under another
// KEK inside the token. The way out is a new ceremony (a new KEK, with
// the current template) and a new import of the batches under it.
var ErrKEKNotRewrappable = errors.New("the KEK's CKA_UNWRAP_TEMPLATE does not let K_I be unwrapped for a re-wrap " +
	"(a KEK made before KEK rotation existed forces CKA_EXTRACTABLE false on every key unwrapped under it): " +
	"its blobs cannot be re-wrapped in the token; generate a new KEK by ceremony and import the batches again under it (docs/OPERATIONS.md, KEK rotation)")

// RewrapCardKey moves one stored K_I from the KEK from to the KEK to
// without it leaving the token: C_UnwrapKey of blob under from (the
// token's RFC 5649 mechanism) into a session key that can do nothing —
// sensitive, every usage false, CKA_WRAP_WITH_TRUSTED, and extractable
// only so that C_WrapKey can wrap it — then C_WrapKey under to, and the
// session key is destroyed whatever happened. The returned Blob has the
// scheme and the token's mechanism code; its KEK label is left for the
// caller to fill, as WrapCardKey leaves it.
//
// The unwrap template states every attribute of KEKUnwrapTemplate with
// its value, which a KEK made by GenerateKEK requires. On a token that
// enforces CKA_WRAP_WITH_TRUSTED (SoftHSM2) to must be CKA_TRUSTED: set
// by the security officer, so a holder of the user PIN cannot move K_I
// under a key of their own (the token answers CKR_KEY_NOT_WRAPPABLE). A
// KEK whose unwrap template forbids an extractable key gives
// ErrKEKNotRewrappable.
func RewrapCardKey(s Session, from, to pkcs11.ObjectHandle, blob Blob) (Blob, error) {
	if blob.Scheme != WrapRFC5649 {
		return Blob{}, fmt.Errorf("re-wrap K_I: blob wrapped with %q, want %q", blob.Scheme, WrapRFC5649)
	}
	if len(blob.Wrapped) != wrappedKILen {
		return Blob{}, fmt.Errorf("re-wrap K_I: blob of %d bytes, want %d", len(blob.Wrapped), wrappedKILen)
	}
	mech, err := rfc5649(s)
	if err != nil {
		return Blob{}, fmt.Errorf("re-wrap K_I: %w", err)
	}
	m := pkcs11.NewMechanism(mech, nil)
	ki, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, from, blob.Wrapped, rewrapTemplate(s.M))
	if err != nil {
		err = Call("C_UnwrapKey", m, err)
		if IsRV(err, pkcs11.CKR_TEMPLATE_INCONSISTENT) {
			return Blob{}, fmt.Errorf("re-wrap K_I: unwrap under the old KEK: %w (%w)", ErrKEKNotRewrappable, err)
		}
		return Blob{}, fmt.Errorf("re-wrap K_I: unwrap under the old KEK (%s): %w", WrapRFC5649, err)
	}
	nb, err := WrapCardKey(s, to, ki)
	if err != nil {
		err = fmt.Errorf("re-wrap K_I: under the new KEK: %w", err)
	}
	if derr := s.P.DestroyObject(s.H, ki); derr != nil {
		// K_I left in the session would outlive this call: report it
		// even when the wrap worked.
		err = errors.Join(err, fmt.Errorf("re-wrap K_I: destroy the unwrapped K_I: %w", Call("C_DestroyObject", nil, derr)))
	}
	if err != nil {
		return Blob{}, err
	}
	return nb, nil
}

// rewrapTemplate is K_I unwrapped for a re-wrap: a session object that
// cannot be used for anything (every usage false, read-only), sensitive
// (its value is never readable), and extractable only under a
// CKA_TRUSTED key (CKA_WRAP_WITH_TRUSTED), which is what lets C_WrapKey
// put it under the new KEK.
//
// locked's attributes go in reverse order, CKA_COPYABLE false before
// CKA_MODIFIABLE false: SoftHSM2 2.6.1 applies an unwrap template in its
// order and refused this one (CKR_ATTRIBUTE_READ_ONLY) with CKA_MODIFIABLE
// false first (measured; either attribute alone, or this order, works).
func rewrapTemplate(m *Mechanisms) []*pkcs11.Attribute {
	l := locked(m, false)
	for i, j := 0, len(l)-1; i < j; i, j = i+1, j-1 {
		l[i], l[j] = l[j], l[i]
	}
	return append(append([]*pkcs11.Attribute{
		attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		attr(pkcs11.CKA_TOKEN, false),
		attr(pkcs11.CKA_PRIVATE, true),
		attr(pkcs11.CKA_SENSITIVE, true),
		attr(pkcs11.CKA_EXTRACTABLE, true),
		attr(pkcs11.CKA_WRAP_WITH_TRUSTED, true),
	}, usages(secretUsages)...), l...)
}

// DestroyKEK destroys the KEK labelled label: every blob wrapped under it
// is lost with it, so the caller must first make sure that none is left
// (issuer kek destroy asks the store).
func (t *Token) DestroyKEK(ctx context.Context, label string) error {
	err := t.With(ctx, func(s Session) error {
		h, err := findOne(s, kekFind(label, nil), "secret key")
		if err != nil {
			return err
		}
		return Call("C_DestroyObject", nil, s.P.DestroyObject(s.H, h))
	})
	if err != nil {
		return fmt.Errorf("destroy KEK %q on token %q: %w", label, t.info.Label, err)
	}
	return nil
}
