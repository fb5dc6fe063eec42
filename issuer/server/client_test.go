package server

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"blindperso/api"
	"blindperso/card/cardtest"
	"blindperso/hsm"
	"blindperso/protocol"
)

// The Go client against the server, every call: what the station's
// upload and the verifier terminal rely on, and the errors a caller
// tells apart with errors.Is.
func TestClient(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	cards := makeCards(t, is, p, 1, 2)
	path := batchOf(t, is, p, cards...)
	changed := batchOf(t, is, p, makeCards(t, is, p, 3)...)
	if err := os.WriteFile(changed, []byte("{}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	e := newAPIEnv(t, is, filepath.Join(t.TempDir(), "data"), 1<<20)
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.srv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	client := func(role string) *api.Client {
		tf := filepath.Join(dir, role+".token")
		if err := os.WriteFile(tf, []byte(e.tokens[role]+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		c, err := api.NewClient(api.Config{URL: e.srv.URL, CAFile: caFile, TokenFile: tf})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	perso, verifier, admin := client(api.RolePerso), client(api.RoleVerifier), client(api.RoleAdmin)
	ctx := context.Background()

	rep, err := perso.Upload(ctx, path)
	if err != nil || rep.Imported != 2 || rep.Status != api.BatchDone || rep.RejectList == nil {
		t.Fatalf("Upload: %+v, %v", rep, err)
	}
	if _, err := perso.Upload(ctx, changed); !errors.Is(err, api.ErrRefused) {
		t.Errorf("Upload of a changed batch: %v; want ErrRefused", err)
	}
	if got, err := perso.Batch(ctx, rep.ID); err != nil || got.ID != rep.ID || got.Imported != 2 {
		t.Errorf("Batch: %+v, %v", got, err)
	}
	if bs, err := admin.Batches(ctx); err != nil || len(bs) != 2 || bs[0].ID != rep.ID || bs[1].Status != api.BatchRefused {
		t.Errorf("Batches: %+v, %v", bs, err)
	}
	if _, err := perso.Batches(ctx); !errors.Is(err, api.ErrForbidden) {
		t.Errorf("Batches as perso: %v; want ErrForbidden", err)
	}

	id := cards[0].Rec.ID
	ch, err := verifier.Challenge(ctx, id)
	if err != nil || len(ch.Challenge) != protocol.ChallengeLen || ch.Expires.IsZero() {
		t.Fatalf("Challenge: %+v, %v", ch, err)
	}
	if v, err := verifier.Verify(ctx, id, ch.Challenge, cardtest.Authenticate(t, cards[0].A, ch.Challenge)); err != nil || v.Result != api.ResultOK {
		t.Errorf("Verify: %+v, %v", v, err)
	}
	if v, err := verifier.Verify(ctx, id, ch.Challenge, cardtest.Authenticate(t, cards[0].A, ch.Challenge)); err != nil || v.Result != api.ResultFailed || v.FailedAuth != 0 {
		t.Errorf("Verify with a used challenge: %+v, %v; want failed, 0 (a challenge error does not count against the card)", v, err)
	}
	if _, err := verifier.Challenge(ctx, []byte{0xee}); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("Challenge for an unknown card: %v; want ErrNotFound", err)
	}

	if k, err := admin.Block(ctx, id, "lost"); err != nil || k.State != api.StateBlocked || !bytes.Equal(k.ID, id) {
		t.Errorf("Block: %+v, %v", k, err)
	}
	if _, err := verifier.Challenge(ctx, id); !errors.Is(err, api.ErrConflict) {
		t.Errorf("Challenge for a blocked card: %v; want ErrConflict", err)
	}
	if cs, err := admin.Cards(ctx, api.StateBlocked); err != nil || len(cs) != 1 || !bytes.Equal(cs[0].ID, id) {
		t.Errorf("Cards(blocked): %+v, %v", cs, err)
	}
	if k, err := admin.Unblock(ctx, id, ""); err != nil || k.State != api.StateActive || k.FailedAuth != 0 {
		t.Errorf("Unblock: %+v, %v", k, err)
	}
	if _, err := admin.Unblock(ctx, id, ""); !errors.Is(err, api.ErrConflict) {
		t.Errorf("Unblock an active card: %v; want ErrConflict", err)
	}
	d, err := admin.Card(ctx, id)
	if err != nil || !bytes.Equal(d.Card.ID, id) || d.Card.Blob.KEK == "" || len(d.Log) < 3 {
		t.Errorf("Card: %+v, %v", d, err)
	}
	if all, err := admin.Cards(ctx, ""); err != nil || len(all) != 2 {
		t.Errorf("Cards: %+v, %v", all, err)
	}
	if _, err := admin.Cards(ctx, "lost"); !errors.Is(err, api.ErrBadRequest) {
		t.Errorf("Cards(lost): %v; want ErrBadRequest", err)
	}
}
