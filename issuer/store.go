package issuer

import (
	"blindperso/api"
	"bytes"
	"context"
	"database/sql"
	"embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"blindperso/hsm"
	"blindperso/protocol"
)

// Store is where the issuer keeps its cards: per card the public data and
// K_I wrapped under the KEK, per batch its manifest, counts, rejects and
// conflicts. It never holds K_I in the clear, nor r, nor S.
//
// Every write is one transaction and every insert is "insert, or do
// nothing if the row is there", then a read of what is there: a rerun of
// a batch, a second process, or a second issuer instance on the same
// PostgreSQL finds the rows and changes nothing (no read-modify-write).
type Store interface {
	// BeginBatch records that the batch id (the SHA-256 of its file) is
	// being imported: inserted, or set back to importing if known.
	BeginBatch(ctx context.Context, id string, manifest []byte, records int) error
	// RefuseBatch records a batch refused as a whole (its file does not
	// match its manifest, or it is for another issuer key). A batch that
	// was already imported is left as it is.
	RefuseBatch(ctx context.Context, id string, manifest []byte, reason string) error
	// FinishBatch recomputes the batch's counts from the cards, conflicts
	// and rejects tables (never by incrementing: reruns stay exact) and
	// marks it done.
	FinishBatch(ctx context.Context, id string) (BatchReport, error)

	// CardCHash returns the SHA-256 of the c stored for card id.
	CardCHash(ctx context.Context, id []byte) (sum []byte, found bool, err error)
	// PutResults applies cards and rejects, in order, in one
	// transaction: the importer's group commit. A card is stored unless
	// its Id is known: then it is a Duplicate (same c) or a Conflict
	// (another c, recorded in the conflicts table; the stored card is
	// kept and its state set to conflict unless it is blocked). A reject
	// is recorded once per batch line.
	PutResults(ctx context.Context, rs []RecordResult) ([]Outcome, error)

	Card(ctx context.Context, id []byte) (StoredCard, error)
	Batch(ctx context.Context, id string) (BatchReport, error)
	Conflicts(ctx context.Context, batch string) ([]ConflictRecord, error)
	Rejects(ctx context.Context, batch string) ([]Reject, error)
	// Cards lists the cards, ordered by Id; state "" means all.
	Cards(ctx context.Context, state string) ([]StoredCard, error)
	// Batches lists the batches, oldest first.
	Batches(ctx context.Context) ([]BatchReport, error)

	// Card authentication (auth.go).
	AuthStore
	// KEK rotation (rotate.go).
	KEKStore
	// Exports to a receiving system (export.go).
	ExportStore

	Close() error
}

// Outcome is what PutResults did with a card.
type Outcome int

const (
	Imported Outcome = iota + 1
	Duplicate
	Conflict
	// Rejected: the record's line was rejected by an earlier run of the
	// same batch, and the reject stands (a would-be conflict).
	Rejected
)

func (o Outcome) String() string {
	switch o {
	case Imported:
		return "imported"
	case Duplicate:
		return "duplicate"
	case Conflict:
		return "conflict"
	case Rejected:
		return "rejected"
	}
	return "outcome(" + strconv.Itoa(int(o)) + ")"
}

// Card states (the API's: api.Card.State).
const (
	StateActive   = api.StateActive
	StateBlocked  = api.StateBlocked
	StateConflict = api.StateConflict
)

// ErrNotFound is returned for a card or batch the store does not hold.
var ErrNotFound = errors.New("not found")

// StoredCard is a card's row: its CardKey and where it came from.
type StoredCard struct {
	CardKey
	IssuerKeyLabel string       `json:"issuer_key_label"`
	CSHA256        protocol.Hex `json:"c_sha256"`
	Batch          string       `json:"batch"`
	Line           int          `json:"line"`
	State          string       `json:"state"`
	FailedAuth     int          `json:"failed_auth"`
	StateReason    string       `json:"state_reason,omitempty"`
	// Attested: the record's chip attestation verified at import
	// (PROTOCOL.md §10.4).
	Attested bool      `json:"attested"`
	Created  time.Time `json:"created"`
	Updated  time.Time `json:"updated"`
}

// A batch's row and its report are the API's wire types (package api
// owns their JSON, which issuer import --json and batches show --json
// print too).
type (
	BatchReport    = api.Batch
	BatchDetail    = api.BatchDetail
	Reject         = api.Reject
	ConflictRecord = api.Conflict
)

