package issuer

import (
	"context"
	"database/sql"
	"encoding/hex"
	"sync"
	"time"
)

// The reads of card authentication outside any transaction, and the
// statements prepared once that the group's transactions reuse
// (authgroup.go).

// stmtPool holds statements prepared once per store handle and reused
// by every transaction and connection (database/sql prepares each once
// per connection): SQLite's modernc driver otherwise parses every
// statement on every run, a third of a group's time. Only the group's
// and the verification's statements go through it; their texts come in
// a few shapes (placeholders, chunked), so it stays small.
type stmtPool struct {
	db *sql.DB
	mu sync.Mutex
	m  map[string]*sql.Stmt
}

// stmt returns query (already rewritten for the dialect) prepared.
func (p *stmtPool) stmt(ctx context.Context, query string) (*sql.Stmt, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if st := p.m[query]; st != nil {
		return st, nil
	}
	st, err := p.db.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	p.m[query] = st
	return st, nil
}

func (p *stmtPool) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, st := range p.m {
		st.Close()
	}
	p.m = map[string]*sql.Stmt{}
}

// pooled runs statements through p, in tx if set, else on the database:
// an execer and querier for s.exec, s.queryRow and s.query.
type pooled struct {
	p  *stmtPool
	tx *sql.Tx
}

func (x pooled) get(ctx context.Context, query string) (*sql.Stmt, error) {
	st, err := x.p.stmt(ctx, query)
	if err != nil || x.tx == nil {
		return st, err
	}
	return x.tx.StmtContext(ctx, st), nil
}

func (x pooled) ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error) {
	st, err := x.get(ctx, query)
	if err != nil {
		return nil, err
	}
	return st.ExecContext(ctx, args...)
}

func (x pooled) QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row {
	st, err := x.get(ctx, query)
	if err != nil {
		// The prepare's error, reported by the Row's Scan.
		if x.tx != nil {
			return x.tx.QueryRowContext(ctx, query, args...)
		}
		return x.p.db.QueryRowContext(ctx, query, args...)
	}
	return st.QueryRowContext(ctx, args...)
}

func (x pooled) QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	st, err := x.get(ctx, query)
	if err != nil {
		return nil, err
	}
	return st.QueryContext(ctx, args...)
}

// preVerify is what a verification reads before its token call, without
// a transaction: the card's key and whether the challenge can be
// consumed for it (this card's, unused, unexpired, the card active). It
// decides only whether the token is asked; the group's transaction
// decides again, under its locks.
type preVerify struct {
	key    CardKey
	usable bool
}

// authReader does the verifications' reads before their token calls in
// batches: whatever is pending, one query (on SQLite every commit empties
// the page cache of every other connection, so that one query per
// verification read its pages from the file again, each time: a
// quarter of the CPU of a verification). Like the committer, it never
// waits for a batch to fill; while it reads, the next batch gathers.
type authReader struct {
	s       *sqlStore
	mu      sync.Mutex
	queue   []*readOp
	started bool
	closed  bool
	wake    chan struct{}
	done    chan struct{}
	conn    *sql.Conn
	stmts   map[string]*sql.Stmt // prepared on conn
}

type readOp struct {
	ctx               context.Context
	cardID, challenge []byte
	now               time.Time
	out               preVerify
	err               error
	done              chan struct{}
}

func newAuthReader(s *sqlStore) *authReader {
	return &authReader{s: s, wake: make(chan struct{}, 1), done: make(chan struct{}), stmts: map[string]*sql.Stmt{}}
}

// read is the pre-read of one verification, batched with others.
func (r *authReader) read(ctx context.Context, id, challenge []byte, now time.Time) (preVerify, error) {
	op := &readOp{ctx: ctx, cardID: id, challenge: challenge, now: now, done: make(chan struct{})}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return preVerify{}, errStoreClosed
	}
	if !r.started {
		r.started = true
		go r.run()
	}
	r.queue = append(r.queue, op)
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
	select {
	case <-op.done:
		return op.out, op.err
	case <-ctx.Done():
		return preVerify{}, ctx.Err()
	}
}

