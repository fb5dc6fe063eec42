package batch

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"blindperso/protocol"
)

// Errors a line can be refused with, for errors.Is. Every other refusal
// is a *FieldError or a plain message.
var (
	// ErrEmpty: the line is empty (or only whitespace).
	ErrEmpty = errors.New("empty line")
	// ErrNotJSON: the line is not a JSON text at all — what a torn
	// append leaves (a cut record, zeros after a crash).
	ErrNotJSON = errors.New("unparsable: not JSON")
	// ErrBOM: the text starts with a UTF-8 byte order mark.
	ErrBOM = errors.New("starts with a UTF-8 byte order mark (EF BB BF); batch files are UTF-8 without one")
	// ErrCRLF: the line ends in CR LF.
	ErrCRLF = errors.New("line ends in CR LF; batch lines end in LF alone")
	// ErrFormat: a manifest of a format this package does not know.
	ErrFormat = errors.New("unknown batch format")
)

// FieldError names the member of a record or manifest that broke a rule.
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return fmt.Sprintf("field %q: %s", e.Field, e.Msg) }

func fieldErr(field, format string, a ...any) error {
	return &FieldError{Field: field, Msg: fmt.Sprintf(format, a...)}
}

// LineError is a line of a batch file that is not a record: its number
// (from 1) and why.
type LineError struct {
	Line int
	Err  error
}

func (e *LineError) Error() string { return fmt.Sprintf("line %d: %v", e.Line, e.Err) }
func (e *LineError) Unwrap() error { return e.Err }

// Torn reports whether err (from ParseRecord) is what a torn append can
// leave on the last line of a journal: an empty line or one that is not
// JSON. A line that is JSON but breaks a rule was written whole by
// something: it is corruption, never torn.
func Torn(err error) bool { return errors.Is(err, ErrNotJSON) || errors.Is(err, ErrEmpty) }

var bom = []byte{0xEF, 0xBB, 0xBF}

// members splits a JSON object into its members, in order, refusing
// anything but exactly one object, a repeated member name, and a member
// not in known. what names the text in messages ("record", "manifest").
func members(data []byte, what string, known map[string]bool) (map[string]json.RawMessage, error) {
	if bytes.HasPrefix(data, bom) {
		return nil, ErrBOM
	}
	// A nested object (an attestation) was validated with its line.
	nested := what == "attestation"
	if !nested && !validPrefix(data) {
		// Say where, from the decoder's own words.
		var v any
		err := json.Unmarshal(data, &v)
		if err == nil {
			err = errors.New("more than one JSON value")
		}
		return nil, fmt.Errorf("%w (%v)", ErrNotJSON, err)
	}
	if !nested && !utf8.Valid(data) {
		return nil, fmt.Errorf("%s is not valid UTF-8", what)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return nil, fmt.Errorf("%w (%v)", ErrNotJSON, err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fmt.Errorf("%s is not a JSON object", what)
	}
	out := map[string]json.RawMessage{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("%w (%v)", ErrNotJSON, err)
		}
		name := tok.(string) // an object key is always a string
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, fmt.Errorf("%w (%v)", ErrNotJSON, err)
		}
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("%s repeats member %q", what, name)
		}
		if !known[name] {
			return nil, fmt.Errorf("unknown field %q in %s (a new field means a new version)", name, what)
		}
		out[name] = raw
	}
	if _, err := dec.Token(); err != nil { // the closing '}'
		return nil, fmt.Errorf("%w (%v)", ErrNotJSON, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w (more than one JSON value in the %s)", ErrNotJSON, what)
	}
	return out, nil
}

// Typed member readers. Each refuses a missing member with "missing".

func str(m map[string]json.RawMessage, field string) (string, error) {
	raw, ok := m[field]
	if !ok {
		return "", fieldErr(field, "missing")
	}
	if len(raw) == 0 || raw[0] != '"' {
		return "", fieldErr(field, "want a string, got %s", short(raw))
	}
	// Without a backslash, a valid JSON string is its own text: the
	// hex fields of a record (the attestation's chain is kilobytes)
	// are read without decoding them once more.
	if bytes.IndexByte(raw, '\\') < 0 {
		return string(raw[1 : len(raw)-1]), nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", fieldErr(field, "%v", err)
	}
	return s, nil
}