// Detail reads rep's rejects and conflicts from st; the lists are empty,
// never nil, so that JSON shows [] rather than null.
func Detail(ctx context.Context, st Store, rep BatchReport) (BatchDetail, error) {
	d := BatchDetail{Batch: rep, RejectList: []Reject{}, ConflictList: []ConflictRecord{}}
	rj, err := st.Rejects(ctx, rep.ID)
	if err != nil {
		return d, err
	}
	cs, err := st.Conflicts(ctx, rep.ID)
	if err != nil {
		return d, err
	}
	if rj != nil {
		d.RejectList = rj
	}
	if cs != nil {
		d.ConflictList = cs
	}
	return d, nil
}

//go:embed migrations/*.sql
var migrationFS embed.FS

// dialect is everything that differs between SQLite and PostgreSQL.
type dialect struct {
	name string
	// dollar: placeholders are $1, $2… (PostgreSQL) rather than ?.
	dollar bool
	// lock is run first in the migration transaction to serialize
	// migrators ("" where BEGIN already takes the write lock).
	lock string
}

var (
	sqliteDialect   = dialect{name: "sqlite"}
	postgresDialect = dialect{name: "postgres", dollar: true, lock: "SELECT pg_advisory_xact_lock(4930427163)"}
)

// q rewrites a query written with ? placeholders for the dialect: the one
// place where placeholder syntax differs.
func (d dialect) q(query string) string {
	if !d.dollar {
		return query
	}
	var b strings.Builder
	n := 0
	for _, r := range query {
		if r == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// sqlStore is the Store over database/sql, for both dialects.
type sqlStore struct {
	db    *sql.DB
	d     dialect
	ac    *authCommitter // card authentication's group commit (authgroup.go)
	ar    *authReader    // and its batched reads
	stmts *stmtPool      // their statements, prepared once
	// retries counts the transactions redone because PostgreSQL asked
	// (retry.go).
	retries atomic.Int64
}

// Close waits for the verifications and challenges handed to the group
// commit to be applied, then closes the database.
func (s *sqlStore) Close() error {
	s.ac.close()
	s.ar.close()
	s.stmts.close()
	return s.db.Close()
}

// exec, queryRow and query are the only ways this package runs SQL: each
// rewrites the placeholders for the dialect (? to $n for PostgreSQL), so
// no statement can forget it (TestSQLThroughWrappers). Statements are
// written with ?.
func (s *sqlStore) exec(ctx context.Context, x execer, query string, args ...any) (sql.Result, error) {
	return x.ExecContext(ctx, s.d.q(query), args...)
}

func (s *sqlStore) queryRow(ctx context.Context, x execer, query string, args ...any) *sql.Row {
	return x.QueryRowContext(ctx, s.d.q(query), args...)
}

func (s *sqlStore) query(ctx context.Context, x querier, query string, args ...any) (*sql.Rows, error) {
	return x.QueryContext(ctx, s.d.q(query), args...)
}

// execer is a *sql.DB, a *sql.Tx or a transaction's stmtCache.
type execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// migrate applies the embedded migrations not yet in schema_version, all
// in one transaction, serialized between processes.
func (s *sqlStore) migrate(ctx context.Context) error {
	names, err := fs.Glob(migrationFS, "migrations/*.sql")
	if err != nil {
		return err
	}
	sort.Strings(names)
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	defer tx.Rollback()
	if s.d.lock != "" {
		if _, err := s.exec(ctx, tx, s.d.lock); err != nil {
			return fmt.Errorf("migrate: lock: %w", err)
		}
	}
	if _, err := s.exec(ctx, tx, `CREATE TABLE IF NOT EXISTS schema_version (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)`); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	var cur int
	if err := s.queryRow(ctx, tx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&cur); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	latest := 0
	for _, name := range names {
		base := strings.TrimPrefix(name, "migrations/")
		v, err := strconv.Atoi(strings.SplitN(base, "_", 2)[0])
		if err != nil {
			return fmt.Errorf("migration %s: name must start with its version number", base)
		}
		latest = max(latest, v)
		if v <= cur {
			continue
		}
		body, err := migrationFS.ReadFile(name)
		if err != nil {
			return err
		}
		for _, stmt := range splitSQL(string(body)) {
			if _, err := s.exec(ctx, tx, stmt); err != nil {
				return fmt.Errorf("migration %s: %w\n%s", base, err, stmt)
			}
		}
		if _, err := s.exec(ctx, tx, `INSERT INTO schema_version (version, applied_at) VALUES (?, ?)`, v, now()); err != nil {
			return fmt.Errorf("migration %s: %w", base, err)
		}
	}
	if cur > latest {
		return fmt.Errorf("the store is at schema version %d, newer than this program's %d: upgrade the program", cur, latest)
	}
	return tx.Commit()
}

// splitSQL drops -- comments and splits a migration into statements at
// semicolons that end a line.
func splitSQL(body string) []string {
	var lines []string
	for _, l := range strings.Split(body, "\n") {
		if i := strings.Index(l, "--"); i >= 0 {
			l = l[:i]
		}
		lines = append(lines, l)
	}
	var out []string
	for _, st := range strings.Split(strings.Join(lines, "\n"), ";\n") {
		if st = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(st), ";")); st != "" {
			out = append(out, st)
		}
	}
	return out
}

