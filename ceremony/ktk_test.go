package ceremony

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
	"blindperso/receiver"
)

func a(t uint, v any) *pkcs11.Attribute { return pkcs11.NewAttribute(t, v) }

// rcv is the receiving system's HSM: a second SoftHSM2 token, its KTKs
// made and sent by package receiver (plain PKCS#11, none of package hsm's
// key code).
type rcv struct{ tok *hsm.Token }

// send makes a KTK labelled label and wraps it to the key-import public
// key, in the receiver's token.
func (r rcv) send(t *testing.T, label string, pub *rsa.PublicKey) receiver.KTK {
	t.Helper()
	k, err := receiver.MakeKTK(context.Background(), r.tok, label, pub)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// open unwraps an RFC 3394 wrap made under the KTK into a readable
// session key and returns its value.
func (r rcv) open(t *testing.T, ktkLabel string, wrapped []byte) []byte {
	t.Helper()
	var v []byte
	err := r.tok.With(context.Background(), func(s hsm.Session) error {
		if err := s.P.FindObjectsInit(s.H, []*pkcs11.Attribute{a(pkcs11.CKA_LABEL, ktkLabel)}); err != nil {
			return err
		}
		hs, _, err := s.P.FindObjects(s.H, 1)
		s.P.FindObjectsFinal(s.H)
		if err != nil || len(hs) != 1 {
			return fmt.Errorf("the receiver's KTK %q: %d found, %v", ktkLabel, len(hs), err)
		}
		h, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP, nil)}, hs[0], wrapped, []*pkcs11.Attribute{
			a(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), a(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			a(pkcs11.CKA_TOKEN, false), a(pkcs11.CKA_SENSITIVE, false), a(pkcs11.CKA_EXTRACTABLE, true)})
		if err != nil {
			return err
		}
		defer s.P.DestroyObject(s.H, h)
		val, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{a(pkcs11.CKA_VALUE, nil)})
		if err != nil {
			return err
		}
		v = val[0].Value
		return nil
	})
	if err != nil {
		t.Fatalf("receiver: unwrap under its KTK: %v", err)
	}
	return v
}