func (r *authReader) close() {
	r.mu.Lock()
	r.closed = true
	started := r.started
	r.mu.Unlock()
	if started {
		select {
		case r.wake <- struct{}{}:
		default:
		}
		<-r.done
	}
}

func (r *authReader) run() {
	defer close(r.done)
	defer r.drop()
	for {
		r.mu.Lock()
		for len(r.queue) == 0 {
			if r.closed {
				r.mu.Unlock()
				return
			}
			r.mu.Unlock()
			<-r.wake
			r.mu.Lock()
		}
		n := min(len(r.queue), maxAuthGroup)
		batch := make([]*readOp, n)
		copy(batch, r.queue)
		r.queue = append(r.queue[:0], r.queue[n:]...)
		r.mu.Unlock()
		err := r.readBatch(batch)
		if err != nil {
			r.drop() // a fresh connection for the next batch
		}
		for _, op := range batch {
			if err != nil {
				op.err = err
			}
			close(op.done)
		}
	}
}

// drop closes the reader's connection and its statements.
func (r *authReader) drop() {
	for q, st := range r.stmts {
		st.Close()
		delete(r.stmts, q)
	}
	if r.conn != nil {
		r.conn.Close()
		r.conn = nil
	}
}

// stmt returns query (already rewritten) prepared on the reader's
// connection.
func (r *authReader) stmt(ctx context.Context, query string) (*sql.Stmt, error) {
	if st := r.stmts[query]; st != nil {
		return st, nil
	}
	if r.conn == nil {
		conn, err := r.s.db.Conn(ctx)
		if err != nil {
			return nil, err
		}
		r.conn = conn
	}
	st, err := r.conn.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	r.stmts[query] = st
	return st, nil
}

// QueryContext makes the reader a querier for s.query.
func (r *authReader) QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	st, err := r.stmt(ctx, query)
	if err != nil {
		return nil, err
	}
	return st.QueryContext(ctx, args...)
}

func (r *authReader) readBatch(batch []*readOp) error {
	ctx := context.Background()
	var ids []string
	seen := map[string]bool{}
	for _, op := range batch {
		if h := hex.EncodeToString(op.challenge); !seen[h] {
			seen[h] = true
			ids = append(ids, h)
		}
	}
	type row struct {
		card, state   string
		expires, used int64
		key           CardKey
	}
	found := map[string]*row{}
	rows, err := r.s.query(ctx, r, `SELECT ch.id, ch.card_id, ch.expires, ch.used, cards.profile, cards.issuer_fingerprint,
			cards.blob_scheme, cards.blob_mechanism, cards.blob_kek, cards.blob_wrapped, cards.state
		FROM challenges ch JOIN cards ON cards.id = ch.card_id WHERE ch.id IN (`+placeholders(len(ids))+`)`, strArgs(ids)...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		var kc keyColumns
		x := &row{}
		if err := rows.Scan(&id, &kc.id, &x.expires, &x.used, &x.key.Profile, &kc.fp, &x.key.Blob.Scheme, &kc.mech,
			&x.key.Blob.KEK, &kc.wrapped, &x.state); err != nil {
			return err
		}
		if err := kc.decode(&x.key); err != nil {
			return err
		}
		x.card = kc.id
		found[id] = x
	}
	if err := rows.Err(); err != nil {
		return err
	}
	for _, op := range batch {
		x := found[hex.EncodeToString(op.challenge)]
		if x == nil || x.card != hexID(op.cardID) {
			continue // unknown, or another card's: the token is not asked
		}
		op.out = preVerify{key: x.key,
			usable: x.state == StateActive && x.used == 0 && x.expires > op.now.UnixNano()}
	}
	return nil
}
