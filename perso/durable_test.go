//go:build linux

package perso_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"blindperso/internal/stationcli"
	"blindperso/perso"
	"blindperso/perso/persotest"
	"blindperso/protocol"
)

// childEnv makes this test binary a station process (stationChild)
// instead of running tests: the tests below start it, kill it with
// SIGKILL and start it again, with the test hooks of perso.TraceEnv and
// perso.SyncDelayEnv, which only a test binary honours.
const childEnv = "BLINDPERSO_TEST_STATION_CHILD"

// childSpec is what a station child runs.
type childSpec struct {
	Batch, Reader, Log string
	Count              int
}

// stationChild runs `perso run`'s own code (stationcli: journal,
// manifest, PC/SC readers through the private pcscd whose socket the
// parent's environment names) over one reader until Count cards are
// locked.
func stationChild(spec string) int {
	var c childSpec
	if err := json.Unmarshal([]byte(spec), &c); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	job, err := loadTestJob()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	cmd := &cobra.Command{}
	cmd.SetContext(context.Background())
	f := stationcli.Flags{ReaderNames: []string{c.Reader}, Station: "child", Progress: "off", LogFile: c.Log,
		Count: c.Count, APDUTimeout: 5 * time.Second, CardTimeout: 30 * time.Second}
	if err := f.Run(cmd, stationcli.Run{Job: job, Batch: c.Batch, Fingerprint: job.Key.Fingerprint(), What: "station"}); err != nil {
		fmt.Fprintln(os.Stderr, "station child:", err)
		return 1
	}
	return 0
}

// station is a running station child.
type station struct {
	cmd  *exec.Cmd
	out  *bytes.Buffer
	done chan struct{}
	err  error
}

// startStation starts a station child with its trace appended to trace
// and every fdatasync of the batch delayed by delay.
func startStation(t *testing.T, spec childSpec, trace string, delay time.Duration) *station {
	t.Helper()
	js, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	s := &station{out: &bytes.Buffer{}, done: make(chan struct{})}
	s.cmd = exec.Command(exe)
	s.cmd.Env = append(os.Environ(), childEnv+"="+string(js), perso.TraceEnv+"="+trace, perso.SyncDelayEnv+"="+delay.String())
	s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.err = s.cmd.Wait(); close(s.done) }()
	t.Cleanup(func() { s.cmd.Process.Kill(); <-s.done })
	return s
}

// kill SIGKILLs the station and waits for it.
func (s *station) kill() {
	s.cmd.Process.Signal(syscall.SIGKILL)
	<-s.done
}

// waitTrace polls the trace until cond holds for it, failing if the
// station exits first or nothing happens for a minute.
func waitTrace(t *testing.T, s *station, trace, log, what string, cond func([]persotest.TraceEvent) bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; {
		evs, err := persotest.ReadTrace(trace)
		if err != nil {
			t.Fatal(err)
		}
		if cond(evs) {
			return
		}
		select {
		case <-s.done:
			logs, _ := os.ReadFile(log)
			t.Fatalf("station exited (%v) before %s; output:\n%s\nlog:\n%s", s.err, what, s.out, logs)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			logs, _ := os.ReadFile(log)
			t.Fatalf("no %s within a minute; log:\n%s", what, logs)
		}
	}
}

// A station killed between a record's write and its sync, then started
// again with the same batch (as often as it takes), must not LOCK the
// card it recovers before a sync of that record has returned: the killed
// run's sync never did, so the record may be in the page cache only.
// Every fdatasync of the batch is slowed to far longer than the test (a
// disk that never answers), so each kill lands inside the sync window,
// deterministically. Through pcscd, vpcd and virtual cards; the order is
// the station's own trace of its real syncs and of the LOCK APDUs it
// transmits, across all its runs (persotest.CheckDurableLocks), and every
// card's LOCK must be in it.
func TestRestartLocksOnlyDurableRecords(t *testing.T) {
	needPCSC(t)
	const hang = time.Hour // the station is killed inside it
	for i, tc := range []struct {
		name     string
		attested bool
		cards    int // fed in turn into one reader
		// kills: runs killed in their first fdatasync of the batch
		// (the run before recovers the card it left, then personalizes
		// the next), before a last run that locks the last card.
		kills int
	}{
		{name: "killed in the record's sync", cards: 1, kills: 1},
		{name: "attested card", attested: true, cards: 1, kills: 1},
		{name: "two crashes, two cards", cards: 2, kills: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			prefix := byte(0xD0 + i)
			paths := manufacture(t, dir, prefix, tc.cards)
			if tc.attested {
				paths = manufactureAttested(t, dir, prefix|0x08, tc.cards)
			}
			batchPath := filepath.Join(dir, "batch.ndjson")
			trace := filepath.Join(dir, "trace")
			log := filepath.Join(dir, "station.log")
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			fed := feed(ctx, t, [][]string{paths})
			spec := childSpec{Batch: batchPath, Reader: daemon.ReaderName(0), Log: log}

			for k := range tc.kills {
				s := startStation(t, spec, trace, hang)
				var pid int
				waitTrace(t, s, trace, log, "an fdatasync of a record", func(evs []persotest.TraceEvent) bool {
					for _, e := range evs {
						if e.PID == s.cmd.Process.Pid && e.Op == perso.TraceFdatasyncBegin {
							pid = e.PID
							return true
						}
					}
					return false
				})
				s.kill()
				evs, err := persotest.ReadTrace(trace)
				if err != nil {
					t.Fatal(err)
				}
				if !persotest.InSyncWindow(evs, pid, batchPath) {
					t.Fatalf("run %d: killed outside its sync window", k+1)
				}
				if lc := open(t, paths[k]).LifeCycle(); lc != protocol.Personalized {
					t.Fatalf("run %d: card %d is %v after the kill, want personalized (record written, not synced, not locked)", k+1, k, lc)
				}
				if n := countLines(t, batchPath); n != k+1 {
					t.Fatalf("run %d: the batch holds %d records, want %d", k+1, n, k+1)
				}
			}
			spec.Count = 1
			s := startStation(t, spec, trace, hang)
			<-s.done
			if s.err != nil {
				logs, _ := os.ReadFile(log)
				t.Fatalf("last run: %v\n%s\nlog:\n%s", s.err, s.out, logs)
			}
			for err := range fed {
				if err != nil {
					t.Error(err)
				}
			}
			checkFinal(t, batchPath, paths)

			evs, err := persotest.ReadTrace(trace)
			if err != nil {
				t.Fatal(err)
			}
			locks, err := persotest.CheckDurableLocks(evs, batchPath)
			if err != nil {
				var tr bytes.Buffer
				for _, e := range evs {
					fmt.Fprintln(&tr, e)
				}
				t.Errorf("%v\ntrace:\n%s", err, tr.String())
			}
			for _, p := range paths {
				if id := fmt.Sprintf("%x", open(t, p).ID()); locks[id] == 0 {
					t.Errorf("card %s is locked, but the trace holds no LOCK for it", id)
				}
			}
		})
	}
}
