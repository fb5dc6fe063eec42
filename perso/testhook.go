package perso

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"blindperso/internal/iso7816"
	"blindperso/protocol"
)

// Test instrumentation of the station's durability order: the real syncs
// and the real LOCKs, written down in the order they happen, and a slow
// disk. Only a test binary (testing.Testing) reads these variables: the
// perso command, the insider tool and every other build ignore them, and
// then every hook below is a nil check.
const (
	// TraceEnv names a file to which a test build of the station appends
	// one line per event (persotest.ReadTrace reads them back): the
	// journal opening the batch, every sync of the batch and of the
	// files and directory beside it (when it starts, and when it
	// returned without error), and every LOCK APDU just before it is
	// transmitted, with the SHA-256(c) it carries. Several station
	// processes may append to one trace, one after another.
	TraceEnv = "BLINDPERSO_TEST_TRACE"
	// SyncDelayEnv is a time.Duration: a test build sleeps this long
	// before every fdatasync of the batch (a record's commit), as
	// `strace -e inject=fdatasync:delay_enter=…` does, so that a test
	// can kill the station between a record's write and its sync.
	SyncDelayEnv = "BLINDPERSO_TEST_SYNC_DELAY"
)

// Trace operations: the second field of a trace line
// ("<pid> <op> <quoted name> <n>").
const (
	TraceOpen           = "open"            // the journal opened the batch (name); n: its size, as read
	TraceFsyncBegin     = "fsync-begin"     // an fsync of name starts; n: the bytes it covers
	TraceFsync          = "fsync"           // that fsync returned without error
	TraceFdatasyncBegin = "fdatasync-begin" // an fdatasync of name starts; n: the bytes it covers
	TraceFdatasync      = "fdatasync"       // that fdatasync returned without error
	TraceDirSync        = "dirsync"         // an fsync of directory name returned without error
	TraceLock           = "lock"            // LOCK is about to be transmitted; name: the hex SHA-256(c) it carries
)

// testHooks is nil outside a test binary, and in one without either
// variable set.
var testHooks = newTestHooks()

type hooks struct {
	mu    sync.Mutex
	trace *os.File
	pid   int
	delay time.Duration
	// failAfter, if failErr is set: fdatasyncs that succeed before every
	// further one fails with failErr (export_test.go, in process only).
	failAfter int
	failErr   error
}

func newTestHooks() *hooks {
	if !testing.Testing() {
		return nil
	}
	path, delay := os.Getenv(TraceEnv), os.Getenv(SyncDelayEnv)
	if path == "" && delay == "" {
		return nil
	}
	h := &hooks{pid: os.Getpid()}
	if delay != "" {
		d, err := time.ParseDuration(delay)
		if err != nil {
			panic(fmt.Sprintf("%s=%q: %v", SyncDelayEnv, delay, err))
		}
		h.delay = d
	}
	if path != "" {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			panic(fmt.Sprintf("%s: %v", TraceEnv, err))
		}
		h.trace = f
	}
	return h
}

// event appends one line to the trace: one write, so a SIGKILL leaves
// whole lines only.
func (h *hooks) event(op, name string, n int64) {
	if h == nil || h.trace == nil {
		return
	}
	if abs, err := filepath.Abs(name); err == nil && op != TraceLock {
		name = abs
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	fmt.Fprintf(h.trace, "%d %s %q %d\n", h.pid, op, name, n)
}

// slowDisk is the delay before an fdatasync of the batch, and a failure
// injected instead of it.
func (h *hooks) slowDisk() error {
	if h == nil {
		return nil
	}
	if h.delay > 0 {
		time.Sleep(h.delay)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.failErr == nil {
		return nil
	}
	if h.failAfter > 0 {
		h.failAfter--
		return nil
	}
	return h.failErr
}

// lock traces capdu if it is a LOCK.
func (h *hooks) lock(capdu []byte) {
	if h == nil || h.trace == nil {
		return
	}
	if cmd, err := iso7816.ParseCommand(capdu); err == nil && cmd.INS == protocol.INSLock {
		h.event(TraceLock, fmt.Sprintf("%x", cmd.Data), 0)
	}
}
