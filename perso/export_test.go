package perso

// FailSyncs makes every fdatasync of a batch after the first n fail with
// err, as a disk that stops writing does, until restore is called. Only
// this package's tests see it; the station must not be running when
// either is called.
func FailSyncs(n int, err error) (restore func()) {
	old := testHooks
	testHooks = &hooks{failAfter: n, failErr: err}
	return func() { testHooks = old }
}
