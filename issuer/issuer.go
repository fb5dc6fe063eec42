// Package issuer is the issuer's side of a personalization run: it takes
// the perso station's records, has the token derive and wrap each card's
// K_I, and verifies cards' answers to challenges in the token. Only
// wrapped blobs and public data pass through it.
package issuer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/miekg/pkcs11"

	"blindperso/hsm"
	"blindperso/perso"
	"blindperso/protocol"
)

// CardKey is what the issuer stores per card: public data and K_I wrapped
// under the KEK. The blob records the wrap scheme, the token's mechanism
// code and the KEK's label, so it can be unwrapped later by the right key
// with the right mechanism.
type CardKey struct {
	ID                protocol.Hex `json:"id"`
	Profile           string       `json:"profile"`
	IssuerFingerprint protocol.Hex `json:"issuer_fingerprint"`
	Blob              hsm.Blob     `json:"blob"`
}

// Issuer binds a token to the issuer key the cards were personalized
// under and to the KEK that protects stored card keys.
//
// The token's work uses session copies of the two keys (hsm.SessionCopy:
// made in the token by C_CopyObject with CKA_TOKEN false, the same
// protections, never leaving it), made on first use: SoftHSM2 re-checks a
// token object's file on every use and NSS softokn reads it through its
// database, and with the copies the in-token chain runs 1.2× (RSA) to
// 1.6× (ECDH) faster on SoftHSM2, 1.3× to 1.7× on NSS softokn, and a
// verification 1.5× and 25× faster (docs/BENCHMARKS.md, "Issuer
// import"). A token that refuses the copy is used with its token
// objects. Close destroys the copies; closing the Token does too.
type Issuer struct {
	Token *hsm.Token
	Key   *hsm.IssuerKeyRef
	KEK   *hsm.KEKRef
	// TokenObjects, if set before first use, makes the issuer use the
	// token objects themselves, without session copies.
	TokenObjects bool

	copiesOnce      sync.Once
	skCopy, kekCopy *hsm.SessionCopy
	verified        atomic.Int64
}

// verifyRecycleEvery is how many verifications pass between two
// Token.Recycle calls: each leaves a destroyed session object that
// SoftHSM2 frees only when finalized (hsm.Token.KeepsDestroyedObjects),
// so a long-running verifier would otherwise grow by ≈ 0.2 KiB per
// verification. A variable so that a test can make it small.
var verifyRecycleEvery int64 = recycleEvery

// Import derives one card's K_I from its record in the token and returns
// it wrapped. A record for another issuer key, an unknown profile, or a c
// the token refuses is an error naming the card.
func (is *Issuer) Import(ctx context.Context, rec perso.Record) (CardKey, error) {
	fp := is.Key.Fingerprint()
	if !bytes.Equal(rec.Fingerprint, fp[:]) {
		return CardKey{}, fmt.Errorf("card %X: personalized under issuer key %x, not this issuer's %x", []byte(rec.ID), []byte(rec.Fingerprint), fp)
	}
	p, err := protocol.ProfileByName(rec.Profile)
	if err != nil {
		return CardKey{}, fmt.Errorf("card %X: %w", []byte(rec.ID), err)
	}
	var blob hsm.Blob
	err = is.Token.With(ctx, func(s hsm.Session) error {
		sk, kek, err := is.handles(s)
		if err != nil {
			return err
		}
		blob, err = hsm.ImportCard(s, p, sk, kek, is.Key.Public.SPKI, rec.C)
		return err
	})
	if err != nil {
		return CardKey{}, fmt.Errorf("import card %X: %w", []byte(rec.ID), err)
	}
	blob.KEK = is.KEK.Label
	return CardKey{ID: rec.ID, Profile: p.Name, IssuerFingerprint: fp[:], Blob: blob}, nil
}

// Verify checks a card's MAC over challenge in the token. false means the
// card answered with another key: the paper's sign of an active attack
// during personalization (or a broken card).
func (is *Issuer) Verify(ctx context.Context, ck CardKey, challenge, mac []byte) (bool, error) {
	if ck.Blob.KEK != is.KEK.Label {
		return false, fmt.Errorf("card %X: key wrapped under KEK %q, not %q", []byte(ck.ID), ck.Blob.KEK, is.KEK.Label)
	}
	var ok bool
	err := is.Token.With(ctx, func(s hsm.Session) error {
		kek, err := is.kekHandle(s)
		if err != nil {
			return err
		}
		ok, err = hsm.VerifyCardMAC(s, kek, ck.Blob, ck.ID, challenge, mac)
		return err
	})
	if err != nil {
		return false, fmt.Errorf("verify card %X: %w", []byte(ck.ID), err)
	}
	if is.verified.Add(1)%verifyRecycleEvery == 0 {
		if err := is.Token.Recycle(); err != nil {
			return false, fmt.Errorf("verify card %X: recycle the token: %w", []byte(ck.ID), err)
		}
	}
	return ok, nil
}

// handles returns the issuer key's and the KEK's handles for s: their
// session copies, or the token objects (TokenObjects, or a token that
// will not copy them).
func (is *Issuer) handles(s hsm.Session) (sk, kek pkcs11.ObjectHandle, err error) {
	is.copiesOnce.Do(is.makeCopies)
	if is.skCopy != nil {
		sk, err = is.skCopy.Handle(s)
	} else {
		sk, err = is.Key.Handle(s)
	}
	if err != nil {
		return 0, 0, err
	}
	kek, err = is.kekHandle(s)
	return sk, kek, err
}

func (is *Issuer) kekHandle(s hsm.Session) (pkcs11.ObjectHandle, error) {
	is.copiesOnce.Do(is.makeCopies)
	if is.kekCopy != nil {
		return is.kekCopy.Handle(s)
	}
	return is.KEK.Handle(s)
}

func (is *Issuer) makeCopies() {
	if !is.TokenObjects {
		is.skCopy, is.kekCopy = is.Key.SessionCopy(), is.KEK.SessionCopy()
	}
}

// Close destroys the session copies of the keys (the Token stays open:
// it is the caller's). The Issuer can still be used afterwards, with the
// token objects.
func (is *Issuer) Close(ctx context.Context) error {
	is.copiesOnce.Do(func() {}) // no copies from now on
	var errs []error
	for _, c := range []*hsm.SessionCopy{is.skCopy, is.kekCopy} {
		if c != nil {
			errs = append(errs, c.Destroy(ctx))
		}
	}
	return errors.Join(errs...)
}
