package batch_test

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"blindperso/batch"
	"blindperso/protocol"
)

var (
	fp64 = strings.Repeat("4c", 32)
	sum  = strings.Repeat("4d", 32)
)

// line is a record line as the station writes it (version 2, a card
// without attestation), with replacements of whole "member":value texts
// applied.
func line(repl ...string) string {
	return edit(`{"v":2,"id":"b101","c":"04aa","profile":"ecdh-p256-aes","issuer_fingerprint":"`+fp64+`","reader":"r0","time":"2026-11-28T06:01:23.75Z"}`, repl...)
}

// line1 is a version 1 record line, as the previous station wrote it.
func line1(repl ...string) string {
	return edit(`{"v":1,"id":"b101","c":"04aa","profile":"ecdh-p256-aes","issuer_fingerprint":"`+fp64+`","reader":"r0","time":"2026-11-28T06:01:23.75Z"}`, repl...)
}

// Parts of an attestation member: a two-certificate chain (the DER is
// not checked by the parser, so any bytes do), the signed fingerprint
// and SHA-256(c), a 71-byte signature.
var (
	cert1  = "30" + strings.Repeat("c1", 20)
	cert2  = "30" + strings.Repeat("c2", 30)
	attFP  = strings.Repeat("4c", 32)
	attCS  = strings.Repeat("5d", 32)
	attSig = "30" + strings.Repeat("5a", 70)
)

// att is an attestation member as the station writes it, edited.
func att(repl ...string) string {
	return edit(`,"attestation":{"chain":["`+cert1+`","`+cert2+`"],"fingerprint":"`+attFP+`","c_sha256":"`+attCS+`","sig":"`+attSig+`"}`, repl...)
}

// attLine is line() of an attested card: its attestation (edited) last.
func attLine(repl ...string) string {
	return strings.TrimSuffix(line(), "}") + att(repl...) + "}"
}

// chainAsWritten is att()'s chain member.
var chainAsWritten = `"chain":["` + cert1 + `","` + cert2 + `"]`

