// Package export owns the format of the files in which the issuer hands
// card keys to a receiving system (docs/EXPORT.md): one NDJSON line per
// card, each K_I wrapped under the receiver's key-transport key (KTK) by
// the issuer's token, and a manifest beside the file that names the KTK
// and says how many lines, of how many bytes, with which SHA-256, the
// file holds. Nothing in either is secret: K_I appears only wrapped.
//
// The issuer writes both (issuer export); the receiver reads them
// (cmd/receiver). One package, so the two cannot drift.
package export

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"time"

	"blindperso/internal/atomicfile"
	"blindperso/protocol"
)

// Format is the manifest's format, and Version the number every line
// carries in "v": they change together.
const (
	Format  = "blindperso-export/1"
	Version = 1
)

// WrapRFC3394 names the wrapping of every line: AES key wrap (RFC 3394,
// the default IV) under the KTK, 24 bytes for a 16-byte K_I. It is
// deterministic: the same K_I under the same KTK is always the same
// bytes.
const WrapRFC3394 = "aes-key-wrap-rfc3394"

// WrappedLen is a wrapped K_I's length.
const WrappedLen = protocol.KeySize + 8

// MaxLine bounds a line when reading.
const MaxLine = 4 << 10

// Record is one card's key for the receiver.
type Record struct {
	V       int          `json:"v"`
	ID      protocol.Hex `json:"id"`
	Profile string       `json:"profile"`
	Wrap    string       `json:"wrap"`
	Wrapped protocol.Hex `json:"wrapped"`
	// KCV is K_I's check value as the issuer's token gave it
	// (CKA_CHECK_VALUE: the first 3 bytes of AES-ECB of a zero block);
	// absent where the token gives none (docs/EXPORT.md, "Key check
	// values").
	KCV protocol.Hex `json:"kcv,omitempty"`
}

// KTK names the key the file's keys are wrapped under.
type KTK struct {
	Label string `json:"label"`
	// Sender is the receiving system that sent the KTK (the ceremony's
	// record), if known.
	Sender string `json:"sender,omitempty"`
	// CheckValue is the KTK's check value in the issuer's token, if the
	// token gives one.
	CheckValue protocol.Hex `json:"check_value,omitempty"`
}

// Manifest describes an export file.
type Manifest struct {
	Format  string       `json:"format"`
	File    string       `json:"file"` // the NDJSON file's name, relative to the manifest
	Count   int          `json:"count"`
	Bytes   int64        `json:"bytes"`
	SHA256  protocol.Hex `json:"sha256"`
	Wrap    string       `json:"wrap"`
	KTK     KTK          `json:"ktk"`
	Issuer  string       `json:"issuer"`    // the issuer's token label
	Select  string       `json:"selection"` // what was exported, in words ("batch …", "state active", "ids from …")
	Written time.Time    `json:"written"`
}

// ManifestPath is the manifest's path for an export file.
func ManifestPath(file string) string { return file + ".manifest.json" }

// MarshalRecord returns r as one line, '\n' included, in the only form
// ParseRecord accepts.
func MarshalRecord(r Record) ([]byte, error) {
	r.V, r.Wrap = Version, WrapRFC3394
	if err := r.check(); err != nil {
		return nil, err
	}
	b, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

func (r Record) check() error {
	switch {
	case r.V != Version:
		return fmt.Errorf("v %d, want %d", r.V, Version)
	case len(r.ID) == 0 || len(r.ID) > protocol.MaxIDLen:
		return fmt.Errorf("id of %d bytes, want 1 to %d", len(r.ID), protocol.MaxIDLen)
	case r.Profile == "":
		return errors.New("no profile")
	case r.Wrap != WrapRFC3394:
		return fmt.Errorf("wrap %q, want %q", r.Wrap, WrapRFC3394)
	case len(r.Wrapped) != WrappedLen:
		return fmt.Errorf("wrapped key of %d bytes, want %d", len(r.Wrapped), WrappedLen)
	case r.KCV != nil && len(r.KCV) != 3:
		return fmt.Errorf("kcv of %d bytes, want 3", len(r.KCV))
	}
	if _, err := protocol.ProfileByName(r.Profile); err != nil {
		return err
	}
	return nil
}

// ParseRecord reads one line (without its newline): strict JSON, no
// unknown or repeated member, lower-case hex, every rule of check.
func ParseRecord(line []byte) (Record, error) {
	var r Record
	if err := strictJSON(line, &r); err != nil {
		return Record{}, err
	}
	if err := r.check(); err != nil {
		return Record{}, err
	}
	canon, _ := json.Marshal(r)
	if !bytes.Equal(canon, line) {
		// Upper-case hex, other spacing, members in another order: one
		// spelling only, so a line's SHA-256 names one record.
		return Record{}, errors.New("not in canonical form (lower-case hex, members in order, no spaces)")
	}
	return r, nil
}

func strictJSON(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return fmt.Errorf("not a valid line: %w", err)
	}
	if d.More() {
		return errors.New("not a valid line: data after the JSON object")
	}
	return nil
}