func nonEmpty(m map[string]json.RawMessage, field string) (string, error) {
	s, err := str(m, field)
	if err == nil && s == "" {
		err = fieldErr(field, "empty")
	}
	return s, err
}

// hexField reads lower-case hex of min to max bytes.
func hexField(m map[string]json.RawMessage, field string, min, max int) (protocol.Hex, error) {
	s, err := str(m, field)
	if err != nil {
		return nil, err
	}
	return hexString(field, s, min, max)
}

// hexString decodes s, the value of field, as lower-case hex of min to
// max bytes.
func hexString(field, s string, min, max int) (protocol.Hex, error) {
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case '0' <= c && c <= '9', 'a' <= c && c <= 'f':
		case 'A' <= c && c <= 'F':
			return nil, fieldErr(field, "upper-case hex digit %q at position %d; batch hex is lower-case", c, i)
		default:
			return nil, fieldErr(field, "not hex: %q at position %d", c, i)
		}
	}
	if len(s)%2 != 0 {
		return nil, fieldErr(field, "odd number of hex digits (%d)", len(s))
	}
	b, _ := hex.DecodeString(s)
	if len(b) < min || len(b) > max {
		if min == max {
			return nil, fieldErr(field, "%d bytes, want %d", len(b), min)
		}
		return nil, fieldErr(field, "%d bytes, want %d to %d", len(b), min, max)
	}
	return b, nil
}

// integer reads a non-negative JSON integer written as digits only (no
// fraction, no exponent, no sign).
func integer(m map[string]json.RawMessage, field string) (int64, error) {
	raw, ok := m[field]
	if !ok {
		return 0, fieldErr(field, "missing")
	}
	s := string(raw)
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fieldErr(field, "want a non-negative integer written as digits only, got %s", short(raw))
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fieldErr(field, "%s is out of range", short(raw))
	}
	return n, nil
}

// utcTime reads an RFC 3339 time in UTC (ending in "Z").
func utcTime(m map[string]json.RawMessage, field string) (time.Time, error) {
	s, err := str(m, field)
	if err != nil {
		return time.Time{}, err
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, fieldErr(field, "%q is not an RFC 3339 time", s)
	}
	if !strings.HasSuffix(s, "Z") {
		return time.Time{}, fieldErr(field, "%q is not in UTC; batch times end in \"Z\"", s)
	}
	return t.UTC(), nil
}

func short(raw []byte) string {
	if len(raw) > 40 {
		return string(raw[:40]) + "…"
	}
	return string(raw)
}

var recordFields = map[string]bool{"v": true, "id": true, "c": true, "profile": true,
	"issuer_fingerprint": true, "reader": true, "time": true, "attestation": true}

