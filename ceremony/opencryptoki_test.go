package ceremony

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
)

// On opencryptoki's soft token (RSA only: no secret-key derivation, no
// AES key wrap, no AES-CMAC) the ceremony refuses every profile before
// anything is made, naming what the token lacks.
func TestRefusalOpenCryptoki(t *testing.T) {
	tok := hsmtest.OpenCryptoki(t)
	dir := t.TempDir()
	soPIN := filepath.Join(dir, "so.pin")
	if err := os.WriteFile(soPIN, []byte(tok.SOPIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	n := count(t, tok.URI)
	// The RFC 5649 code the token's table names, as the probe names it.
	h, err := hsm.OpenURI(tok.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	wrap := hsm.MechName(h.Mechanisms().KeyWrapRFC5649) + " (RFC 5649)"
	h.Close()
	for _, tc := range []struct{ profile, missing string }{
		{"rsa-oaep-aes", "CKM_AES_ECB_ENCRYPT_DATA, " + wrap + ", CKM_AES_CMAC"},
		{"rsa-oaep-sha1", "CKM_CONCATENATE_BASE_AND_DATA, CKM_SHA1_KEY_DERIVATION, " + wrap + ", CKM_AES_CMAC"},
		{"rsa-raw-sha1", "CKM_CONCATENATE_BASE_AND_DATA, CKM_SHA1_KEY_DERIVATION, " + wrap + ", CKM_AES_CMAC"},
	} {
		t.Run(tc.profile, func(t *testing.T) {
			_, err := run(t, script(tok.URI, "file: "+soPIN, out, "-ock", []string{tc.profile}), false)
			want := `issuer key "issuer-rsa-ock": token "` + tok.Label + `" cannot run profile ` + tc.profile +
				" in-token: missing " + tc.missing + " (run issuer probe; choose a profile it can run)"
			if err == nil || err.Error() != want {
				t.Fatalf("got %v\nwant %s", err, want)
			}
			if m := count(t, tok.URI); m != n {
				t.Errorf("token objects %d -> %d", n, m)
			}
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Errorf("output directory made: %v", err)
			}
		})
	}
	// The dry run refuses too: the probe is part of the preflight.
	_, err = run(t, script(tok.URI, "file: "+soPIN, out, "-ock", []string{"rsa-oaep-aes"}), true)
	if err == nil || !strings.Contains(err.Error(), "cannot run profile rsa-oaep-aes in-token: missing CKM_AES_ECB_ENCRYPT_DATA") {
		t.Fatalf("dry run: %v", err)
	}
}
