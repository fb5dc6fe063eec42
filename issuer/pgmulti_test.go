package issuer

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"blindperso/batch"
	"blindperso/card/cardtest"
	"blindperso/hsm"
	"blindperso/internal/pgtest"
	"blindperso/protocol"
)

// softRecords makes n records for the issuer's key with 4-byte Ids
// prefix‖i, each c a fresh encapsulation (no card needed: the importer
// only derives and wraps).
func softRecords(t testing.TB, is *Issuer, p protocol.Profile, prefix byte, n int) []batch.Record {
	t.Helper()
	fp := is.Key.Fingerprint()
	out := make([]batch.Record, n)
	for i := range out {
		_, c, err := protocol.Encapsulate(p, is.Key.Public, rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = batch.Record{V: batch.Version, ID: binary.BigEndian.AppendUint32(nil, uint32(prefix)<<24|uint32(i)),
			C: c, Profile: p.Name, Fingerprint: fp[:], Time: time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC)}
	}
	return out
}

func batchFile(t testing.TB, is *Issuer, p protocol.Profile, rs []batch.Record) string {
	var s strings.Builder
	for _, r := range rs {
		s.WriteString(cardtest.Line(t, r))
	}
	fp := is.Key.Fingerprint()
	return cardtest.WriteBatch(t, p, fp[:], s.String())
}

// TestPGThreeImporters: three importers, each with its own store handle
// (three issuer instances), on one PostgreSQL, 20 rounds: two disjoint
// batches and one that repeats part of the first plus new records (a
// station's retry reaching another instance). No import fails (a
// deadlock or serialization failure is retried, never an importer's
// error), every batch ends done, and the store holds exactly the
// distinct cards, each imported by exactly one batch and a duplicate in
// the other.
func TestPGThreeImporters(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	const n, overlap, fresh, rounds = 240, 120, 60, 20
	a, b := softRecords(t, is, p, 0xA0, n), softRecords(t, is, p, 0xB0, n)
	c := append(append([]batch.Record(nil), a[:overlap]...), softRecords(t, is, p, 0xC0, fresh)...)
	paths := []string{batchFile(t, is, p, a), batchFile(t, is, p, b), batchFile(t, is, p, c)}
	distinct := 2*n + fresh
	for round := range rounds {
		db := pgtest.NewDatabase(t)
		stores := []Store{openStore(t, db), openStore(t, db), openStore(t, db)}
		reps := make([]BatchReport, 3)
		errs := make([]error, 3)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range stores {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				im := &Importer{Issuer: is, Store: stores[i], Workers: 2, MaxLine: 4096}
				reps[i], errs[i] = im.ImportFile(context.Background(), paths[i])
			}()
		}
		close(start)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d: importer %d failed: %v", round, i, err)
			}
		}
		checkThree(t, round, stores[0], reps, n, overlap, distinct)
		var retries int64
		for _, s := range stores {
			retries += s.(*sqlStore).retries.Load()
		}
		t.Logf("round %d: batch 1 imported %d, batch 3 imported %d; %d transactions retried", round, reps[0].Imported, reps[2].Imported, retries)
	}
}