// timeText is how the store writes a time: UTC with all nine digits of
// nanoseconds, so that text order is time order (RFC3339Nano drops
// trailing zeros, and "…:00Z" sorts after "…:00.1Z"). parseTime reads
// both forms.
const timeText = "2006-01-02T15:04:05.000000000Z07:00"

func formatTime(t time.Time) string { return t.UTC().Format(timeText) }

func now() string { return formatTime(time.Now()) }

func parseTime(s string) time.Time {
	t, _ := time.Parse(time.RFC3339Nano, s)
	return t
}

func hexID(id []byte) string { return hex.EncodeToString(id) }

func (s *sqlStore) BeginBatch(ctx context.Context, id string, manifest []byte, records int) error {
	t := now()
	_, err := s.exec(ctx, s.db, `INSERT INTO batches (id, manifest, records, status, created_at, updated_at)
		VALUES (?, ?, ?, ?, ?, ?)
		ON CONFLICT (id) DO UPDATE SET manifest = excluded.manifest, records = excluded.records,
			status = excluded.status, reason = '', updated_at = excluded.updated_at`,
		id, string(manifest), records, BatchImporting, t, t)
	if err != nil {
		return fmt.Errorf("store: begin batch %s: %w", id, err)
	}
	return nil
}

func (s *sqlStore) RefuseBatch(ctx context.Context, id string, manifest []byte, reason string) error {
	t := now()
	_, err := s.exec(ctx, s.db, `INSERT INTO batches (id, manifest, status, reason, created_at, updated_at)
		VALUES (?, ?, ?, ?, ?, ?)
		ON CONFLICT (id) DO UPDATE SET status = excluded.status, reason = excluded.reason, updated_at = excluded.updated_at
		WHERE batches.status <> ?`,
		id, string(manifest), BatchRefused, reason, t, t, BatchDone)
	if err != nil {
		return fmt.Errorf("store: refuse batch %s: %w", id, err)
	}
	return nil
}

func (s *sqlStore) FinishBatch(ctx context.Context, id string) (BatchReport, error) {
	// One transaction for both updates: one commit (one fsync), and no
	// reader sees the counts without the duplicates.
	err := func() error {
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		if _, err := s.exec(ctx, tx, `UPDATE batches SET
				imported = (SELECT COUNT(*) FROM cards WHERE batch_id = ?),
				conflicts = (SELECT COUNT(*) FROM conflicts WHERE batch_id = ?),
				rejects = (SELECT COUNT(*) FROM rejects WHERE batch_id = ?),
				unattested = (SELECT COUNT(*) FROM cards WHERE batch_id = ? AND attested = 0),
				status = ?, updated_at = ?
			WHERE id = ?`, id, id, id, id, BatchDone, now(), id); err != nil {
			return err
		}
		if _, err := s.exec(ctx, tx, `UPDATE batches SET duplicates = records - imported - conflicts - rejects WHERE id = ?`, id); err != nil {
			return err
		}
		return tx.Commit()
	}()
	if err != nil {
		return BatchReport{}, fmt.Errorf("store: finish batch %s: %w", id, err)
	}
	return s.Batch(ctx, id)
}

func (s *sqlStore) CardCHash(ctx context.Context, id []byte) ([]byte, bool, error) {
	var h string
	err := s.queryRow(ctx, s.db, `SELECT c_sha256 FROM cards WHERE id = ?`, hexID(id)).Scan(&h)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("store: card %x: %w", id, err)
	}
	b, err := hex.DecodeString(h)
	return b, err == nil, err
}

