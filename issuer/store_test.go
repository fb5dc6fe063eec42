package issuer

import (
	"blindperso/internal/pgtest"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/card/cardtest"
	"blindperso/hsm"
	"blindperso/protocol"
)

// storeKind opens a fresh store of one kind for a test and names the
// files where its data ends up on disk.
type storeKind struct {
	name string
	// open returns a DSN/dir for Open and the directory holding the
	// store's files.
	open func(t *testing.T) (db, files string)
}

var storeKinds = []storeKind{
	{"sqlite", func(t *testing.T) (string, string) {
		d := filepath.Join(t.TempDir(), "data")
		return d, d
	}},
	{"postgres", func(t *testing.T) (string, string) {
		return pgtest.NewDatabase(t), pgtest.DataDir()
	}},
}

func openStore(t testing.TB, db string) Store {
	t.Helper()
	s, err := Open(context.Background(), db)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// vcard is a personalized virtual card: its record and its state file.
type vcard struct {
	rec batch.Record
	a   *card.Applet
}

func (c vcard) ki(t *testing.T) []byte {
	t.Helper()
	ki := cardtest.KI(t, c.a.Path())
	if len(ki) != protocol.KeySize {
		t.Fatalf("card state %s: k_i %x", c.a.Path(), ki)
	}
	return ki
}

func makeCards(t *testing.T, is *Issuer, p protocol.Profile, ids ...byte) []vcard {
	t.Helper()
	var out []vcard
	for _, c := range cardtest.Cards(t, p, is.Key.Public.SPKI, ids...) {
		out = append(out, vcard{c.Rec, c.A})
	}
	return out
}

func recordLine(t *testing.T, r batch.Record) string { return cardtest.Line(t, r) }

// writeBatch writes lines as a batch with a manifest that matches it.
func writeBatch(t *testing.T, is *Issuer, p protocol.Profile, content string) string {
	fp := is.Key.Fingerprint()
	return cardtest.WriteBatch(t, p, fp[:], content)
}

func batchOf(t *testing.T, is *Issuer, p protocol.Profile, cards ...vcard) string {
	var s strings.Builder
	for _, c := range cards {
		s.WriteString(recordLine(t, c.rec))
	}
	return writeBatch(t, is, p, s.String())
}

func importBatch(t *testing.T, is *Issuer, s Store, path string) BatchReport {
	t.Helper()
	im := &Importer{Issuer: is, Store: s, Workers: 2, MaxLine: 4096}
	rep, err := im.ImportFile(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// dump is the store's content without times, in a fixed order.
func dump(t *testing.T, s Store) string {
	t.Helper()
	ss := s.(*sqlStore)
	var b strings.Builder
	for _, q := range []string{
		`SELECT version FROM schema_version ORDER BY version`,
		`SELECT id, manifest, records, imported, duplicates, conflicts, rejects, status, reason FROM batches ORDER BY id`,
		`SELECT id, profile, issuer_key_label, issuer_fingerprint, blob_scheme, blob_mechanism, blob_kek, blob_wrapped, c_sha256, batch_id, line, state, failed_auth FROM cards ORDER BY id`,
		`SELECT card_id, c_sha256, batch_id, line FROM conflicts ORDER BY batch_id, line`,
		`SELECT batch_id, line, reason FROM rejects ORDER BY batch_id, line`,
	} {
		rows, err := ss.db.Query(q)
		if err != nil {
			t.Fatal(err)
		}
		cols, _ := rows.Columns()
		for rows.Next() {
			vals := make([]any, len(cols))
			ptrs := make([]any, len(cols))
			for i := range vals {
				ptrs[i] = &vals[i]
			}
			if err := rows.Scan(ptrs...); err != nil {
				t.Fatal(err)
			}
			for i, v := range vals {
				if bb, ok := v.([]byte); ok {
					v = string(bb)
				}
				fmt.Fprintf(&b, "%s=%v ", cols[i], v)
			}
			b.WriteString("\n")
		}
		rows.Close()
		b.WriteString("--\n")
	}
	return b.String()
}

func TestStoreImportIdempotent(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	cards := makeCards(t, is, p, 1, 2, 3, 4, 5)
	path := batchOf(t, is, p, cards...)
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			db, files := k.open(t)
			s := openStore(t, db)
			rep := importBatch(t, is, s, path)
			if rep.Records != 5 || rep.Imported != 5 || rep.Duplicates != 0 || rep.Rejects != 0 || rep.Status != "done" {
				t.Fatalf("first import: %+v", rep)
			}
			first := dump(t, s)
			rep2 := importBatch(t, is, s, path)
			if rep2.Imported != 5 || rep2.Duplicates != 0 {
				t.Fatalf("second import: %+v", rep2)
			}
			if second := dump(t, s); second != first {
				t.Fatalf("second import changed the store:\n%s\nvs\n%s", first, second)
			}
			// Reopening migrates nothing and sees the same.
			s.Close()
			s = openStore(t, db)
			if again := dump(t, s); again != first {
				t.Fatal("reopened store differs")
			}
			// Every stored key authenticates its card in the token.
			for _, c := range cards {
				sc, err := s.Card(context.Background(), c.rec.ID)
				if err != nil {
					t.Fatal(err)
				}
				ch := make([]byte, 16)
				ok, err := is.Verify(context.Background(), sc.CardKey, ch, authenticate(t, c.a, ch))
				if err != nil || !ok || sc.State != StateActive {
					t.Fatalf("card %x: verify %v %v, state %s", []byte(c.rec.ID), ok, err, sc.State)
				}
			}
			assertNoKI(t, k.name, files, cards)
		})
	}
}