// checkThree checks a store after the three batches of
// TestPGThreeImporters landed, however they interleaved.
func checkThree(t *testing.T, round int, s Store, reps []BatchReport, n, overlap, distinct int) {
	t.Helper()
	imported := 0
	for i, r := range reps {
		if r.Status != BatchDone || r.Imported+r.Duplicates != r.Records || r.Conflicts != 0 || r.Rejects != 0 {
			t.Fatalf("round %d batch %d: %+v", round, i, r)
		}
		imported += r.Imported
	}
	cards, err := s.Cards(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(cards) != distinct || imported != distinct {
		t.Fatalf("round %d: %d cards stored, %d imported in all, want %d distinct", round, len(cards), imported, distinct)
	}
	if reps[0].Duplicates+reps[2].Duplicates != overlap || reps[1].Duplicates != 0 {
		t.Fatalf("round %d: duplicates %d/%d/%d, want %d between batches 1 and 3", round,
			reps[0].Duplicates, reps[1].Duplicates, reps[2].Duplicates, overlap)
	}
	bs, err := s.Batches(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bs {
		if b.Status != BatchDone {
			t.Fatalf("round %d: batch %s left %s", round, b.ID, b.Status)
		}
	}
}

// TestPGKillOneOfThree: the same three imports, the first in a child
// process killed with SIGKILL at a random point while the other two run;
// the others finish, the killed import rerun completes, the counts are
// exact and no batch is left importing. 10 rounds.
func TestPGKillOneOfThree(t *testing.T) {
	is, uri := newIssuerToken(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	const n, overlap, fresh, rounds = 240, 120, 60, 10
	a, b := softRecords(t, is, p, 0xA1, n), softRecords(t, is, p, 0xB1, n)
	c := append(append([]batch.Record(nil), a[:overlap]...), softRecords(t, is, p, 0xC1, fresh)...)
	paths := []string{batchFile(t, is, p, a), batchFile(t, is, p, b), batchFile(t, is, p, c)}
	for round := range rounds {
		db := pgtest.NewDatabase(t)
		s0 := openStore(t, db) // migrated before the child starts
		arg, _ := json.Marshal(map[string]any{"URI": uri, "DB": db, "Batch": paths[0], "SleepMS": 1})
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), childEnv+"="+string(arg))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		reps := make([]BatchReport, 3)
		errs := make([]error, 3)
		var wg sync.WaitGroup
		for i := 1; i < 3; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				im := &Importer{Issuer: is, Store: openStore(t, db), Workers: 2, MaxLine: 4096}
				reps[i], errs[i] = im.ImportFile(context.Background(), paths[i])
			}()
		}
		// A random point of the child's import.
		want := 1 + mrand.IntN(n-1)
		deadline := time.Now().Add(30 * time.Second)
		for {
			var k int
			// The first batch's Ids (some may be the third's doing).
			s0.(*sqlStore).db.QueryRow(`SELECT COUNT(*) FROM cards WHERE id LIKE 'a1%'`).Scan(&k)
			if k >= want || time.Now().After(deadline) {
				break
			}
			time.Sleep(time.Millisecond)
		}
		cmd.Process.Kill()
		cmd.Wait()
		wg.Wait()
		for i := 1; i < 3; i++ {
			if errs[i] != nil {
				t.Fatalf("round %d: importer %d failed while another was killed: %v", round, i+1, errs[i])
			}
		}
		// The rerun of the killed import.
		im := &Importer{Issuer: is, Store: s0, Workers: 2, MaxLine: 4096}
		var err error
		if reps[0], err = im.ImportFile(context.Background(), paths[0]); err != nil {
			t.Fatalf("round %d: rerun: %v (child: %s)", round, err, stderr.String())
		}
		checkThree(t, round, s0, reps, n, overlap, 2*n+fresh)
		t.Logf("round %d: killed at about %d records; batch 1 imported %d, batch 3 %d", round, want, reps[0].Imported, reps[2].Imported)
	}
}

// BenchmarkPGThreeInstances: three importers (three instances, a store
// handle each) importing disjoint batches into one PostgreSQL at once,
// against one importer importing the same records as one batch, on the
// same token, in the same run. On a 2-core machine the token is the
// limit: the ratio says what the instances cost on top, retries how often
// PostgreSQL aborted a transaction for another.
func BenchmarkPGThreeInstances(b *testing.B) {
	p := protocol.ECDHP256AES
	is := newBenchToken(b, "softhsm2").issuer(p)
	per := max(b.N/3, 50)
	var parts [][]batch.Record
	var all []batch.Record
	for i := range 3 {
		rs := softRecords(b, is, p, byte(0xD0+i), per)
		parts = append(parts, rs)
		all = append(all, rs...)
	}
	paths := []string{batchFile(b, is, p, parts[0]), batchFile(b, is, p, parts[1]), batchFile(b, is, p, parts[2])}
	one := batchFile(b, is, p, all)
	b.ResetTimer()
	var wg sync.WaitGroup
	db := pgtest.NewDatabase(b)
	stores := make([]Store, 3)
	for i := range stores {
		s, err := Open(context.Background(), db)
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		stores[i] = s
	}
	start := time.Now()
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			im := &Importer{Issuer: is, Store: stores[i], Workers: 2, MaxLine: 4096}
			if _, err := im.ImportFile(context.Background(), paths[i]); err != nil {
				b.Error(err)
			}
		}()
	}
	wg.Wait()
	three := time.Since(start)
	var retries int64
	for _, s := range stores {
		retries += s.(*sqlStore).Retries()
	}
	s1, err := Open(context.Background(), pgtest.NewDatabase(b))
	if err != nil {
		b.Fatal(err)
	}
	defer s1.Close()
	start = time.Now()
	im := &Importer{Issuer: is, Store: s1, Workers: 2, MaxLine: 4096}
	if _, err := im.ImportFile(context.Background(), one); err != nil {
		b.Fatal(err)
	}
	single := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(3*per)/three.Seconds(), "three-instances/s")
	b.ReportMetric(float64(3*per)/single.Seconds(), "one-instance/s")
	b.ReportMetric(single.Seconds()/three.Seconds(), "three/one")
	b.ReportMetric(float64(retries), "retries")
	b.ReportMetric(0, "ns/op")
}
