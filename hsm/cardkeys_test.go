package hsm

import (
	"context"
	"errors"
	"testing"

	"blindperso/protocol"
)

// TestCardKeys: import and verification through CardKeys on both tokens,
// recycling the token every other operation (the session copies, where
// made, are made again); a re-wrap to another KEK verifies there, and a
// corrupt blob is ErrBadBlob, not a failure of the token.
func TestCardKeys(t *testing.T) {
	ctx := context.Background()
	for name, tok := range openBoth(t, 1) {
		t.Run(name, func(t *testing.T) {
			key, kek := p256Keys(t, tok, "cardkeys")
			ck := &CardKeys{Token: tok, Key: key, KEK: kek, RecycleEvery: 2}
			defer ck.Close(ctx)
			p := protocol.ECDHP256AES
			var blob Blob
			for i := range 3 {
				card := newSoftCard(t, p, key.Public)
				b, err := ck.Import(ctx, p, card.c)
				if err != nil {
					t.Fatalf("import %d: %v", i, err)
				}
				if b.KEK != kek.Label {
					t.Errorf("blob names KEK %q, want %q", b.KEK, kek.Label)
				}
				challenge := []byte("challenge-012345")
				ok, err := ck.Verify(ctx, b, card.id, challenge, card.answer(t, challenge))
				if err != nil || !ok {
					t.Fatalf("verify %d: %v %v", i, ok, err)
				}
				blob = b
			}
			if _, err := ck.Verify(ctx, Blob{KEK: "other"}, nil, nil, nil); err == nil {
				t.Error("a blob under another KEK was verified")
			}
			next, err := tok.GenerateKEK(ctx, uniqueLabel("cardkeys-next"), soPIN(tok))
			if err != nil {
				t.Fatal(err)
			}
			rw := &Rewrapper{Token: tok, From: kek, To: next}
			defer rw.Close(ctx)
			nb, err := rw.Rewrap(ctx, blob)
			if err != nil || nb.KEK != next.Label {
				t.Fatalf("rewrap: %+v %v", nb, err)
			}
			bad := blob
			bad.Wrapped = append([]byte(nil), blob.Wrapped...)
			bad.Wrapped[3] ^= 1
			if _, err := rw.Rewrap(ctx, bad); !errors.Is(err, ErrBadBlob) {
				t.Errorf("corrupt blob: %v, want ErrBadBlob", err)
			}
		})
	}
}
