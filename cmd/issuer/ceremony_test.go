package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blindperso/hsm/hsmtest"
)

func runCeremonyCmd(t *testing.T, args ...string) (string, error) {
	t.Helper()
	c := ceremonyCmd()
	var out bytes.Buffer
	c.SetOut(&out)
	c.SetErr(&out)
	c.SetArgs(args)
	err := c.Execute()
	return out.String(), err
}

// The example scripts, run as an operator would, against real tokens.
func TestCeremonyExamples(t *testing.T) {
	soft := hsmtest.SoftHSM(t)
	nss := hsmtest.NSS(t)
	tests := []struct {
		name, example, uri, soPIN string
	}{
		{"softhsm2", "../../examples/ceremony-softhsm2.yaml", soft.URI, soft.SOPIN},
		{"nss", "../../examples/ceremony-nss.yaml", nss.URI, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			out := filepath.Join(dir, "out")
			soFile := filepath.Join(dir, "so.pin")
			os.WriteFile(soFile, []byte(tc.soPIN+"\n"), 0o600)
			t.Setenv("BLINDPERSO_TOKEN", tc.uri)
			t.Setenv("BLINDPERSO_SO_PIN_FILE", soFile)
			t.Setenv("CEREMONY_OUT", out)

			o, err := runCeremonyCmd(t, "run", "--dry-run", tc.example)
			if err != nil {
				t.Fatalf("dry run: %v\n%s", err, o)
			}
			if !strings.Contains(o, "would ") {
				t.Errorf("dry run printed no steps:\n%s", o)
			}
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Fatalf("dry run made %s", out)
			}
			if o, err = runCeremonyCmd(t, "run", tc.example); err != nil {
				t.Fatalf("run: %v\n%s", err, o)
			}
			t.Log(o)
			tr := filepath.Join(out, "transcript.json")
			if o, err = runCeremonyCmd(t, "verify", tr); err != nil || !strings.Contains(o, "signature OK") {
				t.Fatalf("verify: %v\n%s", err, o)
			}
			if o, err = runCeremonyCmd(t, "run", tc.example); err == nil || !strings.Contains(err.Error(), "already exists") {
				t.Fatalf("second run: %v\n%s", err, o)
			}
			pins, _ := os.ReadFile(filepath.Join(out, "pinned-fingerprints.txt"))
			os.WriteFile(filepath.Join(out, "pinned-fingerprints.txt"), append(pins, '\n'), 0o644)
			if _, err = runCeremonyCmd(t, "verify", tr); err == nil || !strings.Contains(err.Error(), "output pinned-fingerprints.txt") {
				t.Fatalf("verify after tampering: %v", err)
			}
		})
	}
}