// chain returns a chain member of n certificates of size bytes each.
func chain(n, size int) string {
	var certs []string
	for range n {
		certs = append(certs, `"`+strings.Repeat("ab", size)+`"`)
	}
	return `"chain":[` + strings.Join(certs, ",") + `]`
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
		{"members in another order", `{"id":"b101","v":2,"c":"04aa","time":"2026-11-28T06:01:23Z","profile":"p","issuer_fingerprint":"` + fp64 + `"}`, "", nil},

		// Version: the integer 1 or 2, written as digits.
		{"version 1", line1(), "", nil},
		{"version 1, reader omitted", line1(`"reader":"r0",`, ``), "", nil},
		{"v 2.0", line(`"v":2`, `"v":2.0`), `field "v": want a non-negative integer written as digits only, got 2.0`, nil},
		{"v 1.0", line1(`"v":1`, `"v":1.0`), `field "v": want a non-negative integer written as digits only, got 1.0`, nil},
		{"v 1e0", line1(`"v":1`, `"v":1e0`), `field "v": want a non-negative integer`, nil},
		{"v string", line(`"v":2`, `"v":"2"`), `field "v"`, nil},
		{"v 3", line(`"v":2`, `"v":3`), `record version 3, want 1 or 2`, nil},
		{"v 0", line(`"v":2`, `"v":0`), `record version 0, want 1 or 2`, nil},
		{"v missing", line(`"v":2,`, ``), `field "v": missing`, nil},

		// Version 2: the attestation member, optional, of one shape.
		{"attested", attLine(), "", nil},
		{"attested, members in another order", strings.TrimSuffix(line(), "}") + `,"attestation":{"sig":"` + attSig + `","c_sha256":"` + attCS + `",` + chainAsWritten + `,"fingerprint":"` + attFP + `"}}`, "", nil},
		{"attestation in version 1", strings.TrimSuffix(line1(), "}") + att() + "}", `field "attestation": not in a version 1 record`, nil},
		{"attestation null", line(`"reader":"r0"`, `"reader":"r0","attestation":null`), `field "attestation": want an object, got null`, nil},
		{"attestation a string", line(`"reader":"r0"`, `"reader":"r0","attestation":"x"`), `field "attestation": want an object`, nil},
		{"attestation empty object", line(`"reader":"r0"`, `"reader":"r0","attestation":{}`), `field "attestation.chain": missing`, nil},
		{"attestation repeated", strings.TrimSuffix(attLine(), "}") + att() + "}", `record repeats member "attestation"`, nil},
		{"attestation unknown member", attLine(`"sig"`, `"extra":1,"sig"`), `unknown field "extra" in attestation`, nil},
		{"attestation repeated member", attLine(`"sig"`, `"sig":"`+attSig+`","sig"`), `attestation repeats member "sig"`, nil},
		{"attestation fingerprint missing", attLine(`"fingerprint":"`+attFP+`",`, ``), `field "attestation.fingerprint": missing`, nil},
		{"attestation c_sha256 missing", attLine(`"c_sha256":"`+attCS+`",`, ``), `field "attestation.c_sha256": missing`, nil},
		{"attestation sig missing", attLine(`,"sig":"`+attSig+`"`, ``), `field "attestation.sig": missing`, nil},
		{"chain missing", attLine(chainAsWritten+",", ``), `field "attestation.chain": missing`, nil},
		{"chain not an array", attLine(chainAsWritten, `"chain":"`+cert1+`"`), `field "attestation.chain": want an array of hex strings`, nil},
		{"chain null", attLine(chainAsWritten, `"chain":null`), `field "attestation.chain": want an array`, nil},
		{"chain empty", attLine(chainAsWritten, `"chain":[]`), `field "attestation.chain": 0 certificates, want 1 to 8`, nil},
		{"chain of 8", attLine(chainAsWritten, chain(8, 100)), "", nil},
		{"chain of 9", attLine(chainAsWritten, chain(9, 10)), `field "attestation.chain": 9 certificates, want 1 to 8`, nil},
		{"chain entry empty", attLine(chainAsWritten, `"chain":["`+cert1+`",""]`), `field "attestation.chain[1]": empty`, nil},
		{"chain entry a number", attLine(chainAsWritten, `"chain":[30]`), `field "attestation.chain[0]": want a string`, nil},
		{"chain entry upper case", attLine(chainAsWritten, `"chain":["`+strings.ToUpper(cert1)+`"]`), `field "attestation.chain[0]": upper-case hex digit 'C'`, nil},
		{"chain entry odd", attLine(chainAsWritten, `"chain":["301"]`), `field "attestation.chain[0]": odd number of hex digits`, nil},
		{"chain entry not hex", attLine(chainAsWritten, `"chain":["3g"]`), `field "attestation.chain[0]": not hex`, nil},
		{"chain of 8 KiB", attLine(chainAsWritten, chain(4, 2048)), "", nil},
		{"chain over 8 KiB", attLine(chainAsWritten, chain(4, 2048)[:len(chain(4, 2048))-2]+`ab"]`), `field "attestation.chain": 8193 bytes in all, at most 8192`, nil},
		{"one certificate over 8 KiB", attLine(chainAsWritten, chain(1, 8193)), `field "attestation.chain[0]": 8193 bytes, want 1 to 8192`, nil},
		{"attestation fingerprint 31 bytes", attLine(attFP, attFP[2:]), `field "attestation.fingerprint": 31 bytes, want 32`, nil},
		{"attestation fingerprint upper case", attLine(attFP, strings.ToUpper(attFP)), `field "attestation.fingerprint": upper-case hex digit 'C'`, nil},
		{"c_sha256 33 bytes", attLine(attCS, attCS+"00"), `field "attestation.c_sha256": 33 bytes, want 32`, nil},
		{"c_sha256 upper case", attLine(attCS, strings.ToUpper(attCS)), `field "attestation.c_sha256": upper-case hex digit 'D'`, nil},
		{"sig 8 bytes", attLine(attSig, strings.Repeat("ab", 8)), "", nil},
		{"sig 80 bytes", attLine(attSig, strings.Repeat("ab", 80)), "", nil},
		{"sig 7 bytes", attLine(attSig, strings.Repeat("ab", 7)), `field "attestation.sig": 7 bytes, want 8 to 80`, nil},
		{"sig 81 bytes", attLine(attSig, strings.Repeat("ab", 81)), `field "attestation.sig": 81 bytes, want 8 to 80`, nil},
		{"sig upper case", attLine(attSig, strings.ToUpper(attSig)), `field "attestation.sig": upper-case hex digit 'A'`, nil},
		{"sig a number", attLine(`"sig":"`+attSig+`"`, `"sig":30`), `field "attestation.sig": want a string`, nil},

		// Repeated members: refused, never last-one-wins.
		{"repeated v", line(`"v":2`, `"v":1,"v":2`), `repeats member "v"`, nil},
		{"repeated id", line(`"id":"b101"`, `"id":"b101","id":"b102"`), `repeats member "id"`, nil},
		{"unknown field", line(`"v":2`, `"v":2,"extra":1`), `unknown field "extra"`, nil},

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
				var head struct{ V int }
				json.Unmarshal([]byte(tc.line), &head)
				if rec.V != head.V || len(rec.ID) == 0 || len(rec.C) == 0 || rec.Time.Location() != time.UTC {
					t.Fatalf("accepted as %+v", rec)
				}
				if hasAtt := strings.Contains(tc.line, `"attestation"`); hasAtt != (rec.Attestation != nil) {
					t.Fatalf("attestation in the line: %v; in the record: %+v", hasAtt, rec.Attestation)
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
// would not read back, MarshalRecord refuses. It writes version 2 only.
func TestMarshalRecord(t *testing.T) {
	fp := bytes.Repeat([]byte{0x4c}, 32)
	at := time.Date(2026, 11, 28, 8, 1, 23, 750_000_000, time.FixedZone("CEST", 2*3600))
	rec := batch.Record{V: 1, ID: []byte{0xb1, 0x01}, C: []byte{4, 0xaa}, Profile: "ecdh-p256-aes", Fingerprint: fp, Reader: "r0", Time: at}
	b, err := batch.MarshalRecord(rec)
	if err != nil {
		t.Fatal(err)
	}
	if want := line() + "\n"; string(b) != want {
		t.Fatalf("got  %s\nwant %s", b, want)
	}
	back, err := batch.ParseRecord(bytes.TrimSuffix(b, []byte{'\n'}))
	if err != nil || back.V != 2 || !back.Time.Equal(at) || back.Reader != "r0" || !bytes.Equal(back.ID, rec.ID) || back.Attestation != nil {
		t.Fatalf("read back %+v, %v", back, err)
	}

	// An attested card's record: the attestation member last.
	hx := func(s string) protocol.Hex { b, _ := hex.DecodeString(s); return b }
	a := &batch.Attestation{Chain: []protocol.Hex{hx(cert1), hx(cert2)}, Fingerprint: hx(attFP), CSHA256: hx(attCS), Sig: hx(attSig)}
	arec := rec
	arec.Attestation = a
	b, err = batch.MarshalRecord(arec)
	if err != nil {
		t.Fatal(err)
	}
	if want := attLine() + "\n"; string(b) != want {
		t.Fatalf("got  %s\nwant %s", b, want)
	}
	back, err = batch.ParseRecord(bytes.TrimSuffix(b, []byte{'\n'}))
	if err != nil || back.Attestation == nil || !reflect.DeepEqual(*back.Attestation, *a) {
		t.Fatalf("read back %+v, %v", back.Attestation, err)
	}

	for _, bad := range []func(r *batch.Record){
		func(r *batch.Record) { r.ID = nil },
		func(r *batch.Record) { r.ID = make([]byte, 17) },
		func(r *batch.Record) { r.C = nil },
		func(r *batch.Record) { r.Profile = "" },
		func(r *batch.Record) { r.Fingerprint = fp[:31] },
		func(r *batch.Record) { r.Attestation = &batch.Attestation{} },
		func(r *batch.Record) { a := *a; a.Chain = nil; r.Attestation = &a },
		func(r *batch.Record) { a := *a; a.Chain = make([]protocol.Hex, 9); r.Attestation = &a },
		func(r *batch.Record) { a := *a; a.Chain = []protocol.Hex{hx(cert1), {}}; r.Attestation = &a },
		func(r *batch.Record) {
			a := *a
			a.Chain = []protocol.Hex{make([]byte, 4097), make([]byte, 4096)}
			r.Attestation = &a
		},
		func(r *batch.Record) { a := *a; a.Fingerprint = a.Fingerprint[:31]; r.Attestation = &a },
		func(r *batch.Record) { a := *a; a.CSHA256 = nil; r.Attestation = &a },
		func(r *batch.Record) { a := *a; a.Sig = a.Sig[:7]; r.Attestation = &a },
		func(r *batch.Record) { a := *a; a.Sig = make([]byte, 81); r.Attestation = &a },
	} {
		r := arec
		bad(&r)
		if _, err := batch.MarshalRecord(r); err == nil {
			t.Errorf("MarshalRecord(%+v) wrote it", r)
		}
	}
}

func manifest(repl ...string) string {
	s := `{
  "format": "blindperso-batch/2",
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
		{"version 1", manifest(`batch/2"`, `batch/1"`), ""},
		{"other format", manifest(`batch/2"`, `batch/3", "new": 1`), `manifest format "blindperso-batch/3", want "blindperso-batch/1" or "blindperso-batch/2"`},
		{"format empty", manifest(`"blindperso-batch/2"`, `""`), `manifest format "", want`},
		{"format missing", manifest(`"format": "blindperso-batch/2",`, ``), `field "format": missing`},
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
	if _, err := batch.ParseManifest([]byte(manifest(`batch/2"`, `batch/9"`))); !errors.Is(err, batch.ErrFormat) {
		t.Errorf("another format: %v, want ErrFormat", err)
	}
	for f, v := range map[string]int{batch.Format1: 1, batch.Format2: 2} {
		m, err := batch.ParseManifest([]byte(manifest(`"blindperso-batch/2"`, `"`+f+`"`)))
		if err != nil || m.Format != f || m.Version() != v {
			t.Errorf("%s: %+v, %v; want version %d", f, m, err, v)
		}
	}
}

// The version constants: the station writes version 2; version 1 keeps
// its name; formats and versions map one to one.
func TestVersions(t *testing.T) {
	if batch.Format != batch.Format2 || batch.Version != batch.Version2 || batch.Version2 != 2 || batch.Format2 != "blindperso-batch/2" ||
		batch.Version1 != 1 || batch.Format1 != "blindperso-batch/1" {
		t.Fatal("version constants changed")
	}
	for v, f := range map[int]string{0: "", 1: batch.Format1, 2: batch.Format2, 3: ""} {
		if batch.FormatOf(v) != f || (f != "" && batch.VersionOf(f) != v) {
			t.Errorf("FormatOf(%d) = %q, want %q", v, batch.FormatOf(v), f)
		}
	}
	if batch.VersionOf("blindperso-batch/3") != 0 {
		t.Error("VersionOf knows version 3")
	}
	// A manifest is written in the station's version unless told
	// another known one; an unknown one is not written.
	for _, tc := range []struct{ in, out string }{{"", batch.Format2}, {batch.Format1, batch.Format1}, {batch.Format2, batch.Format2}, {"blindperso-batch/3", ""}} {
		b, err := batch.MarshalManifest(batch.Manifest{Format: tc.in, Station: "s", SHA256: make([]byte, 32), IssuerFingerprint: make([]byte, 32)})
		if tc.out == "" {
			if err == nil {
				t.Errorf("format %q written", tc.in)
			}
			continue
		}
		if err != nil || !strings.Contains(string(b), `"format": "`+tc.out+`"`) {
			t.Errorf("format %q: %s, %v", tc.in, b, err)
		}
	}
}

// A record belongs to its manifest's batch: same version, profile and
// issuer key.
func TestCheckRecord(t *testing.T) {
	m, err := batch.ParseManifest([]byte(manifest()))
	if err != nil {
		t.Fatal(err)
	}
	r2, _ := batch.ParseRecord([]byte(line()))
	r1, _ := batch.ParseRecord([]byte(line1()))
	if err := m.CheckRecord(r2); err != nil {
		t.Error(err)
	}
	if err := m.CheckRecord(r1); err == nil || !strings.Contains(err.Error(), `record version 1 in a blindperso-batch/2 batch`) {
		t.Errorf("v1 record in a v2 batch: %v", err)
	}
	m.Format = batch.Format1
	if err := m.CheckRecord(r1); err != nil {
		t.Error(err)
	}
	if err := m.CheckRecord(r2); err == nil || !strings.Contains(err.Error(), `record version 2 in a blindperso-batch/1 batch`) {
		t.Errorf("v2 record in a v1 batch: %v", err)
	}
	r1.Profile = "rsa-oaep-aes"
	if err := m.CheckRecord(r1); err == nil || !strings.Contains(err.Error(), `profile "rsa-oaep-aes" differs`) {
		t.Errorf("other profile: %v", err)
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
	one := line1() + "\n" + line1(`"id":"b101"`, `"id":"b102"`) + "\n" // version 1
	v1 := func(m *batch.Manifest) { m.Format = batch.Format1 }
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

		// Versions: a batch is all one version, its manifest's.
		{"attested", attLine() + "\n" + line(`"id":"b101"`, `"id":"b102"`) + "\n", nil, "", 2},
		{"version 1 batch", one, v1, "", 2},
		{"empty version 1 batch", "", v1, "", 0},
		{"version 1 records, version 2 manifest", one, nil, "line 1: record version 1 in a blindperso-batch/2 batch", 0},
		{"version 2 records, version 1 manifest", two, v1, "line 1: record version 2 in a blindperso-batch/1 batch", 0},
		{"mixed, version 2 manifest", two + line1(`"id":"b101"`, `"id":"b103"`) + "\n", nil, "line 3: record version 1 in a blindperso-batch/2 batch", 0},
		{"mixed, version 1 manifest", one + line(`"id":"b101"`, `"id":"b103"`) + "\n", v1, "line 3: record version 2 in a blindperso-batch/1 batch", 0},
		{"attestation in a version 1 batch", strings.TrimSuffix(line1(), "}") + att() + "}\n", v1, `line 1: field "attestation": not in a version 1 record`, 0},
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