// KnownCards reports, for each of ids, whether a card with that Id is
// stored: one query for all of them (the importer asks for the records
// waiting in a worker's queue at once).
func (s *sqlStore) KnownCards(ctx context.Context, ids [][]byte) ([]bool, error) {
	found := make([]bool, len(ids))
	if len(ids) == 0 {
		return found, nil
	}
	at := make(map[string][]int, len(ids))
	args := make([]any, len(ids))
	for i, id := range ids {
		h := hexID(id)
		at[h] = append(at[h], i)
		args[i] = h
	}
	q := `SELECT id FROM cards WHERE id IN (?` + strings.Repeat(`, ?`, len(ids)-1) + `)`
	rows, err := s.query(ctx, s.db, q, args...)
	if err != nil {
		return nil, fmt.Errorf("store: look up %d cards: %w", len(ids), err)
	}
	defer rows.Close()
	for rows.Next() {
		var h string
		if err := rows.Scan(&h); err != nil {
			return nil, fmt.Errorf("store: look up %d cards: %w", len(ids), err)
		}
		for _, i := range at[h] {
			found[i] = true
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: look up %d cards: %w", len(ids), err)
	}
	return found, nil
}

// RecordResult is the store write of one batch record: its card (Card
// set) or its reject (Reason).
type RecordResult struct {
	Batch  string
	Line   int
	Card   *StoredCard
	Reason string
}

// PutResults applies rs, in order, in one transaction (the importer's
// group commit), each as Store.PutResults says.
// Either all of rs is stored or, on an error, none of it; since every
// write is idempotent, a lost group is redone by a rerun.
func (s *sqlStore) PutResults(ctx context.Context, rs []RecordResult) (outs []Outcome, err error) {
	// The cards in Id order (records of one Id keep their order): two
	// groups of two instances then lock common cards in the same order
	// and wait for each other instead of deadlocking (retry.go).
	order := make([]int, len(rs))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(i, j int) int {
		a, b := rs[i].Card, rs[j].Card
		switch {
		case a == nil && b == nil:
			return 0
		case a == nil: // rejects first: they lock only their own line
			return -1
		case b == nil:
			return 1
		}
		return bytes.Compare(a.ID, b.ID)
	})
	err = s.retry(ctx, "put results", func() error {
		outs, err = s.putResults(ctx, rs, order)
		return err
	})
	return outs, err
}

func (s *sqlStore) putResults(ctx context.Context, rs []RecordResult, order []int) ([]Outcome, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("store: put results: %w", err)
	}
	defer tx.Rollback()
	// Each statement is prepared once for the group, not once per
	// record: parsing the SQL was a third of the writer's time.
	x := &stmtCache{tx: tx, m: map[string]*sql.Stmt{}}
	defer x.close()
	outs := make([]Outcome, len(rs))
	for _, i := range order {
		r := rs[i]
		if r.Card == nil {
			if _, err := s.exec(ctx, x, `INSERT INTO rejects (batch_id, line, reason, created_at) VALUES (?, ?, ?, ?)
				ON CONFLICT (batch_id, line) DO NOTHING`, r.Batch, r.Line, r.Reason, now()); err != nil {
				return nil, fmt.Errorf("store: reject batch %s line %d: %w", r.Batch, r.Line, err)
			}
			continue
		}
		if outs[i], err = s.putCard(ctx, x, *r.Card); err != nil {
			return nil, fmt.Errorf("store: card %x: %w", []byte(r.Card.ID), err)
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("store: put results: %w", err)
	}
	return outs, nil
}

// stmtCache runs a transaction's statements, each prepared on first use
// and reused for the rest of the transaction.
type stmtCache struct {
	tx *sql.Tx
	m  map[string]*sql.Stmt
}

func (c *stmtCache) stmt(ctx context.Context, query string) (*sql.Stmt, error) {
	if st := c.m[query]; st != nil {
		return st, nil
	}
	st, err := c.tx.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	c.m[query] = st
	return st, nil
}

func (c *stmtCache) ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error) {
	st, err := c.stmt(ctx, query)
	if err != nil {
		return nil, err
	}
	return st.ExecContext(ctx, args...)
}

// QueryRowContext reports a failed prepare through the Row's Scan, as
// database/sql does.
func (c *stmtCache) QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row {
	st, err := c.stmt(ctx, query)
	if err != nil {
		return c.tx.QueryRowContext(ctx, query, args...) // query is rewritten by the caller
	}
	return st.QueryRowContext(ctx, args...)
}

