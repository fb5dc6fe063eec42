package pcscd

import (
	"context"
	"flag"
	"fmt"
	"os"
	"testing"
	"time"
)

// RunTests is a TestMain for packages whose tests talk PC/SC: it starts a
// private daemon, points this process's PC/SC client library at it (before
// any scard call: libpcsclite reads PCSCLITE_CSOCK_NAME once per process),
// stores it in *d, runs the tests and stops it. With -short it runs the
// tests with *d nil, and they should skip. On failure the pcscd log is kept
// and its path printed.
func RunTests(m *testing.M, d **Daemon) int {
	if !flag.Parsed() {
		flag.Parse()
	}
	if !testing.Short() {
		dir, err := os.MkdirTemp("", "pcscd-test-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		daemon, err := Start(ctx, dir, 0)
		cancel()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.RemoveAll(dir)
			return 1
		}
		os.Setenv("PCSCLITE_CSOCK_NAME", daemon.Socket)
		*d = daemon
	}
	code := m.Run()
	if *d == nil {
		return code
	}
	if err := (*d).Stop(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		if code == 0 {
			code = 1
		}
	}
	if code != 0 {
		fmt.Fprintf(os.Stderr, "pcscd log kept in %s\n", (*d).LogFile)
	} else {
		os.RemoveAll((*d).Dir)
	}
	return code
}
