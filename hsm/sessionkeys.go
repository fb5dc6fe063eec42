package hsm

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/miekg/pkcs11"
)

// SessionCopy is a session-object copy of one of the issuer's token keys
// (the issuer key or the KEK), made inside the token with C_CopyObject
// and CKA_TOKEN false. Nothing leaves the token: the copy has the
// original's attributes — private, sensitive, not extractable, the same
// usages, and for a KEK the same CKA_TRUSTED and unwrap template — and
// dies with the session that made it at the latest.
//
// Why: a session object lives in memory, a token object is read through
// the token's store on every use (docs/BENCHMARKS.md, "Issuer import").
//
// Handle falls back to the token object itself when the token refuses to
// copy the key (SoftHSM2 refuses every changing copy of the read-only
// keys of docs/HSM.md §6), or when the copy does not keep the protections
// checked below; Err says why.
type SessionCopy struct {
	tok   *Token
	what  string
	label string // the copy's CKA_LABEL
	src   func(Session) (pkcs11.ObjectHandle, error)
	// check lists the CK_BBOOL attributes the copy must have with the
	// original's values.
	check []uint

	mu      sync.Mutex
	h       pkcs11.ObjectHandle
	stamp   [2]uint64
	refused error // set once the token would not copy: use the original
	closed  bool
}

// copySuffix ends the CKA_LABEL of a session copy: the original's label
// and CKA_ID find the token object, and must find only it.
const copySuffix = " (session copy)"

// copyChecks are the attributes a session copy must keep as they are on
// the original (CKA_TOKEN aside, which must be false).
var copyChecks = []uint{pkcs11.CKA_PRIVATE, pkcs11.CKA_SENSITIVE, pkcs11.CKA_EXTRACTABLE, pkcs11.CKA_MODIFIABLE,
	pkcs11.CKA_DECRYPT, pkcs11.CKA_SIGN, pkcs11.CKA_SIGN_RECOVER, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE,
	pkcs11.CKA_ENCRYPT, pkcs11.CKA_VERIFY, pkcs11.CKA_WRAP}

// SessionCopy returns a session copy of the issuer key (made on first
// use). The caller destroys it with Destroy when done with the key.
func (k *IssuerKeyRef) SessionCopy() *SessionCopy {
	return &SessionCopy{tok: k.tok, what: "issuer key " + k.Label, label: k.Label + copySuffix, src: k.Handle, check: copyChecks}
}

// SessionCopy returns a session copy of the KEK (made on first use); on a
// token that knows CKA_TRUSTED the copy must be trusted as the KEK is.
func (k *KEKRef) SessionCopy() *SessionCopy {
	check := copyChecks
	if k.Trusted {
		check = append(check[:len(check):len(check)], pkcs11.CKA_TRUSTED)
	}
	return &SessionCopy{tok: k.tok, what: "KEK " + k.Label, label: k.Label + copySuffix, src: k.Handle, check: check}
}

// Handle returns the copy's handle for use in s (a session of the same
// Token), making the copy if there is none in the token's current
// generation. If the token refuses the copy, it returns the original's
// handle. Like IssuerKeyRef.Handle, call it inside the function given to
// Token.With, so that With's retry after a recovery gets a fresh copy.
func (c *SessionCopy) Handle(s Session) (pkcs11.ObjectHandle, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.refused != nil || c.closed {
		return c.src(s)
	}
	stamp := c.tok.handleStamp()
	if c.h != 0 && c.stamp == stamp {
		return c.h, nil
	}
	// A copy of an older stamp is not destroyed: its handle may be void,
	// or (after a re-initialization) another object's. It dies with its
	// session.
	c.h = 0
	orig, err := c.src(s)
	if err != nil {
		return 0, err
	}
	h, err := s.P.CopyObject(s.H, orig, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_LABEL, c.label)})
	if err != nil {
		err = Call("C_CopyObject", nil, err)
		if rv, ok := RV(err); ok && recoverable(uint(rv)) {
			return 0, err // With recovers and retries
		}
		c.refused = fmt.Errorf("copy %s into a session object: %w", c.what, err)
		return orig, nil
	}
	if err := c.verify(s, orig, h); err != nil {
		if derr := s.P.DestroyObject(s.H, h); derr != nil {
			return 0, errors.Join(err, Call("C_DestroyObject", nil, derr))
		}
		c.refused = err
		return orig, nil
	}
	c.h, c.stamp = h, stamp
	return h, nil
}

// verify checks that the copy h of orig is a session object with orig's
// protections.
func (c *SessionCopy) verify(s Session, orig, h pkcs11.ObjectHandle) error {
	tok, err := boolAttr(s, h, pkcs11.CKA_TOKEN)
	if err != nil || tok {
		return fmt.Errorf("session copy of %s: CKA_TOKEN is not false (%v)", c.what, err)
	}
	for _, typ := range c.check {
		want, werr := boolAttr(s, orig, typ)
		got, gerr := boolAttr(s, h, typ)
		if werr != nil && gerr != nil {
			continue // an attribute the token does not know on this key
		}
		if werr != nil || gerr != nil || got != want {
			return fmt.Errorf("session copy of %s: attribute 0x%X is %v, the original's %v (%v, %v)", c.what, typ, got, want, gerr, werr)
		}
	}
	// Whatever the original says, a copy the issuer uses is sensitive
	// and never extractable.
	if v, err := boolAttr(s, h, pkcs11.CKA_SENSITIVE); err != nil || !v {
		return fmt.Errorf("session copy of %s: CKA_SENSITIVE is not true (%v)", c.what, err)
	}
	if v, err := boolAttr(s, h, pkcs11.CKA_EXTRACTABLE); err != nil || v {
		return fmt.Errorf("session copy of %s: CKA_EXTRACTABLE is not false (%v)", c.what, err)
	}
	return nil
}

// boolAttr reads one CK_BBOOL attribute.
func boolAttr(s Session, h pkcs11.ObjectHandle, typ uint) (bool, error) {
	a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(typ, nil)})
	if err != nil {
		return false, Call("C_GetAttributeValue", nil, err)
	}
	if len(a) != 1 || len(a[0].Value) != 1 {
		return false, fmt.Errorf("attribute 0x%X is not a CK_BBOOL", typ)
	}
	return a[0].Value[0] != 0, nil
}

// Err says why Handle gives the original token object instead of a
// copy, or nil.
func (c *SessionCopy) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.refused
}

// Destroy destroys the copy, if there is one, and makes Handle return the
// original from then on. Closing the Token destroys it too (it is a
// session object of the Token's sessions).
func (c *SessionCopy) Destroy(ctx context.Context) error {
	c.mu.Lock()
	c.closed = true
	h, stamp := c.h, c.stamp
	c.h = 0
	c.mu.Unlock() // not held across With: a Handle call in another With would wait for it
	if h == 0 {
		return nil
	}
	err := c.tok.With(ctx, func(s Session) error {
		if c.tok.handleStamp() != stamp {
			return nil // gone with its session, or void
		}
		return Call("C_DestroyObject", nil, s.P.DestroyObject(s.H, h))
	})
	if errors.Is(err, ErrClosed) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("destroy the session copy of %s: %w", c.what, err)
	}
	return nil
}
