package perso_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"blindperso/batch"
	"blindperso/perso"
	"blindperso/perso/persotest"
	"blindperso/protocol"
)

// 64 cards through 16 in-process readers: all locked, one record each,
// manifest consistent, and nothing the station wrote or logged holds a
// card's K_I.
func TestLocalSixteenReaders(t *testing.T) {
	job := testJob(t)
	dir := t.TempDir()
	paths := manufacture(t, dir, 1, 64)
	batch := filepath.Join(dir, "batch.ndjson")
	log, logs := newLog()
	j := openJournal(t, job, batch, log)
	var cards []persotest.LocalCard
	for _, p := range paths {
		cards = append(cards, persotest.AppletCard(open(t, p)))
	}
	st := &perso.Station{Job: job, Ledger: j, Log: log}
	runLocal(t, st, 16, hopper(cards...))
	if _, err := perso.WriteManifest(j, "test"); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if st.Done() != 64 {
		t.Errorf("Done = %d", st.Done())
	}
	checkFinal(t, batch, paths)
	checkNoSecret(t, paths, stationFiles(t, batch), logs.String())
	if !strings.Contains(logs.String(), "local 15") {
		t.Error("reader 15 never ran")
	}
}

// crashing stops answering after n APDUs, as if the station had died
// there: nothing after that instant reaches the card.
type crashing struct {
	persotest.LocalCard
	n    int
	sent int
}

var errCrash = errors.New("simulated crash")

func (c *crashing) Transmit(b []byte) ([]byte, error) {
	if c.sent >= c.n {
		return nil, errCrash
	}
	c.sent++
	return c.LocalCard.Transmit(b)
}

// The station "dies" after every possible number of APDUs, with or
// without a torn half-record at the end of the batch, and restarts with
// the same batch: the card always ends locked with exactly one record.
func TestCrashAtEveryAPDU(t *testing.T) {
	job := testJob(t)
	for _, torn := range []bool{false, true} {
		for n := 0; n <= 12; n++ {
			name := map[bool]string{false: "clean", true: "torn"}[torn]
			t.Run(name+"/"+string(rune('a'+n)), func(t *testing.T) {
				dir := t.TempDir()
				paths := manufacture(t, dir, 2, 1)
				batch := filepath.Join(dir, "batch.ndjson")
				j := openJournal(t, job, batch, nil)
				st := &perso.Station{Job: job, Ledger: j, Retries: 1}
				st.Run(context.Background(), persotest.LocalSlots{N: 1, Hopper: hopper(&crashing{LocalCard: persotest.AppletCard(open(t, paths[0])), n: n})})
				j.Close() // the flock goes with the process; no manifest
				if torn {
					appendBytes(t, batch, `{"v":2,"id":"b1`)
				}
				log, logs := newLog()
				j = openJournal(t, job, batch, log)
				st = &perso.Station{Job: job, Ledger: j}
				runLocal(t, st, 1, hopper(persotest.AppletCard(open(t, paths[0]))))
				if _, err := perso.WriteManifest(j, "test"); err != nil {
					t.Fatal(err)
				}
				j.Close()
				checkFinal(t, batch, paths)
				if torn && !strings.Contains(logs.String(), "torn last line") {
					t.Errorf("torn line not reported:\n%s", logs)
				}
			})
		}
	}
}

// fakeCard wraps an applet and rewrites its answer to one instruction.
type fakeCard struct {
	persotest.LocalCard
	ins     byte
	rewrite func([]byte) []byte
}

func (f *fakeCard) Transmit(b []byte) ([]byte, error) {
	r, err := f.LocalCard.Transmit(b)
	if err == nil && len(b) > 1 && b[1] == f.ins {
		r = f.rewrite(r)
	}
	return r, err
}