// wrapUnderKTK makes a readable session key in the issuer's token and
// wraps it under the KTK labelled label (RFC 3394): what the receiver
// opens proves the token's KTK is the receiver's.
func wrapUnderKTK(t *testing.T, tok *hsm.Token, ktk *hsm.KTKRef) (value, wrapped []byte) {
	t.Helper()
	err := tok.With(context.Background(), func(s hsm.Session) error {
		kh, err := s.P.GenerateKey(s.H, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
			a(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), a(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES), a(pkcs11.CKA_VALUE_LEN, 16),
			a(pkcs11.CKA_TOKEN, false), a(pkcs11.CKA_SENSITIVE, false), a(pkcs11.CKA_EXTRACTABLE, true),
			// A trusted KTK wraps only a key that can neither wrap, unwrap
			// nor derive (hsm.KTKWrapTemplate), as K_I; SoftHSM2 defaults
			// usages a template leaves out to true.
			a(pkcs11.CKA_WRAP, false), a(pkcs11.CKA_UNWRAP, false), a(pkcs11.CKA_DERIVE, false)})
		if err != nil {
			return fmt.Errorf("C_GenerateKey: %w", err)
		}
		defer s.P.DestroyObject(s.H, kh)
		v, err := s.P.GetAttributeValue(s.H, kh, []*pkcs11.Attribute{a(pkcs11.CKA_VALUE, nil)})
		if err != nil {
			return err
		}
		value = v[0].Value
		th, err := ktk.Handle(s)
		if err != nil {
			return err
		}
		wrapped, err = s.P.WrapKey(s.H, []*pkcs11.Mechanism{pkcs11.NewMechanism(s.M.AESKeyWrap(), nil)}, th, kh)
		if err != nil {
			return fmt.Errorf("C_WrapKey under the KTK: %w", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return value, wrapped
}

// ktkCeremony is a ceremony script with only a transcript key and body
// (key-import, ktks); soPINFile "" leaves token.so-pin out.
func ktkCeremony(uri, soPINFile, out, transcript, body string) string {
	so := ""
	if soPINFile != "" {
		so = "  so-pin:\n    file: " + soPINFile + "\n"
	}
	return fmt.Sprintf(`ceremony: ktk-ceremony
token:
  uri: %q
%sroles:
  operator: Alice Operator
  security-officer: Sam Officer
  witnesses: [Wendy Witness]
output: %s
transcript-key:
  label: %s
%s`, uri, so, out, transcript, body)
}

func ktksYAML(ks ...KTK) string {
	var b strings.Builder
	b.WriteString("ktks:\n")
	for _, k := range ks {
		fmt.Fprintf(&b, "  - label: %s\n    key-import: %s\n    wrapped: %s\n    sender: %q\n", k.Label, k.KeyImport, k.Wrapped, k.Sender)
		if k.SenderFingerprint != "" {
			fmt.Fprintf(&b, "    sender-fingerprint: %s\n", k.SenderFingerprint)
		}
	}
	return b.String()
}

func stepOf(t *testing.T, b Body, name string) Step {
	t.Helper()
	var found []Step
	for _, st := range b.Steps {
		if st.Step == name {
			found = append(found, st)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d %s steps in the transcript: %+v", len(found), name, b.Steps)
	}
	return found[0]
}

// TestKTKCeremony: a first ceremony makes the key-import key and writes
// its public key; the receiver (a second SoftHSM2 token) wraps its KTK to
// that file's key; a second ceremony imports it, by the SO and trusted
// on SoftHSM2, untrusted on NSS. The signed transcript verifies and holds
// the key-import key's fingerprint, the sender, the wrapped file's
// SHA-256 and the check value (or the note that the token gives none);
// FindKTK finds the KTK, and a key the issuer's token wraps under it
// opens at the receiver to the same value. Then, on SoftHSM2, every
// refusal of the plan comes before anything is made.
func TestKTKCeremony(t *testing.T) {
	ctx := context.Background()
	// Every SoftHSM2 token before any is opened.
	soft, rcvTok, nss := hsmtest.SoftHSM(t), hsmtest.SoftHSM(t), hsmtest.NSS(t)
	rt, err := hsm.OpenURI(rcvTok.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	rcv := rcv{rt}
	for _, tt := range []struct {
		tok hsmtest.Token
		sfx string
		pem bool // send the wrapped KTK as a PEM file, else raw
	}{{soft, "soft", false}, {nss, "nss", true}} {
		t.Run(tt.tok.Label, func(t *testing.T) {
			dir := t.TempDir()
			soFile := ""
			if tt.tok.SOPIN != "" {
				soFile = filepath.Join(dir, "so.pin")
				if err := os.WriteFile(soFile, []byte(tt.tok.SOPIN+"\n"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			importLabel, ktkLabel := "key-import-"+tt.sfx, "ktk-"+tt.sfx
			out1 := filepath.Join(dir, "out1")
			n0 := count(t, tt.tok.URI)
			res1, err := run(t, ktkCeremony(tt.tok.URI, soFile, out1, "tr1-"+tt.sfx, "key-import: {label: "+importLabel+"}\n"), false)
			if err != nil {
				t.Fatal(err)
			}
			// The transcript key and the key-import key pair.
			if n := count(t, tt.tok.URI); n != n0+4 {
				t.Errorf("token objects %d -> %d, want +4", n0, n)
			}
			v1, err := Verify(filepath.Join(out1, TranscriptFile), "", res1.Body.TranscriptKey.Fingerprint)
			if err != nil {
				t.Fatalf("verify: %v", err)
			}
			gen := stepOf(t, v1.Body, "generate-key-import-key")
			pemFile := filepath.Join(out1, KeyImportFile(importLabel))
			pemBytes, err := os.ReadFile(pemFile)
			if err != nil {
				t.Fatal(err)
			}
			pub, err := protocol.ParseIssuerKeyPEM(pemBytes)
			if err != nil || pub.RSA == nil || pub.RSA.N.BitLen() != 3072 {
				t.Fatalf("%s: %v (want an RSA-3072 public key)", pemFile, err)
			}
			fp := fmt.Sprintf("%x", pub.Fingerprint())
			if gen.Inputs["label"] != importLabel || gen.Result["fingerprint"] != fp || gen.Result["file"] != KeyImportFile(importLabel) {
				t.Errorf("generate-key-import-key step %+v, want fingerprint %s", gen, fp)
			}
			if pins, _ := os.ReadFile(filepath.Join(out1, "pinned-fingerprints.txt")); strings.Contains(string(pins), fp) {
				t.Error("the key-import key is in the pinned-fingerprint file (it is not an issuer key)")
			}

			// The receiver sends its KTK to the exported key.
			sent := rcv.send(t, "receiver-"+ktkLabel, pub.RSA)
			wrapped, rcvCV := sent.Wrapped, sent.CheckValue
			file := filepath.Join(dir, "ktk.bin")
			if tt.pem {
				wrapped = pem.EncodeToMemory(&pem.Block{Type: WrappedKTKPEM, Bytes: wrapped})
				file = filepath.Join(dir, "ktk.pem")
			}
			if err := os.WriteFile(file, wrapped, 0o644); err != nil {
				t.Fatal(err)
			}
			fileSHA := fmt.Sprintf("%x", sha256.Sum256(wrapped))
			sender := "Operator AC, Receiver Ltd (J. Sender)"
			out2 := filepath.Join(dir, "out2")
			yaml := ktkCeremony(tt.tok.URI, soFile, out2, "tr2-"+tt.sfx, ktksYAML(KTK{Label: ktkLabel, KeyImport: importLabel, Wrapped: file, Sender: sender, SenderFingerprint: strings.ToUpper(fileSHA)}))

			n1 := count(t, tt.tok.URI)
			s, err := Parse([]byte(yaml))
			if err != nil {
				t.Fatal(err)
			}
			var log strings.Builder
			if res, err := Run(ctx, s, Options{DryRun: true, Log: &log}); err != nil || res != nil {
				t.Fatalf("dry run: %v %v", res, err)
			}
			want := fmt.Sprintf("import KTK %q from %s (%s, sha256 %s) under the key-import key %q", ktkLabel, sender, file, fileSHA, importLabel)
			if !strings.Contains(log.String(), want) {
				t.Errorf("dry run lacks %q:\n%s", want, log.String())
			}
			if n := count(t, tt.tok.URI); n != n1 {
				t.Fatalf("dry run made objects: %d -> %d", n1, n)
			}

			res2, err := run(t, yaml, false)
			if err != nil {
				t.Fatal(err)
			}
			// The transcript key and the KTK; no transfer key left over.
			if n := count(t, tt.tok.URI); n != n1+3 {
				t.Errorf("token objects %d -> %d, want +3", n1, n)
			}
			tr := filepath.Join(out2, TranscriptFile)
			v2, err := Verify(tr, "", res2.Body.TranscriptKey.Fingerprint)
			if err != nil {
				t.Fatalf("verify: %v", err)
			}
			imp := stepOf(t, v2.Body, "import-ktk")
			tok, err := hsm.OpenURI(tt.tok.URI, 1)
			if err != nil {
				t.Fatal(err)
			}
			defer tok.Close()
			enforces := tok.Mechanisms().EnforcesWrapWithTrusted
			if enforces != (tt.sfx == "soft") {
				t.Fatalf("EnforcesWrapWithTrusted %v on %s", enforces, tt.tok.Label)
			}
			format := map[bool]string{true: "pem", false: "raw"}[tt.pem]
			for k, want := range map[string]any{"label": ktkLabel, "key_import": importLabel, "sender": sender, "wrapped": file, "sender_fingerprint": fileSHA} {
				if imp.Inputs[k] != want {
					t.Errorf("import-ktk inputs[%s] = %v, want %v", k, imp.Inputs[k], want)
				}
			}
			for k, want := range map[string]any{"key_import_fingerprint": fp, "wrapped_sha256": fileSHA, "wrapped_format": format,
				"wrapped_bytes": float64(384), "trusted": enforces, "sender_fingerprint": "matches the wrapped file's SHA-256"} {
				if imp.Result[k] != want {
					t.Errorf("import-ktk result[%s] = %v, want %v", k, imp.Result[k], want)
				}
			}
			cv, _ := imp.Result["check_value"].(string)
			switch {
			case cv == checkValueNote:
			case rcvCV != nil && cv == hex.EncodeToString(rcvCV):
			default:
				t.Errorf("import-ktk check_value %q: want %q or the receiver's %x", cv, checkValueNote, rcvCV)
			}
			raw, _ := os.ReadFile(tr)
			for _, want := range []string{fp, sender, fileSHA, cv} {
				if !bytes.Contains(raw, []byte(want)) {
					t.Errorf("the signed transcript lacks %q", want)
				}
			}
			if soFile != "" && bytes.Contains(raw, []byte(tt.tok.SOPIN)) {
				t.Fatal("the SO PIN is in the transcript")
			}

			ktk, err := tok.FindKTK(ctx, ktkLabel)
			if err != nil {
				t.Fatal(err)
			}
			if ktk.Trusted != enforces {
				t.Errorf("KTK trusted %v, token enforces CKA_WRAP_WITH_TRUSTED %v", ktk.Trusted, enforces)
			}
			if (ktk.CheckValue == nil) != (cv == checkValueNote) || (ktk.CheckValue != nil && hex.EncodeToString(ktk.CheckValue) != cv) {
				t.Errorf("KTK check value %x in the token, %q in the transcript", ktk.CheckValue, cv)
			}
			value, w := wrapUnderKTK(t, tok, ktk)
			if got := rcv.open(t, "receiver-"+ktkLabel, w); !bytes.Equal(got, value) {
				t.Fatal("a key wrapped under the imported KTK does not open at the receiver: the KTK is not the receiver's")
			}
			if tt.sfx != "soft" {
				return
			}

			// Refusals, before anything is made.
			short := filepath.Join(dir, "short.bin")
			os.WriteFile(short, wrapped[:100], 0o644)
			wrongPEM := filepath.Join(dir, "wrong.pem")
			os.WriteFile(wrongPEM, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: wrapped}), 0o644)
			good := KTK{Label: "ktk-ref", KeyImport: importLabel, Wrapped: file, Sender: sender}
			tests := []struct {
				name   string
				edit   func(*KTK)
				noSO   bool
				expect []string
			}{
				{"missing file", func(k *KTK) { k.Wrapped = filepath.Join(dir, "no-such.bin") }, false,
					[]string{"ktks[0].wrapped: open " + filepath.Join(dir, "no-such.bin"), "no such file"}},
				{"unknown key-import label", func(k *KTK) { k.KeyImport = "no-such-import" }, false,
					[]string{"ktks[0].key-import: find key-import key", `"no-such-import"`, "no private key"}},
				{"label taken", func(k *KTK) { k.Label = ktkLabel }, false,
					[]string{fmt.Sprintf("label %q already exists in token %q", ktkLabel, tt.tok.Label)}},
				{"not a key-import key", func(k *KTK) { k.KeyImport = "tr1-" + tt.sfx }, false,
					[]string{`ktks[0].key-import: "tr1-soft"`, "is not a key-import key"}},
				{"sender fingerprint differs", func(k *KTK) { k.SenderFingerprint = strings.Repeat("ab", 32) }, false,
					[]string{"has SHA-256 " + fileSHA, "sender-fingerprint " + strings.Repeat("ab", 32), "differs"}},
				{"key-import fingerprint given as the sender's", func(k *KTK) { k.SenderFingerprint = fp }, false,
					[]string{"differs", "is the key-import key's fingerprint"}},
				{"short ciphertext", func(k *KTK) { k.Wrapped = short }, false,
					[]string{"100 bytes of ciphertext (raw), want 384"}},
				{"PEM of another type", func(k *KTK) { k.Wrapped = wrongPEM }, false,
					[]string{`PEM block "PUBLIC KEY", want "BLINDPERSO KTK"`}},
				{"no SO PIN", func(*KTK) {}, true,
					[]string{"enforces CKA_WRAP_WITH_TRUSTED", "mark the KTK trusted", "token.so-pin"}},
			}
			n := count(t, tt.tok.URI)
			for i, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					k := good
					tc.edit(&k)
					so := soFile
					if tc.noSO {
						so = ""
					}
					out := filepath.Join(dir, fmt.Sprintf("ref%d", i))
					_, err := run(t, ktkCeremony(tt.tok.URI, so, out, fmt.Sprintf("tr-ref%d", i), ktksYAML(k)), false)
					if err == nil {
						t.Fatal("accepted")
					}
					t.Logf("refused: %v", err)
					for _, want := range tc.expect {
						if !strings.Contains(err.Error(), want) {
							t.Errorf("error %q lacks %q", err, want)
						}
					}
					if !strings.Contains(err.Error(), "nothing was created") && !tc.noSO {
						t.Errorf("error %q does not say nothing was created", err)
					}
					if m := count(t, tt.tok.URI); m != n {
						t.Errorf("token objects %d -> %d", n, m)
					}
					if _, err := os.Stat(out); !os.IsNotExist(err) {
						t.Errorf("output directory made: %v", err)
					}
				})
			}
		})
	}
}

// The script checks of key-import and ktks, without a token.
func TestKTKScript(t *testing.T) {
	k := KTK{Label: "ktk-a", KeyImport: "import-old", Wrapped: "/tmp/ktk.bin", Sender: "Receiver"}
	base := ktkCeremony("pkcs11:token=x?module-path=/lib.so", "/so.pin", "/tmp/out", "tr", "key-import: {label: import-new}\n"+ktksYAML(k))
	s, err := Parse([]byte(base))
	if err != nil {
		t.Fatalf("a ceremony with only key-import and ktks: %v", err)
	}
	if got := s.Outputs(); strings.Join(got, " ") != "tr.pub.pem key-import-import-new.pub.pem pinned-fingerprints.txt transcript.json" {
		t.Errorf("outputs %v", got)
	}
	for _, tc := range []struct{ name, edit, with, expect string }{
		{"KTK under this ceremony's key-import key", "key-import: import-old", "key-import: import-new",
			`ktks[0].key-import "import-new" is the key-import key this ceremony generates`},
		{"KTK under a label this ceremony creates", "key-import: import-old", "key-import: tr", `ktks[0].key-import "tr" is a label this ceremony creates`},
		{"no key-import", "    key-import: import-old\n", "", "ktks[0].key-import is required"},
		{"no wrapped", "    wrapped: /tmp/ktk.bin\n", "", "ktks[0].wrapped: the file"},
		{"no sender", `sender: "Receiver"`, `sender: " "`, "ktks[0].sender"},
		{"bad sender fingerprint", `sender: "Receiver"`, "sender: R\n    sender-fingerprint: 12ab", `sender-fingerprint "12ab": want the SHA-256 of the wrapped file, 64 hex digits`},
		{"KTK label also the key-import's", "label: ktk-a", "label: import-new", `ktks[0].label "import-new" is also used by key-import`},
		{"bad KTK label", "label: ktk-a", "label: ktk/a", `ktks[0].label "ktk/a"`},
		{"unknown KTK key", "    wrapped:", "    wraped: x\n    wrapped:", `unknown key "wraped"`},
		{"unset variable", "wrapped: /tmp/ktk.bin", "wrapped: ${BLINDPERSO_TEST_UNSET}/ktk.bin", "ktks[0].wrapped uses ${BLINDPERSO_TEST_UNSET}"},
		{"output file twice", "transcript-key:\n  label: tr", "transcript-key:\n  label: key-import-import-new", "key-import-import-new.pub.pem would be written twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			y := strings.Replace(base, tc.edit, tc.with, 1)
			if y == base {
				t.Fatalf("edit %q not applied", tc.edit)
			}
			if _, err := Parse([]byte(y)); err == nil || !strings.Contains(err.Error(), tc.expect) {
				t.Fatalf("got %v, want an error containing %q", err, tc.expect)
			}
		})
	}
	// The example script parses.
	t.Setenv("BLINDPERSO_TOKEN", "pkcs11:token=x?module-path=/lib.so")
	t.Setenv("BLINDPERSO_SO_PIN_FILE", "/nonexistent")
	t.Setenv("CEREMONY_OUT", "/tmp/out")
	t.Setenv("KTK_FILE", "/tmp/ktk.bin")
	ex, err := Load("../examples/ceremony-ktk-softhsm2.yaml")
	if err != nil || len(ex.KTKs) != 1 || ex.KTKs[0].Wrapped != "/tmp/ktk.bin" || ex.KeyImport != nil {
		t.Fatalf("example: %+v %v", ex, err)
	}
	ex, err = Load("../examples/ceremony-softhsm2.yaml")
	if err != nil {
		t.Fatalf("example: %v", err)
	}
}
