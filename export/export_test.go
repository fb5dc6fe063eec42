package export

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func rec(id byte) Record {
	return Record{ID: []byte{0xca, id}, Profile: "ecdh-p256-aes", Wrapped: bytes.Repeat([]byte{id}, WrappedLen), KCV: []byte{1, 2, id}}
}

func write(t *testing.T, dir string, rs ...Record) string {
	t.Helper()
	path := filepath.Join(dir, "out.ndjson")
	w, err := Create(path, Manifest{KTK: KTK{Label: "ktk-bank", Sender: "bank"}, Issuer: "issuer", Select: "batch b"})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		if err := w.Add(r); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := w.Close(time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC)); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestRoundTrip(t *testing.T) {
	dir := t.TempDir()
	path := write(t, dir, rec(1), rec(2), Record{ID: []byte{3}, Profile: "rsa-oaep-aes", Wrapped: make([]byte, WrappedLen)})
	var got []Record
	m, err := Read(ManifestPath(path), func(line int, r Record, err error) error {
		if err != nil {
			t.Errorf("line %d: %v", line, err)
		}
		got = append(got, r)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if m.Count != 3 || m.KTK.Label != "ktk-bank" || m.Format != Format || m.Wrap != WrapRFC3394 || len(got) != 3 {
		t.Fatalf("manifest %+v, %d records", m, len(got))
	}
	if !bytes.Equal(got[1].Wrapped, rec(2).Wrapped) || got[2].KCV != nil || got[0].V != Version {
		t.Fatalf("records %+v", got)
	}
	if _, err := Create(path, Manifest{}); err == nil || !strings.Contains(err.Error(), "never overwritten") {
		t.Fatalf("an existing export was not refused: %v", err)
	}
}

func TestParseRecordRefuses(t *testing.T) {
	good, err := MarshalRecord(rec(1))
	if err != nil {
		t.Fatal(err)
	}
	good = bytes.TrimSuffix(good, []byte("\n"))
	if _, err := ParseRecord(good); err != nil {
		t.Fatalf("the good line: %v", err)
	}
	for _, c := range []struct{ name, line, want string }{
		{"upper-case hex", strings.Replace(string(good), `"id":"ca01"`, `"id":"CA01"`, 1), "canonical"},
		{"unknown member", strings.Replace(string(good), `{"v":1,`, `{"v":1,"x":1,`, 1), "unknown field"},
		{"short wrapped key", strings.Replace(string(good), `"wrapped":"01`, `"wrapped":"`, 1), "wrapped key of 23 bytes"},
		{"unknown profile", strings.Replace(string(good), "ecdh-p256-aes", "rot13", 1), "rot13"},
		{"other wrap", strings.Replace(string(good), WrapRFC3394, "aes-ecb", 1), `wrap "aes-ecb"`},
		{"other version", strings.Replace(string(good), `"v":1`, `"v":2`, 1), "v 2"},
		{"long kcv", strings.Replace(string(good), `"kcv":"010201"`, `"kcv":"01020101"`, 1), "kcv of 4 bytes"},
		{"no id", strings.Replace(string(good), `"id":"ca01"`, `"id":""`, 1), "id of 0 bytes"},
		{"trailing data", string(good) + "{}", "after the JSON"},
		{"not JSON", "garbage", "not a valid line"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseRecord([]byte(c.line))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("%s: %v, want an error with %q", c.line, err, c.want)
			}
		})
	}
}

// A line changed after writing: Read delivers every line, the changed
// one with its error, and then says the file is not the one written.
func TestReadTampered(t *testing.T) {
	dir := t.TempDir()
	path := write(t, dir, rec(1), rec(2), rec(3))
	b, _ := os.ReadFile(path)
	lines := bytes.SplitAfter(b, []byte("\n"))
	lines[1] = []byte(strings.Replace(string(lines[1]), `"wrapped":"02`, `"wrapped":"0X`, 1))
	if err := os.WriteFile(path, bytes.Join(lines, nil), 0o600); err != nil {
		t.Fatal(err)
	}
	var good, bad []int
	_, err := Read(ManifestPath(path), func(line int, r Record, err error) error {
		var le *LineError
		if errors.As(err, &le) {
			bad = append(bad, le.Line)
		} else {
			good = append(good, line)
		}
		return nil
	})
	if !errors.Is(err, ErrNotAsWritten) {
		t.Fatalf("tampered file: %v", err)
	}
	if len(good) != 2 || len(bad) != 1 || bad[0] != 2 {
		t.Fatalf("good lines %v, bad %v", good, bad)
	}
}

