package server

import (
	"encoding/hex"
	"encoding/pem"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"blindperso/api"
	"blindperso/attest"
	"blindperso/card/cardtest"
	"blindperso/chipca"
	"blindperso/hsm"
	"blindperso/protocol"
)

// Uploads under the optional policy: an attested card lands attested, a
// card without an attestation key lands unattested — both visible in the
// card's JSON, the report and the metrics — and a record whose c is not
// the one its chip signed is rejected with that reason while the others
// land.
func TestAPIAttestation(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	ca, err := chipca.New("")
	if err != nil {
		t.Fatal(err)
	}
	roots, err := attest.ParseRoots(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Root.Raw}))
	if err != nil {
		t.Fatal(err)
	}
	ck := &attest.Checker{Policy: attest.Optional, Roots: roots, Issuer: is.Key.Fingerprint()}
	e := newAPIEnv(t, is, filepath.Join(t.TempDir(), "data"), 1<<20, func(c *Config) { c.Attest = ck })

	attested := cardtest.AttestedCards(t, ca, p, is.Key.Public.SPKI, 1, 2)
	plain := cardtest.Cards(t, p, is.Key.Public.SPKI, 3)[0]
	replaced := attested[1].Rec
	replaced.C = cardtest.Cards(t, p, is.Key.Public.SPKI, 2)[0].Rec.C
	path := writeBatch(t, is, p, cardtest.Line(t, attested[0].Rec)+cardtest.Line(t, plain.Rec)+cardtest.Line(t, replaced))
	code, rep, b := e.upload(t, path)
	if code != http.StatusOK || rep.Imported != 2 || rep.Unattested != 1 || rep.Rejects != 1 ||
		rep.RejectList[0].Line != 3 || !strings.Contains(rep.RejectList[0].Reason, "the record was replaced") {
		t.Fatalf("upload: %d %+v %s", code, rep, b)
	}
	for _, c := range []struct {
		id   []byte
		want bool
	}{{attested[0].Rec.ID, true}, {plain.Rec.ID, false}} {
		var cd api.CardDetail
		if code := e.json(t, api.RoleAdmin, "GET", "/v1/cards/"+hex.EncodeToString(c.id), nil, &cd); code != 200 || cd.Card.Attested != c.want {
			t.Errorf("card %x: %d attested %v, want %v", c.id, code, cd.Card.Attested, c.want)
		}
	}
	if v := metric(t, e, "blindperso_issuer_unattested_cards_total"); v != 1 {
		t.Errorf("unattested cards metric %v, want 1", v)
	}
}
