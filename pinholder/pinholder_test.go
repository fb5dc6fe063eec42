package pinholder

import (
	"context"
	"os"
	"slices"
	"strings"
	"testing"

	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
)

// TestMain runs the tests in a private mount namespace where
// opencryptoki can run (hsmtest.Run), and removes the test tokens.
func TestMain(m *testing.M) {
	os.Exit(hsmtest.Run(m))
}

// TestMatrixMatchesTable runs the adversary on both tokens against keys
// made by the real generation code (the ceremony's) and requires the
// open paths to be exactly the token table's OpenPaths: a path that
// opens where the table says closed fails, and so does one the table
// calls open that the token in fact refuses. Every open path must have
// produced the secret, compared with the throwaway card's.
func TestMatrixMatchesTable(t *testing.T) {
	for _, ht := range []hsmtest.Token{hsmtest.SoftHSM(t), hsmtest.NSS(t)} {
		tok, err := hsm.OpenURI(ht.URI, 1)
		if err != nil {
			t.Fatal(err)
		}
		before, _ := tok.CountObjects(context.Background())
		rep, err := Run(context.Background(), tok, Options{UserPIN: ht.PIN, SOPIN: ht.SOPIN})
		if err != nil {
			t.Fatal(err)
		}
		var sb strings.Builder
		rep.WriteText(&sb)
		t.Log(sb.String())
		want := tok.Mechanisms().OpenPaths
		if got := rep.OpenIDs(); !slices.Equal(got, want) {
			t.Errorf("%s: open paths %v, the table says %v", rep.Table, got, want)
		}
		for _, r := range rep.Results {
			switch {
			case r.Open && !strings.Contains(r.Detail, "on the host"):
				t.Errorf("%s: open without a secret on the host: %q", r.ID, r.Detail)
			case r.Tried && !r.Open && !strings.HasPrefix(r.Refusal, "CKR_"):
				t.Errorf("%s: closed without the token's refusal: %q", r.ID, r.Refusal)
			}
		}
		checkSkipped(t, rep, tok, ht.PIN != "", false)
		if after, _ := tok.CountObjects(context.Background()); after != before {
			t.Errorf("%s: %d objects before the run, %d after: throwaway keys left", rep.Table, before, after)
		}
		tok.Close()
	}
}

// TestWeakKeysOpen is the attack working without the defence: on
// SoftHSM2, keys made the old way (modifiable, no unwrap template) let
// the PIN holder out by paths the hardened keys close.
func TestPathsIDsUnique(t *testing.T) {
	seen := map[string]bool{}
	for _, p := range paths {
		if seen[p.id] || p.try == nil {
			t.Errorf("path %q: duplicate or without an attack", p.id)
		}
		seen[p.id] = true
	}
	for _, m := range []*hsm.Mechanisms{hsm.MechanismsFor("SoftHSM project", "SoftHSM v2"), hsm.MechanismsFor("Mozilla Foundation", "NSS 3")} {
		for _, id := range m.OpenPaths {
			if !seen[id] {
				t.Errorf("table %s names unknown path %q", m.Name, id)
			}
		}
	}
}

// checkSkipped allows exactly the paths a run may leave out: the SO
// login on a token without login, the replication's transport without a
// second member, and the replicable keys' paths on a token that refuses
// replicable keys.
func checkSkipped(t *testing.T, rep *Report, tok *hsm.Token, login, peer bool) {
	t.Helper()
	refuses := tok.ReplicationRefusal() != nil
	for _, r := range rep.Results {
		if r.Tried {
			continue
		}
		ok := false
		for _, p := range paths {
			if p.id != r.ID {
				continue
			}
			switch p.needs {
			case needPIN:
				ok = !login
			case needTransport:
				ok = !peer || refuses
			case needRep:
				ok = refuses
			}
		}
		if !ok {
			t.Errorf("%s: path %s not tried: %s", rep.Table, r.ID, r.Detail)
		}
	}
}
