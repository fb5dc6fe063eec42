package main

import (
	"testing"

	"github.com/rogpeppe/go-internal/testscript"
)

// The command as a user meets it: testdata/script/*.txtar. The attack
// itself runs through PC/SC in the e2e test (scripts/demo.sh) and in
// process in internal/insider's tests.
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){"insider": main})
}

func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{Dir: "testdata/script"})
}
