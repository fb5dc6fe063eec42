package issuer

import (
	"context"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"blindperso/protocol"
)

// ExportStore is what Exporter needs of the store: the cards of a
// selection in Id order, from a cursor, and the log of every export and
// of the cards each one wrote (migrations/0004_exports.sql).
type ExportStore interface {
	// SelectCards returns up to limit cards of the batch (if batch is
	// not "") or in the state (if state is not ""), in Id order, with Ids
	// after after (nil: from the first).
	SelectCards(ctx context.Context, batch, state string, after []byte, limit int) ([]ExportCard, error)
	// CountCards counts the cards of the batch (if batch is not "") or
	// in the state (if state is not "").
	CountCards(ctx context.Context, batch, state string) (int, error)
	// CardsByID returns the cards of ids that are stored, in Id order.
	CardsByID(ctx context.Context, ids [][]byte) ([]ExportCard, error)
	// KnownCards reports, for each of ids, whether it is stored.
	KnownCards(ctx context.Context, ids [][]byte) ([]bool, error)

	// BeginExport records an export that starts (e.Status running).
	BeginExport(ctx context.Context, e ExportLog) error
	// RunningExport returns the export still running (unfinished) to
	// file, if any.
	RunningExport(ctx context.Context, file string) (ExportLog, bool, error)
	// AbandonExport marks a running export abandoned (its partial file
	// is gone); the cards it logged stay logged.
	AbandonExport(ctx context.Context, id string) error
	// LogExport records, in one transaction, that the export wrote the
	// cards ids (their lines are in its file, synced), and that its file
	// now holds count lines.
	LogExport(ctx context.Context, id string, ids [][]byte, count int) error
	// LastExported is the greatest card Id the export logged, nil if
	// none.
	LastExported(ctx context.Context, id string) ([]byte, error)
	// TrimExport forgets the export's cards with Ids after after (nil:
	// all of them): those a rerun does not find in the file.
	TrimExport(ctx context.Context, id string, after []byte) error
	// FinishExport marks the export done with its file's count and
	// SHA-256.
	FinishExport(ctx context.Context, id string, count int, sum []byte) error
	// Exports lists the exports, oldest first.
	Exports(ctx context.Context) ([]ExportLog, error)
	// ExportedCards returns up to limit card Ids the export logged, in
	// Id order, after after.
	ExportedCards(ctx context.Context, id string, after []byte, limit int) ([]protocol.Hex, error)
}

// ExportCard is what an export needs of a card.
type ExportCard struct {
	CardBlob
	Profile string
}

// Export statuses (exports.status).
const (
	ExportRunning   = "running"
	ExportDone      = "done"
	ExportAbandoned = "abandoned"
)

// ExportLog is an export's row: who handed which cards' keys to which
// KTK, into which file, and when.
type ExportLog struct {
	ID       string    `json:"id"`
	Started  time.Time `json:"started"`
	Finished time.Time `json:"finished,omitzero"`
	Status   string    `json:"status"`
	Operator string    `json:"operator"`
	// Issuer is the issuer's token label, KEK the KEK the keys were
	// under.
	Issuer string `json:"issuer"`
	KEK    string `json:"kek"`
	KTK    string `json:"ktk"`
	// KTKCheckValue is the KTK's check value in the token, if it gives
	// one.
	KTKCheckValue protocol.Hex `json:"ktk_check_value,omitempty"`
	Selection     string       `json:"selection"`
	// File is the export file's absolute path.
	File   string       `json:"file"`
	Count  int          `json:"count"`
	SHA256 protocol.Hex `json:"sha256,omitempty"`
}

const exportColumns = `id, started_at, finished_at, status, operator, issuer_token, kek_label, ktk_label, ktk_check_value, selection, file, count, sha256`

func scanExport(r scanner) (ExportLog, error) {
	var e ExportLog
	var started, finished, cv, sum string
	if err := r.Scan(&e.ID, &started, &finished, &e.Status, &e.Operator, &e.Issuer, &e.KEK, &e.KTK, &cv, &e.Selection, &e.File, &e.Count, &sum); err != nil {
		return e, err
	}
	e.Started = parseTime(started)
	if finished != "" {
		e.Finished = parseTime(finished)
	}
	var e1, e2 error
	if cv != "" {
		e.KTKCheckValue, e1 = hex.DecodeString(cv)
	}
	if sum != "" {
		e.SHA256, e2 = hex.DecodeString(sum)
	}
	return e, errors.Join(e1, e2)
}

