// Package issuertest makes an issuer on a fresh SoftHSM2 token for the
// tests of packages that drive the issuer from outside (the station's
// upload, the verifier terminal, the insider tool): one place for the
// token, key and KEK set-up they share.
package issuertest

import (
	"context"
	"testing"

	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/issuer"
)

// New returns an issuer whose key (label "issuer", of kind) and trusted
// KEK (label "kek") were generated in a new SoftHSM2 token with sessions
// pooled; the token is closed when the test ends. The caller's TestMain
// should call hsmtest.Cleanup.
func New(tb testing.TB, kind string, sessions int) *issuer.Issuer {
	tb.Helper()
	ctx := context.Background()
	tt := hsmtest.SoftHSM(tb)
	tok, err := hsm.OpenURI(tt.URI, sessions)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { tok.Close() })
	key, err := tok.GenerateIssuerKey(ctx, kind, "issuer")
	if err != nil {
		tb.Fatal(err)
	}
	kek, err := tok.GenerateKEK(ctx, "kek", tt.SOPIN)
	if err != nil {
		tb.Fatal(err)
	}
	return &issuer.Issuer{Token: tok, Key: key, KEK: kek}
}
