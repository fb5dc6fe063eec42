package hsm

import (
	"context"
	"errors"
	"strings"
	"testing"

	"blindperso/hsm/hsmtest"
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

// TestCardKeysRecycling: on SoftHSM2, CardKeys recycles every n
// operations, imports and verifications alike, and says so in Stats;
// NeverRecycle turns it off. A recycle that fails (here: the library
// finalized, C_Initialize "failing") fails no operation: the one that
// triggered it keeps its result, and the next one finds the library
// finalized and re-initializes it (With's recovery).
func TestCardKeysRecycling(t *testing.T) {
	ctx := context.Background()
	tok, err := OpenURI(hsmtest.SoftHSM(t).URI, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	key, kek := p256Keys(t, tok, "recycling")
	p := protocol.ECDHP256AES
	card := newSoftCard(t, p, key.Public)
	challenge := []byte("challenge-012345")
	mac := card.answer(t, challenge)

	ck := &CardKeys{Token: tok, Key: key, KEK: kek, RecycleEvery: 3}
	defer ck.Close(ctx)
	gen := tok.Generation()
	blob, err := ck.Import(ctx, p, card.c)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 8 {
		if ok, err := ck.Verify(ctx, blob, card.id, challenge, mac); err != nil || !ok {
			t.Fatalf("verify %d: %v %v", i, ok, err)
		}
	}
	st := ck.Stats()
	if st.Every != 3 || st.Ops != 9 || st.Recycles != 3 || st.Failures != 0 || st.Max <= 0 || st.Total < st.Max {
		t.Errorf("stats after 9 operations every 3: %+v", st)
	}
	if g := tok.Generation() - gen; g != 6 {
		t.Errorf("%d module generations, want 6 (3 recycles)", g)
	}

	off := &CardKeys{Token: tok, Key: key, KEK: kek, RecycleEvery: NeverRecycle}
	defer off.Close(ctx)
	gen = tok.Generation()
	for i := range 20 {
		if ok, err := off.Verify(ctx, blob, card.id, challenge, mac); err != nil || !ok {
			t.Fatalf("verify %d, recycling off: %v %v", i, ok, err)
		}
	}
	if st := off.Stats(); st.Every != NeverRecycle || st.Ops != 20 || st.Recycles != 0 || tok.Generation() != gen {
		t.Errorf("recycling off: %+v, generation %d → %d", st, gen, tok.Generation())
	}

	failing := &CardKeys{Token: tok, Key: key, KEK: kek, RecycleEvery: 1}
	defer failing.Close(ctx)
	failing.init()
	failing.rec.recycle = func() error {
		u := useOf(tok.mod)
		u.Lock()
		defer u.Unlock()
		tok.mod.mu.Lock()
		defer tok.mod.mu.Unlock()
		tok.mod.ctx.Finalize()
		tok.mod.gen.Add(1)
		return errors.New("C_Initialize failed (test)")
	}
	for i := range 3 {
		ok, err := failing.Verify(ctx, blob, card.id, challenge, mac)
		if err != nil || !ok {
			t.Fatalf("verify %d after a failed recycle: %v %v", i, ok, err)
		}
		if bad, err := failing.Verify(ctx, blob, card.id, []byte("challenge-other!"), mac); err != nil || bad {
			t.Fatalf("forged verify %d after a failed recycle: %v %v", i, bad, err)
		}
	}
	if _, err := failing.Import(ctx, p, card.c); err != nil {
		t.Fatalf("import after a failed recycle: %v", err)
	}
	st = failing.Stats()
	if st.Recycles != 7 || st.Failures != 7 || st.LastErr == nil || !strings.Contains(st.LastErr.Error(), "(test)") {
		t.Errorf("stats of the failing recycles: %+v", st)
	}
}