const exportCardColumns = `id, profile, blob_scheme, blob_mechanism, blob_kek, blob_wrapped`

func scanExportCards(rows *sql.Rows) ([]ExportCard, error) {
	defer rows.Close()
	var out []ExportCard
	for rows.Next() {
		var id, wrapped string
		var mech int64
		var c ExportCard
		if err := rows.Scan(&id, &c.Profile, &c.Blob.Scheme, &mech, &c.Blob.KEK, &wrapped); err != nil {
			return nil, err
		}
		var e1, e2 error
		c.ID, e1 = hex.DecodeString(id)
		c.Blob.Wrapped, e2 = hex.DecodeString(wrapped)
		if err := errors.Join(e1, e2); err != nil {
			return nil, fmt.Errorf("card %s: %w", id, err)
		}
		c.Blob.Mechanism = uint(mech)
		out = append(out, c)
	}
	return out, rows.Err()
}

func (s *sqlStore) SelectCards(ctx context.Context, batch, state string, after []byte, limit int) ([]ExportCard, error) {
	var rows *sql.Rows
	var err error
	switch {
	case batch != "" && state == "":
		rows, err = s.query(ctx, s.db, `SELECT `+exportCardColumns+` FROM cards WHERE batch_id = ? AND id > ? ORDER BY id LIMIT ?`, batch, hexID(after), limit)
	case state != "" && batch == "":
		rows, err = s.query(ctx, s.db, `SELECT `+exportCardColumns+` FROM cards WHERE state = ? AND id > ? ORDER BY id LIMIT ?`, state, hexID(after), limit)
	default:
		return nil, errors.New("store: select cards: give a batch or a state")
	}
	if err != nil {
		return nil, fmt.Errorf("store: select cards: %w", err)
	}
	cs, err := scanExportCards(rows)
	if err != nil {
		return nil, fmt.Errorf("store: select cards: %w", err)
	}
	return cs, nil
}

func (s *sqlStore) CountCards(ctx context.Context, batch, state string) (int, error) {
	var n int
	var err error
	switch {
	case batch != "" && state == "":
		err = s.queryRow(ctx, s.db, `SELECT COUNT(*) FROM cards WHERE batch_id = ?`, batch).Scan(&n)
	case state != "" && batch == "":
		err = s.queryRow(ctx, s.db, `SELECT COUNT(*) FROM cards WHERE state = ?`, state).Scan(&n)
	default:
		return 0, errors.New("store: count cards: give a batch or a state")
	}
	if err != nil {
		return 0, fmt.Errorf("store: count cards: %w", err)
	}
	return n, nil
}

func (s *sqlStore) CardsByID(ctx context.Context, ids [][]byte) ([]ExportCard, error) {
	if len(ids) == 0 {
		return nil, nil
	}
	args := make([]any, len(ids))
	for i, id := range ids {
		args[i] = hexID(id)
	}
	rows, err := s.query(ctx, s.db, `SELECT `+exportCardColumns+` FROM cards WHERE id IN (?`+strings.Repeat(`, ?`, len(ids)-1)+`) ORDER BY id`, args...)
	if err != nil {
		return nil, fmt.Errorf("store: %d cards: %w", len(ids), err)
	}
	cs, err := scanExportCards(rows)
	if err != nil {
		return nil, fmt.Errorf("store: %d cards: %w", len(ids), err)
	}
	return cs, nil
}

func (s *sqlStore) BeginExport(ctx context.Context, e ExportLog) error {
	_, err := s.exec(ctx, s.db, `INSERT INTO exports (`+exportColumns+`) VALUES (?, ?, '', ?, ?, ?, ?, ?, ?, ?, ?, 0, '')`,
		e.ID, formatTime(e.Started), ExportRunning, e.Operator, e.Issuer, e.KEK, e.KTK, hex.EncodeToString(e.KTKCheckValue), e.Selection, e.File)
	if err != nil {
		return fmt.Errorf("store: begin export %s: %w", e.ID, err)
	}
	return nil
}

func (s *sqlStore) RunningExport(ctx context.Context, file string) (ExportLog, bool, error) {
	e, err := scanExport(s.queryRow(ctx, s.db, `SELECT `+exportColumns+` FROM exports WHERE file = ? AND status = ? ORDER BY started_at DESC, id LIMIT 1`, file, ExportRunning))
	if errors.Is(err, sql.ErrNoRows) {
		return ExportLog{}, false, nil
	}
	if err != nil {
		return ExportLog{}, false, fmt.Errorf("store: export to %s: %w", file, err)
	}
	return e, true, nil
}

