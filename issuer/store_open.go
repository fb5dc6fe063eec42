package issuer

import (
	"context"
	"database/sql"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"
	_ "modernc.org/sqlite"             // database/sql driver "sqlite", pure Go
)

// sqliteCacheKiB is each SQLite connection's page cache. SQLite's own
// default (2000 KiB) is kept by every connection of the pool, and a pool
// serving concurrent requests holds a dozen or more: in a long-running
// issuer serve they filled, one page at a time as the log grew, to
// 30+ MiB (+40 B per verification for 200 000 verifications, measured),
// while on a store whose writer commits hundreds of times a second every
// other connection's cache is emptied at each commit anyway. 256 KiB
// each measured as fast (BenchmarkIssuerVerify; docs/BENCHMARKS.md).
const sqliteCacheKiB = 256

// SQLiteFile is the store's file name inside a data directory.
const SQLiteFile = "issuer.db"

// OpenSQLite opens (creating and migrating if needed) the embedded store
// in dir/issuer.db: WAL, synchronous=FULL (a committed card survives a
// power cut), a 10 s busy timeout, and transactions that take the write
// lock when they begin (BEGIN IMMEDIATE), so parallel workers and
// processes wait for each other instead of failing.
func OpenSQLite(ctx context.Context, dir string) (Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	path := filepath.Join(dir, SQLiteFile)
	q := url.Values{}
	for _, p := range []string{"busy_timeout(10000)", "journal_mode(WAL)", "synchronous(FULL)", "foreign_keys(1)",
		"cache_size(" + strconv.Itoa(-sqliteCacheKiB) + ")"} {
		q.Add("_pragma", p)
	}
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", path, err)
	}
	return open(ctx, db, sqliteDialect, path)
}

// OpenPostgres opens (and migrates if needed) a store in PostgreSQL, for
// several issuer instances sharing one store. dsn is a libpq connection
// string or URL ("postgres://user@host/db", "host=/run/pg dbname=issuer").
func OpenPostgres(ctx context.Context, dsn string) (Store, error) {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	return open(ctx, db, postgresDialect, "PostgreSQL")
}

// Open opens the store named by db: a postgres:// or postgresql:// URL,
// or a libpq key=value string, is PostgreSQL; anything else is a data
// directory for the embedded SQLite store.
func Open(ctx context.Context, db string) (Store, error) {
	if strings.HasPrefix(db, "postgres://") || strings.HasPrefix(db, "postgresql://") || strings.Contains(db, "=") {
		return OpenPostgres(ctx, db)
	}
	return OpenSQLite(ctx, db)
}

// maxIdleConns is how many idle connections a store keeps open.
const maxIdleConns = 64

func open(ctx context.Context, db *sql.DB, d dialect, what string) (Store, error) {
	// database/sql keeps 2 idle connections by default: with more
	// concurrent readers (verifications read their card and challenge
	// outside the group's transaction) every extra connection was closed
	// after use and opened again — on PostgreSQL a new backend and its
	// statements prepared again, 20× slower issuing challenges from 16
	// callers.
	db.SetMaxIdleConns(maxIdleConns)
	s := &sqlStore{db: db, d: d}
	s.ac = newAuthCommitter(s)
	s.ar = newAuthReader(s)
	s.stmts = &stmtPool{db: db, m: map[string]*sql.Stmt{}}
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("store %s: %w", what, err)
	}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("store %s: %w", what, err)
	}
	return s, nil
}
