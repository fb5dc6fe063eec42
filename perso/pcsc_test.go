package perso_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"blindperso/card"
	"blindperso/internal/pcscd"
	"blindperso/internal/vcard"
	"blindperso/internal/vpcd"
	"blindperso/perso"
	"blindperso/protocol"
)

// daemon is this binary's private pcscd with two vpcd slots (nil with
// -short). Tests that use it must not run in parallel with each other.
var daemon *pcscd.Daemon

// TestMain runs the tests under a private pcscd, or, in a child started
// by startStation (durable_test.go), a station.
func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		os.Exit(stationChild(spec))
	}
	os.Exit(pcscd.RunTests(m, &daemon))
}

func needPCSC(t testing.TB) {
	t.Helper()
	if daemon == nil {
		t.Skip("needs a private pcscd (not with -short)")
	}
}

// feed runs a Feeder per slot over its share of the cards.
func feed(ctx context.Context, t testing.TB, slots [][]string) <-chan error {
	t.Helper()
	errs := make(chan error, len(slots))
	var wg sync.WaitGroup
	for i, cards := range slots {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- (&vcard.Feeder{Addr: daemon.Addr(i), Cards: cards}).Run(ctx)
		}()
	}
	go func() { wg.Wait(); close(errs) }()
	return errs
}

func pcscAll() perso.PCSC {
	return perso.PCSC{Select: perso.Selector{Names: []string{daemon.ReaderName(0), daemon.ReaderName(1)}}}
}

// 50 cards through the two vpcd readers of one pcscd: every card ends
// locked, one record each, batch and manifest agree, and neither they nor
// the logs hold any card's K_I.
func TestFiftyCardsTwoReaders(t *testing.T) {
	needPCSC(t)
	job := testJob(t)
	dir := t.TempDir()
	paths := manufacture(t, dir, 0x50, 50)
	batch := filepath.Join(dir, "batch.ndjson")
	log, logs := newLog()
	j := openJournal(t, job, batch, log)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	fed := feed(ctx, t, [][]string{paths[:25], paths[25:]})
	st := &perso.Station{Job: job, Ledger: j, Log: log, Count: 50}
	start := time.Now()
	if err := st.Run(ctx, pcscAll()); err != nil {
		t.Fatal(err)
	}
	t.Logf("50 cards in %v through 2 vpcd readers", time.Since(start))
	for err := range fed {
		if err != nil {
			t.Error(err)
		}
	}
	if _, err := perso.WriteManifest(j, "test"); err != nil {
		t.Fatal(err)
	}
	j.Close()
	recs := checkFinal(t, batch, paths)
	readers := map[string]int{}
	for _, r := range recs {
		readers[r.Reader]++
	}
	if len(readers) != 2 {
		t.Errorf("records per reader: %v", readers)
	}
	checkNoSecret(t, paths, stationFiles(t, batch), logs.String())
}

// pullOnPersonalize drops the card out of the reader while it handles
// PERSONALIZE: it computes and persists c, but the answer never arrives.
type pullOnPersonalize struct {
	*card.Applet
	pull func()
	once sync.Once
}

func (p *pullOnPersonalize) Transmit(b []byte) []byte {
	r := p.Applet.Transmit(b)
	if len(b) > 1 && b[1] == protocol.INSPersonalize && b[0]&0x10 == 0 {
		p.once.Do(func() {
			p.pull()
			time.Sleep(50 * time.Millisecond) // gone before the answer
		})
	}
	return r
}

// A card pulled in the middle of PERSONALIZE is reported, and recovered
// (READ CIPHERTEXT) and locked when it is put back.
func TestCardRemovedMidPersonalize(t *testing.T) {
	needPCSC(t)
	job := testJob(t)
	dir := t.TempDir()
	paths := manufacture(t, dir, 0x51, 1)
	batch := filepath.Join(dir, "batch.ndjson")
	log, logs := newLog()
	j := openJournal(t, job, batch, log)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	a := open(t, paths[0])
	go func() {
		// First insertion: pulled during PERSONALIZE.
		sctx, pull := context.WithCancel(ctx)
		defer pull()
		conn, err := vpcd.Dial(ctx, daemon.Addr(0))
		if err != nil {
			t.Error(err)
			return
		}
		conn.Serve(sctx, &pullOnPersonalize{Applet: a, pull: pull})
		time.Sleep(time.Second)
		// Back in the reader until the station locked it.
		(&vcard.Feeder{Addr: daemon.Addr(0), Cards: paths}).Run(ctx)
	}()
	st := &perso.Station{Job: job, Ledger: j, Log: log, Count: 1}
	if err := st.Run(ctx, pcscAll()); err != nil {
		t.Fatal(err)
	}
	perso.WriteManifest(j, "test")
	j.Close()
	checkFinal(t, batch, paths)
	for _, want := range []string{"card pulled before it was locked", "card resumed", "outcome=recovered"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs)
		}
	}
}

// pcscd stops and starts again (same dir, same ports) under a running
// station: the readers vanish and come back, the feeder re-inserts the
// card in hand, and every card still ends locked with one record.
func TestPcscdRestart(t *testing.T) {
	needPCSC(t)
	job := testJob(t)
	dir := t.TempDir()
	paths := manufacture(t, dir, 0x52, 6)
	batch := filepath.Join(dir, "batch.ndjson")
	log, logs := newLog()
	j := openJournal(t, job, batch, log)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	fed := feed(ctx, t, [][]string{paths[:3], paths[3:]})
	st := &perso.Station{Job: job, Ledger: j, Log: log, Count: 6}
	done := make(chan error, 1)
	go func() { done <- st.Run(ctx, pcscAll()) }()

	for j.Len() < 2 {
		time.Sleep(20 * time.Millisecond)
	}
	if err := daemon.Stop(); err != nil {
		t.Logf("stop: %v", err)
	}
	time.Sleep(time.Second)
	d, err := pcscd.Start(ctx, daemon.Dir, daemon.BasePort)
	if err != nil {
		t.Fatal(err)
	}
	daemon = d // TestMain stops the new one
	if err := <-done; err != nil {
		t.Fatalf("station: %v (%d cards locked); log:\n%s", err, st.Done(), logs)
	}
	for err := range fed {
		if err != nil {
			t.Error(err)
		}
	}
	perso.WriteManifest(j, "test")
	j.Close()
	checkFinal(t, batch, paths)
	if !strings.Contains(logs.String(), "reader gone") {
		t.Errorf("the readers never went away:\n%s", logs)
	}
}
