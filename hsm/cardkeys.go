package hsm

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// DefaultRecycleEvery is how many token operations (imports, verifications,
// re-wraps) pass between two Token.Recycle calls: SoftHSM2 keeps every
// destroyed session object until it is finalized, ≈ 0.5 KiB per card
// (docs/BENCHMARKS.md, "Why RSS grew before").
const DefaultRecycleEvery = 16384

// recycler calls Token.Recycle every n operations.
type recycler struct {
	tok   *Token
	every int64
	ops   atomic.Int64
}

func (r *recycler) count() error {
	every := r.every
	if every <= 0 {
		every = DefaultRecycleEvery
	}
	if r.ops.Add(1)%every != 0 {
		return nil
	}
	if err := r.tok.Recycle(); err != nil {
		return fmt.Errorf("recycle the token: %w", err)
	}
	return nil
}

// CardKeys is the issuer's use of its token for card keys: the issuer key
// and KEK, their session copies where the token makes them (SessionCopy),
// and SoftHSM2's recycling. It offers the two operations the issuer
// needs, import of a card's c and verification of a card's MAC; nothing
// else of the token's quirks reaches the caller.
type CardKeys struct {
	Token *Token
	Key   *IssuerKeyRef
	KEK   *KEKRef
	// TokenObjects, if set before first use, makes CardKeys use the token
	// objects themselves, without session copies.
	TokenObjects bool
	// RecycleEvery, if set before first use, replaces DefaultRecycleEvery.
	RecycleEvery int64

	once            sync.Once
	skCopy, kekCopy *SessionCopy
	rec             recycler
}

func (k *CardKeys) init() {
	k.once.Do(func() {
		k.rec = recycler{tok: k.Token, every: k.RecycleEvery}
		if !k.TokenObjects {
			k.skCopy, k.kekCopy = k.Key.SessionCopy(), k.KEK.SessionCopy()
		}
	})
}

func (k *CardKeys) skHandle(s Session) (pkcs11.ObjectHandle, error) {
	if k.skCopy != nil {
		return k.skCopy.Handle(s)
	}
	return k.Key.Handle(s)
}

func (k *CardKeys) kekHandle(s Session) (pkcs11.ObjectHandle, error) {
	if k.kekCopy != nil {
		return k.kekCopy.Handle(s)
	}
	return k.KEK.Handle(s)
}

// Import derives the K_I of a card personalized under profile p with
// ciphertext c in the token and returns it wrapped under the KEK (the
// blob names the KEK).
func (k *CardKeys) Import(ctx context.Context, p protocol.Profile, c []byte) (Blob, error) {
	k.init()
	var blob Blob
	err := k.Token.With(ctx, func(s Session) error {
		sk, err := k.skHandle(s)
		if err != nil {
			return err
		}
		kek, err := k.kekHandle(s)
		if err != nil {
			return err
		}
		blob, err = ImportCard(s, p, sk, kek, k.Key.Public.SPKI, c)
		return err
	})
	if err != nil {
		return Blob{}, err
	}
	blob.KEK = k.KEK.Label
	return blob, k.rec.count()
}

// Verify checks a card's MAC over challenge in the token (VerifyCardMAC)
// with the K_I in blob, which must be wrapped under this KEK.
func (k *CardKeys) Verify(ctx context.Context, blob Blob, id, challenge, mac []byte) (bool, error) {
	if blob.KEK != k.KEK.Label {
		return false, fmt.Errorf("key wrapped under KEK %q, not %q", blob.KEK, k.KEK.Label)
	}
	k.init()
	var ok bool
	err := k.Token.With(ctx, func(s Session) error {
		kek, err := k.kekHandle(s)
		if err != nil {
			return err
		}
		ok, err = VerifyCardMAC(s, kek, blob, id, challenge, mac)
		return err
	})
	if err != nil {
		return false, err
	}
	return ok, k.rec.count()
}

// Close destroys the session copies (the Token stays open: it is the
// caller's). CardKeys can still be used afterwards, with the token
// objects.
func (k *CardKeys) Close(ctx context.Context) error {
	k.init()
	var errs []error
	for _, c := range []*SessionCopy{k.skCopy, k.kekCopy} {
		if c != nil {
			errs = append(errs, c.Destroy(ctx))
		}
	}
	return errors.Join(errs...)
}

// Rewrapper moves card keys from one KEK to another inside the token
// (RewrapCardKey), with session copies of both and SoftHSM2's recycling.
type Rewrapper struct {
	Token    *Token
	From, To *KEKRef
	// RecycleEvery, if set before first use, replaces DefaultRecycleEvery.
	RecycleEvery int64

	once     sync.Once
	from, to *SessionCopy
	rec      recycler
}

// ErrBadBlob marks a re-wrap that failed on the one blob (corrupt, under
// another key, or of another scheme), not on the token or the KEKs.
var ErrBadBlob = errors.New("the blob does not unwrap under the old KEK (corrupt, or wrapped under another key)")

// Rewrap re-wraps one blob from From to To; the new blob names To. An
// error about this blob alone wraps ErrBadBlob; any other stops a
// rotation (ErrKEKNotRewrappable among them).
func (r *Rewrapper) Rewrap(ctx context.Context, blob Blob) (Blob, error) {
	r.once.Do(func() {
		r.from, r.to = r.From.SessionCopy(), r.To.SessionCopy()
		r.rec = recycler{tok: r.Token, every: r.RecycleEvery}
	})
	if blob.Scheme != WrapRFC5649 {
		return Blob{}, fmt.Errorf("%w: wrapped with %q, want %q", ErrBadBlob, blob.Scheme, WrapRFC5649)
	}
	var nb Blob
	err := r.Token.With(ctx, func(s Session) error {
		fh, err := r.from.Handle(s)
		if err != nil {
			return err
		}
		th, err := r.to.Handle(s)
		if err != nil {
			return err
		}
		nb, err = RewrapCardKey(s, fh, th, blob)
		return err
	})
	if err != nil {
		if badBlob(err) {
			return Blob{}, fmt.Errorf("%w: KEK %q: %w", ErrBadBlob, r.From.Label, err)
		}
		return Blob{}, err
	}
	nb.KEK = r.To.Label
	return nb, r.rec.count()
}

// Close destroys the session copies of both KEKs.
func (r *Rewrapper) Close(ctx context.Context) {
	if r.from != nil {
		r.from.Destroy(ctx)
		r.to.Destroy(ctx)
	}
}

// badBlob: C_UnwrapKey refused the blob itself. SoftHSM2 2.6.1 answers a
// blob whose RFC 5649 integrity check fails (corrupt, or under another
// KEK) with CKR_GENERAL_ERROR.
func badBlob(err error) bool {
	if errors.Is(err, ErrKEKNotRewrappable) {
		return false
	}
	rv, ok := RV(err)
	var ce *CallError
	if !ok || !errors.As(err, &ce) || ce.Call != "C_UnwrapKey" {
		return false
	}
	switch uint(rv) {
	case pkcs11.CKR_WRAPPED_KEY_INVALID, pkcs11.CKR_WRAPPED_KEY_LEN_RANGE,
		pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE,
		pkcs11.CKR_DATA_INVALID, pkcs11.CKR_DATA_LEN_RANGE,
		pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_FUNCTION_FAILED:
		return true
	}
	return false
}
