package issuer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"time"

	"blindperso/hsm"
	"blindperso/protocol"
)

// KEK rotation: every stored K_I is moved from one KEK to another inside
// the token (hsm.RewrapCardKey: unwrap under the old KEK, wrap under the
// new one, destroy) and its blob replaced in the store. docs/OPERATIONS.md
// has the runbook, docs/HSM.md ("KEK rotation") why the token allows it
// and who can do it.
//
// A blob is replaced only by its re-wrap, in a transaction that checks
// the row still holds the old blob under the old KEK (KEKStore.
// ReplaceBlobs): at every point of a run, and after a kill -9 at any
// point, every card's blob is under exactly one of the two KEKs, and a
// rerun picks up what is left under the old one. Nothing is done twice:
// a card already under the new KEK is not read again.

// RotateOptions are the knobs of Rotate.
type RotateOptions struct {
	// Workers is the number of token sessions used in parallel (at
	// least 1; the Token should have as many).
	Workers int
	// Progress, if set, is called after each committed group.
	Progress func(RotateProgress)
	// Log, if set, gets one line per card whose blob could not be
	// re-wrapped (the token's words; never a key).
	Log *slog.Logger

	// page, group, groupWait and recycle replace rotatePage,
	// rotateGroup, groupWait and hsm.DefaultRecycleEvery (tests).
	page, group int
	groupWait   time.Duration
	recycle     int64
}

// RotateProgress is where a rotation stands.
type RotateProgress struct {
	// Total is the number of blobs under the old KEK when the run began.
	Total     int
	Rewrapped int
	Failed    int
	Elapsed   time.Duration
}

// RotateResult is what a rotation did.
type RotateResult struct {
	From string `json:"from"`
	To   string `json:"to"`
	// Total is the number of blobs under From when the run began.
	Total int `json:"total"`
	// Rewrapped blobs moved from From to To by this run.
	Rewrapped int `json:"rewrapped"`
	// AlreadyDone is the number of blobs under To when the run began
	// (earlier runs), plus any another run replaced during this one.
	AlreadyDone int `json:"already_done"`
	// Failed blobs could not be re-wrapped (Failures says why, for the
	// first maxFailures); they stay under From.
	Failed   int             `json:"failed"`
	Failures []RotateFailure `json:"failures"`
	// UnderFrom and UnderTo count the blobs under each KEK at the end.
	UnderFrom int     `json:"under_from"`
	UnderTo   int     `json:"under_to"`
	Seconds   float64 `json:"seconds"`
}

// RotateFailure is one card whose blob the token would not re-wrap.
type RotateFailure struct {
	CardID protocol.Hex `json:"card_id"`
	Reason string       `json:"reason"`
}

const (
	// rotatePage is how many cards the reader takes from the store per
	// query.
	rotatePage = 1024
	// rotateChunk is how many cards a worker takes at once, and hands to
	// the writer at once: one channel operation per chunk, not per card.
	rotateChunk = 32
	// rotateGroup is the most blobs replaced in one transaction.
	rotateGroup = 1024
	// maxFailures is how many failures the result lists.
	maxFailures = 1000
)

// rotated is a chunk of cards after the token's work: per card the new
// blob, or why not.
type rotated struct {
	cards []CardBlob
	blobs []hsm.Blob
	errs  []error
}

// Rotate moves every blob the store holds under from to to, in the token
// tok (which holds both KEKs). It refuses from == to, a missing KEK, and
// on a token that enforces CKA_WRAP_WITH_TRUSTED a to that is not
// CKA_TRUSTED. A blob the token refuses (corrupt, or not under from) is a
// failure and stays under from; a failure that is not about one blob (the
// old KEK cannot re-wrap at all, the token or the store is gone, ctx is
// done) stops the run and is returned with the counts so far. Rerunning
// after an error or a kill finishes the work.
func Rotate(ctx context.Context, st KEKStore, tok *hsm.Token, from, to *hsm.KEKRef, opt RotateOptions) (RotateResult, error) {
	start := time.Now()
	var res RotateResult
	if from == nil || from.Label == "" || to == nil || to.Label == "" {
		return res, errors.New("KEK rotation: both the old (--from) and the new (--to) KEK label are required")
	}
	res.From, res.To, res.Failures = from.Label, to.Label, []RotateFailure{}
	if from.Label == to.Label {
		return res, fmt.Errorf("KEK rotation: --from and --to are the same KEK %q: nothing to rotate", from.Label)
	}
	if m := tok.Mechanisms(); m != nil && m.EnforcesWrapWithTrusted && !to.Trusted {
		return res, fmt.Errorf("KEK rotation: the new KEK %q is not CKA_TRUSTED, and token %q enforces CKA_WRAP_WITH_TRUSTED: "+
			"K_I can leave the token only under a key the security officer marked trusted; generate the new KEK by ceremony "+
			"(kek-rotation) or with issuer kek and the SO PIN", to.Label, tok.Info().Label)
	}
	counts, err := st.KEKCounts(ctx)
	if err != nil {
		return res, err
	}
	res.Total, res.AlreadyDone = counts[from.Label], counts[to.Label]
	res.UnderFrom, res.UnderTo = res.Total, res.AlreadyDone
	if res.Total == 0 {
		res.Seconds = time.Since(start).Seconds()
		return res, nil
	}
	r := &rotation{st: st, tok: tok, from: from, to: to, opt: opt, res: &res, start: start}
	err = r.run(ctx)
	if counts, cerr := st.KEKCounts(context.WithoutCancel(ctx)); cerr == nil {
		res.UnderFrom, res.UnderTo = counts[from.Label], counts[to.Label]
	} else {
		err = errors.Join(err, cerr)
	}
	res.Seconds = time.Since(start).Seconds()
	if err != nil {
		return res, fmt.Errorf("KEK rotation %s → %s: %w", from.Label, to.Label, err)
	}
	return res, nil
}

