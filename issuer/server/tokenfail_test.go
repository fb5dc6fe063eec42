package server

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/api"
	"blindperso/card/cardtest"
	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/issuer"
	"blindperso/protocol"
)

// A token that fails as a device answers 503 with Retry-After, not a
// verification outcome: the challenge is not consumed and the card's
// failures are not counted, so the same answer verifies once the token
// is back. The token is a SoftHSM2 token behind p11fault.
func TestVerifyTokenUnavailable(t *testing.T) {
	ctx := context.Background()
	tt := hsmtest.SoftHSM(t)
	f := hsmtest.Faulty(t, tt)
	tok, err := hsm.OpenURI(f.Token.URI, 4)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tok.Close() })
	key, err := tok.GenerateIssuerKey(ctx, hsm.KindP256, "issuer")
	if err != nil {
		t.Fatal(err)
	}
	kek, err := tok.GenerateKEK(ctx, "kek", tt.SOPIN)
	if err != nil {
		t.Fatal(err)
	}
	is := &issuer.Issuer{Token: tok, Key: key, KEK: kek}
	p := protocol.ECDHP256AES
	cards := makeCards(t, is, p, 0x51)
	e := newAPIEnv(t, is, filepath.Join(t.TempDir(), "data"), 0)
	if code, rep, _ := e.upload(t, batchOf(t, is, p, cards...)); code != 200 || rep.Imported != 1 {
		t.Fatalf("upload: %d %+v", code, rep)
	}
	if v := metric(t, e, `blindperso_issuer_token_member_up{member="`+tt.Label+`"}`); v != 1 {
		t.Fatalf("member_up = %v, want 1", v)
	}
	id := hex.EncodeToString(cards[0].Rec.ID)
	var ch struct{ Challenge string }
	if code := e.json(t, api.RoleVerifier, "POST", "/v1/cards/"+id+"/challenge", nil, &ch); code != 200 {
		t.Fatalf("challenge: %d", code)
	}
	c, _ := hex.DecodeString(ch.Challenge)
	body := `{"challenge":"` + ch.Challenge + `","mac":"` + hex.EncodeToString(cardtest.Authenticate(t, cards[0].A, c)) + `"}`

	f.Fail("C_UnwrapKey", pkcs11.CKR_DEVICE_ERROR)
	code, b := e.do(t, nil, api.RoleVerifier, "POST", "/v1/cards/"+id+"/verify", "application/json", strings.NewReader(body))
	var ae api.Error
	json.Unmarshal(b, &ae)
	if code != http.StatusServiceUnavailable || ae.Title != "token unavailable" || strings.Contains(ae.Detail, tt.Label) {
		t.Fatalf("verify with the token failing: %d %s", code, b)
	}
	f.Clear()
	var v api.VerifyResult
	if code := e.json(t, api.RoleVerifier, "POST", "/v1/cards/"+id+"/verify", json.RawMessage(body), &v); code != 200 || v.Result != api.ResultOK || v.FailedAuth != 0 {
		t.Fatalf("the same answer once the token is back: %d %+v", code, v)
	}
}
