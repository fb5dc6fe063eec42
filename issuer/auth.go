package issuer

import (
	"blindperso/api"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"blindperso/protocol"
)

// Card authentication: the paper's key-integrity check (docs/PROTOCOL.md
// §4, docs/ISSUER.md "Card authentication"). The issuer hands out a fresh
// random challenge for one card; the card answers AES-CMAC under its K_I;
// the token verifies it under the K_I the issuer derived. A card
// personalized under a substituted key never verifies and is blocked after
// MaxFailures failures in a row (the paper's blacklist).

const (
	// DefaultChallengeTTL is how long a challenge can be answered.
	DefaultChallengeTTL = 5 * time.Minute
	// DefaultMaxFailures is the number of failed verifications in a row
	// that blocks a card.
	DefaultMaxFailures = 3
	// DefaultChallengeRetention is how long a challenge is kept after it
	// expired (used or not) before it is purged: long enough that a late
	// or repeated answer is told "expired" or "already used" rather than
	// "unknown". A purged challenge is refused like any unknown one.
	DefaultChallengeRetention = time.Hour
	// purgePerChallenge bounds the rows one issued challenge purges: more
	// than the one it adds, so the table cannot grow without bound, and
	// few enough that issuing a challenge stays quick.
	purgePerChallenge = 64
)

// Errors about a challenge. A verification refused for one of them
// changes nothing on the card (it says nothing about the card's key) and
// is logged as challenge-refused.
var (
	ErrChallengeUnknown   = errors.New("no such challenge: it was never issued by this store, or it expired long ago and was purged")
	ErrChallengeOtherCard = errors.New("the challenge was issued for another card")
	ErrChallengeUsed      = errors.New("the challenge was already used (challenges are single-use)")
	ErrChallengeExpired   = errors.New("the challenge has expired")
	// ErrCardNotActive is returned when a challenge is asked for a card
	// that is blocked or in conflict.
	ErrCardNotActive = errors.New("card is not active")
)

// Results of a verification (AuthResult.Result, auth_log.result).
const (
	AuthOK      = api.ResultOK      // the MAC verified; failed_auth is reset to 0
	AuthFailed  = api.ResultFailed  // the MAC did not verify; failed_auth + 1, still below the limit
	AuthBlocked = api.ResultBlocked // the MAC did not verify and this failure reached the limit: the card is now blocked
	AuthRefused = api.ResultRefused // the card was blocked or in conflict: refused without a token call
)

// Auth log results besides the above.
const (
	LogChallengeRefused = "challenge-refused"
	LogAdminBlock       = "admin-block"
	LogAdminUnblock     = "admin-unblock"
)

// AuthStore is the store's part of card authentication.
type AuthStore interface {
	// PutChallenge stores a freshly issued challenge; it returns once the
	// challenge is committed (in a group with others: see Authenticate).
	PutChallenge(ctx context.Context, c Challenge) error
	// IssueChallenge is PutChallenge that also purges, in the same
	// transaction, up to a few dozen challenges that expired at or
	// before purgeBefore (PurgeChallenges).
	IssueChallenge(ctx context.Context, c Challenge, purgeBefore time.Time) error
	// Authenticate runs one verification. It reads the card and the
	// challenge and, if the challenge can be consumed and the card is
	// active, calls verify with the card's stored key (the token's
	// check, outside any transaction, in the caller's goroutine); then
	// the store's group commit decides and records it in a transaction
	// shared with the other pending verifications and challenges,
	// exactly as a transaction of its own would: it consumes the
	// challenge (a conditional UPDATE … WHERE used = 0 under the row
	// locks of the group, which exactly one of several concurrent
	// verifiers, on any instance, wins), refuses a card that is not
	// active, else applies verify's verdict: failed_auth reset or
	// incremented, the card blocked when it reaches maxFailures, a row in
	// auth_log. It returns after that transaction has committed. A
	// challenge that is unknown, for another card, used or expired is an
	// error wrapping ErrChallenge…, and verify is not called for it; an
	// error from verify changes nothing (the challenge stays usable).
	// If the card's key was re-wrapped, or the card became active,
	// between the read and the group, the verification is done again
	// alone, verify called inside its transaction.
	Authenticate(ctx context.Context, cardID, challenge []byte, now time.Time, maxFailures int,
		verify func(CardKey) (bool, error)) (AuthResult, error)
	// BlockCard blocks a card (from any state) with the admin's reason.
	BlockCard(ctx context.Context, id []byte, reason string, now time.Time) (StoredCard, error)
	// UnblockCard unblocks a blocked card and resets failed_auth: it goes
	// back to active, or to conflict if a conflicting c was ever recorded
	// for it (a conflict is not resolved by unblocking).
	UnblockCard(ctx context.Context, id []byte, reason string, now time.Time) (StoredCard, error)
	// AuthLog returns the card's last limit log entries, newest first.
	AuthLog(ctx context.Context, id []byte, limit int) ([]AuthEntry, error)
	// PurgeChallenges deletes up to limit challenges (all of them if
	// limit <= 0) that expired at or before before, used or not, oldest
	// first, and returns how many it deleted. Such a challenge could not
	// be consumed any more: deleting it changes no verification's
	// outcome, only its error (unknown instead of expired or used).
	PurgeChallenges(ctx context.Context, before time.Time, limit int) (int64, error)
}

