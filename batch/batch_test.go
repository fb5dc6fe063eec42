package batch_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blindperso/batch"
)

var (
	fp64 = strings.Repeat("4c", 32)
	sum  = strings.Repeat("4d", 32)
)

// line is a record line as the station writes it, with replacements of
// whole "member":value texts applied.
func line(repl ...string) string {
	return edit(`{"v":1,"id":"b101","c":"04aa","profile":"ecdh-p256-aes","issuer_fingerprint":"`+fp64+`","reader":"r0","time":"2026-11-28T06:01:23.75Z"}`, repl...)
}

// edit replaces, once each, repl[0] by repl[1], repl[2] by repl[3]…
func edit(s string, repl ...string) string {
	for i := 0; i+1 < len(repl); i += 2 {
		if !strings.Contains(s, repl[i]) {
			panic(repl[i])
		}
		s = strings.Replace(s, repl[i], repl[i+1], 1)
	}
	return s
}

// Each rule of docs/BATCH.md "Records", one case each: the line, and a
// substring of the refusal ("" means accepted).
func TestParseRecord(t *testing.T) {
	for _, tc := range []struct {
		name, line, want string
		is               error
	}{
		{"as written", line(), "", nil},
		{"reader omitted", line(`"reader":"r0",`, ``), "", nil},
		{"members in another order", `{"id":"b101","v":1,"c":"04aa","time":"2026-11-28T06:01:23Z","profile":"p","issuer_fingerprint":"` + fp64 + `"}`, "", nil},

		// Version: the integer 1, written as 1.
		{"v 1.0", line(`"v":1`, `"v":1.0`), `field "v": want a non-negative integer written as digits only, got 1.0`, nil},
		{"v 1e0", line(`"v":1`, `"v":1e0`), `field "v": want a non-negative integer`, nil},
		{"v string", line(`"v":1`, `"v":"1"`), `field "v"`, nil},
		{"v 2", line(`"v":1`, `"v":2`), `record version 2, want 1`, nil},
		{"v missing", line(`"v":1,`, ``), `field "v": missing`, nil},

		// Repeated members: refused, never last-one-wins.
		{"repeated v", line(`"v":1`, `"v":2,"v":1`), `repeats member "v"`, nil},
		{"repeated id", line(`"id":"b101"`, `"id":"b101","id":"b102"`), `repeats member "id"`, nil},
		{"unknown field", line(`"v":1`, `"v":1,"extra":1`), `unknown field "extra"`, nil},

		// Hex: lower case only.
		{"upper-case id", line(`"id":"b101"`, `"id":"B101"`), `field "id": upper-case hex digit 'B'`, nil},
		{"upper-case c", line(`"c":"04aa"`, `"c":"04AA"`), `field "c": upper-case hex digit 'A'`, nil},
		{"upper-case fingerprint", line(fp64, strings.ToUpper(fp64)), `field "issuer_fingerprint": upper-case`, nil},
		{"id not hex", line(`"id":"b101"`, `"id":"zz"`), `field "id": not hex`, nil},
		{"id odd", line(`"id":"b101"`, `"id":"b10"`), `odd number of hex digits`, nil},
		{"id empty", line(`"id":"b101"`, `"id":""`), `field "id": 0 bytes, want 1 to 16`, nil},
		{"id 17 bytes", line(`"id":"b101"`, `"id":"`+strings.Repeat("ab", 17)+`"`), `field "id": 17 bytes, want 1 to 16`, nil},
		{"id 16 bytes", line(`"id":"b101"`, `"id":"`+strings.Repeat("ab", 16)+`"`), "", nil},
		{"id a number", line(`"id":"b101"`, `"id":101`), `field "id": want a string`, nil},
		{"c missing", line(`"c":"04aa",`, ``), `field "c": missing`, nil},
		{"fingerprint 31 bytes", line(fp64, fp64[2:]), `field "issuer_fingerprint": 31 bytes, want 32`, nil},
		{"profile empty", line(`"profile":"ecdh-p256-aes"`, `"profile":""`), `field "profile": empty`, nil},
		{"reader empty", line(`"reader":"r0"`, `"reader":""`), `field "reader": empty`, nil},

		// Time: required, RFC 3339, UTC.
		{"time missing", line(`,"time":"2026-11-28T06:01:23.75Z"`, ``), `field "time": missing`, nil},
		{"time offset", line(`23.75Z`, `23.75+02:00`), `field "time": "2026-11-28T06:01:23.75+02:00" is not in UTC`, nil},
		{"time +00:00", line(`23.75Z`, `23.75+00:00`), `is not in UTC`, nil},
		{"time garbage", line(`2026-11-28T06:01:23.75Z`, `yesterday`), `is not an RFC 3339 time`, nil},

		// Bytes of the line.
		{"CRLF", line() + "\r", `ends in CR LF`, batch.ErrCRLF},
		{"BOM", "\uFEFF" + line(), `byte order mark`, batch.ErrBOM},
		{"empty", "", `empty line`, batch.ErrEmpty},
		{"blank", "  ", `empty line`, batch.ErrEmpty},
		{"not json", "not json", `not JSON`, batch.ErrNotJSON},
		{"cut", line()[:40], `not JSON`, batch.ErrNotJSON},
		{"zeros", "\x00\x00\x00", `not JSON`, batch.ErrNotJSON},
		{"two values", line() + " " + line(), `not JSON`, batch.ErrNotJSON},
		{"array", `[]`, `not a JSON object`, nil},
		{"null", `null`, `not a JSON object`, nil},
		{"invalid UTF-8 in a string", line(`"reader":"r0"`, "\"reader\":\"r\xff\""), `not valid UTF-8`, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec, err := batch.ParseRecord([]byte(tc.line))
			if tc.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if rec.V != 1 || len(rec.ID) == 0 || len(rec.C) == 0 || rec.Time.Location() != time.UTC {
					t.Fatalf("accepted as %+v", rec)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("err = %v, want errors.Is %v", err, tc.is)
			}
			// Only what a torn append leaves counts as torn.
			if torn := errors.Is(tc.is, batch.ErrNotJSON) || errors.Is(tc.is, batch.ErrEmpty); batch.Torn(err) != torn {
				t.Errorf("Torn(%v) = %v, want %v", err, !torn, torn)
			}
		})
	}
}

