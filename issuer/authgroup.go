package issuer

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"blindperso/hsm"
)

// Group commit of card authentication (docs/ISSUER.md, "Card
// authentication"): every verification and every challenge issued
// through one store handle goes to that handle's auth committer, a
// goroutine that applies whatever is pending in one transaction — one
// fsync for many — and answers each caller only once that transaction
// has committed.
//
// A verification first reads its card and challenge without a
// transaction and, if the challenge can be consumed and the card is
// active, has the token check the MAC, in the caller's goroutine (token
// calls run in parallel, none inside a transaction). The committer's
// transaction then locks the group's challenges and cards and, for each
// verification in the order they arrived, decides exactly as one
// transaction per verification would: the challenge must exist, be this
// card's, unused and unexpired, else the answer is an ErrChallenge…
// error; it is consumed; a card that is not active is refused; else the
// token's verdict is applied (failed_auth reset, or incremented and the
// card blocked at the limit) and logged. Two verifications of one card
// in a group see each other's effect, as consecutive transactions would;
// the second of two for the same challenge finds it used.

const (
	// maxAuthGroup is the most operations one group transaction applies.
	maxAuthGroup = 256
	// authGroupWait is how long an idle committer, woken by a
	// verification, waits for the verifications that have started
	// (their token call is running) before it commits what it has. It
	// never waits when none has — a lone verification is committed at
	// once — nor when work queued up during its last commit.
	authGroupWait = 2 * time.Millisecond
)

var errStoreClosed = errors.New("store: closed")

// authOp is one operation for the committer: a verification (challenge
// set) or a challenge to store (put set).
type authOp struct {
	ctx context.Context

	// A verification.
	cardID, challenge []byte
	now               time.Time
	maxFailures       int
	// checked is the token's verdict on the MAC under the card's blob
	// as read before the group; nil: the token was not asked (the
	// challenge could not be consumed, or the card was not active).
	checked *macCheck
	// verify asks the token inside the transaction: only in inline mode
	// (authTx), for a verification the group deferred.
	verify func(CardKey) (bool, error)

	// A challenge to store, and the purge that goes with it.
	put         *Challenge
	purge       bool
	purgeBefore time.Time

	out  authOutcome
	done chan struct{}
}

// authOutcome is what a group decided for one operation.
type authOutcome struct {
	res  AuthResult
	cerr error // the challenge was refused
	// deferred: the verification needs the token under another blob
	// than the one it was checked under (the card's key was re-wrapped,
	// or the card became active, meanwhile): nothing was done for it; the
	// caller runs it alone (inline).
	deferred bool
	err      error
}

type macCheck struct {
	blob hsm.Blob
	ok   bool
}

// authCommitter is a store handle's group committer.
type authCommitter struct {
	s        *sqlStore
	mu       sync.Mutex
	queue    []*authOp
	started  bool
	closed   bool
	wake     chan struct{} // capacity 1
	done     chan struct{} // closed when run returns
	inflight atomic.Int64  // verifications between their start and their hand-over
	wait     time.Duration

	groups, ops atomic.Int64 // committed groups and their operations
	busy        atomic.Int64 // nanoseconds spent applying groups

	conn *sql.Conn // the committer's own connection (its page cache stays warm)

	// Tests.
	afterPreRead func()
	beforeCommit func(ops []*authOp) error
}

func newAuthCommitter(s *sqlStore) *authCommitter {
	return &authCommitter{s: s, wake: make(chan struct{}, 1), done: make(chan struct{}), wait: authGroupWait}
}

func (c *authCommitter) signal() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// submit hands op to the committer, starting it on first use.
func (c *authCommitter) submit(op *authOp) error {
	op.done = make(chan struct{})
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return errStoreClosed
	}
	if !c.started {
		c.started = true
		go c.run()
	}
	c.queue = append(c.queue, op)
	c.mu.Unlock()
	c.signal()
	return nil
}

// await waits for op's group to commit (or fail); the caller's context
// ending first is the caller's error (the operation may still be
// applied: its answer is lost, not its effect).
func (c *authCommitter) await(ctx context.Context, op *authOp) (authOutcome, error) {
	select {
	case <-op.done:
		return op.out, nil
	case <-ctx.Done():
		return authOutcome{}, ctx.Err()
	}
}

// close stops the committer once it has applied what is queued.
func (c *authCommitter) close() {
	c.mu.Lock()
	c.closed = true
	started := c.started
	c.mu.Unlock()
	if started {
		c.signal()
		<-c.done
	}
}

func (c *authCommitter) queued() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.queue)
}

func (c *authCommitter) run() {
	defer close(c.done)
	defer func() {
		if c.conn != nil {
			c.conn.Close()
		}
	}()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		idle := false
		c.mu.Lock()
		for len(c.queue) == 0 {
			if c.closed {
				c.mu.Unlock()
				return
			}
			c.mu.Unlock()
			idle = true
			<-c.wake
			c.mu.Lock()
		}
		c.mu.Unlock()
		// Woken from idle by a verification while others are in their
		// token call: they will be here in a fraction of a millisecond,
		// wait for them, a little. Under load, what arrived during the
		// last commit is committed at once (its fsync was the wait).
		if idle && c.wait > 0 && c.inflight.Load() > 0 {
			timer.Reset(c.wait)
		gather:
			for c.inflight.Load() > 0 && c.queued() < maxAuthGroup {
				select {
				case <-c.wake:
				case <-timer.C:
					break gather
				}
			}
			timer.Stop()
		}
		c.mu.Lock()
		n := min(len(c.queue), maxAuthGroup)
		group := make([]*authOp, n)
		copy(group, c.queue)
		c.queue = append(c.queue[:0], c.queue[n:]...)
		c.mu.Unlock()
		c.apply(group)
	}
}

