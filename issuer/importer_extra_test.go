package issuer

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"

	"blindperso/hsm"
	"blindperso/protocol"
)

// FuzzParseRecord: the batch line parser never panics; an accepted line
// is a record the importer can use; a refused one says why.
func FuzzParseRecord(f *testing.F) {
	for _, s := range []string{
		`{"v":1,"id":"b101","c":"0411","profile":"ecdh-p256-aes","issuer_fingerprint":"00","time":"2026-01-01T00:00:00Z"}`,
		`{"v":1,"id":"` + strings.Repeat("ab", 16) + `","c":"00","profile":"x","issuer_fingerprint":"00","time":"2026-01-01T00:00:00Z"}`,
		`{"v":1,"id":"` + strings.Repeat("ab", 17) + `","c":"00"}`,
		`{"v":2,"id":"b1","c":"00"}`,
		`{"v":1,"id":"","c":"00"}`,
		`{"v":1,"id":"b1"}`,
		`{"v":1,"id":"zz","c":"00"}`,
		`{"v":1,"id":"b1","c":"00","extra":1}`,
		`{"v":1,"id":"b1","c":"00"} {"v":1}`,
		`{"v":1,"id":"b1","c":"00","time":"yesterday"}`,
		`not json`, `[]`, `null`, `{}`, `"`, `{"v":1e400}`, "",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		rec, err := parseRecord(line)
		if err != nil {
			if strings.TrimSpace(err.Error()) == "" {
				t.Fatalf("error without a message for %q", line)
			}
			return
		}
		if rec.V != 1 || len(rec.ID) == 0 || len(rec.ID) > protocol.MaxIDLen || len(rec.C) == 0 {
			t.Fatalf("accepted %q as %+v", line, rec)
		}
		// What was accepted survives a write and a re-read unchanged.
		again, err := parseRecord([]byte(recordLine(t, rec)))
		if err != nil || !bytes.Equal(again.ID, rec.ID) || !bytes.Equal(again.C, rec.C) || again.Profile != rec.Profile {
			t.Fatalf("re-parse of %+v: %+v, %v", rec, again, err)
		}
	})
}

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

	ref := openStore(t, newPGDatabase(t))
	importBatch(t, is, ref, path1)
	importBatch(t, is, ref, path2)
	want := dump(t, ref)

	for round := range 3 {
		db := newPGDatabase(t)
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