// assertNoKI searches every file of the store for any card's K_I, in
// every encoding of cardtest.Encodings.
func assertNoKI(t *testing.T, kind, dir string, cards []vcard) {
	t.Helper()
	if kind == "postgres" {
		pgtest.Checkpoint(t)
	}
	var needles [][]byte
	for _, c := range cards {
		for _, e := range cardtest.Encodings(c.ki(t)) {
			needles = append(needles, e)
		}
	}
	n := 0
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return nil // sockets, pid files that vanish
		}
		n++
		for _, nd := range needles {
			if bytes.Contains(b, nd) {
				t.Errorf("%s contains a card's K_I (%x)", path, nd)
			}
		}
		return nil
	})
	if err != nil || n == 0 {
		t.Fatalf("searched %d files in %s: %v", n, dir, err)
	}
}

func TestStoreConflict(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	a1 := makeCards(t, is, p, 1)[0]
	a2 := makeCards(t, is, p, 1)[0] // another card claiming the same Id
	b, c := makeCards(t, is, p, 2)[0], makeCards(t, is, p, 3)[0]
	if bytes.Equal(a1.rec.C, a2.rec.C) {
		t.Fatal("two cards with one c")
	}
	batch1 := batchOf(t, is, p, a1, b)
	batch2 := batchOf(t, is, p, a2, c, b)
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			db, _ := k.open(t)
			s := openStore(t, db)
			ctx := context.Background()
			importBatch(t, is, s, batch1)
			before, _ := s.Card(ctx, a1.rec.ID)
			rep := importBatch(t, is, s, batch2)
			if rep.Records != 3 || rep.Imported != 1 || rep.Conflicts != 1 || rep.Duplicates != 1 || rep.Rejects != 0 {
				t.Fatalf("report %+v", rep)
			}
			after, _ := s.Card(ctx, a1.rec.ID)
			if !bytes.Equal(after.Blob.Wrapped, before.Blob.Wrapped) || after.Batch != before.Batch || after.State != StateConflict {
				t.Fatalf("first key not kept or state not conflict: %+v", after)
			}
			cs, err := s.Conflicts(ctx, rep.ID)
			h2 := sha256.Sum256(a2.rec.C)
			if err != nil || len(cs) != 1 || cs[0].Line != 1 || !bytes.Equal(cs[0].CSHA256, h2[:]) || !bytes.Equal(cs[0].CardID, a1.rec.ID) {
				t.Fatalf("conflicts %+v, %v", cs, err)
			}
			// The first card still authenticates with the kept key.
			ch := make([]byte, 16)
			if ok, err := is.Verify(ctx, after.CardKey, ch, authenticate(t, a1.a, ch)); !ok || err != nil {
				t.Fatalf("first card: %v %v", ok, err)
			}
			d := dump(t, s)
			importBatch(t, is, s, batch2)
			if dump(t, s) != d {
				t.Fatal("re-importing the conflicting batch changed the store")
			}
		})
	}
}

