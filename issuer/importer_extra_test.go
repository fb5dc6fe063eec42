package issuer

import (
	"blindperso/internal/pgtest"
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"blindperso/batch"
	"blindperso/hsm"
	"blindperso/protocol"
)

// Two issuer instances (two store handles, two goroutines) import
// different batches into one PostgreSQL at the same time: the store ends
// exactly as after importing them one after the other.
func TestPGConcurrentImport(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	var ids1, ids2 []byte
	for i := range 12 {
		ids1 = append(ids1, byte(0x10+i))
		ids2 = append(ids2, byte(0x60+i))
	}
	cards1, cards2 := makeCards(t, is, p, ids1...), makeCards(t, is, p, ids2...)
	// Each batch also carries a bad line, so rejects race too.
	batch := func(cards []vcard) string {
		var s strings.Builder
		for i, c := range cards {
			s.WriteString(recordLine(t, c.rec))
			if i == 4 {
				s.WriteString("{oops\n")
			}
		}
		return writeBatch(t, is, p, s.String())
	}
	path1, path2 := batch(cards1), batch(cards2)

	ref := openStore(t, pgtest.NewDatabase(t))
	importBatch(t, is, ref, path1)
	importBatch(t, is, ref, path2)
	want := dump(t, ref)

	for round := range 3 {
		db := pgtest.NewDatabase(t)
		s1, s2 := openStore(t, db), openStore(t, db)
		var wg sync.WaitGroup
		errs := make([]error, 2)
		start := make(chan struct{})
		for i, job := range []struct {
			s    Store
			path string
		}{{s1, path1}, {s2, path2}} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				im := &Importer{Issuer: is, Store: job.s, Workers: 2, MaxLine: 4096}
				_, errs[i] = im.ImportFile(context.Background(), job.path)
			}()
		}
		close(start)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d importer %d: %v", round, i, err)
			}
		}
		if got := dump(t, s1); got != want {
			t.Fatalf("round %d: concurrent imports:\n%s\none after the other:\n%s", round, got, want)
		}
	}
}

// noLookupStore hides the store's KnownCards: the importer then asks
// CardCHash per record.
type noLookupStore struct{ Store }

// Records of one Id spread over the batch — the first refused by the
// token, then the genuine c, the same again, another card's c — with
// other records between them, so that they fall in different lookup
// lists and groups: whatever the group timing and the worker count, and
// with or without the store's batched lookup, the store ends the same,
// and the token works exactly once per record whose Id is neither stored
// nor pending (a refused record does not make its Id known).
func TestImportSameIDAcrossGroups(t *testing.T) {
	p := protocol.RSAOAEPAES
	is := newIssuer(t, hsm.KindRSA2048)
	var ids []byte
	for i := range 6 {
		ids = append(ids, byte(0x20+i))
	}
	cards := makeCards(t, is, p, ids...)
	x := cards[0].rec
	refused := x
	refused.C = bytes.Clone(x.C)
	refused.C[len(refused.C)-1] ^= 0x80
	other := cards[1].rec
	other.ID = x.ID
	var content strings.Builder
	filler := 0
	fill := func(n int) {
		for range n {
			r := cards[2+filler%4].rec
			r.ID = []byte{0xF0, byte(filler >> 8), byte(filler)}
			filler++
			content.WriteString(recordLine(t, r))
		}
	}
	for _, r := range []batch.Record{refused, x, x, other} {
		fill(70) // more than a lookup list
		content.WriteString(recordLine(t, r))
	}
	fill(5)
	path := writeBatch(t, is, p, content.String())
	// Token work: the refused record, x once, and every filler.
	wantCalls := int64(2 + filler)

	var want, wantRerun string
	for _, tc := range []struct {
		name    string
		workers int
		wait    time.Duration
		hide    bool
	}{
		{"1 worker", 1, 0, false},
		{"2 workers", 2, 0, false},
		{"commit at once", 2, time.Nanosecond, false},
		{"commit at once, 1 worker", 1, time.Nanosecond, false},
		{"per-record lookup", 2, time.Nanosecond, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var s Store = openStore(t, filepath.Join(t.TempDir(), "data"))
			dumpOf := s
			if tc.hide {
				s = noLookupStore{s}
			}
			var calls atomic.Int64
			im := &Importer{Issuer: is, Store: s, Workers: tc.workers, groupWait: tc.wait,
				TokenTime: func(time.Duration) { calls.Add(1) }}
			rep, err := im.ImportFile(context.Background(), path)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Rejects != 1 || rep.Conflicts != 1 || rep.Duplicates != 1 || rep.Imported != 1+filler {
				t.Errorf("report %+v", rep)
			}
			if got := calls.Load(); got != wantCalls {
				t.Errorf("%d token calls, want %d", got, wantCalls)
			}
			got := dump(t, dumpOf)
			if want == "" {
				want = got
			} else if got != want {
				t.Errorf("store:\n%s\nwant (first run):\n%s", got, want)
			}
			// A rerun makes no token call: every Id is stored now. (The
			// refused record's Id is now known, so its line turns from
			// a reject into a conflict, as it did before lookups were
			// batched; the same in every case.)
			calls.Store(0)
			if _, err := im.ImportFile(context.Background(), path); err != nil {
				t.Fatal(err)
			}
			if n := calls.Load(); n != 0 {
				t.Errorf("rerun: %d token calls, want 0", n)
			}
			got = dump(t, dumpOf)
			if wantRerun == "" {
				wantRerun = got
			} else if got != wantRerun {
				t.Errorf("after a rerun:\n%s\nwant (first run):\n%s", got, wantRerun)
			}
		})
	}
}

