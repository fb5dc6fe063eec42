package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/card/cardtest"
	"blindperso/chipca"
	"blindperso/internal/vcard"
	"blindperso/perso"
	"blindperso/perso/persotest"
	"blindperso/protocol"
)

// testKey is the P-256 issuer public key of the test vectors.
const testKey = `-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEV5igqfiNx5y67zcyoImBpfJYKadG
ShOjsgzGRFRPuVIOxsPwPCkH/jTM6f8s0uQR7X525j0ld2LXtgcEVHciHw==
-----END PUBLIC KEY-----
`

// The crash campaign: the station process is killed with SIGKILL 30
// times over a run of 40 cards (half of them attested) in two vpcd
// readers, on a slow disk (every fdatasync of the batch delayed by
// syncDelay, perso.SyncDelayEnv), and restarted each time with the same
// batch. The kills take turns: at a random instant; the moment the batch
// grows (a record written, its fdatasync pending); and at a random point
// inside a sync window (after the run's first, second or third
// fdatasync of the batch began, before it can return). Every run
// traces its real syncs and the LOCK APDUs it sends (perso.TraceEnv),
// and the order is checked across all runs, not only the end state: no
// LOCK went out before a sync covering its record had returned, in that
// run or an earlier one. At the end no card is stranded (all locked),
// every card has exactly one record and a LOCK in the trace, the manifest
// matches, every attested card's record carries an attestation that
// verifies, and nothing written or logged holds a K_I.
func TestCrashCampaign(t *testing.T) {
	if daemon == nil {
		t.Skip("needs a private pcscd (not with -short)")
	}
	const nCards, kills = 40, 30
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "issuer.pub.pem")
	must(t, os.WriteFile(keyFile, []byte(testKey), 0o644))
	// Every other card is attested (PROTOCOL.md §10): its record must
	// carry the attestation it signed, whatever the kills did.
	ca, err := chipca.New("crash campaign vendor")
	must(t, err)
	var paths []string
	attested := map[string]bool{}
	for i := range nCards {
		p := filepath.Join(dir, fmt.Sprintf("card-%02d.json", i))
		o := card.Options{ID: []byte{0xC0, byte(i)}}
		if i%2 == 0 {
			cc, err := ca.NewCard(o.ID, chipca.CertOptions{})
			must(t, err)
			at := card.Attestation(cc)
			o.Attestation = &at
			attested[hex.EncodeToString(o.ID)] = true
		}
		_, err := card.Manufacture(p, o)
		must(t, err)
		paths = append(paths, p)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()
	for slot, cards := range [][]string{paths[:nCards/2], paths[nCards/2:]} {
		go (&vcard.Feeder{Addr: daemon.Addr(slot), Cards: cards}).Run(ctx)
	}
	batch := filepath.Join(dir, "batch.ndjson")
	logFile := filepath.Join(dir, "perso.log")
	trace := filepath.Join(dir, "trace")
	const syncDelay = 200 * time.Millisecond
	station := func(count int) *exec.Cmd {
		cmd := exec.CommandContext(ctx, "perso", "run", "--issuer-key", keyFile, "--profile", "ecdh-p256-aes",
			"--batch", batch, "--station", "crash", "--progress", "off", "--log", logFile,
			"--count", strconv.Itoa(count))
		cmd.Env = append(os.Environ(), perso.TraceEnv+"="+trace, perso.SyncDelayEnv+"="+syncDelay.String())
		cmd.Stderr = os.Stderr
		must(t, cmd.Start())
		return cmd
	}
	start := time.Now()
	rng := rand.New(rand.NewPCG(1, 2))
	inWindow := 0 // kills that landed inside a sync of the batch
	for k := range kills {
		cmd := station(0)
		switch k % 3 {
		case 0:
			time.Sleep(time.Duration(50+rng.IntN(900)) * time.Millisecond)
		case 1:
			size := fileSize(batch)
			for deadline := time.Now().Add(3 * time.Second); fileSize(batch) == size && time.Now().Before(deadline); {
				time.Sleep(200 * time.Microsecond)
			}
		case 2:
			nth := 1 + rng.IntN(3)
			for deadline := time.Now().Add(5 * time.Second); syncsBegun(t, trace, cmd.Process.Pid) < nth && time.Now().Before(deadline); {
				time.Sleep(time.Millisecond)
			}
			time.Sleep(time.Duration(rng.Int64N(int64(syncDelay) * 3 / 4)))
		}
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		evs, err := persotest.ReadTrace(trace)
		must(t, err)
		if persotest.InSyncWindow(evs, cmd.Process.Pid, batch) {
			inWindow++
		}
	}
	locked := countLocked(t, paths)
	t.Logf("%v: after %d kills (%d inside a sync of the batch): %d of %d cards locked, %d records",
		time.Since(start), kills, inWindow, locked, nCards, lines(batch))
	if inWindow == 0 {
		t.Error("no kill landed inside a sync of the batch")
	}
	// The last run is left alone until every card is locked, then stopped
	// the way an operator does (SIGTERM), which must exit cleanly.
	cmd := station(0)
	// Its signal handler is in place once it has opened the batch (the
	// kills may have left no card to do).
	for deadline := time.Now().Add(10 * time.Second); !opened(t, trace, cmd.Process.Pid) && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	for deadline := time.Now().Add(60 * time.Second); countLocked(t, paths) < nCards && time.Now().Before(deadline); {
		time.Sleep(200 * time.Millisecond)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil || countLocked(t, paths) < nCards {
		logs, _ := os.ReadFile(logFile)
		if len(logs) > 6000 {
			logs = logs[len(logs)-6000:]
		}
		t.Fatalf("final station run: %v, %d of %d cards locked; log tail:\n%s", err, countLocked(t, paths), nCards, logs)
	}
	_, recs, err := readBatch(batch)
	must(t, err)
	if len(recs) != nCards {
		t.Errorf("%d records for %d cards", len(recs), nCards)
	}
	if n := countLocked(t, paths); n != nCards {
		t.Errorf("%d of %d cards locked: stranded cards", n, nCards)
	}
	ids := map[string]bool{}
	for _, r := range recs {
		id := hex.EncodeToString(r.ID)
		ids[id] = true
		switch {
		case attested[id] && r.Attestation == nil:
			t.Errorf("attested card %s: record without attestation", id)
		case attested[id]:
			if err := perso.CheckAttestation(r); err != nil {
				t.Errorf("attested card %s: %v", id, err)
			}
			if leaf, err := x509.ParseCertificate(r.Attestation.Chain[0]); err != nil {
				t.Error(err)
			} else if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Roots(), Intermediates: pool(t, r.Attestation.Chain[1:])}); err != nil {
				t.Errorf("attested card %s: chain: %v", id, err)
			}
		case r.Attestation != nil:
			t.Errorf("unattested card %s: record with attestation", id)
		}
	}
	for _, p := range paths {
		a, err := card.Open(p)
		must(t, err)
		if !ids[hex.EncodeToString(a.ID())] {
			t.Errorf("card %x has no record", a.ID())
		}
	}
	// The order of every run's syncs and LOCKs, not only where they ended.
	evs, err := persotest.ReadTrace(trace)
	must(t, err)
	lockCount, err := persotest.CheckDurableLocks(evs, batch)
	if err != nil {
		t.Errorf("LOCK before its record was durable:\n%v", err)
	}
	sent := 0
	for _, p := range paths {
		a, err := card.Open(p)
		must(t, err)
		id := hex.EncodeToString(a.ID())
		if lockCount[id] == 0 {
			t.Errorf("card %s is locked, but no run's trace holds a LOCK for it", id)
		}
		sent += lockCount[id]
	}
	logs, _ := os.ReadFile(logFile)
	t.Logf("%d runs, %d LOCKs checked; torn lines repaired: %d; cards recovered: %d", len(persotest.Runs(evs)), sent,
		bytes.Count(logs, []byte("torn last line")), bytes.Count(logs, []byte("outcome=recovered")))
	files, _ := filepath.Glob(batch + "*")
	checkNoKI(t, paths, append(files, logFile))
}

