package main

import (
	"testing"

	"github.com/rogpeppe/go-internal/testscript"
)

// The command's behaviour end to end, as a user meets it: testdata/script/*.txtar.
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){"vcard": main})
}

func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{Dir: "testdata/script"})
}
