package issuer

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Several issuer instances on one PostgreSQL: transactions that write
// several cards take their row locks in one order (by card Id: the
// importer's groups sort their records, the verification groups lock
// challenges then cards by id), so they wait for each other rather than
// deadlock. What PostgreSQL may still abort — a deadlock with a
// transaction of another shape, a serialization failure — it asks its
// clients to retry: the transaction rolled back whole, so running it
// again re-derives every result from the store, exactly.

// retryable reports whether PostgreSQL asks for err's transaction to be
// run again: 40P01 deadlock_detected, 40001 serialization_failure.
func retryable(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "40P01" || pe.Code == "40001")
}

// maxTxAttempts bounds the runs of one transaction.
const maxTxAttempts = 8

// retry runs tx, a whole transaction, until it succeeds, fails for
// another reason, or has run maxTxAttempts times, sleeping a jittered,
// doubling backoff (1, 2, 4 … ms, ±50 %) between runs. Each retry is
// counted (Retries); the first of a call is logged.
func (s *sqlStore) retry(ctx context.Context, what string, tx func() error) error {
	for attempt := 1; ; attempt++ {
		err := tx()
		if err == nil || !retryable(err) || attempt == maxTxAttempts {
			return err
		}
		s.retries.Add(1)
		if attempt == 1 {
			slog.Warn("store: PostgreSQL aborted a transaction for a concurrent one; retrying it", "what", what, "error", err)
		}
		d := time.Duration(1<<(attempt-1)) * time.Millisecond
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d/2 + rand.N(d)):
		}
	}
}

// Retries is how many transactions this store handle ran again because
// PostgreSQL asked (issuer serve's blindperso_issuer_store_retries_total).
func (s *sqlStore) Retries() int64 { return s.retries.Load() }
