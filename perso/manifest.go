package perso

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"blindperso/batch"
)

// WriteManifest writes the manifest for the journal's current content.
func WriteManifest(j *Journal, station string) (batch.Manifest, error) {
	count, size, sum, err := j.Summary()
	if err != nil {
		return batch.Manifest{}, err
	}
	m := batch.Manifest{
		Format: batch.Format, Batch: filepath.Base(j.path), Count: count, Bytes: size,
		SHA256: sum, Profile: j.profile, IssuerFingerprint: j.fp, Station: station,
		Rejects: countLines(batch.RejectsPath(j.path)), Written: time.Now().UTC(),
	}
	b, err := batch.MarshalManifest(m)
	if err != nil {
		return m, err
	}
	if err := writeFileAtomic(batch.ManifestPath(j.path), b); err != nil {
		return m, fmt.Errorf("write manifest: %w", err)
	}
	return m, nil
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