func (c *stmtCache) close() {
	for _, st := range c.m {
		st.Close()
	}
}

func (s *sqlStore) putCard(ctx context.Context, tx execer, c StoredCard) (Outcome, error) {
	t := now()
	id, ch := hexID(c.ID), hex.EncodeToString(c.CSHA256)
	// A line an earlier run rejected (a token that was unreachable then,
	// or that refused c) is tried again; see known for what then.
	var n int
	if err := s.queryRow(ctx, tx, `SELECT COUNT(*) FROM rejects WHERE batch_id = ? AND line = ?`, c.Batch, c.Line).Scan(&n); err != nil {
		return 0, err
	}
	rejected := n > 0
	if len(c.Blob.Wrapped) == 0 {
		// Only the c hash: the caller knows the Id is stored.
		var have string
		err := s.queryRow(ctx, tx, `SELECT c_sha256 FROM cards WHERE id = ?`, id).Scan(&have)
		if errors.Is(err, sql.ErrNoRows) {
			return 0, errors.New("card not stored and no wrapped key given")
		}
		if err != nil {
			return 0, err
		}
		return s.known(ctx, tx, c, id, ch, have, t, rejected)
	}
	attested := 0
	if c.Attested {
		attested = 1
	}
	res, err := s.exec(ctx, tx, `INSERT INTO cards (id, profile, issuer_key_label, issuer_fingerprint,
			blob_scheme, blob_mechanism, blob_kek, blob_wrapped, c_sha256, batch_id, line, state, failed_auth, created_at, updated_at, attested)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', 0, ?, ?, ?)
		ON CONFLICT (id) DO NOTHING`,
		id, c.Profile, c.IssuerKeyLabel, hex.EncodeToString(c.IssuerFingerprint),
		c.Blob.Scheme, int64(c.Blob.Mechanism), c.Blob.KEK, hex.EncodeToString(c.Blob.Wrapped),
		ch, c.Batch, c.Line, t, t, attested)
	if err != nil {
		return 0, err
	}
	if n, err := res.RowsAffected(); err != nil {
		return 0, err
	} else if n == 1 {
		return Imported, s.unreject(ctx, tx, c, rejected)
	}
	var have string
	if err := s.queryRow(ctx, tx, `SELECT c_sha256 FROM cards WHERE id = ?`, id).Scan(&have); err != nil {
		return 0, err
	}
	return s.known(ctx, tx, c, id, ch, have, t, rejected)
}

// known handles a card whose Id is stored with c hash have.
// rejected: an earlier run rejected the record's line.
func (s *sqlStore) known(ctx context.Context, tx execer, c StoredCard, id, ch, have, t string, rejected bool) (Outcome, error) {
	if have == ch {
		return Duplicate, s.unreject(ctx, tx, c, rejected)
	}
	if rejected {
		// The earlier run rejected this line before a later line of
		// the same Id landed (records of one Id are handled in file
		// order): the reject stands, as in an uninterrupted run, rather
		// than turning into a conflict on the rerun.
		return Rejected, nil
	}
	if _, err := s.exec(ctx, tx, `INSERT INTO conflicts (card_id, c_sha256, batch_id, line, created_at)
		VALUES (?, ?, ?, ?, ?) ON CONFLICT (batch_id, line) DO NOTHING`, id, ch, c.Batch, c.Line, t); err != nil {
		return 0, err
	}
	if _, err := s.exec(ctx, tx, `UPDATE cards SET state = 'conflict', updated_at = ? WHERE id = ? AND state = 'active'`, t, id); err != nil {
		return 0, err
	}
	return Conflict, nil
}

// unreject deletes the reject an earlier run left for the line of a
// record that has now landed.
func (s *sqlStore) unreject(ctx context.Context, tx execer, c StoredCard, rejected bool) error {
	if !rejected {
		return nil
	}
	_, err := s.exec(ctx, tx, `DELETE FROM rejects WHERE batch_id = ? AND line = ?`, c.Batch, c.Line)
	return err
}

const cardColumns = `id, profile, issuer_key_label, issuer_fingerprint, blob_scheme, blob_mechanism, blob_kek, blob_wrapped,
	c_sha256, batch_id, line, state, failed_auth, created_at, updated_at, state_reason, attested`

type scanner interface{ Scan(dest ...any) error }

