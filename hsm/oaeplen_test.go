package hsm

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"fmt"
	"testing"

	"blindperso/protocol"
)

// TestOAEPSecretLength: a c that carries an S of another length than 32
// bytes is refused in the token on both tokens — on SoftHSM2, which
// reports CKA_VALUE_LEN 0 for unwrapped keys, by the wrap-length check
// under the trusted KEK — and a 32-byte S still imports.
func TestOAEPSecretLength(t *testing.T) {
	ctx := context.Background()
	for name, tok := range openBoth(t, 1) {
		t.Run(name, func(t *testing.T) {
			key, err := tok.GenerateIssuerKey(ctx, KindRSA2048, uniqueLabel("oaeplen"))
			if err != nil {
				t.Fatal(err)
			}
			kek, err := tok.GenerateKEK(ctx, uniqueLabel("oaeplen-kek"), soPIN(tok))
			if err != nil {
				t.Fatal(err)
			}
			p := protocol.RSAOAEPAES
			for _, n := range []int{16, 24, 31, 32, 33, 48} {
				t.Run(fmt.Sprint(n), func(t *testing.T) {
					s := make([]byte, n)
					rand.Read(s)
					// Anyone with PK can make such a c.
					c, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, key.Public.RSA, s, nil)
					if err != nil {
						t.Fatal(err)
					}
					err = tok.With(ctx, func(ss Session) error {
						sk, _ := key.Handle(ss)
						kh, _ := kek.Handle(ss)
						_, err := ImportCard(ss, p, sk, kh, key.Public.SPKI, c)
						return err
					})
					switch {
					case n == 32 && err != nil:
						t.Errorf("32-byte S refused: %v", err)
					case n != 32 && err == nil:
						t.Errorf("%d-byte S imported", n)
					}
				})
			}
		})
	}
}
