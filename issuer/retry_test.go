package issuer

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"

	"blindperso/internal/pgtest"
)

func TestRetryWhatPostgreSQLAsks(t *testing.T) {
	for _, c := range []struct {
		name      string
		errs      []error
		wantCalls int
		wantErr   bool
	}{
		{"deadlock twice, then done", []error{&pgconn.PgError{Code: "40P01"}, &pgconn.PgError{Code: "40P01"}, nil}, 3, false},
		{"serialization failure, then done", []error{&pgconn.PgError{Code: "40001"}, nil}, 2, false},
		{"unique violation: not retried", []error{&pgconn.PgError{Code: "23505"}}, 1, true},
		{"another error: not retried", []error{errors.New("disk full")}, 1, true},
		{"deadlock every time: bounded", nil, maxTxAttempts, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := &sqlStore{}
			calls := 0
			err := s.retry(context.Background(), "test", func() error {
				calls++
				if c.errs == nil {
					return &pgconn.PgError{Code: "40P01"}
				}
				return c.errs[calls-1]
			})
			if calls != c.wantCalls || (err != nil) != c.wantErr || s.Retries() != int64(c.wantCalls-1) {
				t.Fatalf("%d calls (want %d), err %v, %d retries", calls, c.wantCalls, err, s.Retries())
			}
		})
	}
}

// Two transactions that lock two rows in opposite orders: PostgreSQL
// detects the deadlock and aborts one (the attack on the importer before
// its groups were sorted); through retry both complete.
func TestPGRetryRealDeadlock(t *testing.T) {
	db := pgtest.NewDatabase(t)
	s := openStore(t, db).(*sqlStore)
	ctx := context.Background()
	if _, err := s.db.ExecContext(ctx, `CREATE TABLE dl (id INT PRIMARY KEY, n INT); INSERT INTO dl VALUES (1, 0), (2, 0)`); err != nil {
		t.Fatal(err)
	}
	for _, withRetry := range []bool{false, true} {
		var both sync.WaitGroup
		both.Add(2)
		errs := make([]error, 2)
		var wg sync.WaitGroup
		for i, order := range [][2]int{{1, 2}, {2, 1}} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				first := true
				tx := func() error {
					t, err := s.db.BeginTx(ctx, nil)
					if err != nil {
						return err
					}
					defer t.Rollback()
					if _, err := t.ExecContext(ctx, `UPDATE dl SET n = n + 1 WHERE id = $1`, order[0]); err != nil {
						return err
					}
					if first {
						first = false
						both.Done()
						both.Wait() // both hold their first row
					}
					if _, err := t.ExecContext(ctx, `UPDATE dl SET n = n + 1 WHERE id = $1`, order[1]); err != nil {
						return err
					}
					return t.Commit()
				}
				if withRetry {
					errs[i] = s.retry(ctx, "test", tx)
				} else {
					errs[i] = tx()
				}
			}()
		}
		wg.Wait()
		failed := 0
		for _, err := range errs {
			if err != nil {
				if !retryable(err) {
					t.Fatalf("retry %v: %v", withRetry, err)
				}
				failed++
			}
		}
		switch {
		case !withRetry && failed != 1:
			t.Fatalf("without retry: %d of 2 transactions failed, want the one PostgreSQL aborted", failed)
		case withRetry && failed != 0:
			t.Fatalf("with retry: %v", errs)
		}
	}
	if s.Retries() != 1 {
		t.Errorf("%d retries counted, want 1", s.Retries())
	}
}