func scanCard(r scanner) (StoredCard, error) {
	var c StoredCard
	var id, fp, wrapped, ch, created, updated string
	var mech, attested int64
	if err := r.Scan(&id, &c.Profile, &c.IssuerKeyLabel, &fp, &c.Blob.Scheme, &mech, &c.Blob.KEK, &wrapped,
		&ch, &c.Batch, &c.Line, &c.State, &c.FailedAuth, &created, &updated, &c.StateReason, &attested); err != nil {
		return c, err
	}
	c.Attested = attested == 1
	var errs [4]error
	c.ID, errs[0] = hex.DecodeString(id)
	c.IssuerFingerprint, errs[1] = hex.DecodeString(fp)
	c.Blob.Wrapped, errs[2] = hex.DecodeString(wrapped)
	c.CSHA256, errs[3] = hex.DecodeString(ch)
	c.Blob.Mechanism = uint(mech)
	c.Created, c.Updated = parseTime(created), parseTime(updated)
	return c, errors.Join(errs[:]...)
}

var _ = hsm.WrapRFC5649 // the blob columns hold an hsm.Blob

func (s *sqlStore) Card(ctx context.Context, id []byte) (StoredCard, error) {
	c, err := scanCard(s.queryRow(ctx, s.db, `SELECT `+cardColumns+` FROM cards WHERE id = ?`, hexID(id)))
	if errors.Is(err, sql.ErrNoRows) {
		return c, fmt.Errorf("card %x: %w", id, ErrNotFound)
	}
	if err != nil {
		return c, fmt.Errorf("store: card %x: %w", id, err)
	}
	return c, nil
}