// failingStore fails every group commit.
type failingStore struct {
	Store
	puts atomic.Int64
}

func (f *failingStore) PutResults(ctx context.Context, rs []RecordResult) ([]Outcome, error) {
	f.puts.Add(1)
	return nil, errors.New("disk on fire")
}

// A store that cannot commit stops the import at its first group: the
// workers stop asking the token, and ImportFile says why.
func TestImportStopsOnStoreFailure(t *testing.T) {
	p := protocol.ECDHP256AES
	is := newIssuer(t, hsm.KindP256)
	cards := makeCards(t, is, p, 1, 2, 3, 4)
	var content strings.Builder
	const n = 2000
	for i := range n {
		r := cards[i%len(cards)].rec
		r.ID = []byte{0xD0, byte(i >> 8), byte(i)}
		content.WriteString(recordLine(t, r))
	}
	path := writeBatch(t, is, p, content.String())
	fs := &failingStore{Store: openStore(t, filepath.Join(t.TempDir(), "data"))}
	var calls atomic.Int64
	im := &Importer{Issuer: is, Store: fs, Workers: 2, TokenTime: func(time.Duration) { calls.Add(1) }}
	_, err := im.ImportFile(context.Background(), path)
	if err == nil || !strings.Contains(err.Error(), "disk on fire") {
		t.Fatalf("err = %v", err)
	}
	if fs.puts.Load() != 1 {
		t.Errorf("%d group commits tried, want 1", fs.puts.Load())
	}
	if c := calls.Load(); c >= n {
		t.Errorf("the token imported all %d records after the store failed", c)
	} else {
		t.Logf("stopped after %d token calls of %d", c, n)
	}
}

// The importer recycles SoftHSM2 (hsm.Token.Recycle: finalize and
// initialize, which frees the session objects it keeps) every so many
// records, while both workers import: every card lands, with the key a
// card holds, and the issuer's session copies are made again each time.
func TestImportRecycles(t *testing.T) {
	p := protocol.ECDHP256AES
	is := newIssuer(t, hsm.KindP256)
	is.RecycleEvery = 50
	gen := is.Token.Generation()
	cards := makeCards(t, is, p, 1, 2, 3)
	var content strings.Builder
	const n = 600
	for i := range n {
		r := cards[i%len(cards)].rec
		if i >= len(cards) {
			r.ID = []byte{0xC0, byte(i >> 8), byte(i)}
		}
		content.WriteString(recordLine(t, r))
	}
	path := writeBatch(t, is, p, content.String())
	s := openStore(t, filepath.Join(t.TempDir(), "data"))
	im := &Importer{Issuer: is, Store: s, Workers: 2}
	rep, err := im.ImportFile(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Imported != n || rep.Rejects != 0 {
		t.Fatalf("report %+v", rep)
	}
	// One recycle (a finalization and an initialization) per 50 imports.
	if got := is.Token.Generation() - gen; got < 2*(n/50) {
		t.Errorf("%d module generations during the import, want at least %d", got, 2*(n/50))
	}
	// The genuine cards authenticate against what was stored.
	a := &Authenticator{Verifier: is, Store: s}
	for _, c := range cards {
		ch, err := a.Challenge(context.Background(), c.rec.ID)
		if err != nil {
			t.Fatal(err)
		}
		res, err := a.Verify(context.Background(), c.rec.ID, ch.Challenge, authenticate(t, c.a, ch.Challenge))
		if err != nil || !res.OK {
			t.Errorf("card %x after recycling: %+v, %v", c.rec.ID, res, err)
		}
	}
}

// The importer reads the manifest with batch.ParseManifest: a renamed
// batch is refused (batch row), a manifest that breaks a rule is an
// error that stores nothing.
func TestImportManifestRules(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	cards := makeCards(t, is, p, 1)
	path := batchOf(t, is, p, cards...)
	s := openStore(t, filepath.Join(t.TempDir(), "d"))
	im := &Importer{Issuer: is, Store: s, Workers: 1}

	renamed := filepath.Join(filepath.Dir(path), "renamed.ndjson")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	raw, err := os.ReadFile(batch.ManifestPath(path))
	must(err)
	content, err := os.ReadFile(path)
	must(err)
	must(os.WriteFile(renamed, content, 0o644))
	must(os.WriteFile(batch.ManifestPath(renamed), raw, 0o644))
	if _, err := im.ImportFile(context.Background(), renamed); err == nil || !strings.Contains(err.Error(), `manifest names batch "batch.ndjson", but the file is "renamed.ndjson"`) {
		t.Fatalf("renamed batch: %v", err)
	}
	if _, err := s.Card(context.Background(), cards[0].rec.ID); err == nil {
		t.Fatal("a card of a renamed batch was stored")
	}

	for _, tc := range []struct{ name, from, to, want string }{
		{"unknown field", `"station":`, `"extra":1,"station":`, `unknown field "extra" in manifest`},
		{"no station", `"station":"test",`, ``, `field "station": missing`},
		{"repeated count", `"count":`, `"count":7,"count":`, `repeats member "count"`},
		{"other format", `batch/2"`, `batch/3"`, `manifest format "blindperso-batch/3"`},
		{"unknown profile", `"profile":"ecdh-p256-aes"`, `"profile":"ecdh-p384-aes"`, `the manifest names unknown profile`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !strings.Contains(string(raw), tc.from) {
				t.Fatalf("manifest %s has no %s", raw, tc.from)
			}
			must(os.WriteFile(batch.ManifestPath(path), []byte(strings.Replace(string(raw), tc.from, tc.to, 1)), 0o644))
			if _, err := im.ImportFile(context.Background(), path); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}