// MarshalManifest returns m as JSON with a trailing newline.
func MarshalManifest(m Manifest) ([]byte, error) {
	m.Format, m.Wrap = Format, WrapRFC3394
	m.Written = m.Written.UTC()
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// ReadManifest reads and checks a manifest.
func ReadManifest(path string) (Manifest, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Manifest{}, err
	}
	var m Manifest
	if err := strictJSON(b, &m); err != nil {
		return Manifest{}, fmt.Errorf("%s: %w", path, err)
	}
	switch {
	case m.Format != Format:
		return Manifest{}, fmt.Errorf("%s: format %q, want %q", path, m.Format, Format)
	case m.Wrap != WrapRFC3394:
		return Manifest{}, fmt.Errorf("%s: wrap %q, want %q", path, m.Wrap, WrapRFC3394)
	case m.File == "" || filepath.Base(m.File) != m.File:
		return Manifest{}, fmt.Errorf("%s: file %q must be a file name beside the manifest", path, m.File)
	case len(m.SHA256) != sha256.Size:
		return Manifest{}, fmt.Errorf("%s: sha256 of %d bytes", path, len(m.SHA256))
	case m.KTK.Label == "":
		return Manifest{}, fmt.Errorf("%s: no KTK label", path)
	}
	return m, nil
}

// LineError is a line that could not be read, with its number.
type LineError struct {
	Line int
	Err  error
}

func (e *LineError) Error() string { return fmt.Sprintf("line %d: %v", e.Line, e.Err) }
func (e *LineError) Unwrap() error { return e.Err }

// ErrNotAsWritten marks a file that is not the one its manifest
// describes (other bytes, another count): Read still hands every line to
// its caller, since each wrapped key carries its own integrity check
// (RFC 3394's, checked by the receiver's token at unwrap), but says so.
var ErrNotAsWritten = errors.New("the file is not the one the manifest describes")

// Read calls fn for every line of the file named by the manifest at
// manifestPath, in order: with the record, or with the line's error (a
// *LineError) for a line that does not parse, which does not stop the
// others. An error from fn stops the reading and is returned. Once every
// line is read, the file is compared with the manifest (count, bytes,
// SHA-256); a difference is an error wrapping ErrNotAsWritten.
func Read(manifestPath string, fn func(line int, r Record, err error) error) (Manifest, error) {
	m, err := ReadManifest(manifestPath)
	if err != nil {
		return m, err
	}
	path := filepath.Join(filepath.Dir(manifestPath), m.File)
	f, err := os.Open(path)
	if err != nil {
		return m, err
	}
	defer f.Close()
	h := newHashCounter()
	sc := bufio.NewScanner(io.TeeReader(f, h))
	sc.Buffer(make([]byte, MaxLine), MaxLine)
	line := 0
	for sc.Scan() {
		line++
		r, perr := ParseRecord(sc.Bytes())
		if perr != nil {
			perr = &LineError{line, perr}
		}
		if err := fn(line, r, perr); err != nil {
			return m, err
		}
	}
	if err := sc.Err(); err != nil {
		return m, fmt.Errorf("%s: line %d: %w", path, line+1, err)
	}
	if sum := h.sum.Sum(nil); line != m.Count || h.bytes != m.Bytes || !bytes.Equal(sum, m.SHA256) {
		return m, fmt.Errorf("%s: %w: %d lines, %d bytes, SHA-256 %x; the manifest says %d lines, %d bytes, %x",
			path, ErrNotAsWritten, line, h.bytes, sum, m.Count, m.Bytes, []byte(m.SHA256))
	}
	return m, nil
}