type rotation struct {
	st       KEKStore
	tok      *hsm.Token
	from, to *hsm.KEKRef
	opt      RotateOptions
	res      *RotateResult
	start    time.Time

	rw *hsm.Rewrapper
}

func (r *rotation) run(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	n := max(r.opt.Workers, 1)
	page := r.opt.page
	if page <= 0 {
		page = rotatePage
	}
	r.rw = &hsm.Rewrapper{Token: r.tok, From: r.from, To: r.to, RecycleEvery: r.opt.recycle}
	defer r.rw.Close(context.WithoutCancel(ctx))

	jobs := make(chan []CardBlob, 2*n)
	out := make(chan rotated, 2*n+2*rotateGroup/rotateChunk)
	// The reader: pages of cards under the old KEK, in Id order from a
	// cursor, cut into chunks. A card re-wrapped meanwhile is under the
	// new KEK and not read again; one in flight is behind the cursor.
	go func() {
		defer close(jobs)
		var after []byte
		for {
			cs, err := r.st.BlobsUnderKEK(ctx, r.from.Label, after, page)
			if err != nil {
				cancel(err)
				return
			}
			if len(cs) == 0 {
				return
			}
			after = cs[len(cs)-1].ID
			for len(cs) > 0 {
				k := min(rotateChunk, len(cs))
				select {
				case jobs <- cs[:k:k]:
				case <-ctx.Done():
					return
				}
				cs = cs[k:]
			}
		}
	}()
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// One OS thread for the worker's token calls, as the
			// importer's workers.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			for cs := range jobs {
				if ctx.Err() != nil {
					continue // drain
				}
				rt := rotated{cards: cs, blobs: make([]hsm.Blob, len(cs)), errs: make([]error, len(cs))}
				for i, c := range cs {
					b, err := r.rw.Rewrap(ctx, c.Blob)
					if err != nil && !errors.Is(err, hsm.ErrBadBlob) {
						cancel(err)
						break
					}
					rt.blobs[i], rt.errs[i] = b, err
				}
				if ctx.Err() != nil {
					continue
				}
				select {
				case out <- rt:
				case <-ctx.Done():
				}
			}
		}()
	}
	go func() {
		wg.Wait()
		close(out)
	}()
	r.write(ctx, out, cancel)
	err := context.Cause(ctx)
	if err == nil || ctx.Err() == nil {
		return nil
	}
	if errors.Is(err, hsm.ErrKEKNotRewrappable) {
		// The sentence that says what to do, and the token's answer.
		var ce *hsm.CallError
		if errors.As(err, &ce) {
			return fmt.Errorf("the old KEK %q cannot re-wrap (token %q answered %v): %w", r.from.Label, r.tok.Info().Label, ce, hsm.ErrKEKNotRewrappable)
		}
		return fmt.Errorf("the old KEK %q cannot re-wrap: %w", r.from.Label, hsm.ErrKEKNotRewrappable)
	}
	return err
}

// write is the store writer: it takes the workers' chunks and replaces
// their blobs, up to rotateGroup per transaction, committing what has
// arrived after groupWait or when the group is full.
func (r *rotation) write(ctx context.Context, out <-chan rotated, stop func(error)) {
	maxG := r.opt.group
	if maxG <= 0 {
		maxG = rotateGroup
	}
	wait := r.opt.groupWait
	if wait <= 0 {
		wait = groupWait
	}
	group := make([]BlobReplacement, 0, maxG+rotateChunk)
	var failed []RotateFailure
	timer := time.NewTimer(wait)
	timer.Stop()
	add := func(rt rotated) {
		for i, c := range rt.cards {
			if err := rt.errs[i]; err != nil {
				failed = append(failed, RotateFailure{CardID: c.ID, Reason: err.Error()})
				if r.opt.Log != nil {
					r.opt.Log.Warn("blob not re-wrapped", "card", fmt.Sprintf("%x", []byte(c.ID)), "err", err)
				}
				continue
			}
			if rt.blobs[i].KEK == "" {
				continue // not reached: the worker stopped
			}
			group = append(group, BlobReplacement{ID: c.ID, Old: c.Blob.Wrapped, New: rt.blobs[i]})
		}
	}
	commit := func() {
		if ctx.Err() != nil {
			return
		}
		if len(group) > 0 {
			done, err := r.st.ReplaceBlobs(ctx, r.from.Label, group)
			if err != nil {
				stop(err)
				return
			}
			for _, d := range done {
				if d {
					r.res.Rewrapped++
				} else {
					r.res.AlreadyDone++
				}
			}
		}
		r.res.Failed += len(failed)
		for _, f := range failed {
			if len(r.res.Failures) < maxFailures {
				r.res.Failures = append(r.res.Failures, f)
			}
		}
		group, failed = group[:0], failed[:0]
		if r.opt.Progress != nil {
			r.opt.Progress(RotateProgress{Total: r.res.Total, Rewrapped: r.res.Rewrapped, Failed: r.res.Failed, Elapsed: time.Since(r.start)})
		}
	}
	for rt := range out {
		if ctx.Err() != nil {
			continue // drain
		}
		add(rt)
		closed := false
		timer.Reset(wait)
	fill:
		for len(group)+len(failed) < maxG {
			select {
			case rt, ok := <-out:
				if !ok {
					closed = true
					break fill
				}
				add(rt)
			case <-timer.C:
				break fill
			case <-ctx.Done():
				break fill
			}
		}
		timer.Stop()
		commit()
		if closed {
			return
		}
	}
}