// ParseRecord parses one batch line, without its '\n', strictly
// (docs/BATCH.md, "Records" and "Version 2"): one JSON object in UTF-8
// without BOM and without a CR at the end; each member once, none
// unknown; "v" the integer 1 or 2; "id" lower-case hex of 1 to 16 bytes;
// "c" lower-case hex, not empty; "profile" a non-empty string;
// "issuer_fingerprint" lower-case hex of 32 bytes; "reader" absent or a
// non-empty string; "time" RFC 3339 in UTC; "attestation" absent, or in
// a version 2 record an object of the shape Attestation.Check describes.
// Rec.V is the version the line carries. Whether the profile is known, c
// fits it and the attestation verifies is the caller's business (it needs
// the profile registry, the key and the trusted roots); whether the
// version is the batch's is Manifest.CheckRecord's.
func ParseRecord(line []byte) (Record, error) {
	var rec Record
	if bytes.HasSuffix(line, []byte{'\r'}) {
		return rec, ErrCRLF
	}
	if len(bytes.TrimSpace(line)) == 0 {
		return rec, ErrEmpty
	}
	m, err := members(line, "record", recordFields)
	if err != nil {
		return rec, err
	}
	v, err := integer(m, "v")
	if err != nil {
		return rec, err
	}
	if v != Version1 && v != Version2 {
		return rec, fieldErr("v", "record version %d, want %d or %d", v, Version1, Version2)
	}
	rec.V = int(v)
	if _, ok := m["attestation"]; ok && v == Version1 {
		return rec, fieldErr("attestation", "not in a version 1 record (attestation is version 2)")
	}
	if rec.ID, err = hexField(m, "id", 1, protocol.MaxIDLen); err != nil {
		return rec, err
	}
	if rec.C, err = hexField(m, "c", 1, 1<<20); err != nil {
		return rec, err
	}
	if rec.Profile, err = nonEmpty(m, "profile"); err != nil {
		return rec, err
	}
	if rec.Fingerprint, err = hexField(m, "issuer_fingerprint", FingerprintLen, FingerprintLen); err != nil {
		return rec, err
	}
	if _, ok := m["reader"]; ok {
		if rec.Reader, err = nonEmpty(m, "reader"); err != nil {
			return rec, fieldErr("reader", "empty (omitted when unknown, never empty)")
		}
	}
	if rec.Time, err = utcTime(m, "time"); err != nil {
		return rec, err
	}
	if raw, ok := m["attestation"]; ok {
		if rec.Attestation, err = parseAttestation(raw); err != nil {
			return rec, err
		}
	}
	return rec, nil
}

var attestationFields = map[string]bool{"chain": true, "fingerprint": true, "c_sha256": true, "sig": true}

// parseAttestation reads a version 2 record's attestation member: an
// object with exactly the members chain, fingerprint, c_sha256 and sig,
// each once, of the shape Attestation.Check describes. Its fields are
// named "attestation.chain" and so on in errors.
func parseAttestation(raw json.RawMessage) (*Attestation, error) {
	if len(raw) == 0 || raw[0] != '{' {
		return nil, fieldErr("attestation", "want an object, got %s", short(raw))
	}
	in, err := members(raw, "attestation", attestationFields)
	if err != nil {
		return nil, err
	}
	m := make(map[string]json.RawMessage, len(in))
	for k, v := range in {
		m["attestation."+k] = v
	}
	a := &Attestation{}
	const chainField = "attestation.chain"
	craw, ok := m[chainField]
	if !ok {
		return nil, fieldErr(chainField, "missing")
	}
	if len(craw) == 0 || craw[0] != '[' {
		return nil, fieldErr(chainField, "want an array of hex strings, got %s", short(craw))
	}
	var entries []json.RawMessage
	if err := json.Unmarshal(craw, &entries); err != nil {
		return nil, fieldErr(chainField, "%v", err)
	}
	if len(entries) < 1 || len(entries) > MaxChainCerts {
		return nil, fieldErr(chainField, "%d certificates, want 1 to %d", len(entries), MaxChainCerts)
	}
	total := 0
	for i, e := range entries {
		name := fmt.Sprintf("%s[%d]", chainField, i)
		s, err := str(map[string]json.RawMessage{name: e}, name)
		if err != nil {
			return nil, err
		}
		if s == "" {
			return nil, fieldErr(name, "empty")
		}
		cert, err := hexString(name, s, 1, protocol.MaxAttestationChain)
		if err != nil {
			return nil, err
		}
		total += len(cert)
		a.Chain = append(a.Chain, cert)
	}
	if total > protocol.MaxAttestationChain {
		return nil, fieldErr(chainField, "%d bytes in all, at most %d", total, protocol.MaxAttestationChain)
	}
	if a.Fingerprint, err = hexField(m, "attestation.fingerprint", FingerprintLen, FingerprintLen); err != nil {
		return nil, err
	}
	if a.CSHA256, err = hexField(m, "attestation.c_sha256", FingerprintLen, FingerprintLen); err != nil {
		return nil, err
	}
	if a.Sig, err = hexField(m, "attestation.sig", MinSigLen, MaxSigLen); err != nil {
		return nil, err
	}
	return a, a.Check() // the same rules MarshalRecord applies
}

