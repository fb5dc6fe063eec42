package issuer

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"blindperso/hsm"
)

// The transaction of one group of card authentications (authgroup.go):
// what it locks, how it decides each operation, what it writes.

// authTx applies ops in one transaction and returns their outcomes once
// it has committed. inline: a verification without a usable token
// verdict asks the token (op.verify) inside the transaction, and a token
// error rolls everything back; otherwise such a verification is
// deferred.
func (s *sqlStore) authTx(ctx context.Context, on txBeginner, ops []*authOp, inline bool, beforeCommit func([]*authOp) error) ([]authOutcome, error) {
	tx, err := on.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	outs := make([]authOutcome, len(ops))
	if err := s.authApply(ctx, pooled{s.stmts, tx}, ops, outs, inline); err != nil {
		return nil, err
	}
	if beforeCommit != nil {
		if err := beforeCommit(ops); err != nil {
			return nil, &commitError{err}
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, &commitError{err}
	}
	return outs, nil
}

// txBeginner is a *sql.DB or a *sql.Conn.
type txBeginner interface {
	BeginTx(ctx context.Context, opts *sql.TxOptions) (*sql.Tx, error)
}

// execQuerier is what the group's statements run on (pooled).
type execQuerier interface {
	execer
	querier
}

// lockedChallenge and lockedCard are the rows a group holds (on
// PostgreSQL, locked FOR NO KEY UPDATE; on SQLite the transaction holds
// the write lock from its BEGIN IMMEDIATE), changed as the group's
// verifications are decided in order.
type lockedChallenge struct {
	card     string
	expires  int64
	used     bool
	deferred bool // a verification of it was deferred: so are later ones
}

type lockedCard struct {
	key     CardKey
	state   string
	failed  int
	reason  string
	updated string
	changed bool
}

type authLogRow struct {
	card          string
	now           time.Time
	result, about string
}

func sameBlob(a, b hsm.Blob) bool {
	return a.Scheme == b.Scheme && a.Mechanism == b.Mechanism && a.KEK == b.KEK && bytes.Equal(a.Wrapped, b.Wrapped)
}

// authApply decides and writes ops inside tx (see the top of authgroup.go).
// Locks are taken in one order — the group's challenges by id, then its
// cards by id — so two groups on two instances sharing a PostgreSQL wait
// for each other but never deadlock; the purge, last, skips the rows
// others hold.
func (s *sqlStore) authApply(ctx context.Context, tx execQuerier, ops []*authOp, outs []authOutcome, inline bool) error {
	lock := ""
	if s.d.name == postgresDialect.name {
		lock = ` FOR NO KEY UPDATE`
	}
	var chIDs []string
	seen := map[string]bool{}
	for _, op := range ops {
		if op.put != nil {
			continue
		}
		h := hex.EncodeToString(op.challenge)
		if !seen[h] {
			seen[h] = true
			chIDs = append(chIDs, h)
		}
	}
	chs := map[string]*lockedChallenge{}
	cards := map[string]*lockedCard{}
	var logs []authLogRow
	var consumed []string
	if len(chIDs) > 0 {
		rows, err := s.query(ctx, tx, `SELECT id, card_id, expires, used FROM challenges WHERE id IN (`+placeholders(len(chIDs))+
			`) ORDER BY id`+lock, strArgs(chIDs)...)
		if err != nil {
			return err
		}
		for rows.Next() {
			var id string
			var c lockedChallenge
			var used int64
			if err := rows.Scan(&id, &c.card, &c.expires, &used); err != nil {
				rows.Close()
				return err
			}
			c.used = used != 0
			chs[id] = &c
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return err
		}
		// The cards of the verifications that may consume their
		// challenge.
		var cardIDs []string
		seen = map[string]bool{}
		for _, op := range ops {
			if op.put != nil {
				continue
			}
			c := chs[hex.EncodeToString(op.challenge)]
			if c == nil || c.used || c.card != hexID(op.cardID) || seen[c.card] {
				continue
			}
			seen[c.card] = true
			cardIDs = append(cardIDs, c.card)
		}
		if len(cardIDs) > 0 {
			if err := s.lockCards(ctx, tx, cardIDs, lock, cards); err != nil {
				return err
			}
		}
	}
	for i, op := range ops {
		if op.put != nil {
			continue
		}
		o := &outs[i]
		h := hex.EncodeToString(op.challenge)
		c := chs[h]
		var why error
		switch {
		case c == nil:
			why = ErrChallengeUnknown
		case c.card != hexID(op.cardID):
			why = ErrChallengeOtherCard
		case c.used:
			why = ErrChallengeUsed
		case c.expires <= op.now.UnixNano():
			why = fmt.Errorf("%w (at %s)", ErrChallengeExpired, time.Unix(0, c.expires).UTC().Format(time.RFC3339))
		}
		if why != nil {
			o.cerr = fmt.Errorf("card %x: challenge %x: %w", op.cardID, op.challenge, why)
			if c != nil {
				// An unknown challenge has nothing to log against:
				// the card may not exist either.
				logs = append(logs, authLogRow{hexID(op.cardID), op.now, LogChallengeRefused, why.Error()})
			}
			continue
		}
		if c.deferred {
			o.deferred = true
			continue
		}
		card := cards[c.card]
		if card == nil {
			return fmt.Errorf("card %s of challenge %s not found", c.card, h)
		}
		res := AuthResult{CardID: op.cardID, State: card.state, FailedAuth: card.failed, MaxFailures: op.maxFailures}
		if card.state != StateActive {
			c.used = true
			consumed = append(consumed, h)
			res.Result = AuthRefused
			o.res = res
			logs = append(logs, authLogRow{c.card, op.now, AuthRefused, "card is " + card.state})
			continue
		}
		var ok bool
		switch {
		case op.checked != nil && sameBlob(op.checked.blob, card.key.Blob):
			ok = op.checked.ok
		case inline:
			var err error
			if ok, err = op.verify(card.key); err != nil {
				return err
			}
		default:
			c.deferred = true
			o.deferred = true
			continue
		}
		c.used = true
		consumed = append(consumed, h)
		before := card.failed
		if ok {
			card.failed = 0
		} else {
			card.failed++
			if card.failed >= op.maxFailures {
				card.state = StateBlocked
				card.reason = fmt.Sprintf("%d failed authentications in a row", op.maxFailures)
			}
		}
		// A success on a card with no failures changes nothing in its
		// row (the log has the verification): the row, a page written
		// per verification, is left alone.
		if card.failed != before || card.state != StateActive {
			card.changed, card.updated = true, formatTime(op.now)
		}
		res.State, res.FailedAuth = card.state, card.failed
		switch {
		case ok:
			res.OK, res.Result = true, AuthOK
		case card.state == StateBlocked:
			res.Result = AuthBlocked
		default:
			res.Result = AuthFailed
		}
		o.res = res
		logs = append(logs, authLogRow{c.card, op.now, res.Result, fmt.Sprintf("failed_auth %d of %d", res.FailedAuth, op.maxFailures)})
	}
	if err := s.consume(ctx, tx, consumed); err != nil {
		return err
	}
	if err := s.writeCards(ctx, tx, cards); err != nil {
		return err
	}
	if err := s.writeAuthLog(ctx, tx, logs); err != nil {
		return err
	}
	return s.putChallenges(ctx, tx, ops)
}

func (s *sqlStore) lockCards(ctx context.Context, tx execQuerier, ids []string, lock string, into map[string]*lockedCard) error {
	rows, err := s.query(ctx, tx, `SELECT id, profile, issuer_fingerprint, blob_scheme, blob_mechanism, blob_kek, blob_wrapped,
			state, failed_auth, state_reason FROM cards WHERE id IN (`+placeholders(len(ids))+`) ORDER BY id`+lock, strArgs(ids)...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var c lockedCard
		var kc keyColumns
		if err := rows.Scan(&kc.id, &c.key.Profile, &kc.fp, &c.key.Blob.Scheme, &kc.mech, &c.key.Blob.KEK, &kc.wrapped,
			&c.state, &c.failed, &c.reason); err != nil {
			return err
		}
		if err := kc.decode(&c.key); err != nil {
			return err
		}
		id := kc.id
		into[id] = &c
	}
	return rows.Err()
}

// keyColumns are the columns of a card's key that are stored as text
// (hex) or a number: scanned into these, then decoded into a CardKey.
type keyColumns struct {
	id, fp, wrapped string
	mech            int64
}

func (kc keyColumns) decode(k *CardKey) error {
	var errs [3]error
	k.ID, errs[0] = hex.DecodeString(kc.id)
	k.IssuerFingerprint, errs[1] = hex.DecodeString(kc.fp)
	k.Blob.Wrapped, errs[2] = hex.DecodeString(kc.wrapped)
	k.Blob.Mechanism = uint(kc.mech)
	if err := errors.Join(errs[:]...); err != nil {
		return fmt.Errorf("card %s: %w", kc.id, err)
	}
	return nil
}

// consume marks the group's consumed challenges used: a conditional
// UPDATE (used = 0) that must change every one of them — which the
// group's locks guarantee; if it did not, the group fails and is redone.
func (s *sqlStore) consume(ctx context.Context, tx execQuerier, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	r, err := s.exec(ctx, tx, `UPDATE challenges SET used = 1 WHERE used = 0 AND id IN (`+placeholders(len(ids))+`)`, strArgs(ids)...)
	if err != nil {
		return err
	}
	n, err := r.RowsAffected()
	if err != nil {
		return err
	}
	if int(n) != len(ids) {
		return fmt.Errorf("consumed %d of %d challenges: another transaction consumed some", n, len(ids))
	}
	return nil
}

// writeCards writes the changed cards' counts and states, guarded by
// state = 'active' (they all were, under the group's lock).
func (s *sqlStore) writeCards(ctx context.Context, tx execQuerier, cards map[string]*lockedCard) error {
	var ids []string
	for id, c := range cards {
		if c.changed {
			ids = append(ids, id)
		}
	}
	// Padded with copies of the last row: a card joined twice is
	// updated once, with the same values.
	return chunked(len(ids), func(from, n, size int) error {
		args := make([]any, 0, 5*size)
		for k := range size {
			id := ids[from+min(k, n-1)]
			c := cards[id]
			args = append(args, id, c.failed, c.state, c.reason, c.updated)
		}
		r, err := s.exec(ctx, tx, `UPDATE cards SET failed_auth = v.column2, state = v.column3, state_reason = v.column4,
			updated_at = v.column5 FROM (VALUES `+rows("(?, CAST(? AS BIGINT), ?, ?, ?)", size)+`) AS v
			WHERE cards.id = v.column1 AND cards.state = 'active'`, args...)
		if err != nil {
			return err
		}
		m, err := r.RowsAffected()
		if err != nil {
			return err
		}
		if int(m) != n {
			return fmt.Errorf("updated %d of %d cards", m, n)
		}
		return nil
	})
}

// writeAuthLog inserts the group's log rows (padding rows are all NULL
// and filtered out).
func (s *sqlStore) writeAuthLog(ctx context.Context, tx execQuerier, logs []authLogRow) error {
	return chunked(len(logs), func(from, n, size int) error {
		args := make([]any, 0, 5*size)
		for _, l := range logs[from : from+n] {
			args = append(args, l.card, formatTime(l.now), l.now.UnixNano(), l.result, l.about)
		}
		for range size - n {
			args = append(args, nil, nil, nil, nil, nil)
		}
		_, err := s.exec(ctx, tx, `INSERT INTO auth_log (card_id, created_at, at_ns, result, detail)
			SELECT column1, column2, column3, column4, column5 FROM (VALUES `+rows("(?, ?, CAST(? AS BIGINT), ?, ?)", size)+`) AS v
			WHERE column1 IS NOT NULL`, args...)
		return err
	})
}

// putChallenges stores the group's new challenges, then purges up to
// purgePerChallenge expired ones for each that asked for it (more than
// it adds, so the table stays bounded) that expired before the earliest
// of their cut-offs.
func (s *sqlStore) putChallenges(ctx context.Context, tx execQuerier, ops []*authOp) error {
	var puts []*Challenge
	var before time.Time
	purges := 0
	for _, op := range ops {
		if op.put == nil {
			continue
		}
		puts = append(puts, op.put)
		if op.purge {
			if purges == 0 || op.purgeBefore.Before(before) {
				before = op.purgeBefore
			}
			purges++
		}
	}
	if err := chunked(len(puts), func(from, n, size int) error {
		args := make([]any, 0, 4*size)
		for _, c := range puts[from : from+n] {
			args = append(args, hex.EncodeToString(c.Challenge), hexID(c.CardID), formatTime(c.Created), c.Expires.UnixNano())
		}
		for range size - n {
			args = append(args, nil, nil, nil, nil)
		}
		_, err := s.exec(ctx, tx, `INSERT INTO challenges (id, card_id, created_at, expires, used)
			SELECT column1, column2, column3, column4, 0 FROM (VALUES `+rows("(?, ?, ?, CAST(? AS BIGINT))", size)+`) AS v
			WHERE column1 IS NOT NULL`, args...)
		return err
	}); err != nil {
		return err
	}
	if purges == 0 {
		return nil
	}
	_, err := s.purge(ctx, tx, before, min(purges*purgePerChallenge, 4096))
	return err
}

// chunked calls write for consecutive runs of at most maxAuthGroup of n
// items, each to be written padded to size, a power of two: a group's
// statements then come in a few shapes only, each prepared once
// (stmtPool; PostgreSQL's driver too caches its prepared statements per
// connection).
func chunked(n int, write func(from, n, size int) error) error {
	for from := 0; from < n; from += maxAuthGroup {
		k := min(n-from, maxAuthGroup)
		if err := write(from, k, pow2(k)); err != nil {
			return err
		}
	}
	return nil
}

// rows is n copies of row, comma-separated.
func rows(row string, n int) string {
	return row + strings.Repeat(", "+row, n-1)
}

// placeholders is "?, ?, …" for n values, padded to a power of two (the
// caller's args by strArgs, repeating the last value), for the same
// reason as chunked. n is at most maxAuthGroup.
func placeholders(n int) string {
	return "?" + strings.Repeat(", ?", pow2(n)-1)
}

func strArgs(vs []string) []any {
	args := make([]any, pow2(len(vs)))
	for i := range args {
		args[i] = vs[min(i, len(vs)-1)]
	}
	return args
}

func pow2(n int) int {
	p := 1
	for p < n {
		p *= 2
	}
	return p
}