// Challenge is a challenge issued for a card.
type Challenge struct {
	Challenge protocol.Hex `json:"challenge"`
	CardID    protocol.Hex `json:"card_id"`
	Created   time.Time    `json:"created"`
	Expires   time.Time    `json:"expires"`
	Used      bool         `json:"used,omitempty"`
}

// AuthResult is the outcome of one verification.
type AuthResult struct {
	CardID      protocol.Hex `json:"card_id"`
	OK          bool         `json:"ok"`
	Result      string       `json:"result"`
	State       string       `json:"state"`
	FailedAuth  int          `json:"failed_auth"`
	MaxFailures int          `json:"max_failures"`
}

// AuthEntry is a row of the auth log (the API's wire type).
type AuthEntry = api.AuthEntry

// MACVerifier checks a card's MAC under its stored key; *Issuer is one
// (in-token).
type MACVerifier interface {
	Verify(ctx context.Context, ck CardKey, challenge, mac []byte) (bool, error)
}

// Authenticator issues challenges and verifies cards' answers.
type Authenticator struct {
	Verifier    MACVerifier
	Store       Store
	TTL         time.Duration    // 0 means DefaultChallengeTTL
	MaxFailures int              // 0 means DefaultMaxFailures
	Retention   time.Duration    // kept after expiry before purged; 0 means DefaultChallengeRetention
	Now         func() time.Time // nil means time.Now
}

func (a *Authenticator) now() time.Time {
	if a.Now != nil {
		return a.Now()
	}
	return time.Now()
}

func (a *Authenticator) maxFailures() int {
	if a.MaxFailures > 0 {
		return a.MaxFailures
	}
	return DefaultMaxFailures
}

func (a *Authenticator) purgeBefore() time.Time {
	r := a.Retention
	if r <= 0 {
		r = DefaultChallengeRetention
	}
	return a.now().Add(-r)
}

// Purge deletes every challenge that expired more than the retention ago
// (see AuthStore.PurgeChallenges), in rounds of bounded size; issuer
// serve runs it at start. Challenge purges a few on every call.
func (a *Authenticator) Purge(ctx context.Context) (int64, error) {
	before := a.purgeBefore()
	var total int64
	for {
		n, err := a.Store.PurgeChallenges(ctx, before, 1000)
		total += n
		if err != nil || n < 1000 {
			return total, err
		}
	}
}

// Challenge issues a fresh random challenge for an active card. The
// transaction that stores it (shared with other challenges and
// verifications: group commit) also purges up to a few dozen challenges
// that expired more than the retention ago, so expired and used
// challenges do not accumulate.
func (a *Authenticator) Challenge(ctx context.Context, id []byte) (Challenge, error) {
	c, err := a.Store.Card(ctx, id)
	if err != nil {
		return Challenge{}, err
	}
	if c.State != StateActive {
		return Challenge{}, fmt.Errorf("card %x is %s%s: %w", id, c.State, reasonSuffix(c.StateReason), ErrCardNotActive)
	}
	ch := make([]byte, protocol.ChallengeLen)
	if _, err := rand.Read(ch); err != nil {
		return Challenge{}, err
	}
	ttl := a.TTL
	if ttl <= 0 {
		ttl = DefaultChallengeTTL
	}
	t := a.now()
	out := Challenge{Challenge: ch, CardID: id, Created: t.UTC(), Expires: t.Add(ttl).UTC()}
	if err := a.Store.IssueChallenge(ctx, out, a.purgeBefore()); err != nil {
		return Challenge{}, err
	}
	return out, nil
}

func reasonSuffix(r string) string {
	if r == "" {
		return ""
	}
	return " (" + r + ")"
}

// Verify checks the card's answer mac to challenge and records the
// result (see AuthStore.Authenticate). A MAC that does not verify is a
// result (OK false), not an error.
func (a *Authenticator) Verify(ctx context.Context, id, challenge, mac []byte) (AuthResult, error) {
	if len(challenge) != protocol.ChallengeLen {
		return AuthResult{}, fmt.Errorf("challenge is %d bytes, want %d", len(challenge), protocol.ChallengeLen)
	}
	if len(mac) != protocol.MACLen {
		return AuthResult{}, fmt.Errorf("MAC is %d bytes, want %d", len(mac), protocol.MACLen)
	}
	return a.Store.Authenticate(ctx, id, challenge, a.now(), a.maxFailures(), func(ck CardKey) (bool, error) {
		return a.Verifier.Verify(ctx, ck, challenge, mac)
	})
}

// Store side (sqlStore).

func (s *sqlStore) PutChallenge(ctx context.Context, c Challenge) error {
	return s.putGrouped(ctx, c, false, time.Time{})
}

func (s *sqlStore) IssueChallenge(ctx context.Context, c Challenge, purgeBefore time.Time) error {
	return s.putGrouped(ctx, c, true, purgeBefore)
}

