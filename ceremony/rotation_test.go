package ceremony

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
)

// rotationScript is a ceremony that makes only the next KEK: kek-rotation
// from an existing KEK to a new one, no issuer key.
func rotationScript(uri, soPIN, out, from, to string) string {
	return fmt.Sprintf(`ceremony: kek-rotation-ceremony
token:
  uri: %q
  so-pin:
    %s
roles:
  operator: Alice Operator
  security-officer: Sam Officer
  witnesses: [Wendy Witness]
output: %s
transcript-key:
  label: rotation-transcript-%[5]s
kek-rotation:
  from: %[4]s
  to: %[5]s
`, uri, soPIN, out, from, to)
}

// TestKEKRotationCeremony: after the first ceremony made KEK "kek", a
// rotation ceremony checks it exists, generates the next KEK as kek does
// (trusted, by the SO, on SoftHSM2), and signs a transcript with a
// generate-rotation-kek step naming both.
func TestKEKRotationCeremony(t *testing.T) {
	f := softFixture(t, "")
	if _, err := run(t, f.script, false); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "rot")
	yaml := rotationScript(f.tok.URI, "file: "+f.soPIN, out, "kek", "kek-next")

	n := count(t, f.tok.URI)
	if _, err := run(t, yaml, true); err != nil {
		t.Fatalf("dry run: %v", err)
	}
	if m := count(t, f.tok.URI); m != n {
		t.Fatalf("dry run made objects: %d -> %d", n, m)
	}
	res, err := run(t, yaml, false)
	if err != nil {
		t.Fatal(err)
	}
	// The transcript key (2 objects) and the new KEK.
	if m := count(t, f.tok.URI); m != n+3 {
		t.Errorf("token objects %d -> %d, want +3", n, m)
	}
	var step *Step
	for i, st := range res.Body.Steps {
		if st.Step == "generate-rotation-kek" {
			step = &res.Body.Steps[i]
		}
		if st.Step == "generate-kek" || st.Step == "generate-issuer-key" {
			t.Errorf("unexpected step %s", st.Step)
		}
	}
	if step == nil {
		t.Fatalf("no generate-rotation-kek step: %+v", res.Body.Steps)
	}
	if step.Inputs["from"] != "kek" || step.Inputs["to"] != "kek-next" || step.Result["trusted"] != true || step.Result["from_trusted"] != true ||
		!strings.Contains(fmt.Sprint(step.Result["rewrap"]), "issuer kek rotate --from kek --to kek-next") {
		t.Errorf("step %+v", step)
	}
	if _, err := Verify(filepath.Join(out, TranscriptFile), "", res.Body.TranscriptKey.Fingerprint); err != nil {
		t.Fatalf("verify: %v", err)
	}
	tok, err := hsm.OpenURI(f.tok.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	kek, err := tok.FindKEK(context.Background(), "kek-next")
	if err != nil || !kek.Trusted {
		t.Fatalf("the new KEK: %+v %v", kek, err)
	}
}

func TestKEKRotationCeremonyRefusals(t *testing.T) {
	soft := hsmtest.SoftHSM(t)
	out := filepath.Join(t.TempDir(), "rot")
	for _, tc := range []struct{ name, from, to, want string }{
		{"same", "kek", "kek", "from and to are the same label"},
		{"no from", "", "kek-next", "kek-rotation.from is required"},
		{"from made here", "rotation-transcript-kek-next", "kek-next", "is a label this ceremony creates"},
		{"bad to", "kek", "bad label", `kek-rotation.to.label "bad label"`},
	} {
		if _, err := Parse([]byte(rotationScript(soft.URI, "file: /nonexistent", out, tc.from, tc.to))); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	// The example script parses.
	t.Setenv("BLINDPERSO_TOKEN", soft.URI)
	t.Setenv("BLINDPERSO_SO_PIN_FILE", "/nonexistent")
	t.Setenv("CEREMONY_OUT", out)
	ex, err := Load("../examples/ceremony-kek-rotation-softhsm2.yaml")
	if err != nil || ex.KEKRotation == nil || ex.KEKRotation.From != "kek-2026" || ex.KEKRotation.To != "kek-2027" {
		t.Fatalf("example: %+v %v", ex, err)
	}
	// A from KEK the token does not have: refused before anything is made.
	n := count(t, soft.URI)
	s, err := Parse([]byte(rotationScript(soft.URI, "file: /nonexistent", out, "no-such-kek", "kek-next")))
	if err != nil {
		t.Fatal(err)
	}
	_, err = Run(context.Background(), s, Options{})
	if err == nil || !strings.Contains(err.Error(), `kek-rotation.from: find KEK "no-such-kek"`) {
		t.Fatalf("missing from KEK: %v", err)
	}
	if m := count(t, soft.URI); m != n {
		t.Errorf("token objects %d -> %d", n, m)
	}
}
