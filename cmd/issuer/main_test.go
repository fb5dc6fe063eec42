package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rogpeppe/go-internal/testscript"

	"blindperso/hsm/hsmtest"
)

// The command's behaviour end to end, as a user meets it: testdata/script/*.txtar.
func TestMain(m *testing.M) {
	testscript.Main(cleanupM{m}, map[string]func(){"issuer": main})
}

// cleanupM runs the tests in a private mount namespace where
// opencryptoki can run (hsmtest.Run), and removes the test tokens after
// them. The script commands (issuer) that testscript runs are children
// of that process, so they share its namespace and pkcsslotd.
type cleanupM struct{ m *testing.M }

func (c cleanupM) Run() int { return hsmtest.Run(c.m) }

// TestScripts runs the scripts with real tokens: $SOFTHSM_URI names a
// SoftHSM2 token of the script's own (SO PIN in $SOFTHSM_SO_PIN_FILE),
// $NSS_URI the NSS softokn database, shared (scripts use their own
// labels). SoftHSM2 tokens are not shared because scripts run in
// parallel, and a SoftHSM2 process that starts while another writes the
// same token's files can miss the token (measured: "no such token").
func TestScripts(t *testing.T) {
	scripts, err := filepath.Glob("testdata/script/*.txtar")
	if err != nil {
		t.Fatal(err)
	}
	// All SoftHSM2 tokens exist before any script starts.
	soft := map[string]hsmtest.Token{}
	for _, s := range scripts {
		soft[strings.TrimSuffix(filepath.Base(s), ".txtar")] = hsmtest.SoftHSM(t)
	}
	// The group script's second member: its token through a p11fault
	// copy of the library (the `fault` command sets its rules).
	faults["group"] = hsmtest.Faulty(t, soft["group"])
	nss := hsmtest.NSS(t)
	// opencryptoki's soft token, shared like NSS's database; scripts that
	// use it start with [!opencryptoki] skip.
	ock, ockSkip, err := hsmtest.LookupOpenCryptoki()
	if err != nil {
		t.Errorf("opencryptoki: %v", err)
	} else if ockSkip != "" {
		t.Logf("scripts that need opencryptoki skip: %s", ockSkip)
	}
	testscript.Run(t, testscript.Params{
		Dir:  "testdata/script",
		Cmds: scriptCmds,
		Condition: func(cond string) (bool, error) {
			if cond == "opencryptoki" {
				return ock.URI != "", nil
			}
			return false, fmt.Errorf("unknown condition %q", cond)
		},
		Setup: func(env *testscript.Env) error {
			tok := soft[strings.TrimPrefix(filepath.Base(env.WorkDir), "script-")]
			soPIN := tok.PINFile + ".so"
			if err := os.WriteFile(soPIN, []byte(tok.SOPIN+"\n"), 0o600); err != nil {
				return err
			}
			env.Setenv("SOFTHSM2_CONF", os.Getenv("SOFTHSM2_CONF"))
			env.Setenv("SOFTHSM_URI", tok.URI)
			env.Setenv("SOFTHSM_SO_PIN_FILE", soPIN)
			if f := faults[strings.TrimPrefix(filepath.Base(env.WorkDir), "script-")]; f != nil {
				env.Setenv("SOFTHSM_COPY_URI", f.Token.URI)
			}
			env.Setenv("NSS_URI", nss.URI)
			if ock.URI != "" {
				ockSO := filepath.Join(env.WorkDir, "ock-so.pin")
				if err := os.WriteFile(ockSO, []byte(ock.SOPIN+"\n"), 0o600); err != nil {
					return err
				}
				env.Setenv("OCK_URI", ock.URI)
				env.Setenv("OCK_SO_PIN_FILE", ockSO)
			}
			return nil
		},
	})
}
