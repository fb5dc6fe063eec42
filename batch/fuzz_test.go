package batch_test

import (
	"bytes"
	"reflect"
	"strings"
	"testing"

	"blindperso/batch"
	"blindperso/protocol"
)

// FuzzParseRecord: the batch line parser never panics; an accepted line
// is a record every reader can use (version 1 or 2, an attestation only
// in version 2 and of the shape Attestation.Check wants), and what
// MarshalRecord writes of it (version 2) parses back to the same record;
// a refused one says why.
func FuzzParseRecord(f *testing.F) {
	fp := strings.Repeat("00", 32)
	for _, s := range []string{
		`{"v":1,"id":"b101","c":"0411","profile":"ecdh-p256-aes","issuer_fingerprint":"` + fp + `","time":"2026-01-01T00:00:00Z"}`,
		`{"v":1,"id":"` + strings.Repeat("ab", 16) + `","c":"00","profile":"x","issuer_fingerprint":"` + fp + `","reader":"r","time":"2026-01-01T00:00:00.5Z"}`,
		`{"v":1,"id":"` + strings.Repeat("ab", 17) + `","c":"00"}`,
		`{"v":2,"id":"b1","c":"0411","profile":"ecdh-p256-aes","issuer_fingerprint":"` + fp + `","time":"2026-01-01T00:00:00Z"}`,
		`{"v":2,"id":"b1","c":"0411","profile":"ecdh-p256-aes","issuer_fingerprint":"` + fp + `","time":"2026-01-01T00:00:00Z","attestation":{"chain":["3003020100","30020500"],"fingerprint":"` + fp + `","c_sha256":"` + fp + `","sig":"` + strings.Repeat("30", 71) + `"}}`,
		`{"v":1,"id":"b1","c":"0411","profile":"ecdh-p256-aes","issuer_fingerprint":"` + fp + `","time":"2026-01-01T00:00:00Z","attestation":{"chain":["30"],"fingerprint":"` + fp + `","c_sha256":"` + fp + `","sig":"` + strings.Repeat("30", 8) + `"}}`,
		`{"v":2,"id":"b1","c":"04","profile":"p","issuer_fingerprint":"` + fp + `","time":"2026-01-01T00:00:00Z","attestation":{"chain":[],"fingerprint":"","c_sha256":"","sig":""}}`,
		`{"v":2,"id":"b1","c":"04","profile":"p","issuer_fingerprint":"` + fp + `","time":"2026-01-01T00:00:00Z","attestation":{"chain":["AB"],"chain":[""],"x":1}}`,
		`{"v":2,"id":"b1","c":"04","profile":"p","issuer_fingerprint":"` + fp + `","time":"2026-01-01T00:00:00Z","attestation":null}`,
		`{"v":3,"id":"b1","c":"00"}`,
		`{"v":2,"id":"b1","c":"00"}`,
		`{"v":2,"v":1,"id":"b1","c":"00"}`,
		`{"v":1.0,"id":"b1","c":"00"}`,
		`{"v":1,"id":"","c":"00"}`,
		`{"v":1,"id":"B1"}`,
		`{"v":1,"id":"zz","c":"00"}`,
		`{"v":1,"id":"b1","c":"00","extra":1}`,
		`{"v":1,"id":"b1","c":"00"} {"v":1}`,
		`{"v":1,"id":"b1","c":"00","time":"2026-01-01T00:00:00+02:00"}`,
		"\uFEFF{}", "{}\r",
		`not json`, `[]`, `null`, `{}`, `"`, `{"v":1e400}`, "",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		rec, err := batch.ParseRecord(line)
		if err != nil {
			if strings.TrimSpace(err.Error()) == "" {
				t.Fatalf("error without a message for %q", line)
			}
			return
		}
		if (rec.V != 1 && rec.V != 2) || len(rec.ID) == 0 || len(rec.ID) > protocol.MaxIDLen || len(rec.C) == 0 ||
			rec.Profile == "" || len(rec.Fingerprint) != 32 {
			t.Fatalf("accepted %q as %+v", line, rec)
		}
		if a := rec.Attestation; a != nil {
			if rec.V != 2 {
				t.Fatalf("accepted %q: an attestation in a version %d record", line, rec.V)
			}
			if err := a.Check(); err != nil {
				t.Fatalf("accepted %q: its attestation breaks a rule: %v", line, err)
			}
		}
		out, err := batch.MarshalRecord(rec)
		if err != nil {
			t.Fatalf("accepted %q, but MarshalRecord refuses it: %v", line, err)
		}
		again, err := batch.ParseRecord(bytes.TrimSuffix(out, []byte{'\n'}))
		if err != nil || !bytes.Equal(again.ID, rec.ID) || !bytes.Equal(again.C, rec.C) || again.Profile != rec.Profile ||
			!bytes.Equal(again.Fingerprint, rec.Fingerprint) || again.Reader != rec.Reader || !again.Time.Equal(rec.Time) ||
			again.V != batch.Version || !reflect.DeepEqual(again.Attestation, rec.Attestation) {
			t.Fatalf("re-parse of %+v: %+v, %v", rec, again, err)
		}
	})
}
