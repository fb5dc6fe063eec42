package persotest

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"blindperso/batch"
	"blindperso/perso"
)

// TraceEvent is one line of a station's test trace (perso.TraceEnv).
type TraceEvent struct {
	PID  int
	Op   string // perso.TraceOpen, perso.TraceFsync, …
	Name string // a path (absolute), or for perso.TraceLock the hex SHA-256(c) LOCK carries
	N    int64  // the size opened, or the bytes a sync covers
}

func (e TraceEvent) String() string { return fmt.Sprintf("pid %d %s %s %d", e.PID, e.Op, e.Name, e.N) }

// ReadTrace reads the trace one or more test builds of the station wrote
// to path (in the order they ran). A missing file is an empty trace.
func ReadTrace(path string) ([]TraceEvent, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var evs []TraceEvent
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		f := strings.SplitN(sc.Text(), " ", 3)
		if len(f) != 3 {
			return nil, fmt.Errorf("trace %s line %d: %q", path, n, sc.Text())
		}
		var e TraceEvent
		var perr error
		if e.PID, perr = strconv.Atoi(f[0]); perr != nil {
			return nil, fmt.Errorf("trace %s line %d: %v", path, n, perr)
		}
		e.Op = f[1]
		i := strings.LastIndexByte(f[2], ' ')
		if i < 0 {
			return nil, fmt.Errorf("trace %s line %d: %q", path, n, sc.Text())
		}
		if e.Name, perr = strconv.Unquote(f[2][:i]); perr != nil {
			return nil, fmt.Errorf("trace %s line %d: name: %v", path, n, perr)
		}
		if e.N, perr = strconv.ParseInt(f[2][i+1:], 10, 64); perr != nil {
			return nil, fmt.Errorf("trace %s line %d: %v", path, n, perr)
		}
		evs = append(evs, e)
	}
	return evs, sc.Err()
}

// Runs is the station processes of a trace, in the order they first
// appear.
func Runs(evs []TraceEvent) []int {
	var pids []int
	seen := map[int]bool{}
	for _, e := range evs {
		if !seen[e.PID] {
			seen[e.PID] = true
			pids = append(pids, e.PID)
		}
	}
	return pids
}

// InSyncWindow reports whether run pid's trace ends inside a sync of
// file: the sync had started and had not returned (the process was
// killed between a write and its sync).
func InSyncWindow(evs []TraceEvent, pid int, file string) bool {
	file = abs(file)
	open := false
	for _, e := range evs {
		if e.PID != pid || e.Name != file {
			continue
		}
		switch e.Op {
		case perso.TraceFsyncBegin, perso.TraceFdatasyncBegin:
			open = true
		case perso.TraceFsync, perso.TraceFdatasync:
			open = false
		}
	}
	return open
}

// CheckDurableLocks checks the trace of every station run on the batch at
// batchPath against docs/STATION.md's rule, across runs: every LOCK went
// out only after a sync of the batch covering the record it confirms had
// returned (in this run or an earlier one: a sync that returned is
// durable; bytes an earlier run only wrote are not), and after a sync of
// the batch's directory had returned. The record a LOCK confirms is the
// batch line whose c has the SHA-256 LOCK carries, where that line is in
// the batch now (the batch only grows; a crash leaves no whole record it
// later cuts). It returns the LOCKs seen per card (hex Id), and every
// violation, naming the run, the card and the syncs that had returned.
func CheckDurableLocks(evs []TraceEvent, batchPath string) (map[string]int, error) {
	batchPath = abs(batchPath)
	b, err := os.ReadFile(batchPath)
	if err != nil {
		return nil, err
	}
	type rec struct {
		id   string
		line int
		end  int64
	}
	byHash := map[string]rec{}
	var off int64
	for n, line := range bytes.SplitAfter(b, []byte{'\n'}) {
		if len(line) == 0 {
			continue
		}
		off += int64(len(line))
		r, err := batch.ParseRecord(bytes.TrimSuffix(line, []byte{'\n'}))
		if err != nil {
			return nil, fmt.Errorf("batch %s line %d: %w", batchPath, n+1, err)
		}
		h := sha256.Sum256(r.C)
		byHash[hex.EncodeToString(h[:])] = rec{id: hex.EncodeToString(r.ID), line: n + 1, end: off}
	}
	run := map[int]int{}
	for i, pid := range Runs(evs) {
		run[pid] = i + 1
	}
	dir := filepath.Dir(batchPath)
	var (
		synced   int64 // bytes of the batch a returned sync covered
		dirSync  bool
		lastSync = "none"
		errs     []error
	)
	locks := map[string]int{}
	for _, e := range evs {
		switch {
		case (e.Op == perso.TraceFsync || e.Op == perso.TraceFdatasync) && e.Name == batchPath:
			synced = max(synced, e.N)
			lastSync = fmt.Sprintf("%s of %d bytes by run %d", e.Op, e.N, run[e.PID])
		case e.Op == perso.TraceDirSync && e.Name == dir:
			dirSync = true
		case e.Op == perso.TraceLock:
			r, ok := byHash[e.Name]
			if !ok {
				errs = append(errs, fmt.Errorf("run %d (pid %d) sent LOCK for a c (SHA-256 %s) that is in no record of the batch", run[e.PID], e.PID, e.Name))
				continue
			}
			locks[r.id]++
			if synced < r.end {
				errs = append(errs, fmt.Errorf("run %d (pid %d) sent LOCK to card %s before its record (line %d, bytes up to %d) was durable: the syncs of the batch that had returned covered %d bytes (last: %s)",
					run[e.PID], e.PID, r.id, r.line, r.end, synced, lastSync))
			}
			if !dirSync {
				errs = append(errs, fmt.Errorf("run %d (pid %d) sent LOCK to card %s before any sync of the batch's directory %s had returned", run[e.PID], e.PID, r.id, dir))
			}
		}
	}
	return locks, errors.Join(errs...)
}

func abs(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}