func TestReadManifestRefuses(t *testing.T) {
	dir := t.TempDir()
	path := write(t, dir, rec(1))
	b, _ := os.ReadFile(ManifestPath(path))
	for _, c := range []struct{ name, from, to, want string }{
		{"other format", Format, "blindperso-export/9", "format"},
		{"path outside", `"file": "out.ndjson"`, `"file": "../x"`, "file name beside"},
		{"no KTK", `"label": "ktk-bank"`, `"label": ""`, "no KTK label"},
		{"unknown member", `"count"`, `"extra": 1, "count"`, "unknown field"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "m.json")
			os.WriteFile(p, bytes.Replace(b, []byte(c.from), []byte(c.to), 1), 0o600)
			if _, err := ReadManifest(p); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("%v, want %q", err, c.want)
			}
		})
	}
}

// TestResume: an export written through Resume, stopped (Abort keeps the
// partial file), torn in its last line as a kill leaves it, and resumed,
// is byte for byte the file Create writes in one go, with the same
// manifest but for the time.
func TestResume(t *testing.T) {
	dir := t.TempDir()
	whole := write(t, dir, rec(1), rec(2), rec(3), rec(4), rec(5))
	path := filepath.Join(dir, "resumed.ndjson")
	m := Manifest{KTK: KTK{Label: "ktk-bank", Sender: "bank"}, Issuer: "issuer", Select: "batch b"}
	w, err := Resume(path, m, nil)
	if err != nil {
		t.Fatal(err)
	}
	if w.Resumed() != 0 || w.Last() != nil {
		t.Fatalf("a new partial file: %d lines resumed, last %x", w.Resumed(), []byte(w.Last()))
	}
	for _, r := range []Record{rec(1), rec(2), rec(3)} {
		if err := w.Add(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Add(rec(2)); err == nil || !strings.Contains(err.Error(), "in Id order") {
		t.Fatalf("a record out of Id order: %v", err)
	}
	w.Abort()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("the export file exists before Close: %v", err)
	}
	// The writer died inside line 4.
	line4, _ := MarshalRecord(rec(4))
	f, err := os.OpenFile(PartialPath(path), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(line4[:17])
	f.Close()

	var seen []Record
	w, err = Resume(path, m, func(r Record) error { seen = append(seen, r); return nil })
	if err != nil {
		t.Fatal(err)
	}
	if w.Resumed() != 3 || w.Torn() != 17 || len(seen) != 3 || !bytes.Equal(w.Last(), rec(3).ID) || w.Count() != 3 {
		t.Fatalf("resumed %d lines, torn %d bytes, seen %d, last %x", w.Resumed(), w.Torn(), len(seen), []byte(w.Last()))
	}
	if _, err := Resume(path, m, nil); !errors.Is(err, ErrPartialBusy) {
		t.Fatalf("a second writer of the partial file: %v", err)
	}
	for _, r := range []Record{rec(4), rec(5)} {
		if err := w.Add(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Sync(); err != nil {
		t.Fatal(err)
	}
	got, err := w.Close(time.Date(2026, 12, 3, 0, 0, 0, 0, time.UTC))
	if err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(whole)
	b, _ := os.ReadFile(path)
	if !bytes.Equal(a, b) {
		t.Fatalf("resumed file differs from the uninterrupted one:\n%s\n%s", a, b)
	}
	want, err := ReadManifest(ManifestPath(whole))
	if err != nil {
		t.Fatal(err)
	}
	if got.Count != 5 || got.Count != want.Count || got.Bytes != want.Bytes || !bytes.Equal(got.SHA256, want.SHA256) || got.File != "resumed.ndjson" {
		t.Fatalf("manifest %+v, want %+v", got, want)
	}
	if _, err := os.Stat(PartialPath(path)); !os.IsNotExist(err) {
		t.Fatalf("the partial file is left after Close: %v", err)
	}
	if _, err := Read(ManifestPath(path), func(int, Record, error) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := Resume(path, m, nil); err == nil || !strings.Contains(err.Error(), "never overwritten") {
		t.Fatalf("resume of a finished export: %v", err)
	}
}

// TestResumeRefuses: a partial file that is not one Resume's Writers
// wrote (a bad line, Ids out of order) is refused with the line, and
// left as it is.
func TestResumeRefuses(t *testing.T) {
	l1, _ := MarshalRecord(rec(1))
	l2, _ := MarshalRecord(rec(2))
	for _, c := range []struct{ name, content, want string }{
		{"bad line", string(l1) + "not a record\n" + string(l2), "line 2: not a valid line"},
		{"out of order", string(l2) + string(l1), "line 2: card ca01 after card ca02: not in Id order"},
		{"repeated", string(l1) + string(l1), "not in Id order"},
		{"long line", strings.Repeat("x", MaxLine+10) + "\n", "longer than"},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "out.ndjson")
			os.WriteFile(PartialPath(path), []byte(c.content), 0o600)
			_, err := Resume(path, Manifest{KTK: KTK{Label: "k"}}, nil)
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "remove the file") {
				t.Fatalf("%v, want %q", err, c.want)
			}
			if b, _ := os.ReadFile(PartialPath(path)); string(b) != c.content {
				t.Fatal("the refused partial file was changed")
			}
		})
	}
}
