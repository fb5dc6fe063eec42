// Package pgtest runs a PostgreSQL 15 cluster of the test binary's own
// for tests that need a real PostgreSQL store (the issuer's, its API's):
// started on first use as the unprivileged "postgres" user (initdb and
// postgres refuse root), listening only on a unix socket in a temp dir,
// trust auth. Each test gets a database of its own; the test binary's
// TestMain calls Stop.
package pgtest

import (
	"database/sql"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"
)

const pgBin = "/usr/lib/postgresql/15/bin"

var pg struct {
	once sync.Once
	err  error
	dir  string // temp dir: data/ and sock/
	sock string
	cmd  *exec.Cmd
	n    atomic.Int32
}

func pgCred() (*syscall.SysProcAttr, int, int, error) {
	if os.Geteuid() != 0 {
		return nil, -1, -1, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, 0, 0, fmt.Errorf("running as root and no postgres user to run PostgreSQL as: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}, uid, gid, nil
}

func startPG() error {
	attr, uid, gid, err := pgCred()
	if err != nil {
		return err
	}
	pg.dir, err = os.MkdirTemp("", "issuer-pg-")
	if err != nil {
		return err
	}
	data, sock := filepath.Join(pg.dir, "data"), filepath.Join(pg.dir, "sock")
	for _, d := range []string{pg.dir, data, sock} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
		if uid >= 0 {
			if err := os.Chown(d, uid, gid); err != nil {
				return err
			}
		}
	}
	initdb := exec.Command(filepath.Join(pgBin, "initdb"), "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "--locale=C", "-E", "UTF8")
	initdb.SysProcAttr = attr
	if out, err := initdb.CombinedOutput(); err != nil {
		return fmt.Errorf("initdb: %v\n%s", err, out)
	}
	pg.cmd = exec.Command(filepath.Join(pgBin, "postgres"), "-D", data, "-k", sock, "-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=200")
	pg.cmd.SysProcAttr = attr
	logf, _ := os.Create(filepath.Join(pg.dir, "postgres.log"))
	pg.cmd.Stdout, pg.cmd.Stderr = logf, logf
	if err := pg.cmd.Start(); err != nil {
		return err
	}
	pg.sock = sock
	db, err := sql.Open("pgx", pgDSN("postgres"))
	if err != nil {
		return err
	}
	defer db.Close()
	for deadline := time.Now().Add(20 * time.Second); ; {
		if err = db.Ping(); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(pg.dir, "postgres.log"))
			return fmt.Errorf("postgres did not start: %v\n%s", err, log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func pgDSN(db string) string {
	return fmt.Sprintf("host=%s port=5432 user=postgres dbname=%s sslmode=disable", pg.sock, db)
}

// NewDatabase returns the DSN of a new, empty database in the test
// cluster, or skips the test if PostgreSQL is not installed.
func NewDatabase(t testing.TB) string {
	t.Helper()
	if _, err := os.Stat(filepath.Join(pgBin, "postgres")); err != nil {
		t.Skipf("PostgreSQL 15 server binaries not in %s (apt-get install postgresql-15): %v", pgBin, err)
	}
	pg.once.Do(func() { pg.err = startPG() })
	if pg.err != nil {
		t.Fatal(pg.err)
	}
	name := fmt.Sprintf("t%d", pg.n.Add(1))
	db, err := sql.Open("pgx", pgDSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec("CREATE DATABASE " + name); err != nil {
		t.Fatal(err)
	}
	return pgDSN(name)
}

// DataDir is the cluster's data directory (for scans of what the
// database wrote to disk); "" before the first NewDatabase.
func DataDir() string {
	if pg.dir == "" {
		return ""
	}
	return filepath.Join(pg.dir, "data")
}

// Stop stops the cluster (fast shutdown) and removes it.
func Stop() {
	if pg.cmd != nil && pg.cmd.Process != nil {
		pg.cmd.Process.Signal(syscall.SIGINT)
		done := make(chan struct{})
		go func() { pg.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			pg.cmd.Process.Kill()
		}
	}
	if pg.dir != "" {
		os.RemoveAll(pg.dir)
	}
}

// Checkpoint makes PostgreSQL write everything to its data files.
func Checkpoint(t testing.TB) {
	db, err := sql.Open("pgx", pgDSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec("CHECKPOINT"); err != nil {
		t.Fatal(err)
	}
}