// Writer writes an export file and, on Close, its manifest.
//
// A Writer from Create writes to a temporary file, synced and renamed on
// Close: a crash leaves either no file or a whole one. A Writer from
// Resume writes to the file's partial file (PartialPath), which outlives
// a crash: every complete line in it is a record, in Id order, and a
// rerun continues after the last one; Close renames it to the file.
// Either way the file a receiver gets is whole, with its manifest.
type Writer struct {
	path string
	tmp  *os.File
	w    *bufio.Writer
	h    *hashCounter
	m    Manifest
	done bool

	partial bool         // Resume's: the file is PartialPath(path), kept by Abort
	resumed int          // complete lines the partial file held when resumed
	torn    int64        // bytes of a torn last line cut off when resumed
	last    protocol.Hex // the Id of the last record (Resume's Writers keep Id order)
}

// hashCounter is the SHA-256, size and line count of a file as it is
// written or read: what the manifest says of it.
type hashCounter struct {
	sum   hash.Hash
	bytes int64
	lines int
}

func newHashCounter() *hashCounter { return &hashCounter{sum: sha256.New()} }

// Write hashes and counts p (an io.Writer, for io.TeeReader).
func (h *hashCounter) Write(p []byte) (int, error) {
	h.sum.Write(p)
	h.bytes += int64(len(p))
	return len(p), nil
}

// line hashes and counts one whole line.
func (h *hashCounter) line(b []byte) {
	h.Write(b)
	h.lines++
}

// Create starts the export file at path; m's KTK, Issuer and Select are
// recorded in the manifest, the rest is filled in by Close. An existing
// file is not replaced: exports are records, not scratch files.
func Create(path string, m Manifest) (*Writer, error) {
	if err := refuseExisting(path); err != nil {
		return nil, err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return nil, err
	}
	m.File = filepath.Base(path)
	return &Writer{path: path, tmp: tmp, w: bufio.NewWriter(tmp), m: m, h: newHashCounter()}, nil
}

func refuseExisting(path string) error {
	for _, p := range []string{path, ManifestPath(path)} {
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("%s exists: an export is never overwritten (choose another --out)", p)
		}
	}
	return nil
}

// PartialPath is where Resume's Writer writes the export file at path
// until it is whole.
func PartialPath(path string) string { return path + ".partial" }

// ErrPartialBusy marks a partial file another process is writing.
var ErrPartialBusy = errors.New("another process is writing this export")

// Resume starts the export file at path, or continues it: its lines go
// to PartialPath(path), created if absent, appended to if present. Every
// complete line already there must be a record as ParseRecord has it,
// with Ids in strictly increasing order (the order Resume's Writers
// keep); they are hashed and counted again, so the finished file and its
// manifest are exactly what an uninterrupted run writes, and seen, if
// not nil, is called with each in order. A torn last line (no newline:
// the writer died inside it) is cut off. The partial file is locked
// against a second writer (ErrPartialBusy). As with Create, an existing
// file or manifest at path is refused.
func Resume(path string, m Manifest, seen func(Record) error) (*Writer, error) {
	if err := refuseExisting(path); err != nil {
		return nil, err
	}
	pp := PartialPath(path)
	f, err := os.OpenFile(pp, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	if err := lockFile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w (%v)", pp, ErrPartialBusy, err)
	}
	// What is read back below may be only what a killed run wrote, in
	// the page cache: make it durable (and the file's name) before seen
	// tells the caller about it (the issuer logs those cards as exported).
	if err := f.Sync(); err == nil {
		err = atomicfile.SyncDir(filepath.Dir(pp))
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: make it durable: %w", pp, err)
	}
	m.File = filepath.Base(path)
	w := &Writer{path: path, tmp: f, m: m, h: newHashCounter(), partial: true}
	if err := w.rehash(seen); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", pp, err)
	}
	w.resumed = w.h.lines
	w.w = bufio.NewWriter(f)
	return w, nil
}

