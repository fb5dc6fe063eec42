package attest

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"blindperso/batch"
	"blindperso/protocol"
)

// The openssl-made vectors of testdata/attestation (PROTOCOL.md §10.5):
// the issuer's checker accepts every vector's record and refuses each
// mutation at the step of §10.4 the vector file names.
func TestVectors(t *testing.T) {
	dir := filepath.Join("..", "testdata", "attestation")
	b, err := os.ReadFile(filepath.Join(dir, "vectors.json"))
	if err != nil {
		t.Fatal(err)
	}
	type entry struct {
		Name, Profile     string
		Check             int
		CardID            protocol.Hex       `json:"card_id"`
		IssuerFingerprint protocol.Hex       `json:"issuer_fingerprint"`
		C                 protocol.Hex       `json:"c"`
		Attestation       *batch.Attestation `json:"attestation"`
	}
	var v struct {
		Root      string
		Vectors   []entry
		Mutations []entry
	}
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	roots, err := LoadRoots(filepath.Join(dir, v.Root))
	if err != nil {
		t.Fatal(err)
	}
	check := func(e entry) error {
		ck := &Checker{Policy: Required, Roots: roots}
		copy(ck.Issuer[:], e.IssuerFingerprint)
		_, err := ck.Check(batch.Record{V: batch.Version, ID: e.CardID, C: e.C, Profile: e.Profile, Fingerprint: e.IssuerFingerprint, Attestation: e.Attestation})
		return err
	}
	if len(v.Vectors) < 5 || len(v.Mutations) < 6 {
		t.Fatalf("%d vectors, %d mutations: the file is not the one make.sh writes", len(v.Vectors), len(v.Mutations))
	}
	for _, e := range v.Vectors {
		if err := check(e); err != nil {
			t.Errorf("vector %s: %v", e.Name, err)
		}
	}
	steps := map[int]string{1: CheckChain, 2: CheckID, 3: CheckSignature, 4: CheckSubstitution, 5: CheckReplaced}
	for _, m := range v.Mutations {
		err := check(m)
		e, ok := err.(*Error)
		if !ok || e.Check != steps[m.Check] {
			t.Errorf("mutation %s: %v; want a refusal at step %d (%s)", m.Name, err, m.Check, steps[m.Check])
		}
	}
}
