package hsm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// DefaultRecycleEvery is how many token operations (imports, verifications,
// re-wraps) pass between two Token.Recycle calls. SoftHSM2 keeps every
// destroyed session object until it is finalized, ≈ 0.5 KiB per card
// imported and ≈ 0.25 KiB per verification (docs/BENCHMARKS.md, "Why RSS
// grew before"), and C_Finalize takes ≈ 2 µs for each (measured: 8 ms
// for 4096 verifications' objects, 42–85 ms for 16 384). Every 4096
// bounds both the dead objects (1–2 MiB) and the pause (≈ 10 ms); the
// fixed part of a recycle (≈ 1 ms, and a login on next use) is < 1 µs
// per operation.
const DefaultRecycleEvery = 4096

// NeverRecycle as a RecycleEvery turns the recycling off: the token's
// library then keeps what it keeps (tests, and measuring the leak).
const NeverRecycle = -1

// RecycleEnv names the environment variable that sets the period of a
// CardKeys or Rewrapper whose RecycleEvery is 0: a positive count, or
// "off" (or -1) for NeverRecycle. Unset or empty: DefaultRecycleEvery.
// It lets an operator (or a soak run of issuer serve) tune the quirk
// without any command knowing about it; a bad value is ignored.
const RecycleEnv = "BLINDPERSO_HSM_RECYCLE_EVERY"

var envRecycle = sync.OnceValue(func() int64 {
	v := strings.TrimSpace(os.Getenv(RecycleEnv))
	if v == "off" {
		return NeverRecycle
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n == 0 || n < NeverRecycle {
		return DefaultRecycleEvery
	}
	return n
})

// RecycleStats says how the recycling of a CardKeys went: how many
// Token.Recycle calls it made and how long each held every call of the
// process into the token off (the pause: the wait for the calls in
// flight, C_Finalize, C_Initialize). A call that starts during a recycle
// waits for it, then reopens its session (≈ 2 ms on SoftHSM2 for the
// first, which logs in again): no operation waits much longer than Max.
type RecycleStats struct {
	Every    int64         // operations between two recycles; NeverRecycle: none
	Ops      int64         // operations counted
	Recycles int64         // Token.Recycle calls that did the work
	Failures int64         // of which failed (LastErr)
	LastErr  error         // the last failure, or nil
	Last     time.Duration // the last recycle's pause
	Max      time.Duration // the longest pause
	Total    time.Duration // all pauses
}

// recycler calls Token.Recycle every n operations, on the goroutine of
// the nth, after its own token work (so no session object of its own is
// alive), and keeps RecycleStats.
type recycler struct {
	tok   *Token
	every int64
	ops   atomic.Int64
	// recycle, if set, replaces tok.Recycle (tests: a failing recycle).
	recycle func() error

	mu    sync.Mutex
	stats RecycleStats
}

func (r *recycler) period() int64 {
	switch {
	case r.every < 0:
		return NeverRecycle
	case r.every == 0:
		return envRecycle()
	}
	return r.every
}

// count counts one finished operation and recycles the token when its
// turn comes. It never fails the operation: the operation's result is
// already known and stands. A failed recycle leaves the library
// finalized or half initialized; the next With re-initializes it (its
// recovery from CKR_CRYPTOKI_NOT_INITIALIZED, docs/HSM.md §3), and a
// token that is really gone fails that operation. The failure is in
// Stats meanwhile.
func (r *recycler) count() {
	every := r.period()
	n := r.ops.Add(1)
	if every <= 0 || n%every != 0 || !r.tok.KeepsDestroyedObjects() {
		return
	}
	recycle := r.tok.Recycle
	if r.recycle != nil {
		recycle = r.recycle
	}
	start := time.Now()
	err := recycle()
	d := time.Since(start)
	r.mu.Lock()
	defer r.mu.Unlock()
	st := &r.stats
	st.Recycles++
	st.Last, st.Total = d, st.Total+d
	st.Max = max(st.Max, d)
	if err != nil {
		st.Failures++
		st.LastErr = fmt.Errorf("recycle the token: %w", err)
	}
}

func (r *recycler) snapshot() RecycleStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.stats
	st.Every, st.Ops = r.period(), r.ops.Load()
	return st
}

// Recycler is the recycling of CardKeys and Rewrapper for other token
// work of the same kind (issuer export): Count after each operation.
type Recycler struct{ r recycler }

// NewRecycler recycles tok every every operations (0: RecycleEnv, else
// DefaultRecycleEvery; NeverRecycle: never).
func NewRecycler(tok *Token, every int64) *Recycler {
	return &Recycler{r: recycler{tok: tok, every: every}}
}

// Count counts one finished operation and recycles when its turn comes;
// it never fails (see recycler.count).
func (r *Recycler) Count() { r.r.count() }

// Stats says how the recycling went so far.
func (r *Recycler) Stats() RecycleStats { return r.r.snapshot() }

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
	// RecycleEvery, if set before first use, is the number of operations
	// between two recycles (NeverRecycle: none; 0: RecycleEnv, else
	// DefaultRecycleEvery). Imports and verifications count alike: a
	// service that only verifies recycles as the importer does.
	RecycleEvery int64

	once            sync.Once
	skCopy, kekCopy *SessionCopy
	rec             recycler
}

func (k *CardKeys) init() {
	k.once.Do(func() {
		k.rec.tok, k.rec.every = k.Token, k.RecycleEvery
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
	k.rec.count()
	return blob, nil
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
	k.rec.count()
	return ok, nil
}

// Stats says how the recycling went so far (see RecycleStats).
func (k *CardKeys) Stats() RecycleStats {
	k.init()
	return k.rec.snapshot()
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
	// RecycleEvery: as CardKeys's.
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
		r.rec.tok, r.rec.every = r.Token, r.RecycleEvery
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
	r.rec.count()
	return nb, nil
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