// What MarshalRecord writes, ParseRecord reads back unchanged; what it
// would not read back, MarshalRecord refuses.
func TestMarshalRecord(t *testing.T) {
	fp := bytes.Repeat([]byte{0x4c}, 32)
	at := time.Date(2026, 11, 28, 8, 1, 23, 750_000_000, time.FixedZone("CEST", 2*3600))
	rec := batch.Record{ID: []byte{0xb1, 0x01}, C: []byte{4, 0xaa}, Profile: "ecdh-p256-aes", Fingerprint: fp, Reader: "r0", Time: at}
	b, err := batch.MarshalRecord(rec)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"v":1,"id":"b101","c":"04aa","profile":"ecdh-p256-aes","issuer_fingerprint":"` + fp64 + `","reader":"r0","time":"2026-11-28T06:01:23.75Z"}` + "\n"; string(b) != want {
		t.Fatalf("got  %s\nwant %s", b, want)
	}
	back, err := batch.ParseRecord(bytes.TrimSuffix(b, []byte{'\n'}))
	if err != nil || !back.Time.Equal(at) || back.Reader != "r0" || !bytes.Equal(back.ID, rec.ID) {
		t.Fatalf("read back %+v, %v", back, err)
	}
	for _, bad := range []func(r *batch.Record){
		func(r *batch.Record) { r.ID = nil },
		func(r *batch.Record) { r.ID = make([]byte, 17) },
		func(r *batch.Record) { r.C = nil },
		func(r *batch.Record) { r.Profile = "" },
		func(r *batch.Record) { r.Fingerprint = fp[:31] },
	} {
		r := rec
		bad(&r)
		if _, err := batch.MarshalRecord(r); err == nil {
			t.Errorf("MarshalRecord(%+v) wrote it", r)
		}
	}
}

func manifest(repl ...string) string {
	s := `{
  "format": "blindperso-batch/1",
  "batch": "batch.ndjson",
  "count": 50,
  "bytes": 16650,
  "sha256": "` + sum + `",
  "profile": "ecdh-p256-aes",
  "issuer_fingerprint": "` + fp64 + `",
  "station": "perso-line-2",
  "rejects": 1,
  "written": "2026-11-28T06:01:23.75Z"
}
`
	return edit(s, repl...)
}

// Each rule of docs/BATCH.md "Manifest".
func TestParseManifest(t *testing.T) {
	for _, tc := range []struct{ name, text, want string }{
		{"as written", manifest(), ""},
		{"rejects omitted", manifest(`"rejects": 1,`, ``), ""},
		{"CRLF (JSON whitespace)", strings.ReplaceAll(manifest(), "\n", "\r\n"), ""},
		{"other format", manifest(`batch/1"`, `batch/2", "new": 1`), `manifest format "blindperso-batch/2", want "blindperso-batch/1"`},
		{"format missing", manifest(`"format": "blindperso-batch/1",`, ``), `field "format": missing`},
		{"unknown field", manifest(`"rejects": 1,`, `"rejects": 1, "extra": true,`), `unknown field "extra" in manifest`},
		{"repeated member", manifest(`"count": 50,`, `"count": 51, "count": 50,`), `repeats member "count"`},
		{"station missing", manifest(`"station": "perso-line-2",`, ``), `field "station": missing`},
		{"station empty", manifest(`"perso-line-2"`, `""`), `field "station": empty`},
		{"written missing", manifest(`,
  "written": "2026-11-28T06:01:23.75Z"`, ``), `field "written": missing`},
		{"written offset", manifest(`23.75Z`, `23.75+01:00`), `field "written": "2026-11-28T06:01:23.75+01:00" is not in UTC`},
		{"batch a path", manifest(`"batch.ndjson"`, `"../batch.ndjson"`), `field "batch": "../batch.ndjson" is not a plain file name`},
		{"batch missing", manifest(`"batch": "batch.ndjson",`, ``), `field "batch": missing`},
		{"count 50.0", manifest(`50,`, `50.0,`), `field "count": want a non-negative integer`},
		{"count negative", manifest(`50,`, `-1,`), `field "count": want a non-negative integer`},
		{"bytes missing", manifest(`"bytes": 16650,`, ``), `field "bytes": missing`},
		{"sha256 upper case", manifest(sum, strings.ToUpper(sum)), `field "sha256": upper-case`},
		{"sha256 short", manifest(sum, sum[2:]), `field "sha256": 31 bytes, want 32`},
		{"fingerprint missing", manifest(`"issuer_fingerprint": "`+fp64+`",`, ``), `field "issuer_fingerprint": missing`},
		{"profile missing", manifest(`"profile": "ecdh-p256-aes",`, ``), `field "profile": missing`},
		{"BOM", "\uFEFF" + manifest(), "byte order mark"},
		{"not json", "{", "not JSON"},
		{"two objects", manifest() + "{}", "not JSON"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := batch.ParseManifest([]byte(tc.text))
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				if m.Count != 50 || m.Bytes != 16650 || m.Station != "perso-line-2" || len(m.SHA256) != 32 || m.Written.IsZero() {
					t.Fatalf("parsed as %+v", m)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
	if _, err := batch.ParseManifest([]byte(manifest(`batch/1"`, `batch/9"`))); !errors.Is(err, batch.ErrFormat) {
		t.Errorf("another format: %v, want ErrFormat", err)
	}
}

// The manifest names its batch's file: a renamed batch is refused.
func TestCheckName(t *testing.T) {
	m, err := batch.ParseManifest([]byte(manifest()))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.CheckName("/x/y/batch.ndjson"); err != nil {
		t.Error(err)
	}
	if err := m.CheckName("/x/y/other.ndjson"); err == nil || !strings.Contains(err.Error(), `manifest names batch "batch.ndjson", but the file is "other.ndjson"`) {
		t.Errorf("renamed: %v", err)
	}
}

// writeBatch writes lines and a manifest that matches them (count =
// lines), then lets edit change the manifest text.
func writeBatch(t *testing.T, content string, edit func(m *batch.Manifest)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "b.ndjson")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := batch.Summarize(strings.NewReader(content))
	if err != nil {
		t.Fatal(err)
	}
	m := batch.Manifest{Batch: "b.ndjson", Count: s.Lines, Bytes: s.Bytes, SHA256: s.SHA256,
		Profile: "ecdh-p256-aes", IssuerFingerprint: bytes.Repeat([]byte{0x4c}, 32), Station: "t", Written: time.Unix(0, 0)}
	if edit != nil {
		edit(&m)
	}
	b, err := batch.MarshalManifest(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(batch.ManifestPath(path), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// count is lines of the file; Verify is the whole check, streaming.
func TestVerify(t *testing.T) {
	two := line() + "\n" + line(`"id":"b101"`, `"id":"b102"`) + "\n"
	for _, tc := range []struct {
		name    string
		content string
		edit    func(m *batch.Manifest)
		want    string
		records int
	}{
		{"good", two, nil, "", 2},
		{"empty batch", "", nil, "", 0},
		{"count is lines", two, func(m *batch.Manifest) { m.Count = 3 }, "batch has 2 lines, manifest says count 3", 0},
		{"size", two, func(m *batch.Manifest) { m.Bytes++ }, "manifest says", 0},
		{"sha256", two, func(m *batch.Manifest) { m.SHA256 = make([]byte, 32) }, "SHA-256 differs", 0},
		{"renamed", two, func(m *batch.Manifest) { m.Batch = "other.ndjson" }, `manifest names batch "other.ndjson"`, 0},
		{"torn last line", two + line()[:30], nil, "line 3: torn last line", 0},
		{"CRLF", strings.ReplaceAll(two, "\n", "\r\n"), nil, "line 1: line ends in CR LF", 0},
		{"BOM", "\uFEFF" + two, nil, "line 1: starts with a UTF-8 byte order mark", 0},
		{"empty line", line() + "\n\n", nil, "line 2: empty line", 0},
		{"upper-case id", line() + "\n" + line(`"id":"b101"`, `"id":"B102"`) + "\n", nil, `line 2: field "id": upper-case hex digit 'B'`, 0},
		{"id twice", line() + "\n" + line() + "\n", nil, "line 2: card b101 appears twice", 0},
		{"other profile", two, func(m *batch.Manifest) { m.Profile = "rsa-oaep-aes" }, `line 1: profile "ecdh-p256-aes" differs from the manifest's "rsa-oaep-aes"`, 0},
		{"other key", two, func(m *batch.Manifest) { m.IssuerFingerprint = make([]byte, 32) }, "line 1: issuer_fingerprint", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := writeBatch(t, tc.content, tc.edit)
			n := 0
			_, err := batch.Verify(path, func(int, batch.Record) error { n++; return nil })
			if tc.want == "" {
				if err != nil || n != tc.records {
					t.Fatalf("%d records, %v", n, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
	// No manifest, no batch: each named for what it is.
	dir := t.TempDir()
	if _, err := batch.Verify(filepath.Join(dir, "none.ndjson"), nil); err == nil || !strings.Contains(err.Error(), "batch "+filepath.Join(dir, "none.ndjson")) {
		t.Errorf("missing batch: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "x.ndjson"), nil, 0o644)
	if _, err := batch.Verify(filepath.Join(dir, "x.ndjson"), nil); err == nil || !strings.Contains(err.Error(), "read manifest") {
		t.Errorf("missing manifest: %v", err)
	}
}

// Scan numbers lines, skips an over-long one without holding it, and
// names a torn last line.
func TestScan(t *testing.T) {
	content := line() + "\n" + strings.Repeat("x", 300) + "\n" + line(`"id":"b101"`, `"id":"b102"`) + "\n" + `{"v":1`
	var got []string
	err := batch.Scan(strings.NewReader(content), 256, func(n int, rec batch.Record, err error) error {
		if err != nil {
			got = append(got, err.Error())
		} else {
			got = append(got, rec.ID.String())
		}
		return nil
	})
	want := []string{"b101", "line too long: longer than 256 bytes", "b102", "torn last line (no newline at its end)"}
	if err != nil || strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("got %q, %v; want %q", got, err, want)
	}
}
