package main

import "runtime"

// atLeastProcs raises GOMAXPROCS to at least workers+1 for the rest of
// the process. A worker keeps its P during a token call (cgo), so with
// one P per worker the reader, the store writer and the collector wait
// for a call to end; one more P made the import 10–20 % faster on two
// cores (docs/BENCHMARKS.md, "Issuer import"). A process-wide setting,
// so the command sets it, not the library.
func atLeastProcs(workers int) {
	if n := workers + 1; runtime.GOMAXPROCS(0) < n {
		runtime.GOMAXPROCS(n)
	}
}