// commitError is a failed COMMIT: whether the group is stored is not
// known, so it is not redone.
type commitError struct{ err error }

func (e *commitError) Error() string { return e.err.Error() }
func (e *commitError) Unwrap() error { return e.err }

// apply runs one group and answers its callers. A group that fails
// before its commit is redone one operation per transaction, so that an
// error (a token's, a statement's, a deadlock on PostgreSQL) is the
// answer of the operation it concerns only.
func (c *authCommitter) apply(group []*authOp) {
	live := group[:0:0]
	for _, op := range group {
		if err := op.ctx.Err(); err != nil {
			op.out = authOutcome{err: err} // the caller has gone: not applied
			close(op.done)
			continue
		}
		live = append(live, op)
	}
	if len(live) == 0 {
		return
	}
	start := time.Now()
	defer func() { c.busy.Add(int64(time.Since(start))) }()
	ctx := context.Background()
	if c.conn == nil {
		conn, err := c.s.db.Conn(ctx)
		if err != nil {
			for _, op := range live {
				op.out = authOutcome{err: fmt.Errorf("store: %w", err)}
				close(op.done)
			}
			return
		}
		c.conn = conn
	}
	var outs []authOutcome
	err := c.s.retry(ctx, "authenticate", func() (err error) {
		outs, err = c.s.authTx(ctx, c.conn, live, false, c.beforeCommit)
		return err
	})
	if err != nil {
		// A fresh connection for what follows: this one may be broken.
		c.conn.Close()
		c.conn = nil
	}
	var ce *commitError
	switch {
	case err == nil:
		c.groups.Add(1)
		c.ops.Add(int64(len(live)))
	case len(live) == 1 || errors.As(err, &ce):
		outs = make([]authOutcome, len(live))
		for i := range outs {
			outs[i].err = err
		}
	default:
		outs = make([]authOutcome, len(live))
		for i, op := range live {
			o, err := c.s.authTx(ctx, c.s.db, []*authOp{op}, false, c.beforeCommit)
			if err != nil {
				outs[i].err = err
				continue
			}
			c.groups.Add(1)
			c.ops.Add(1)
			outs[i] = o[0]
		}
	}
	for i, op := range live {
		op.out = outs[i]
		if op.out.err != nil {
			if op.put != nil {
				op.out.err = fmt.Errorf("store: challenge for card %x: %w", []byte(op.put.CardID), op.out.err)
			} else {
				op.out.err = fmt.Errorf("authenticate card %x: %w", op.cardID, op.out.err)
			}
		}
		close(op.done)
	}
}

// verifyGrouped is sqlStore.Authenticate: the pre-read and the token
// call here, the rest in the committer's group.
func (s *sqlStore) verifyGrouped(ctx context.Context, id, challenge []byte, now time.Time, maxFailures int,
	verify func(CardKey) (bool, error)) (AuthResult, error) {
	c := s.ac
	c.inflight.Add(1)
	arrived := false
	arrive := func() {
		if !arrived {
			arrived = true
			c.inflight.Add(-1)
			c.signal()
		}
	}
	defer arrive()
	pre, err := s.ar.read(ctx, id, challenge, now)
	if err != nil {
		return AuthResult{}, fmt.Errorf("authenticate card %x: %w", id, err)
	}
	if c.afterPreRead != nil {
		c.afterPreRead()
	}
	op := &authOp{ctx: ctx, cardID: id, challenge: challenge, now: now, maxFailures: maxFailures}
	if pre.usable {
		ok, err := verify(pre.key)
		if err != nil {
			return AuthResult{}, fmt.Errorf("authenticate card %x: %w", id, err)
		}
		op.checked = &macCheck{blob: pre.key.Blob, ok: ok}
	}
	if err := c.submit(op); err != nil {
		return AuthResult{}, fmt.Errorf("authenticate card %x: %w", id, err)
	}
	arrive()
	out, err := c.await(ctx, op)
	if err == nil && out.deferred {
		// Alone, with the token asked inside the transaction, as a
		// verification was before group commit.
		op.verify, op.checked = verify, nil
		var outs []authOutcome
		outs, err = s.authTx(ctx, s.db, []*authOp{op}, true, nil)
		if err != nil {
			err = fmt.Errorf("authenticate card %x: %w", id, err)
		} else {
			out = outs[0]
		}
	}
	if err == nil {
		err = out.err
	}
	if err != nil {
		return AuthResult{}, err
	}
	return out.res, out.cerr
}

// putGrouped stores a challenge (and purges, if purge) in the
// committer's group.
func (s *sqlStore) putGrouped(ctx context.Context, c Challenge, purge bool, before time.Time) error {
	op := &authOp{ctx: ctx, put: &c, purge: purge, purgeBefore: before}
	if err := s.ac.submit(op); err != nil {
		return fmt.Errorf("store: challenge for card %x: %w", []byte(c.CardID), err)
	}
	out, err := s.ac.await(ctx, op)
	if err != nil {
		return err
	}
	return out.err
}