// Cards that answer garbage or a c of the wrong shape are set aside with
// an error naming the problem; nothing is recorded and nothing locked.
func TestBadCards(t *testing.T) {
	job := testJob(t)
	offCurve := func(r []byte) []byte {
		r = append([]byte(nil), r...)
		r[10] ^= 1 // X changed: no longer on P-256
		return r
	}
	for _, tc := range []struct {
		name    string
		ins     byte
		rewrite func([]byte) []byte
		want    string
	}{
		{"garbage answer", protocol.INSGetID, func([]byte) []byte { return []byte{0x42} }, "GET ID"},
		{"no status word", protocol.INSPersonalize, func([]byte) []byte { return nil }, "PERSONALIZE"},
		{"short c", protocol.INSPersonalize, func(r []byte) []byte { return append(r[:40:40], 0x90, 0) }, "malformed c"},
		{"long c", protocol.INSPersonalize, func(r []byte) []byte { return append(append(r[:len(r)-2:len(r)-2], 0), 0x90, 0) }, "malformed c"},
		{"c off the curve", protocol.INSPersonalize, offCurve, "malformed c"},
		{"bad status", protocol.INSGetStatus, func([]byte) []byte { return []byte{1, 2, 3, 0x90, 0} }, "GET STATUS"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			paths := manufacture(t, dir, 3, 1)
			batch := filepath.Join(dir, "batch.ndjson")
			log, logs := newLog()
			j := openJournal(t, job, batch, log)
			st := &perso.Station{Job: job, Ledger: j, Log: log}
			fake := &fakeCard{LocalCard: persotest.AppletCard(open(t, paths[0])), ins: tc.ins, rewrite: tc.rewrite}
			runLocal(t, st, 1, hopper(fake))
			j.Close()
			if j.Len() != 0 || st.Done() != 0 {
				t.Errorf("%d records, %d locked; want none", j.Len(), st.Done())
			}
			if !strings.Contains(logs.String(), tc.want) || !strings.Contains(logs.String(), "card set aside") {
				t.Errorf("log does not name %q:\n%s", tc.want, logs)
			}
			if lc := open(t, paths[0]).LifeCycle(); lc == protocol.Locked {
				t.Error("bad card was locked")
			}
		})
	}
}

// Two cards claiming one Id: the first is recorded and locked, the second
// is flagged in the rejects file and left unlocked.
func TestDuplicateID(t *testing.T) {
	job := testJob(t)
	dir := t.TempDir()
	a := manufacture(t, filepath.Join(dir), 4, 1)
	twinDir := filepath.Join(dir, "twin")
	b := manufacture(t, mkdir(t, twinDir), 4, 1) // same Id
	batchPath := filepath.Join(dir, "batch.ndjson")
	log, logs := newLog()
	j := openJournal(t, job, batchPath, log)
	st := &perso.Station{Job: job, Ledger: j, Log: log}
	runLocal(t, st, 1, hopper(persotest.AppletCard(open(t, a[0])), persotest.AppletCard(open(t, b[0]))))
	perso.WriteManifest(j, "test")
	j.Close()
	checkFinal(t, batchPath, a)
	if lc := open(t, b[0]).LifeCycle(); lc != protocol.Personalized {
		t.Errorf("twin is %v, want personalized (unlocked)", lc)
	}
	if !strings.Contains(logs.String(), "duplicate card Id") {
		t.Errorf("duplicate not flagged:\n%s", logs)
	}
	if n := countLines(t, batch.RejectsPath(batchPath)); n != 1 {
		t.Errorf("rejects file has %d lines, want 1", n)
	}
}

// pulled reports the card removed at the first APDU with INS ins.
type pulled struct {
	persotest.LocalCard
	ins  byte
	done bool
}

func (p *pulled) Transmit(b []byte) ([]byte, error) {
	if !p.done && len(b) > 1 && b[1] == p.ins {
		p.done = true
		return nil, perso.ErrCardRemoved
	}
	return p.LocalCard.Transmit(b)
}

// A card pulled before LOCK is reported, and finished ("resumed") when it
// comes back.
func TestPulledCardResumes(t *testing.T) {
	job := testJob(t)
	dir := t.TempDir()
	paths := manufacture(t, dir, 5, 1)
	batch := filepath.Join(dir, "batch.ndjson")
	log, logs := newLog()
	j := openJournal(t, job, batch, log)
	c := &pulled{LocalCard: persotest.AppletCard(open(t, paths[0])), ins: protocol.INSLock}
	h := make(persotest.Hopper, 2)
	h <- c
	h <- c // put back
	close(h)
	st := &perso.Station{Job: job, Ledger: j, Log: log}
	runLocal(t, st, 1, h)
	perso.WriteManifest(j, "test")
	j.Close()
	checkFinal(t, batch, paths)
	for _, want := range []string{"card pulled before it was locked", "card resumed", "outcome=recovered"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs)
		}
	}
}

// slowCard takes a while per APDU and tells when it started.
type slowCard struct {
	persotest.LocalCard
	started chan struct{}
	once    sync.Once
}

func (s *slowCard) Transmit(b []byte) ([]byte, error) {
	s.once.Do(func() { close(s.started) })
	time.Sleep(20 * time.Millisecond)
	return s.LocalCard.Transmit(b)
}

