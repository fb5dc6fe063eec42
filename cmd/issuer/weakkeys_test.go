package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
)

// A deployment whose keys were made the old way (modifiable, no unwrap
// templates) is refused by import and serve with the key, the attribute
// and the fix; --accept-weak-keys imports all the same, logging each
// finding. issuer audit lists the same findings and exits non-zero.
func TestWeakKeysRefused(t *testing.T) {
	ht := hsmtest.SoftHSM(t)
	dir := t.TempDir()
	file := func(n string) string { return filepath.Join(dir, n) }
	tok, err := hsm.OpenURI(ht.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := hsm.MakeOldStyleKeys(context.Background(), tok, "old-rsa", "old-kek", ht.SOPIN); err != nil {
		t.Fatal(err)
	}
	tok.Close()
	if _, err := runCmd(t, "", "pubkey", "--token", ht.URI, "--label", "old-rsa", "--out", file("pub.pem")); err != nil {
		t.Fatal(err)
	}
	pub, err := os.ReadFile(file("pub.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stationBatch(pub, file("b.ndjson"), []string{"A1", "A2"}); err != nil {
		t.Fatal(err)
	}
	cert, key, err := selfSigned("localhost")
	if err != nil {
		t.Fatal(err)
	}
	for n, b := range map[string][]byte{"cert.pem": cert, "key.pem": key, "tokens": []byte("perso " + strings.Repeat("ab", 32) + "\n")} {
		if err := os.WriteFile(file(n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	flags := []string{"--token", ht.URI, "--key", "old-rsa", "--kek", "old-kek", "--db", file("data")}
	for _, args := range [][]string{
		append([]string{"import", "--batch", file("b.ndjson")}, flags...),
		append([]string{"serve", "--addr", "127.0.0.1:0", "--tls-cert", file("cert.pem"), "--tls-key", file("key.pem"), "--tokens", file("tokens")}, flags...),
	} {
		_, err := runCmd(t, "", args...)
		if err == nil {
			t.Fatalf("issuer %s started on weak keys", args[0])
		}
		for _, want := range []string{"refusing to start", "issuer key old-rsa (private): CKA_MODIFIABLE is true", "CKA_UNWRAP_TEMPLATE", "KEK old-kek: CKA_MODIFIABLE is true", "issuer kek rotate", "--accept-weak-keys"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("issuer %s: error lacks %q:\n%v", args[0], want, err)
			}
		}
	}
	out, err := runCmd(t, "", append([]string{"import", "--batch", file("b.ndjson"), "--accept-weak-keys", "--json"}, flags...)...)
	if err != nil {
		t.Fatalf("import with --accept-weak-keys: %v", err)
	}
	if !strings.Contains(out, `"imported": 2`) {
		t.Errorf("import with --accept-weak-keys: %s", out)
	}
	out, err = runCmd(t, "", "audit", "--token", ht.URI, "--key", "old-rsa", "--kek", "old-kek")
	if err == nil || !strings.Contains(out, "WEAK  KEK old-kek: CKA_MODIFIABLE is true") {
		t.Errorf("audit: %v\n%s", err, out)
	}
}

// A command whose token cannot be opened creates no store.
func TestFailingTokenCreatesNoStore(t *testing.T) {
	ht := hsmtest.SoftHSM(t)
	dir := t.TempDir()
	db := filepath.Join(dir, "data")
	bad := strings.Replace(ht.URI, "token="+ht.Label, "token=no-such-token", 1)
	for _, args := range [][]string{
		{"import", "--batch", filepath.Join(dir, "b.ndjson"), "--key", "k", "--kek", "k"},
		{"cards", "verify", "AA", "--challenge", "00", "--mac", "00", "--key", "k", "--kek", "k"},
		{"kek", "destroy", "--label", "k"},
	} {
		if _, err := runCmd(t, "", append(args, "--token", bad, "--db", db)...); err == nil {
			t.Fatalf("issuer %v: no error", args)
		}
		if _, err := os.Stat(db); !os.IsNotExist(err) {
			t.Fatalf("issuer %v made the store %s (%v)", args, db, err)
		}
	}
}
