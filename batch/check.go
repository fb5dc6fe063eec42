package batch

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
)

// DefaultMaxLine is the longest line Scan reads by default; a longer line
// is refused (and skipped) without being held in memory. A record of the
// largest profile (RSA-2048, c of 256 bytes) is about 750 bytes; with the
// largest attestation (8 KiB of certificates, hex) about 17 KB.
const DefaultMaxLine = 64 << 10

// ErrNoNewline: the file's last line does not end in '\n' — a torn
// append the station did not repair (perso seal does).
var ErrNoNewline = errors.New("torn last line (no newline at its end)")

// ErrTooLong: a line longer than the reader's limit.
var ErrTooLong = errors.New("line too long")

// Scan reads the lines of a batch file in constant memory and calls fn
// for each, numbered from 1: with its record, or with why the line is
// not one (ParseRecord's error, ErrTooLong wrapped with the limit, or
// ErrNoNewline for a last line without '\n'). maxLine ≤ 0 means
// DefaultMaxLine. An error fn returns stops the scan and is returned; so
// is a read error.
func Scan(r io.Reader, maxLine int, fn func(line int, rec Record, err error) error) error {
	if maxLine <= 0 {
		maxLine = DefaultMaxLine
	}
	br := bufio.NewReaderSize(r, maxLine)
	for n := 1; ; n++ {
		b, err := br.ReadSlice('\n')
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			if err != nil && err != io.EOF {
				return err
			}
			if ferr := fn(n, Record{}, fmt.Errorf("%w: longer than %d bytes", ErrTooLong, maxLine)); ferr != nil {
				return ferr
			}
			if err == io.EOF {
				return nil
			}
			continue
		case err == io.EOF:
			if len(b) > 0 {
				return fn(n, Record{}, ErrNoNewline)
			}
			return nil
		case err != nil:
			return err
		}
		rec, perr := ParseRecord(b[:len(b)-1])
		if err := fn(n, rec, perr); err != nil {
			return err
		}
	}
}

// Summary is what a manifest says of its batch file's bytes.
type Summary struct {
	Bytes  int64
	SHA256 []byte
	// Lines counts every '\n', and a last line without one.
	Lines int
	// Newline: the file is empty or ends in '\n'.
	Newline bool
}

// Summarize hashes r and counts its lines in one pass of constant memory.
func Summarize(r io.Reader) (Summary, error) {
	h := sha256.New()
	buf := make([]byte, 64<<10)
	s := Summary{Newline: true}
	for {
		n, err := r.Read(buf)
		if n > 0 {
			h.Write(buf[:n])
			s.Bytes += int64(n)
			s.Lines += bytes.Count(buf[:n], []byte{'\n'})
			s.Newline = buf[n-1] == '\n'
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return Summary{}, err
		}
	}
	if !s.Newline {
		s.Lines++
	}
	s.SHA256 = h.Sum(nil)
	return s, nil
}

// Match returns nil if s is the batch m describes, else an error saying
// which of size, SHA-256 and count differ.
func (m Manifest) Match(s Summary) error {
	switch {
	case s.Bytes != m.Bytes:
		return fmt.Errorf("batch is %d bytes, manifest says %d", s.Bytes, m.Bytes)
	case !bytes.Equal(s.SHA256, m.SHA256):
		return errors.New("batch SHA-256 differs from the manifest's")
	case s.Lines != m.Count:
		return fmt.Errorf("batch has %d lines, manifest says count %d", s.Lines, m.Count)
	}
	return nil
}

// ReadManifest reads and parses the manifest beside the batch at path,
// and checks that it names that file.
func ReadManifest(path string) (Manifest, []byte, error) {
	raw, err := os.ReadFile(ManifestPath(path))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			if _, serr := os.Stat(path); serr != nil {
				return Manifest{}, nil, fmt.Errorf("batch %s: %w", path, serr)
			}
		}
		return Manifest{}, nil, fmt.Errorf("read manifest: %w", err)
	}
	m, err := ParseManifest(raw)
	if err != nil {
		return m, raw, fmt.Errorf("manifest %s: %w", ManifestPath(path), err)
	}
	if err := m.CheckName(path); err != nil {
		return m, raw, fmt.Errorf("manifest %s: %w", ManifestPath(path), err)
	}
	return m, raw, nil
}

// Verify checks the batch at path against its manifest, strictly, in one
// streaming pass: the manifest parses and names the file; size, SHA-256
// and count match; every line is a record (ParseRecord) of the manifest's
// version, profile and issuer key (Manifest.CheckRecord); no card Id
// appears twice. fn, if not nil, gets
// each record in file order. Memory grows only with the set of Ids seen.
// It checks what the station vouches for, not what only the issuer can
// (whether the profile is known to it, whether c fits the key).
func Verify(path string, fn func(line int, rec Record) error) (Manifest, error) {
	m, _, err := ReadManifest(path)
	if err != nil {
		return m, err
	}
	f, err := os.Open(path)
	if err != nil {
		return m, err
	}
	defer f.Close()
	h := sha256.New()
	cr := &countingReader{r: io.TeeReader(f, h)}
	seen := map[string]bool{}
	lines := 0
	err = Scan(cr, 0, func(n int, rec Record, err error) error {
		lines = n
		if err != nil {
			return &LineError{Line: n, Err: err}
		}
		if err := m.CheckRecord(rec); err != nil {
			return &LineError{n, err}
		}
		if seen[string(rec.ID)] {
			return &LineError{n, fmt.Errorf("card %x appears twice", []byte(rec.ID))}
		}
		seen[string(rec.ID)] = true
		if fn != nil {
			return fn(n, rec)
		}
		return nil
	})
	if err != nil {
		return m, fmt.Errorf("batch %s: %w", path, err)
	}
	s := Summary{Bytes: cr.n, SHA256: h.Sum(nil), Lines: lines, Newline: true}
	if err := m.Match(s); err != nil {
		return m, fmt.Errorf("batch %s: %w", path, err)
	}
	return m, nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
