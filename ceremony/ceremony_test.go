package ceremony

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blindperso/chipca"
	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
)

// TestMain runs the tests in a private mount namespace where
// opencryptoki can run (hsmtest.Run), and removes the test tokens.
func TestMain(m *testing.M) {
	os.Exit(hsmtest.Run(m))
}

type fixture struct {
	tok    hsmtest.Token
	soPIN  string
	out    string
	script string
}

// softFixture makes a SoftHSM2 token and a script like
// examples/ceremony-softhsm2.yaml for it.
func softFixture(t *testing.T, suffix string, profiles ...string) fixture {
	t.Helper()
	tok := hsmtest.SoftHSM(t)
	dir := t.TempDir()
	f := fixture{tok: tok, soPIN: filepath.Join(dir, "so.pin"), out: filepath.Join(dir, "out")}
	if err := os.WriteFile(f.soPIN, []byte(tok.SOPIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if len(profiles) == 0 {
		profiles = []string{"rsa-oaep-aes"}
	}
	f.script = script(tok.URI, "file: "+f.soPIN, f.out, suffix, profiles)
	return f
}

func script(uri, soPIN, out, suffix string, profiles []string) string {
	return fmt.Sprintf(`ceremony: test-ceremony
token:
  uri: %q
  so-pin:
    %s
roles:
  operator: Alice Operator
  security-officer: Sam Officer
  witnesses: [Wendy Witness, Walter Witness]
output: %s
transcript-key:
  label: transcript%[4]s
issuer-keys:
  - label: issuer-rsa%[4]s
    kind: rsa2048
    profiles: [%[5]s]
  - label: issuer-ec%[4]s
    kind: p256
    profiles: [ecdh-p256-aes]
kek:
  label: kek%[4]s
fingerprint-file: pinned-fingerprints.txt
`, uri, soPIN, out, suffix, strings.Join(profiles, ", "))
}

func count(t *testing.T, uri string) int {
	t.Helper()
	tok, err := hsm.OpenURI(uri, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	n, err := tok.CountObjects(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func run(t *testing.T, yaml string, dry bool) (*Result, error) {
	t.Helper()
	s, err := Parse([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	var log strings.Builder
	res, err := Run(context.Background(), s, Options{DryRun: dry, Log: &log})
	t.Logf("ceremony log:\n%s", log.String())
	return res, err
}

func TestRunVerifyTamper(t *testing.T) {
	f := softFixture(t, "")
	before := count(t, f.tok.URI)
	res, err := run(t, f.script, false)
	if err != nil {
		t.Fatal(err)
	}
	// transcript key (2 objects), two issuer key pairs (4), KEK (1).
	if after := count(t, f.tok.URI); after != before+7 {
		t.Errorf("token objects: %d before, %d after, want +7", before, after)
	}
	for _, name := range []string{"transcript.pub.pem", "issuer-rsa.pub.pem", "issuer-ec.pub.pem", "pinned-fingerprints.txt", "transcript.json"} {
		if st, err := os.Stat(filepath.Join(f.out, name)); err != nil || st.Size() == 0 {
			t.Errorf("output %s: %v", name, err)
		}
	}
	if res.Body.Status != "completed" || len(res.Body.Outputs) != 4 {
		t.Errorf("status %q, %d outputs", res.Body.Status, len(res.Body.Outputs))
	}
	for _, st := range res.Body.Steps {
		if st.Step == "generate-kek" && st.Result["trusted"] != true {
			t.Errorf("KEK not trusted on SoftHSM2: %v", st.Result)
		}
	}
	pins, _ := os.ReadFile(filepath.Join(f.out, "pinned-fingerprints.txt"))
	for _, o := range res.Body.Steps {
		if o.Step == "generate-issuer-key" && !strings.Contains(string(pins), o.Result["fingerprint"].(string)+" "+o.Inputs["label"].(string)) {
			t.Errorf("fingerprint file lacks %v:\n%s", o.Result, pins)
		}
	}
	tr := filepath.Join(f.out, "transcript.json")
	if _, err := Verify(tr, "", res.Body.TranscriptKey.Fingerprint); err != nil {
		t.Fatalf("verify: %v", err)
	}
	raw, _ := os.ReadFile(tr)
	if strings.Contains(string(raw), f.tok.PIN) || strings.Contains(string(raw), f.tok.SOPIN) {
		t.Fatal("a PIN is in the transcript")
	}

	tests := []struct {
		name   string
		file   string
		edit   func([]byte) []byte
		expect string
	}{
		{"transcript body", "transcript.json", func(b []byte) []byte {
			return []byte(strings.Replace(string(b), "Wendy Witness", "Wendy Witnesz", 1))
		}, "signature does not verify"},
		{"transcript byte in a fingerprint", "transcript.json", func(b []byte) []byte {
			i := strings.Index(string(b), `"fingerprint": "`) + len(`"fingerprint": "`)
			b[i] ^= 1
			return b
		}, "signature does not verify"},
		{"signature key fingerprint", "transcript.json", func(b []byte) []byte {
			i := strings.Index(string(b), `"key_fingerprint": "`) + len(`"key_fingerprint": "`)
			b[i] ^= 1
			return b
		}, "signature.key_fingerprint"},
		{"issuer public key", "issuer-rsa.pub.pem", func(b []byte) []byte { b[40] ^= 1; return b }, "output issuer-rsa.pub.pem: SHA-256"},
		{"fingerprint file", "pinned-fingerprints.txt", func(b []byte) []byte { return append(b, "00 evil\n"...) }, "output pinned-fingerprints.txt: SHA-256"},
		{"transcript key", "transcript.pub.pem", func(b []byte) []byte { b[40] ^= 1; return b }, "transcript key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(f.out, tc.file)
			orig, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			defer os.WriteFile(p, orig, 0o644)
			if err := os.WriteFile(p, tc.edit(append([]byte(nil), orig...)), 0o644); err != nil {
				t.Fatal(err)
			}
			_, err = Verify(tr, "", "")
			if err == nil || !strings.Contains(err.Error(), tc.expect) {
				t.Fatalf("verify after tampering with %s: %v, want an error naming %q", tc.file, err, tc.expect)
			}
			t.Logf("%v", err)
		})
	}
	if _, err := Verify(tr, "", strings.Repeat("0", 64)); err == nil || !strings.Contains(err.Error(), "expected") {
		t.Errorf("wrong expected key fingerprint: %v", err)
	}
	if _, err := Verify(tr, "", ""); err != nil {
		t.Fatalf("verify after restoring: %v", err)
	}

	// Rerun with the same labels, into a fresh directory: refused before
	// anything is made.
	t.Run("same labels refused", func(t *testing.T) {
		n := count(t, f.tok.URI)
		out2 := filepath.Join(t.TempDir(), "out2")
		_, err := run(t, strings.Replace(f.script, "output: "+f.out, "output: "+out2, 1), false)
		if err == nil || !strings.Contains(err.Error(), `label "transcript" already exists`) {
			t.Fatalf("rerun: %v", err)
		}
		if m := count(t, f.tok.URI); m != n {
			t.Errorf("token objects %d -> %d", n, m)
		}
		if _, err := os.Stat(out2); !os.IsNotExist(err) {
			t.Errorf("output directory made: %v", err)
		}
	})
	// New labels, same output directory: refused, nothing overwritten.
	t.Run("existing outputs refused", func(t *testing.T) {
		n := count(t, f.tok.URI)
		before, _ := os.ReadFile(tr)
		s := strings.ReplaceAll(f.script, "label: ", "label: new-")
		s = strings.Replace(s, "fingerprint-file: pinned-fingerprints.txt", "fingerprint-file: pins2.txt", 1)
		_, err := run(t, s, false)
		if err == nil || !strings.Contains(err.Error(), "transcript.json already exists") {
			t.Fatalf("rerun into the same directory: %v", err)
		}
		after, _ := os.ReadFile(tr)
		if string(after) != string(before) {
			t.Error("transcript changed")
		}
		if m := count(t, f.tok.URI); m != n {
			t.Errorf("token objects %d -> %d", n, m)
		}
		for _, name := range []string{"pins2.txt", "new-transcript.pub.pem"} {
			if _, err := os.Stat(filepath.Join(f.out, name)); !os.IsNotExist(err) {
				t.Errorf("%s written: %v", name, err)
			}
		}
	})
}

func TestDryRun(t *testing.T) {
	f := softFixture(t, "-dry")
	n := count(t, f.tok.URI)
	s, err := Parse([]byte(f.script))
	if err != nil {
		t.Fatal(err)
	}
	var log strings.Builder
	res, err := Run(context.Background(), s, Options{DryRun: true, Log: &log})
	if err != nil || res != nil {
		t.Fatalf("dry run: %v, %v", res, err)
	}
	if m := count(t, f.tok.URI); m != n {
		t.Errorf("dry run changed the token: %d -> %d objects", n, m)
	}
	if _, err := os.Stat(f.out); !os.IsNotExist(err) {
		t.Errorf("dry run made the output directory: %v", err)
	}
	for _, want := range []string{"would 2. generate the transcript signing key", `issuer key "issuer-rsa-dry" (rsa2048)`, "marks it CKA_TRUSTED", "pinned fingerprints", "sign the transcript"} {
		if !strings.Contains(log.String(), want) {
			t.Errorf("dry-run output lacks %q:\n%s", want, log.String())
		}
	}
}

func TestRefusals(t *testing.T) {
	f := softFixture(t, "-ref", "rsa-oaep-sha1")
	n := count(t, f.tok.URI)
	tests := []struct {
		name, script, expect string
	}{
		{"profile the token cannot run", f.script, "cannot run profile rsa-oaep-sha1 in-token: missing CKM_"},
		{"no SO PIN where the token enforces trusted wrap",
			strings.Replace(strings.Replace(f.script, "rsa-oaep-sha1", "rsa-oaep-aes", 1), "  so-pin:\n    file: "+f.soPIN+"\n", "", 1),
			"enforces CKA_WRAP_WITH_TRUSTED"},
		{"SO PIN env unset", strings.Replace(strings.Replace(f.script, "rsa-oaep-sha1", "rsa-oaep-aes", 1), "file: "+f.soPIN, "env: BLINDPERSO_TEST_UNSET_SO_PIN", 1),
			"BLINDPERSO_TEST_UNSET_SO_PIN is not set"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := run(t, tc.script, false)
			if err == nil || !strings.Contains(err.Error(), tc.expect) {
				t.Fatalf("got %v, want an error containing %q", err, tc.expect)
			}
			if m := count(t, f.tok.URI); m != n {
				t.Errorf("token objects %d -> %d", n, m)
			}
			if _, err := os.Stat(f.out); !os.IsNotExist(err) {
				t.Errorf("output directory made: %v", err)
			}
		})
	}
}

func TestParseStrict(t *testing.T) {
	good := script("pkcs11:token=x?module-path=/lib.so", "env: SO", "/tmp/out", "", []string{"rsa-oaep-aes"})
	if _, err := Parse([]byte(good)); err != nil {
		t.Fatalf("good script: %v", err)
	}
	tests := []struct {
		name, edit, with, expect string
	}{
		{"unknown key", "  witnesses:", "  witnesess: [x]\n  witnesses:", `line 9: unknown key "witnesess"`},
		{"unknown top-level key", "output:", "outptu: x\noutput:", `line 10: unknown key "outptu"`},
		{"PIN inline", "env: SO", "pin: 1234", `unknown key "pin"`},
		{"both PIN sources", "env: SO", "env: SO\n    file: /x", "exactly one of file or env"},
		{"pin-value in URI", "module-path=/lib.so", "module-path=/lib.so&pin-value=1", "pin-value is refused"},
		{"duplicate label", "label: kek", "label: issuer-ec", `"issuer-ec" is also used`},
		{"kind does not fit profile", "kind: p256", "kind: rsa2048", "profile ecdh-p256-aes needs a p256 key"},
		{"unknown profile", "[ecdh-p256-aes]", "[ecdh-p256-sha3]", "ecdh-p256-sha3"},
		{"no witness", "witnesses: [Wendy Witness, Walter Witness]", "witnesses: []", "at least one witness"},
		{"unset variable", "output: /tmp/out", "output: ${BLINDPERSO_TEST_UNSET}/out", "${BLINDPERSO_TEST_UNSET}, which is not set"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := strings.Replace(good, tc.edit, tc.with, 1)
			if s == good {
				t.Fatalf("edit %q not applied", tc.edit)
			}
			_, err := Parse([]byte(s))
			if err == nil || !strings.Contains(err.Error(), tc.expect) {
				t.Fatalf("got %v, want an error containing %q", err, tc.expect)
			}
		})
	}
}

func TestCanonical(t *testing.T) {
	tests := []struct{ in, want string }{
		{`{"b": 1, "a": [true, null, "x\u00e9\n\"\u0001"]}`, "{\"a\":[true,null,\"x\u00e9\\n\\\"\\u0001\"],\"b\":1}"},
		{`{"\u20ac":1,"\r":2,"\ud83d\ude00":3,"\ufb33":4}`, "{\"\\r\":2,\"\u20ac\":1,\"\U0001F600\":3,\"\ufb33\":4}"},
		{`"<&>"`, `"<&>"`},
	}
	for _, tc := range tests {
		got, err := Canonical([]byte(tc.in))
		if err != nil || string(got) != tc.want {
			t.Errorf("Canonical(%s) = %s, %v; want %s", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{`1.5`, `1e3`, `{} {}`, `9007199254740993`} {
		if _, err := Canonical([]byte(bad)); err == nil {
			t.Errorf("Canonical(%s) accepted", bad)
		}
	}
}

// chip-attestation: the roots are checked before anything is made,
// copied to the output, and recorded with each key's policy in the
// signed transcript.
func TestChipAttestationRoots(t *testing.T) {
	f := softFixture(t, "-att")
	ca, err := chipca.New("")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := ca.Write(dir); err != nil {
		t.Fatal(err)
	}
	roots := filepath.Join(dir, chipca.RootFile)
	yaml := strings.Replace(f.script, "fingerprint-file:", "chip-attestation:\n  roots: "+roots+"\nfingerprint-file:", 1)
	yaml = strings.Replace(yaml, "    profiles: [ecdh-p256-aes]\n", "    profiles: [ecdh-p256-aes]\n    attestation: optional\n", 1)

	// A roots file that is not one: refused before anything is made.
	before := count(t, f.tok.URI)
	bad := filepath.Join(dir, "bad.pem")
	os.WriteFile(bad, []byte("not a certificate"), 0o644)
	if _, err := run(t, strings.Replace(yaml, roots, bad, 1), false); err == nil || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Fatalf("bad roots: %v", err)
	}
	if after := count(t, f.tok.URI); after != before {
		t.Fatalf("a refused roots file left %d objects in the token", after-before)
	}

	res, err := run(t, yaml, false)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(f.out, ChipRootsFile))
	want, _ := os.ReadFile(roots)
	if string(got) != string(want) {
		t.Errorf("%s is not a copy of the roots", ChipRootsFile)
	}
	fp := ca.RootFingerprint()
	var found bool
	for _, st := range res.Body.Steps {
		if st.Step != "trust-chip-roots" {
			continue
		}
		found = true
		list := st.Result["roots"].([]map[string]any)
		pol := st.Result["attestation"].(map[string]any)
		if len(list) != 1 || list[0]["sha256"] != fmt.Sprintf("%x", fp) || pol["issuer-rsa-att"] != "required" || pol["issuer-ec-att"] != "optional" {
			t.Errorf("trust-chip-roots step: %v", st.Result)
		}
	}
	if !found {
		t.Fatal("no trust-chip-roots step in the transcript")
	}
	if _, err := Verify(filepath.Join(f.out, TranscriptFile), "", res.Body.TranscriptKey.Fingerprint); err != nil {
		t.Fatalf("verify: %v", err)
	}
	if tr, _ := os.ReadFile(filepath.Join(f.out, TranscriptFile)); !strings.Contains(string(tr), fmt.Sprintf("%x", fp)) {
		t.Error("the signed transcript does not name the root's fingerprint")
	}
	// A policy without roots is refused by the script check.
	noRoots := strings.Replace(f.script, "    profiles: [ecdh-p256-aes]\n", "    profiles: [ecdh-p256-aes]\n    attestation: required\n", 1)
	if _, err := Parse([]byte(noRoots)); err == nil || !strings.Contains(err.Error(), "needs chip-attestation.roots") {
		t.Errorf("policy without roots: %v", err)
	}
}
