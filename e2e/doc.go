// Package e2e holds the end-to-end test of the main job: it builds the
// commands, runs scripts/demo.sh (the `make demo` a user runs) on SoftHSM2
// and on NSS softokn, and checks the paper's insider properties on
// everything the run left behind (demo_test.go). It has no code of its own.
package e2e
