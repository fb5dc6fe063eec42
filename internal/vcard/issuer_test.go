package vcard_test

import (
	"context"
	"encoding/pem"
	"errors"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blindperso/api"
	"blindperso/card"
	"blindperso/hsm"
	"blindperso/internal/insider"
	"blindperso/internal/vcard"
	"blindperso/issuer"
	"blindperso/issuer/issuertest"
	"blindperso/issuer/server"
	"blindperso/perso"
	"blindperso/protocol"
)

// The verifier terminal against the real issuer API (real SoftHSM2 token,
// real SQLite store, real importer): a genuine card authenticates; a card
// personalized by the active insider (paper Fig. 2) fails, is blocked at
// the limit, and then gets no challenge.
func TestAuthenticateThroughIssuer(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	is := issuertest.New(t, hsm.KindP256, 4)
	key := is.Key
	p := protocol.ECDHP256AES

	// One batch: a genuine card's record and the insider's forged one.
	batch := filepath.Join(dir, "batch.ndjson")
	fp := key.Public.Fingerprint()
	j, err := perso.OpenJournal(batch, p.Name, fp[:], nil)
	if err != nil {
		t.Fatal(err)
	}
	genuineJob, err := perso.NewJob(p, key.Public, nil)
	if err != nil {
		t.Fatal(err)
	}
	honest := personalizeInto(t, genuineJob, j, filepath.Join(dir, "honest.json"), 1)
	attacker, err := insider.GenerateKey(insider.KindP256, nil)
	if err != nil {
		t.Fatal(err)
	}
	insiderJob, _ := insider.Job(p, attacker)
	forging, err := insider.NewLedger(j, p, attacker, key.Public, nil)
	if err != nil {
		t.Fatal(err)
	}
	attacked := personalizeInto(t, insiderJob, forging, filepath.Join(dir, "attacked.json"), 2)
	if _, err := perso.WriteManifest(j, "test"); err != nil {
		t.Fatal(err)
	}
	j.Close()

	st, err := issuer.OpenSQLite(ctx, filepath.Join(dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rep, err := (&issuer.Importer{Issuer: is, Store: st, Workers: 1}).ImportFile(ctx, batch)
	if err != nil || rep.Imported != 2 {
		t.Fatalf("import: %+v, %v; want 2 imported", rep, err)
	}

	tokens, err := server.ParseTokens(strings.NewReader("verifier " + server.HashToken("verifier-secret") + "\nadmin " + server.HashToken("admin-secret") + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	h, err := server.New(server.Config{Issuer: is, Store: st, UploadDir: filepath.Join(dir, "uploads"),
		Tokens: tokens, MaxFailures: 2})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewTLSServer(h)
	defer srv.Close()

	// The client as the command makes it: CA file and token file.
	caFile := filepath.Join(dir, "server.pem")
	os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644)
	tokFile := filepath.Join(dir, "verifier.token")
	os.WriteFile(tokFile, []byte("verifier-secret\n"), 0o600)
	cl, err := api.NewClient(api.Config{URL: srv.URL, CAFile: caFile, TokenFile: tokFile})
	if err != nil {
		t.Fatal(err)
	}

	for range 2 {
		res, err := vcard.Authenticate(ctx, cl, honest)
		if err != nil || !res.OK() {
			t.Fatalf("genuine card: %+v, %v; want ok", res, err)
		}
	}
	for i, want := range []string{"failed", "blocked", vcard.ResultNotActive} {
		res, err := vcard.Authenticate(ctx, cl, attacked)
		if err != nil || res.Result != want || res.OK() {
			t.Fatalf("attacked card, try %d: %+v, %v; want %s", i+1, res, err, want)
		}
	}
	c, err := st.Card(ctx, []byte{0xA1, 2})
	if err != nil || c.State != "blocked" {
		t.Fatalf("attacked card in the store: %+v, %v; want blocked", c, err)
	}

	// Wrong credentials and unknown cards are errors, not results.
	os.WriteFile(tokFile, []byte("admin-secret"), 0o600)
	admin, _ := api.NewClient(api.Config{URL: srv.URL, CAFile: caFile, TokenFile: tokFile})
	var ae *api.Error
	if _, err := vcard.Authenticate(ctx, admin, honest); !errors.As(err, &ae) || !errors.Is(err, api.ErrForbidden) {
		t.Errorf("admin token: %v; want a 403 api.Error", err)
	}
	if _, err := cl.Challenge(ctx, []byte{0xEE}); !errors.As(err, &ae) || !errors.Is(err, api.ErrNotFound) {
		t.Errorf("unknown card: %v; want a 404 api.Error", err)
	}
}

// personalizeInto manufactures a card with Id A1‖n, personalizes and locks
// it under job, committing through l, and returns its state file.
func personalizeInto(t *testing.T, job perso.Job, l perso.Ledger, path string, n byte) string {
	t.Helper()
	a, err := card.Manufacture(path, card.Options{ID: []byte{0xA1, n}})
	if err != nil {
		t.Fatal(err)
	}
	if _, outcome, err := job.Personalize(&card.Client{T: a.Local()}, "test", l); err != nil || outcome != perso.Personalized {
		t.Fatalf("personalize: %v, %v", outcome, err)
	}
	return path
}
