package perso

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"blindperso/batch"
	"blindperso/internal/atomicfile"
)

// WriteManifest writes the manifest for the journal's current content,
// in the format of its records' version (batch.Format, or an older one
// for a batch opened to be sealed). The bytes it describes are synced
// first, so a durable manifest never names batch bytes that are not.
func WriteManifest(j *Journal, station string) (batch.Manifest, error) {
	count, size, sum, err := j.Summary()
	if err != nil {
		return batch.Manifest{}, err
	}
	if err := j.syncTo(size); err != nil {
		return batch.Manifest{}, err
	}
	m := batch.Manifest{
		Format: batch.FormatOf(j.version), Batch: filepath.Base(j.path), Count: count, Bytes: size,
		SHA256: sum, Profile: j.profile, IssuerFingerprint: j.fp, Station: station,
		Rejects: countLines(batch.RejectsPath(j.path)), Written: time.Now().UTC(),
	}
	b, err := batch.MarshalManifest(m)
	if err != nil {
		return m, err
	}
	if err := atomicfile.Write(batch.ManifestPath(j.path), b); err != nil {
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
