package perso_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/card/cardtest"
	"blindperso/perso"
	"blindperso/perso/persotest"
	"blindperso/protocol"
)

// testJob is ecdh-p256-aes under the test vectors' P-256 issuer key: the
// cheapest profile for the card, so tests measure the station.
func testJob(t testing.TB) perso.Job {
	t.Helper()
	job, err := loadTestJob()
	if err != nil {
		t.Fatal(err)
	}
	return job
}

func loadTestJob() (perso.Job, error) {
	vs, err := protocol.ReadVectors("../testdata/vectors.json")
	if err != nil {
		return perso.Job{}, err
	}
	for _, v := range vs {
		if v.Profile == protocol.ECDHP256AES.Name {
			key, err := protocol.ParseIssuerKey(v.IssuerSPKI)
			if err != nil {
				return perso.Job{}, err
			}
			return perso.NewJob(protocol.ECDHP256AES, key, v.Fingerprint)
		}
	}
	return perso.Job{}, errors.New("no ecdh-p256-aes vector")
}

// manufacture makes n blank cards in dir with Ids prefix‖i and returns
// their state files.
func manufacture(t testing.TB, dir string, prefix byte, n int) []string {
	t.Helper()
	var paths []string
	for i := range n {
		p := filepath.Join(dir, fmt.Sprintf("card-%02x-%04d.json", prefix, i))
		if _, err := card.Manufacture(p, card.Options{ID: []byte{0xB1, prefix, byte(i >> 8), byte(i)}}); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	return paths
}

func open(t testing.TB, path string) *card.Applet {
	t.Helper()
	a, err := card.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// openJournal opens a batch for testJob.
func openJournal(t testing.TB, job perso.Job, path string, log *slog.Logger) *perso.Journal {
	t.Helper()
	fp := job.Key.Fingerprint()
	j, err := perso.OpenJournal(path, job.Profile.Name, fp[:], log)
	if err != nil {
		t.Fatal(err)
	}
	return j
}

// hopper returns a closed hopper holding the cards.
func hopper(cards ...persotest.LocalCard) persotest.Hopper {
	h := make(persotest.Hopper, len(cards))
	for _, c := range cards {
		h <- c
	}
	close(h)
	return h
}

// logBuffer is a concurrency-safe log sink.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func newLog() (*slog.Logger, *logBuffer) {
	b := &logBuffer{}
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug})), b
}

// checkFinal asserts the invariants of a finished run: every card locked,
// exactly one batch record per card whose c the card locked with, and the
// manifest matching the batch.
func checkFinal(t testing.TB, batchPath string, cards []string) []batch.Record {
	t.Helper()
	_, recs, err := readBatch(batchPath)
	if err != nil {
		t.Fatal(err)
	}
	byID := map[string]batch.Record{}
	for _, r := range recs {
		byID[hex.EncodeToString(r.ID)] = r
	}
	for _, p := range cards {
		a := open(t, p)
		id := hex.EncodeToString(a.ID())
		if a.LifeCycle() != protocol.Locked {
			t.Errorf("card %s is %v, want locked", id, a.LifeCycle())
		}
		if _, ok := byID[id]; !ok {
			t.Errorf("card %s has no record", id)
		}
	}
	if len(recs) != len(cards) {
		t.Errorf("%d records for %d cards", len(recs), len(cards))
	}
	return recs
}

// checkNoSecret asserts that no card's K_I appears, raw, in hex or in
// base64, in any file under dirs or in the extra texts (logs).
func checkNoSecret(t testing.TB, cards []string, files []string, texts ...string) {
	t.Helper()
	var hay [][]byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		hay = append(hay, b)
	}
	for _, s := range texts {
		hay = append(hay, []byte(s))
	}
	checked := 0
	for _, p := range cards {
		ki := cardtest.KI(t, p)
		if len(ki) == 0 {
			continue
		}
		checked++
		for i, h := range hay {
			for _, f := range cardtest.Encodings(ki) {
				if bytes.Contains(h, f) {
					t.Errorf("K_I of card %s found in station output #%d", p, i)
				}
			}
		}
	}
	if checked == 0 {
		t.Fatal("no card holds a K_I: nothing was checked")
	}
}

// stationFiles lists what the station wrote next to batch.
func stationFiles(t testing.TB, batch string) []string {
	t.Helper()
	m, err := filepath.Glob(batch + "*")
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func runLocal(t testing.TB, st *perso.Station, n int, h persotest.Hopper) {
	t.Helper()
	if err := st.Run(context.Background(), persotest.LocalSlots{N: n, Hopper: h}); err != nil {
		t.Fatal(err)
	}
}

func appendBytes(t testing.TB, path, s string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
}

func mkdir(t testing.TB, dir string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

func countLines(t testing.TB, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Count(b, []byte{'\n'})
}

// readBatch checks the batch at path against its manifest (batch.Verify)
// and returns its records.
func readBatch(path string) (batch.Manifest, []batch.Record, error) {
	var recs []batch.Record
	m, err := batch.Verify(path, func(_ int, r batch.Record) error { recs = append(recs, r); return nil })
	return m, recs, err
}
