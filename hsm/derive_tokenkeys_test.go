package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"testing"

	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// TestImportWithTokenKeys runs the chains as the issuer will: keys made by
// the token layer (GenerateIssuerKey, GenerateKEK: token objects, the KEK
// marked trusted by the security officer and carrying its unwrap template
// where the token enforces CKA_WRAP_WITH_TRUSTED), sessions from the pool.
// Every runnable profile imports a software card, whose MAC then verifies
// in the token; a wrong MAC does not.
func TestImportWithTokenKeys(t *testing.T) {
	ctx := context.Background()
	for _, kind := range testTokenKinds {
		t.Run(kind, func(t *testing.T) {
			hs := hsmtest.NSS(t)
			if kind == kindSoftHSM2 {
				hs = hsmtest.SoftHSM(t)
			}
			tok, err := OpenURI(hs.URI, 2)
			if err != nil {
				t.Fatal(err)
			}
			defer tok.Close()
			suffix := make([]byte, 4)
			rand.Read(suffix)
			label := "chain-test-" + hex.EncodeToString(suffix)
			rsaKey, err := tok.GenerateIssuerKey(ctx, KindRSA2048, label+"-rsa")
			if err != nil {
				t.Fatal(err)
			}
			ecKey, err := tok.GenerateIssuerKey(ctx, KindP256, label+"-ec")
			if err != nil {
				t.Fatal(err)
			}
			kek, err := tok.GenerateKEK(ctx, label+"-kek", hs.SOPIN)
			if err != nil {
				t.Fatal(err)
			}
			for _, name := range briefRunnable[kind] {
				p := mustProfile(t, name)
				key := rsaKey
				if p.Transport == protocol.ECDHP256 {
					key = ecKey
				}
				card := newSoftCard(t, p, key.Public)
				challenge := make([]byte, protocol.ChallengeLen)
				rand.Read(challenge)
				mac := card.answer(t, challenge)
				bad := bytes.Clone(mac)
				bad[0] ^= 1
				err := tok.With(ctx, func(s Session) error {
					sk, err := key.Handle(s)
					if err != nil {
						return err
					}
					k, err := kek.Handle(s)
					if err != nil {
						return err
					}
					blob, err := ImportCard(s, p, sk, k, key.Public.SPKI, card.c)
					if err != nil {
						return err
					}
					blob.KEK = kek.Label
					if ok, err := VerifyCardMAC(s, k, blob, card.id, challenge, mac); !ok || err != nil {
						t.Errorf("%s: the card's MAC: %v, %v", name, ok, err)
					}
					if ok, err := VerifyCardMAC(s, k, blob, card.id, challenge, bad); ok || err != nil {
						t.Errorf("%s: a wrong MAC: %v, %v", name, ok, err)
					}
					return nil
				})
				if err != nil {
					t.Errorf("%s: %v", name, err)
				}
			}
		})
	}
}