func TestStoreRejects(t *testing.T) {
	is := newIssuer(t, hsm.KindRSA2048)
	p := protocol.RSAOAEPAES
	cards := makeCards(t, is, p, 1, 2, 3, 4)
	line := func(r batch.Record) string { return recordLine(t, r) }
	mod := func(f func(r *batch.Record)) string {
		r := cards[0].rec
		r.C = bytes.Clone(r.C)
		f(&r)
		return line(r)
	}
	garbage := bytes.Repeat([]byte{0x5a}, 256)
	garbage[0] = 0 // below n: the right shape, but OAEP fails in the token
	rows := []struct {
		text   string
		reason string // substring; "" means the line lands
	}{
		{line(cards[0].rec), ""},
		{"not json\n", "unparsable"},
		{line(cards[1].rec), ""},
		{strings.TrimSuffix(line(cards[2].rec), "}\n") + `,"extra":1}` + "\n", "unknown field"},
		{mod(func(r *batch.Record) { r.Profile = "rsa-raw-md5"; r.ID = []byte{0xE1} }), "unknown profile"},
		{mod(func(r *batch.Record) { r.Profile = protocol.ECDHP256AES.Name; r.ID = []byte{0xE2} }), "differs from the manifest"},
		{mod(func(r *batch.Record) { r.Fingerprint = make([]byte, 32); r.ID = []byte{0xE3} }), "fingerprint"},
		{mod(func(r *batch.Record) { r.C = r.C[:100]; r.ID = []byte{0xE4} }), "bad c"},
		{"\n", "empty line"},
		{mod(func(r *batch.Record) { r.C = garbage; r.ID = []byte{0xE5} }), "token refused"},
		{mod(func(r *batch.Record) { r.V = 3; r.ID = []byte{0xE6} }), "version"},
		{`{"v":1,"id":"` + strings.Repeat("ab", 17) + `","c":"00","profile":"x","issuer_fingerprint":"00","time":"2026-01-01T00:00:00Z"}` + "\n", `field "id": 17 bytes, want 1 to 16`},
		{`{"v":1,"id":"zz"}` + "\n", `field "id": not hex`},
		{strings.Repeat("x", 5000) + "\n", "longer than"},
		{line(cards[0].rec), ""}, // the same (Id, c) again: a duplicate
		{line(cards[2].rec), ""},
		{strings.TrimSuffix(line(cards[3].rec), "\n"), "torn"},
	}
	var content strings.Builder
	for _, r := range rows {
		content.WriteString(r.text)
	}
	path := writeBatch(t, is, p, content.String())
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			db, files := k.open(t)
			s := openStore(t, db)
			rep := importBatch(t, is, s, path)
			rejects, err := s.Rejects(context.Background(), rep.ID)
			if err != nil {
				t.Fatal(err)
			}
			got := map[int]string{}
			for _, r := range rejects {
				got[r.Line] = r.Reason
			}
			nrej := 0
			for i, r := range rows {
				reason, rejected := got[i+1]
				switch {
				case r.reason == "" && rejected:
					t.Errorf("line %d rejected: %s", i+1, reason)
				case r.reason != "" && !rejected:
					t.Errorf("line %d not rejected, want %q", i+1, r.reason)
				case r.reason != "" && !strings.Contains(reason, r.reason):
					t.Errorf("line %d rejected for %q, want %q", i+1, reason, r.reason)
				}
				if r.reason != "" {
					nrej++
				}
			}
			if rep.Records != len(rows) || rep.Imported != 3 || rep.Duplicates != 1 || rep.Rejects != nrej {
				t.Errorf("report %+v, want %d records, 3 imported, 1 duplicate, %d rejects", rep, len(rows), nrej)
			}
			for _, c := range cards[:3] {
				if _, err := s.Card(context.Background(), c.rec.ID); err != nil {
					t.Error(err)
				}
			}
			assertNoKI(t, k.name, files, cards)
		})
	}
}

func TestStoreRefusesMismatchedBatch(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	cards := makeCards(t, is, p, 1, 2)
	path := batchOf(t, is, p, cards...)
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(recordLine(t, cards[0].rec))
	f.Close()
	s := openStore(t, filepath.Join(t.TempDir(), "d"))
	im := &Importer{Issuer: is, Store: s, Workers: 2}
	if _, err := im.ImportFile(context.Background(), path); err == nil || !strings.Contains(err.Error(), "manifest says") {
		t.Fatalf("err = %v", err)
	}
	if _, err := s.Card(context.Background(), cards[0].rec.ID); err == nil {
		t.Fatal("a card of a refused batch was stored")
	}
}

