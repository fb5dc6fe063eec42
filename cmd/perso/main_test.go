package main

import (
	"testing"

	"github.com/rogpeppe/go-internal/testscript"

	"blindperso/internal/pcscd"
)

// daemon is this binary's private pcscd (nil with -short); the station
// processes the tests start reach it through PCSCLITE_CSOCK_NAME, which
// pcscd.RunTests sets for this process and its children.
var daemon *pcscd.Daemon

// withPCSC runs the tests under a private pcscd.
type withPCSC struct{ m *testing.M }

func (w withPCSC) Run() int { return pcscd.RunTests(w.m, &daemon) }

// The command's behaviour end to end, as a user meets it: testdata/script/*.txtar.
// testscript also puts this binary on PATH as "perso", which the crash
// campaign starts and kills.
func TestMain(m *testing.M) {
	testscript.Main(withPCSC{m}, map[string]func(){"perso": main})
}

func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{Dir: "testdata/script"})
}