// pool holds the DER certificates.
func pool(t *testing.T, ders []protocol.Hex) *x509.CertPool {
	p := x509.NewCertPool()
	for _, d := range ders {
		c, err := x509.ParseCertificate(d)
		must(t, err)
		p.AddCert(c)
	}
	return p
}

func countLocked(t *testing.T, paths []string) int {
	n := 0
	for _, p := range paths {
		a, err := card.Open(p)
		must(t, err)
		if a.LifeCycle() == protocol.Locked {
			n++
		}
	}
	return n
}

// checkNoKI asserts that no card's K_I (from its state file) appears in
// the files, in any encoding of cardtest.Encodings.
func checkNoKI(t *testing.T, cards, files []string) {
	var hay []byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		must(t, err)
		hay = append(hay, b...)
	}
	for _, p := range cards {
		ki := cardtest.KI(t, p)
		if len(ki) == 0 {
			t.Errorf("card %s holds no K_I", p)
			continue
		}
		for enc, f := range cardtest.Encodings(ki) {
			if bytes.Contains(hay, f) {
				t.Errorf("K_I of %s (%s) found in station output", p, enc)
			}
		}
	}
}

// opened reports whether run pid has opened the batch.
func opened(t *testing.T, trace string, pid int) bool {
	evs, err := persotest.ReadTrace(trace)
	must(t, err)
	for _, e := range evs {
		if e.PID == pid && e.Op == perso.TraceOpen {
			return true
		}
	}
	return false
}

// syncsBegun is how many fdatasyncs of a record run pid has begun.
func syncsBegun(t *testing.T, trace string, pid int) int {
	evs, err := persotest.ReadTrace(trace)
	must(t, err)
	n := 0
	for _, e := range evs {
		if e.PID == pid && e.Op == perso.TraceFdatasyncBegin {
			n++
		}
	}
	return n
}

func fileSize(p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		return -1
	}
	return fi.Size()
}

func lines(p string) int {
	b, _ := os.ReadFile(p)
	return bytes.Count(b, []byte{'\n'})
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// readBatch checks the batch at path against its manifest (batch.Verify)
// and returns its records.
func readBatch(path string) (batch.Manifest, []batch.Record, error) {
	var recs []batch.Record
	m, err := batch.Verify(path, func(_ int, r batch.Record) error { recs = append(recs, r); return nil })
	return m, recs, err
}