// rehash reads the partial file's complete lines into the hash, and cuts
// off a torn last line.
func (w *Writer) rehash(seen func(Record) error) error {
	if _, err := w.tmp.Seek(0, io.SeekStart); err != nil {
		return err
	}
	r := bufio.NewReaderSize(w.tmp, 64<<10)
	var good int64
	for {
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) || (len(line) > MaxLine) {
			return fmt.Errorf("line %d is longer than %d bytes: not an export this program wrote; remove the file to start again", w.h.lines+1, MaxLine)
		}
		if errors.Is(err, io.EOF) {
			if len(line) > 0 {
				// Torn: the writer died inside this line.
				w.torn = int64(len(line))
				if err := w.tmp.Truncate(good); err != nil {
					return err
				}
				if err := w.tmp.Sync(); err != nil {
					return err
				}
			}
			return nil
		}
		if err != nil {
			return err
		}
		rec, perr := ParseRecord(line[:len(line)-1])
		if perr != nil {
			return fmt.Errorf("line %d: %w: not an export this program wrote; remove the file to start again", w.h.lines+1, perr)
		}
		if w.last != nil && bytes.Compare(rec.ID, w.last) <= 0 {
			return fmt.Errorf("line %d: card %x after card %x: not in Id order, not an export this program wrote; remove the file to start again", w.h.lines+1, []byte(rec.ID), []byte(w.last))
		}
		w.h.line(line)
		good += int64(len(line))
		w.last = append(w.last[:0:0], rec.ID...)
		if seen != nil {
			if err := seen(rec); err != nil {
				return err
			}
		}
	}
}

// Add writes one record. A Writer from Resume takes records in strictly
// increasing Id order only.
func (w *Writer) Add(r Record) error {
	if w.partial && w.last != nil && bytes.Compare(r.ID, w.last) <= 0 {
		return fmt.Errorf("card %x after card %x: a resumable export is written in Id order", []byte(r.ID), []byte(w.last))
	}
	b, err := MarshalRecord(r)
	if err != nil {
		return fmt.Errorf("card %x: %w", []byte(r.ID), err)
	}
	if _, err := w.w.Write(b); err != nil {
		return err
	}
	w.h.line(b)
	if w.partial {
		w.last = append(w.last[:0], r.ID...)
	}
	return nil
}

// Count is the number of records written so far (with Resume, those the
// partial file held included).
func (w *Writer) Count() int { return w.h.lines }

// Resumed is the number of complete lines the partial file held when
// Resume opened it, and Torn the bytes of a torn last line it cut off.
func (w *Writer) Resumed() int { return w.resumed }

// Torn: see Resumed.
func (w *Writer) Torn() int64 { return w.torn }

// Last is the Id of the last record written (with Resume, the partial
// file's last complete line's until Add), nil if none; only Resume's
// Writers keep it.
func (w *Writer) Last() protocol.Hex { return w.last }

// Sync writes what Add buffered and syncs the file: every record added
// so far survives a crash (in a Resume Writer's partial file).
func (w *Writer) Sync() error {
	if err := w.w.Flush(); err != nil {
		return err
	}
	return w.tmp.Sync()
}

// Close finishes the file and writes the manifest; it returns the
// manifest.
func (w *Writer) Close(now time.Time) (Manifest, error) {
	w.done = true
	err := w.w.Flush()
	if err == nil {
		err = w.tmp.Sync()
	}
	if cerr := w.tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(w.tmp.Name(), w.path)
	}
	if err != nil {
		if !w.partial {
			os.Remove(w.tmp.Name())
		}
		return Manifest{}, err
	}
	w.m.Count, w.m.Bytes, w.m.Written = w.h.lines, w.h.bytes, now
	w.m.SHA256 = w.h.sum.Sum(nil)
	b, err := MarshalManifest(w.m)
	if err != nil {
		return Manifest{}, err
	}
	// Also syncs the directory, and so the file's rename above.
	if err := atomicfile.Write(ManifestPath(w.path), b); err != nil {
		return Manifest{}, err
	}
	return w.m, nil
}

// Abort stops the Writer. Create's unfinished file is removed; Resume's
// partial file is kept, with every record added (written out and synced
// here), for the next Resume.
func (w *Writer) Abort() {
	if w.done {
		return
	}
	w.done = true
	if w.partial {
		w.w.Flush()
		w.tmp.Sync()
		w.tmp.Close()
		return
	}
	w.tmp.Close()
	os.Remove(w.tmp.Name())
}