// Cancelling the run (SIGINT/SIGTERM) lets the card in hand finish.
func TestStopFinishesCardInHand(t *testing.T) {
	job := testJob(t)
	dir := t.TempDir()
	paths := manufacture(t, dir, 6, 2)
	batch := filepath.Join(dir, "batch.ndjson")
	j := openJournal(t, job, batch, nil)
	slow := &slowCard{LocalCard: persotest.AppletCard(open(t, paths[0])), started: make(chan struct{})}
	h := make(persotest.Hopper, 2)
	h <- slow
	h <- persotest.AppletCard(open(t, paths[1]))
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-slow.started; cancel() }()
	st := &perso.Station{Job: job, Ledger: j}
	if err := st.Run(ctx, persotest.LocalSlots{N: 1, Hopper: h}); err != nil {
		t.Fatal(err)
	}
	j.Close()
	if open(t, paths[0]).LifeCycle() != protocol.Locked || st.Done() != 1 {
		t.Errorf("card in hand not finished: done=%d", st.Done())
	}
	if open(t, paths[1]).LifeCycle() != protocol.Blank {
		t.Error("the next card was started after the stop")
	}
}

// --count stops at exactly N cards even with many readers.
func TestCountIsExact(t *testing.T) {
	job := testJob(t)
	dir := t.TempDir()
	paths := manufacture(t, dir, 7, 20)
	j := openJournal(t, job, filepath.Join(dir, "batch.ndjson"), nil)
	defer j.Close()
	var cards []persotest.LocalCard
	for _, p := range paths {
		cards = append(cards, persotest.AppletCard(open(t, p)))
	}
	h := make(persotest.Hopper, len(cards))
	for _, c := range cards {
		h <- c
	}
	st := &perso.Station{Job: job, Ledger: j, Count: 7}
	runLocal(t, st, 4, h)
	locked := 0
	for _, p := range paths {
		if open(t, p).LifeCycle() == protocol.Locked {
			locked++
		}
	}
	if st.Done() != 7 || locked != 7 || j.Len() != 7 {
		t.Errorf("done %d, locked %d, records %d; want 7", st.Done(), locked, j.Len())
	}
}

// hang never answers one instruction.
type hang struct {
	persotest.LocalCard
	ins   byte
	calls atomic.Int32
}

func (h *hang) Transmit(b []byte) ([]byte, error) {
	if len(b) > 1 && b[1] == h.ins && h.calls.Add(1) == 1 {
		time.Sleep(time.Second)
	}
	return h.LocalCard.Transmit(b)
}

// A card that stops answering times out, is retried, and succeeds.
func TestAPDUTimeoutRetried(t *testing.T) {
	job := testJob(t)
	dir := t.TempDir()
	paths := manufacture(t, dir, 8, 1)
	batch := filepath.Join(dir, "batch.ndjson")
	log, logs := newLog()
	j := openJournal(t, job, batch, log)
	st := &perso.Station{Job: job, Ledger: j, Log: log, APDUTimeout: 100 * time.Millisecond}
	runLocal(t, st, 1, hopper(&hang{LocalCard: persotest.AppletCard(open(t, paths[0])), ins: protocol.INSGetStatus}))
	perso.WriteManifest(j, "test")
	j.Close()
	checkFinal(t, batch, paths)
	if !strings.Contains(logs.String(), "card timed out") || !strings.Contains(logs.String(), "transient error; trying the card again") {
		t.Errorf("timeout not reported and retried:\n%s", logs)
	}
}

// lostLockAnswer delivers LOCK to the card, then loses the answer, as
// when pcscd or the reader goes away under the command.
type lostLockAnswer struct {
	persotest.LocalCard
	lost bool
}

func (c *lostLockAnswer) Transmit(b []byte) ([]byte, error) {
	r, err := c.LocalCard.Transmit(b)
	if err == nil && !c.lost && len(b) > 1 && b[1] == protocol.INSLock {
		c.lost = true
		return nil, errors.New("simulated: answer lost")
	}
	return r, err
}

// A card whose LOCK answer was lost after its record was committed is
// found locked with its record when it is seen again, and counts toward
// Count: the run that sent the LOCK is the run that locked it.
func TestLostLockAnswerCounts(t *testing.T) {
	job := testJob(t)
	dir := t.TempDir()
	paths := manufacture(t, dir, 3, 1)
	batch := filepath.Join(dir, "batch.ndjson")
	log, logs := newLog()
	j := openJournal(t, job, batch, log)
	st := &perso.Station{Job: job, Ledger: j, Log: log, Count: 1}
	// The card is set aside, then comes back (the operator re-feeds it).
	a := persotest.AppletCard(open(t, paths[0]))
	runLocal(t, st, 1, hopper(&lostLockAnswer{LocalCard: a}, a))
	if _, err := perso.WriteManifest(j, "test"); err != nil {
		t.Fatal(err)
	}
	j.Close()
	if st.Done() != 1 {
		t.Fatalf("Done = %d, want 1:\n%s", st.Done(), logs)
	}
	checkFinal(t, batch, paths)
	if !strings.Contains(logs.String(), "lock_confirmed=true") {
		t.Errorf("the lost LOCK was not confirmed on the card's return:\n%s", logs)
	}
}