func (s *sqlStore) PurgeChallenges(ctx context.Context, before time.Time, limit int) (int64, error) {
	n, err := s.purge(ctx, s.db, before, limit)
	if err != nil {
		return 0, fmt.Errorf("store: purge challenges: %w", err)
	}
	return n, nil
}

func (s *sqlStore) purge(ctx context.Context, x execer, before time.Time, limit int) (int64, error) {
	q, args := `DELETE FROM challenges WHERE expires <= ?`, []any{before.UnixNano()}
	if limit > 0 {
		// Oldest first, bounded. On PostgreSQL the rows another purger
		// (or a verifier) holds are skipped rather than waited for, so
		// concurrent purgers neither queue nor deadlock.
		sub := `SELECT id FROM challenges WHERE expires <= ? ORDER BY expires LIMIT ?`
		if s.d.name == postgresDialect.name {
			sub += ` FOR UPDATE SKIP LOCKED`
		}
		q, args = `DELETE FROM challenges WHERE id IN (`+sub+`)`, []any{before.UnixNano(), limit}
	}
	r, err := s.exec(ctx, x, q, args...)
	if err != nil {
		return 0, err
	}
	return r.RowsAffected()
}

func (s *sqlStore) logAuth(ctx context.Context, x execer, id []byte, now time.Time, result, detail string) error {
	_, err := s.exec(ctx, x, `INSERT INTO auth_log (card_id, created_at, at_ns, result, detail) VALUES (?, ?, ?, ?, ?)`,
		hexID(id), formatTime(now), now.UnixNano(), result, detail)
	return err
}

func (s *sqlStore) Authenticate(ctx context.Context, id, challenge []byte, now time.Time, maxFailures int,
	verify func(CardKey) (bool, error)) (AuthResult, error) {
	return s.verifyGrouped(ctx, id, challenge, now, maxFailures, verify)
}

func (s *sqlStore) BlockCard(ctx context.Context, id []byte, reason string, now time.Time) (StoredCard, error) {
	return s.setState(ctx, id, now, LogAdminBlock, reason, func(tx *sql.Tx, t string) (int64, error) {
		r, err := s.exec(ctx, tx, `UPDATE cards SET state = 'blocked', state_reason = ?, updated_at = ? WHERE id = ?`,
			"admin: "+reason, t, hexID(id))
		if err != nil {
			return 0, err
		}
		return r.RowsAffected()
	})
}

func (s *sqlStore) UnblockCard(ctx context.Context, id []byte, reason string, now time.Time) (StoredCard, error) {
	return s.setState(ctx, id, now, LogAdminUnblock, reason, func(tx *sql.Tx, t string) (int64, error) {
		var conflicts int
		if err := s.queryRow(ctx, tx, `SELECT COUNT(*) FROM conflicts WHERE card_id = ?`, hexID(id)).Scan(&conflicts); err != nil {
			return 0, err
		}
		state := StateActive
		if conflicts > 0 {
			state = StateConflict
		}
		r, err := s.exec(ctx, tx, `UPDATE cards SET state = ?, state_reason = '', failed_auth = 0, updated_at = ? WHERE id = ? AND state = 'blocked'`,
			state, t, hexID(id))
		if err != nil {
			return 0, err
		}
		return r.RowsAffected()
	})
}

// setState runs update (which returns the rows it changed) and logs the
// admin action, in one transaction.
func (s *sqlStore) setState(ctx context.Context, id []byte, now time.Time, action, reason string,
	update func(tx *sql.Tx, t string) (int64, error)) (StoredCard, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return StoredCard{}, fmt.Errorf("store: card %x: %w", id, err)
	}
	defer tx.Rollback()
	n, err := update(tx, formatTime(now))
	if err == nil && n == 1 {
		err = s.logAuth(ctx, tx, id, now, action, reason)
	}
	if err == nil && n == 1 {
		err = tx.Commit()
	}
	if err != nil {
		return StoredCard{}, fmt.Errorf("store: card %x: %w", id, err)
	}
	c, err := s.Card(ctx, id)
	if err != nil {
		return c, err
	}
	if n != 1 {
		return c, fmt.Errorf("card %x is %s, not blocked: nothing to unblock: %w", id, c.State, ErrCardNotBlocked)
	}
	return c, nil
}

func (s *sqlStore) AuthLog(ctx context.Context, id []byte, limit int) ([]AuthEntry, error) {
	rows, err := s.query(ctx, s.db, `SELECT card_id, created_at, result, detail FROM auth_log WHERE card_id = ? ORDER BY at_ns DESC LIMIT ?`,
		hexID(id), limit)
	if err != nil {
		return nil, fmt.Errorf("store: auth log of card %x: %w", id, err)
	}
	defer rows.Close()
	var out []AuthEntry
	for rows.Next() {
		var e AuthEntry
		var cid, t string
		if err := rows.Scan(&cid, &t, &e.Result, &e.Detail); err != nil {
			return nil, err
		}
		e.CardID, _ = hex.DecodeString(cid)
		e.Time = parseTime(t)
		out = append(out, e)
	}
	return out, rows.Err()
}