func (s *sqlStore) AbandonExport(ctx context.Context, id string) error {
	if _, err := s.exec(ctx, s.db, `UPDATE exports SET status = ? WHERE id = ? AND status = ?`, ExportAbandoned, id, ExportRunning); err != nil {
		return fmt.Errorf("store: abandon export %s: %w", id, err)
	}
	return nil
}

// logChunk is the most cards one INSERT of LogExport names.
const logChunk = 256

func (s *sqlStore) LogExport(ctx context.Context, id string, ids [][]byte, count int) error {
	err := func() error {
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		x := &stmtCache{tx: tx, m: map[string]*sql.Stmt{}}
		defer x.close()
		for len(ids) > 0 {
			k := min(logChunk, len(ids))
			args := make([]any, 0, 2*k)
			for _, c := range ids[:k] {
				args = append(args, id, hexID(c))
			}
			q := `INSERT INTO export_cards (export_id, card_id) VALUES (?, ?)` + strings.Repeat(`, (?, ?)`, k-1) + ` ON CONFLICT (export_id, card_id) DO NOTHING`
			if _, err := s.exec(ctx, x, q, args...); err != nil {
				return err
			}
			ids = ids[k:]
		}
		if _, err := s.exec(ctx, x, `UPDATE exports SET count = ? WHERE id = ?`, count, id); err != nil {
			return err
		}
		return tx.Commit()
	}()
	if err != nil {
		return fmt.Errorf("store: log export %s: %w", id, err)
	}
	return nil
}

func (s *sqlStore) LastExported(ctx context.Context, id string) ([]byte, error) {
	var last sql.NullString
	if err := s.queryRow(ctx, s.db, `SELECT MAX(card_id) FROM export_cards WHERE export_id = ?`, id).Scan(&last); err != nil {
		return nil, fmt.Errorf("store: export %s: %w", id, err)
	}
	if !last.Valid {
		return nil, nil
	}
	return hex.DecodeString(last.String)
}

func (s *sqlStore) TrimExport(ctx context.Context, id string, after []byte) error {
	if _, err := s.exec(ctx, s.db, `DELETE FROM export_cards WHERE export_id = ? AND card_id > ?`, id, hexID(after)); err != nil {
		return fmt.Errorf("store: export %s: %w", id, err)
	}
	return nil
}

func (s *sqlStore) FinishExport(ctx context.Context, id string, count int, sum []byte) error {
	res, err := s.exec(ctx, s.db, `UPDATE exports SET status = ?, finished_at = ?, count = ?, sha256 = ? WHERE id = ? AND status = ?`,
		ExportDone, now(), count, hex.EncodeToString(sum), id, ExportRunning)
	if err == nil {
		var n int64
		if n, err = res.RowsAffected(); err == nil && n != 1 {
			err = errors.New("not a running export")
		}
	}
	if err != nil {
		return fmt.Errorf("store: finish export %s: %w", id, err)
	}
	return nil
}

func (s *sqlStore) Exports(ctx context.Context) ([]ExportLog, error) {
	rows, err := s.query(ctx, s.db, `SELECT `+exportColumns+` FROM exports ORDER BY started_at, id`)
	if err != nil {
		return nil, fmt.Errorf("store: exports: %w", err)
	}
	defer rows.Close()
	var out []ExportLog
	for rows.Next() {
		e, err := scanExport(rows)
		if err != nil {
			return nil, fmt.Errorf("store: exports: %w", err)
		}
		out = append(out, e)
	}
	return out, rows.Err()
}

func (s *sqlStore) ExportedCards(ctx context.Context, id string, after []byte, limit int) ([]protocol.Hex, error) {
	rows, err := s.query(ctx, s.db, `SELECT card_id FROM export_cards WHERE export_id = ? AND card_id > ? ORDER BY card_id LIMIT ?`, id, hexID(after), limit)
	if err != nil {
		return nil, fmt.Errorf("store: export %s: %w", id, err)
	}
	defer rows.Close()
	var out []protocol.Hex
	for rows.Next() {
		var h string
		if err := rows.Scan(&h); err != nil {
			return nil, fmt.Errorf("store: export %s: %w", id, err)
		}
		b, err := hex.DecodeString(h)
		if err != nil {
			return nil, fmt.Errorf("store: export %s: card %s: %w", id, h, err)
		}
		out = append(out, b)
	}
	return out, rows.Err()
}
