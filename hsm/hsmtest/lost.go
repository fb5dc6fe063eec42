package hsmtest

import (
	"os"
	"path/filepath"
	"testing"
)

// SoftHSM2's file backend rewrites a token's token.object in place at
// every C_Login (its flags and PIN counters), successful or not: a
// process killed inside that rewrite leaves it empty, and the token —
// with every key in it — is gone for every later process ("no such
// token"). Measured on Debian 12's 2.6.1: 1 of about 25 SIGKILLs landing
// in a login's first 100 ms (docs/HSM.md, "SoftHSM2 loses a token killed
// in its login"). The kill -9 tests of this project kill processes that
// log in; TokenObjects and RestoreLost let them tell that loss (the
// library's, not what they test) from their own failures.

// TokenObjects reads every SoftHSM2 token's token.object of this test
// binary's token directory.
func TokenObjects(tb testing.TB) map[string][]byte {
	tb.Helper()
	paths, err := filepath.Glob(filepath.Join(softDir, "tokens", "*", "token.object"))
	if err != nil || softDir == "" {
		tb.Fatalf("hsmtest: SoftHSM2 token objects: %v (no SoftHSM2 token made yet?)", err)
	}
	out := map[string][]byte{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			tb.Fatalf("hsmtest: %v", err)
		}
		out[p] = b
	}
	return out
}

// RestoreLost puts back, from snap (TokenObjects), every token.object
// SoftHSM2 has emptied since, and returns their paths.
func RestoreLost(tb testing.TB, snap map[string][]byte) []string {
	tb.Helper()
	var restored []string
	for p, b := range snap {
		if fi, err := os.Stat(p); err == nil && fi.Size() == 0 && len(b) > 0 {
			if err := os.WriteFile(p, b, 0o600); err != nil {
				tb.Fatalf("hsmtest: restore %s: %v", p, err)
			}
			restored = append(restored, p)
		}
	}
	return restored
}