func (s *sqlStore) Cards(ctx context.Context, state string) ([]StoredCard, error) {
	query, args := `SELECT `+cardColumns+` FROM cards ORDER BY id`, []any(nil)
	if state != "" {
		query, args = `SELECT `+cardColumns+` FROM cards WHERE state = ? ORDER BY id`, []any{state}
	}
	rows, err := s.query(ctx, s.db, query, args...)
	if err != nil {
		return nil, fmt.Errorf("store: cards: %w", err)
	}
	defer rows.Close()
	var out []StoredCard
	for rows.Next() {
		c, err := scanCard(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

const batchColumns = `id, manifest, records, imported, duplicates, conflicts, rejects, unattested, status, reason, created_at, updated_at`

func scanBatch(r scanner) (BatchReport, error) {
	var b BatchReport
	var m, created, updated string
	err := r.Scan(&b.ID, &m, &b.Records, &b.Imported, &b.Duplicates, &b.Conflicts, &b.Rejects, &b.Unattested, &b.Status, &b.Reason, &created, &updated)
	b.Manifest = json.RawMessage(m)
	b.Created, b.Updated = parseTime(created), parseTime(updated)
	return b, err
}

func (s *sqlStore) Batches(ctx context.Context) ([]BatchReport, error) {
	rows, err := s.query(ctx, s.db, `SELECT `+batchColumns+` FROM batches ORDER BY created_at, id`)
	if err != nil {
		return nil, fmt.Errorf("store: batches: %w", err)
	}
	defer rows.Close()
	var out []BatchReport
	for rows.Next() {
		b, err := scanBatch(rows)
		if err != nil {
			return nil, fmt.Errorf("store: batches: %w", err)
		}
		out = append(out, b)
	}
	return out, rows.Err()
}

func (s *sqlStore) Batch(ctx context.Context, id string) (BatchReport, error) {
	b, err := scanBatch(s.queryRow(ctx, s.db, `SELECT `+batchColumns+` FROM batches WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return b, fmt.Errorf("batch %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return b, fmt.Errorf("store: batch %s: %w", id, err)
	}
	return b, nil
}

func (s *sqlStore) Conflicts(ctx context.Context, batch string) ([]ConflictRecord, error) {
	rows, err := s.query(ctx, s.db, `SELECT card_id, c_sha256, batch_id, line, created_at FROM conflicts WHERE batch_id = ? ORDER BY line`, batch)
	if err != nil {
		return nil, fmt.Errorf("store: conflicts: %w", err)
	}
	defer rows.Close()
	var out []ConflictRecord
	for rows.Next() {
		var c ConflictRecord
		var id, ch, t string
		if err := rows.Scan(&id, &ch, &c.Batch, &c.Line, &t); err != nil {
			return nil, err
		}
		c.CardID, _ = hex.DecodeString(id)
		c.CSHA256, _ = hex.DecodeString(ch)
		c.Time = parseTime(t)
		out = append(out, c)
	}
	return out, rows.Err()
}

func (s *sqlStore) Rejects(ctx context.Context, batch string) ([]Reject, error) {
	rows, err := s.query(ctx, s.db, `SELECT batch_id, line, reason, created_at FROM rejects WHERE batch_id = ? ORDER BY line`, batch)
	if err != nil {
		return nil, fmt.Errorf("store: rejects: %w", err)
	}
	defer rows.Close()
	var out []Reject
	for rows.Next() {
		var r Reject
		var t string
		if err := rows.Scan(&r.Batch, &r.Line, &r.Reason, &t); err != nil {
			return nil, err
		}
		r.Time = parseTime(t)
		out = append(out, r)
	}
	return out, rows.Err()
}

// KEKStore is what KEK rotation (Rotate) needs of the store.
type KEKStore interface {
	// BlobsUnderKEK returns up to limit cards whose blob is wrapped under
	// the KEK labelled kek, in Id order, with Ids after after (nil: from
	// the first).
	BlobsUnderKEK(ctx context.Context, kek string, after []byte, limit int) ([]CardBlob, error)
	// ReplaceBlobs replaces, in one transaction, each card's blob by its
	// re-wrap, but only where the row still holds the old blob under the
	// KEK labelled from (compare-and-set): a row another run replaced
	// already is left alone. replaced[i] says whether rs[i] was written.
	ReplaceBlobs(ctx context.Context, from string, rs []BlobReplacement) (replaced []bool, err error)
	// KEKCounts counts the stored blobs per KEK label.
	KEKCounts(ctx context.Context) (map[string]int, error)
}

// CardBlob is a card's Id and its stored blob.
type CardBlob struct {
	ID   protocol.Hex `json:"id"`
	Blob hsm.Blob     `json:"blob"`
}

// BlobReplacement is one card's blob re-wrapped under a new KEK: Old is
// the wrapped bytes it replaces (under the from KEK), New the re-wrap
// with its KEK label.
type BlobReplacement struct {
	ID  []byte
	Old []byte
	New hsm.Blob
}

func (s *sqlStore) BlobsUnderKEK(ctx context.Context, kek string, after []byte, limit int) ([]CardBlob, error) {
	rows, err := s.query(ctx, s.db, `SELECT id, blob_scheme, blob_mechanism, blob_kek, blob_wrapped FROM cards
		WHERE blob_kek = ? AND id > ? ORDER BY id LIMIT ?`, kek, hexID(after), limit)
	if err != nil {
		return nil, fmt.Errorf("store: blobs under KEK %q: %w", kek, err)
	}
	defer rows.Close()
	var out []CardBlob
	for rows.Next() {
		var id, wrapped string
		var mech int64
		var c CardBlob
		if err := rows.Scan(&id, &c.Blob.Scheme, &mech, &c.Blob.KEK, &wrapped); err != nil {
			return nil, fmt.Errorf("store: blobs under KEK %q: %w", kek, err)
		}
		var e1, e2 error
		c.ID, e1 = hex.DecodeString(id)
		c.Blob.Wrapped, e2 = hex.DecodeString(wrapped)
		if err := errors.Join(e1, e2); err != nil {
			return nil, fmt.Errorf("store: card %s: %w", id, err)
		}
		c.Blob.Mechanism = uint(mech)
		out = append(out, c)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: blobs under KEK %q: %w", kek, err)
	}
	return out, nil
}

func (s *sqlStore) ReplaceBlobs(ctx context.Context, from string, rs []BlobReplacement) ([]bool, error) {
	for _, r := range rs {
		if r.New.KEK == "" || r.New.KEK == from {
			return nil, fmt.Errorf("store: card %x: the new blob's KEK label is %q (from %q)", r.ID, r.New.KEK, from)
		}
	}
	var done []bool
	err := s.retry(ctx, "replace blobs", func() (err error) {
		done, err = s.replaceBlobs(ctx, from, rs)
		return err
	})
	return done, err
}

func (s *sqlStore) replaceBlobs(ctx context.Context, from string, rs []BlobReplacement) ([]bool, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("store: replace blobs: %w", err)
	}
	defer tx.Rollback()
	x := &stmtCache{tx: tx, m: map[string]*sql.Stmt{}}
	defer x.close()
	t := now()
	done := make([]bool, len(rs))
	// One statement per up to replaceChunk cards whose new blobs share
	// scheme, mechanism and KEK (a rotation's do): an UPDATE … FROM a
	// VALUES list of (id, old, new) that returns the Ids it changed (one
	// statement per card costs more than the re-wrap: docs/BENCHMARKS.md,
	// "KEK rotation").
	for i := 0; i < len(rs); {
		j := i + 1
		for j < len(rs) && j-i < replaceChunk && sameTarget(rs[i].New, rs[j].New) {
			j++
		}
		if err := s.replaceChunk(ctx, x, from, t, rs[i:j], done[i:j]); err != nil {
			return nil, err
		}
		i = j
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("store: replace blobs: %w", err)
	}
	return done, nil
}

// replaceChunk is the most cards one UPDATE of ReplaceBlobs names: three
// parameters each, far below SQLite's and PostgreSQL's limits.
const replaceChunk = 256

func sameTarget(a, b hsm.Blob) bool {
	return a.Scheme == b.Scheme && a.Mechanism == b.Mechanism && a.KEK == b.KEK
}

func (s *sqlStore) replaceChunk(ctx context.Context, x *stmtCache, from, t string, rs []BlobReplacement, done []bool) error {
	nb := rs[0].New
	args := []any{nb.Scheme, int64(nb.Mechanism), nb.KEK, t}
	var q strings.Builder
	q.WriteString(`UPDATE cards SET blob_scheme = ?, blob_mechanism = ?, blob_kek = ?, blob_wrapped = v.column3, updated_at = ? FROM (VALUES `)
	for k, r := range rs {
		if k > 0 {
			q.WriteString(", ")
		}
		q.WriteString("(?, ?, ?)")
		args = append(args, hexID(r.ID), hex.EncodeToString(r.Old), hex.EncodeToString(r.New.Wrapped))
	}
	q.WriteString(`) AS v WHERE cards.id = v.column1 AND cards.blob_kek = ? AND cards.blob_wrapped = v.column2`)
	args = append(args, from)
	// In a savepoint: if not every row still holds its old blob (another
	// run replaced some), the chunk is undone and redone card by card,
	// which says exactly which rows this call wrote.
	if _, err := s.exec(ctx, x.tx, `SAVEPOINT replace_chunk`); err != nil {
		return fmt.Errorf("store: replace blobs: %w", err)
	}
	res, err := s.exec(ctx, x, q.String(), args...)
	if err != nil {
		return fmt.Errorf("store: replace blobs: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("store: replace blobs: %w", err)
	}
	if int(n) == len(rs) {
		for k := range done {
			done[k] = true
		}
		_, err := s.exec(ctx, x.tx, `RELEASE SAVEPOINT replace_chunk`)
		return err
	}
	if _, err := s.exec(ctx, x.tx, `ROLLBACK TO SAVEPOINT replace_chunk`); err != nil {
		return fmt.Errorf("store: replace blobs: %w", err)
	}
	if _, err := s.exec(ctx, x.tx, `RELEASE SAVEPOINT replace_chunk`); err != nil {
		return fmt.Errorf("store: replace blobs: %w", err)
	}
	for k, r := range rs {
		res, err := s.exec(ctx, x, `UPDATE cards SET blob_scheme = ?, blob_mechanism = ?, blob_kek = ?, blob_wrapped = ?, updated_at = ?
			WHERE id = ? AND blob_kek = ? AND blob_wrapped = ?`,
			r.New.Scheme, int64(r.New.Mechanism), r.New.KEK, hex.EncodeToString(r.New.Wrapped), t,
			hexID(r.ID), from, hex.EncodeToString(r.Old))
		if err != nil {
			return fmt.Errorf("store: card %x: replace blob: %w", r.ID, err)
		}
		n, err := res.RowsAffected()
		if err != nil {
			return fmt.Errorf("store: card %x: replace blob: %w", r.ID, err)
		}
		done[k] = n == 1
	}
	return nil
}

func (s *sqlStore) KEKCounts(ctx context.Context) (map[string]int, error) {
	rows, err := s.query(ctx, s.db, `SELECT blob_kek, COUNT(*) FROM cards GROUP BY blob_kek`)
	if err != nil {
		return nil, fmt.Errorf("store: blobs per KEK: %w", err)
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var k string
		var n int
		if err := rows.Scan(&k, &n); err != nil {
			return nil, fmt.Errorf("store: blobs per KEK: %w", err)
		}
		out[k] = n
	}
	return out, rows.Err()
}
