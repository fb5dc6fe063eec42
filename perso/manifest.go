package perso

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"blindperso/protocol"
)

// Manifest describes a batch for the issuer (docs/BATCH.md). It is written
// beside the batch whenever the station stops cleanly (and at start, after
// any repair), atomically, so the issuer can check that it has the whole
// batch, the one the station meant, before importing a record.
type Manifest struct {
	Format            string       `json:"format"`
	Batch             string       `json:"batch"` // file name, relative to the manifest
	Count             int          `json:"count"`
	Bytes             int64        `json:"bytes"`
	SHA256            protocol.Hex `json:"sha256"`
	Profile           string       `json:"profile"`
	IssuerFingerprint protocol.Hex `json:"issuer_fingerprint"`
	Station           string       `json:"station"`
	Rejects           int          `json:"rejects,omitempty"`
	Written           time.Time    `json:"written"`
}

// WriteManifest writes the manifest for the journal's current content.
func WriteManifest(j *Journal, station string) (Manifest, error) {
	count, size, sum, err := j.Summary()
	if err != nil {
		return Manifest{}, err
	}
	m := Manifest{
		Format: BatchFormat, Batch: filepath.Base(j.path), Count: count, Bytes: size,
		SHA256: sum, Profile: j.profile, IssuerFingerprint: j.fp, Station: station,
		Rejects: countLines(RejectsPath(j.path)), Written: time.Now().UTC(),
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return m, err
	}
	if err := writeFileAtomic(ManifestPath(j.path), append(b, '\n')); err != nil {
		return m, fmt.Errorf("write manifest: %w", err)
	}
	return m, nil
}

// VerifyBatch checks a batch against its manifest the way an issuer
// should: format, size, SHA-256, count, and every record well-formed, of
// the manifest's profile and key, with no Id twice. It returns the records.
func VerifyBatch(batch string) (Manifest, []Record, error) {
	var m Manifest
	mb, err := os.ReadFile(ManifestPath(batch))
	if err != nil {
		return m, nil, fmt.Errorf("read manifest: %w", err)
	}
	if err := json.Unmarshal(mb, &m); err != nil {
		return m, nil, fmt.Errorf("manifest %s: %w", ManifestPath(batch), err)
	}
	if m.Format != BatchFormat {
		return m, nil, fmt.Errorf("manifest format %q, want %q", m.Format, BatchFormat)
	}
	f, err := os.Open(batch)
	if err != nil {
		return m, nil, err
	}
	defer f.Close()
	h := sha256.New()
	r := bufio.NewReader(io.TeeReader(f, h))
	var recs []Record
	seen := map[string]bool{}
	var size int64
	for n := 1; ; n++ {
		line, err := r.ReadBytes('\n')
		size += int64(len(line))
		if err == io.EOF {
			if len(line) > 0 {
				return m, nil, fmt.Errorf("batch %s ends with a torn line", batch)
			}
			break
		}
		if err != nil {
			return m, nil, err
		}
		rec, err := parseRecord(line)
		if err != nil {
			return m, nil, fmt.Errorf("batch %s line %d: %w", batch, n, err)
		}
		if rec.Profile != m.Profile || !bytes.Equal(rec.Fingerprint, m.IssuerFingerprint) {
			return m, nil, fmt.Errorf("batch %s line %d: profile or issuer key differs from the manifest's", batch, n)
		}
		if seen[string(rec.ID)] {
			return m, nil, fmt.Errorf("batch %s line %d: card %X twice", batch, n, []byte(rec.ID))
		}
		seen[string(rec.ID)] = true
		recs = append(recs, rec)
	}
	switch {
	case size != m.Bytes:
		return m, nil, fmt.Errorf("batch %s is %d bytes, manifest says %d", batch, size, m.Bytes)
	case !bytes.Equal(h.Sum(nil), m.SHA256):
		return m, nil, fmt.Errorf("batch %s SHA-256 differs from the manifest's", batch)
	case len(recs) != m.Count:
		return m, nil, fmt.Errorf("batch %s has %d records, manifest says %d", batch, len(recs), m.Count)
	}
	return m, recs, nil
}

func countLines(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	return bytes.Count(b, []byte{'\n'})
}

// writeFileAtomic replaces path with data: temp file, fsync, rename, fsync
// of the directory. A reader sees the old manifest or the new one.
func writeFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}