var manifestFields = map[string]bool{"format": true, "batch": true, "count": true, "bytes": true,
	"sha256": true, "profile": true, "issuer_fingerprint": true, "station": true, "rejects": true, "written": true}

// ParseManifest parses a manifest file strictly (docs/BATCH.md,
// "Manifest"): one JSON object in UTF-8 without BOM; "format" first
// checked to be Format1 or Format2 (else ErrFormat); then each member
// once, none unknown, every one present but "rejects"; "batch" a plain
// file name; "count", "bytes" and "rejects" non-negative integers;
// "sha256" and "issuer_fingerprint" lower-case hex of 32 bytes; "profile"
// and "station" non-empty strings; "written" RFC 3339 in UTC. Both
// versions have these members; m.Version() is the one its records carry.
func ParseManifest(data []byte) (Manifest, error) {
	var m Manifest
	if bytes.HasPrefix(data, bom) {
		return m, ErrBOM
	}
	// The format first: a manifest of another version is refused for
	// that, not for the fields it may have that this one does not.
	var head struct {
		Format *string `json:"format"`
	}
	if err := json.Unmarshal(data, &head); err == nil && head.Format != nil && VersionOf(*head.Format) == 0 {
		return m, formatErr(*head.Format)
	}
	f, err := members(data, "manifest", manifestFields)
	if err != nil {
		return m, err
	}
	if m.Format, err = str(f, "format"); err != nil {
		return m, err
	}
	if VersionOf(m.Format) == 0 {
		return m, formatErr(m.Format)
	}
	if m.Batch, err = nonEmpty(f, "batch"); err != nil {
		return m, err
	}
	if m.Batch == "." || m.Batch == ".." || strings.ContainsAny(m.Batch, "/\\\x00") || filepath.Base(m.Batch) != m.Batch {
		return m, fieldErr("batch", "%q is not a plain file name", m.Batch)
	}
	count, err := integer(f, "count")
	if err != nil {
		return m, err
	}
	m.Count = int(count)
	if m.Bytes, err = integer(f, "bytes"); err != nil {
		return m, err
	}
	if m.SHA256, err = hexField(f, "sha256", FingerprintLen, FingerprintLen); err != nil {
		return m, err
	}
	if m.Profile, err = nonEmpty(f, "profile"); err != nil {
		return m, err
	}
	if m.IssuerFingerprint, err = hexField(f, "issuer_fingerprint", FingerprintLen, FingerprintLen); err != nil {
		return m, err
	}
	if m.Station, err = nonEmpty(f, "station"); err != nil {
		return m, err
	}
	if _, ok := f["rejects"]; ok {
		n, err := integer(f, "rejects")
		if err != nil {
			return m, err
		}
		m.Rejects = int(n)
	}
	if m.Written, err = utcTime(f, "written"); err != nil {
		return m, err
	}
	return m, nil
}

func formatErr(f string) error {
	return fmt.Errorf("%w: manifest format %q, want %q or %q", ErrFormat, f, Format1, Format2)
}

// CheckName refuses a manifest that names another file than path, the
// batch it was found beside.
func (m Manifest) CheckName(path string) error {
	if name := filepath.Base(path); m.Batch != name {
		return fmt.Errorf("manifest names batch %q, but the file is %q (a batch and its manifest are renamed only by sealing again)", m.Batch, name)
	}
	return nil
}

// validPrefix is json.Valid, skipping the scan of a line that starts like
// an object: the walk below refuses what is not JSON with the decoder's
// own words.
func validPrefix(data []byte) bool {
	t := bytes.TrimLeft(data, " \t\n\r")
	return len(t) > 0 && t[0] == '{' || json.Valid(data)
}