// The importer killed with SIGKILL part-way, then run again, leaves the
// store exactly as one uninterrupted run does.
const childEnv = "ISSUER_TEST_IMPORT_CHILD"

func importChild() int {
	var a struct {
		URI, DB, Batch string
		SleepMS        int // after each record (default 40)
	}
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &a); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx := context.Background()
	tok, err := hsm.OpenURI(a.URI, 2)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	key, err := tok.FindIssuerKey(ctx, "issuer")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	kek, err := tok.FindKEK(ctx, "kek")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	s, err := Open(ctx, a.DB)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if a.SleepMS == 0 {
		a.SleepMS = 40
	}
	im := &Importer{Issuer: &Issuer{Token: tok, Key: key, KEK: kek}, Store: s, Workers: 2, MaxLine: 4096,
		afterRecord: func(int) { time.Sleep(time.Duration(a.SleepMS) * time.Millisecond) }}
	if _, err := im.ImportFile(ctx, a.Batch); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func TestStoreKillAndRerun(t *testing.T) {
	is, uri := newIssuerToken(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	var ids []byte
	for i := range 24 {
		ids = append(ids, byte(0x40+i))
	}
	cards := makeCards(t, is, p, ids...)
	var content strings.Builder
	for i, c := range cards {
		content.WriteString(recordLine(t, c.rec))
		if i == 7 {
			content.WriteString("bad line\n")
		}
	}
	path := writeBatch(t, is, p, content.String())
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			refDB, _ := k.open(t)
			ref := openStore(t, refDB)
			importBatch(t, is, ref, path)
			want := dump(t, ref)

			db, files := k.open(t)
			s := openStore(t, db) // migrated before the child starts
			arg, _ := json.Marshal(map[string]string{"URI": uri, "DB": db, "Batch": path})
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), childEnv+"="+string(arg))
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			ss := s.(*sqlStore)
			deadline := time.Now().Add(20 * time.Second)
			for {
				var n int
				ss.db.QueryRow(`SELECT COUNT(*) FROM cards`).Scan(&n)
				if n >= 6 {
					break
				}
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					cmd.Wait()
					t.Fatalf("child stored %d cards in 20 s; stderr: %s", n, stderr.String())
				}
				time.Sleep(5 * time.Millisecond)
			}
			cmd.Process.Kill() // SIGKILL
			cmd.Wait()
			var n int
			ss.db.QueryRow(`SELECT COUNT(*) FROM cards`).Scan(&n)
			if n >= len(cards) {
				t.Fatalf("the child finished (%d cards) before it was killed", n)
			}
			t.Logf("killed after %d of %d cards", n, len(cards))
			importBatch(t, is, s, path)
			if got := dump(t, s); got != want {
				t.Fatalf("after kill and rerun:\n%s\nuninterrupted:\n%s", got, want)
			}
			assertNoKI(t, k.name, files, cards)
		})
	}
}

// A line the token refused stays a reject when the batch is imported
// again, even though a later line of the same Id landed in the meantime:
// a rerun (after a kill, or of a finished batch) gives the store of one
// uninterrupted import, not a conflict.
func TestRerunKeepsRejectOfSameID(t *testing.T) {
	is := newIssuer(t, hsm.KindRSA2048)
	p := protocol.RSAOAEPAES
	good := makeCards(t, is, p, 7)[0]
	bad := good.rec
	bad.C = bytes.Clone(good.rec.C)
	bad.C[len(bad.C)/2] ^= 0x01 // well-shaped, but OAEP decoding fails in the token
	batch := writeBatch(t, is, p, recordLine(t, bad)+recordLine(t, good.rec))
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			db, _ := k.open(t)
			s := openStore(t, db)
			rep := importBatch(t, is, s, batch)
			if rep.Imported != 1 || rep.Rejects != 1 || rep.Conflicts != 0 {
				t.Fatalf("first import: %+v", rep)
			}
			d := dump(t, s)
			rep = importBatch(t, is, s, batch)
			if rep.Imported != 1 || rep.Rejects != 1 || rep.Conflicts != 0 {
				t.Fatalf("rerun: %+v", rep)
			}
			if got := dump(t, s); got != d {
				t.Fatalf("rerun changed the store:\n%s\nwas\n%s", got, d)
			}
		})
	}
}
