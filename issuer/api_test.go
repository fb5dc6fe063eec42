package issuer

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"blindperso/hsm"
	"blindperso/perso"
	"blindperso/protocol"
)

type apiEnv struct {
	srv    *httptest.Server
	is     *Issuer
	st     Store
	tokens map[string]string // role → bearer token
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
}

func newAPIEnv(t *testing.T, is *Issuer, maxBatch int64) *apiEnv {
	t.Helper()
	dir := t.TempDir()
	st := openStore(t, filepath.Join(dir, "data"))
	e := &apiEnv{is: is, st: st, tokens: map[string]string{}}
	var tf strings.Builder
	for _, r := range Roles {
		tok := "secret-" + r
		e.tokens[r] = tok
		fmt.Fprintf(&tf, "%s %s\n", r, HashToken(tok))
	}
	entries, err := ParseTokens(strings.NewReader("# test\n" + tf.String()))
	if err != nil {
		t.Fatal(err)
	}
	api, err := NewAPI(APIConfig{Issuer: is, Store: st, UploadDir: filepath.Join(dir, "uploads"), Tokens: entries, MaxBatchBytes: maxBatch})
	if err != nil {
		t.Fatal(err)
	}
	e.caKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test client CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &e.caKey.PublicKey, e.caKey)
	if err != nil {
		t.Fatal(err)
	}
	e.ca, _ = x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(e.ca)
	e.srv = httptest.NewUnstartedServer(api)
	e.srv.TLS = &tls.Config{ClientCAs: pool, ClientAuth: tls.VerifyClientCertIfGiven}
	e.srv.StartTLS()
	t.Cleanup(e.srv.Close)
	return e
}

// clientCert makes a client certificate signed by the test CA with the
// given OUs.
func (e *apiEnv) clientCert(t *testing.T, cn string, ous ...string) tls.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:   pkix.Name{CommonName: cn, OrganizationalUnit: ous},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, e.ca, &k.PublicKey, e.caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}
}

func (e *apiEnv) certClient(cert tls.Certificate) *http.Client {
	c := e.srv.Client()
	tr := c.Transport.(*http.Transport).Clone()
	tr.TLSClientConfig.Certificates = []tls.Certificate{cert}
	return &http.Client{Transport: tr}
}

// do sends a request as role ("" none, "wrong" an unknown token) and
// returns the status and body.
func (e *apiEnv) do(t *testing.T, c *http.Client, role, method, path, ctype string, body io.Reader) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, e.srv.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	switch role {
	case "":
	case "wrong":
		req.Header.Set("Authorization", "Bearer not-a-token")
	default:
		req.Header.Set("Authorization", "Bearer "+e.tokens[role])
	}
	if c == nil {
		c = e.srv.Client()
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK && !json.Valid(b) {
		t.Errorf("%s %s: error body is not JSON: %q", method, path, b)
	}
	return resp.StatusCode, b
}

func (e *apiEnv) json(t *testing.T, role, method, path string, in any, out any) int {
	t.Helper()
	var body io.Reader
	if in != nil {
		b, _ := json.Marshal(in)
		body = bytes.NewReader(b)
	}
	code, b := e.do(t, nil, role, method, path, "application/json", body)
	if out != nil && code == http.StatusOK {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s %s: %v: %s", method, path, err, b)
		}
	}
	return code
}

// multipartBatch is the upload body for the batch at path.
func multipartBatch(t *testing.T, path string) (string, []byte) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, p := range []struct{ name, file string }{{"manifest", perso.ManifestPath(path)}, {"batch", path}} {
		b, err := os.ReadFile(p.file)
		if err != nil {
			t.Fatal(err)
		}
		w, _ := mw.CreateFormFile(p.name, filepath.Base(p.file))
		w.Write(b)
	}
	mw.Close()
	return mw.FormDataContentType(), buf.Bytes()
}

func metric(t *testing.T, e *apiEnv, name string) float64 {
	t.Helper()
	code, b := e.do(t, nil, RoleMetrics, "GET", "/metrics", "", nil)
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindSubmatch(b)
	if m == nil {
		return 0
	}
	v, _ := strconv.ParseFloat(string(m[1]), 64)
	return v
}

func TestAPI(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	cards := makeCards(t, is, p, 1, 2)
	path := batchOf(t, is, p, cards...)
	e := newAPIEnv(t, is, 1<<20)
	ctype, body := multipartBatch(t, path)

	var rep BatchDetail
	code, b := e.do(t, nil, RolePerso, "POST", "/v1/batches", ctype, bytes.NewReader(body))
	if code != 200 {
		t.Fatalf("upload: %d %s", code, b)
	}
	json.Unmarshal(b, &rep)
	if rep.Records != 2 || rep.Imported != 2 || rep.Rejects != 0 || rep.Conflicts != 0 || rep.Status != "done" {
		t.Fatalf("report %+v", rep)
	}
	if got := e.json(t, RolePerso, "GET", "/v1/batches/"+rep.ID, nil, &rep); got != 200 || rep.Imported != 2 {
		t.Fatalf("GET batch: %d %+v", got, rep)
	}
	if v := metric(t, e, "blindperso_issuer_imported_cards_total"); v != 2 {
		t.Errorf("imported metric %v", v)
	}
	if v := metric(t, e, `blindperso_issuer_token_op_seconds_count{op="import"}`); v != 2 {
		t.Errorf("import latency count %v", v)
	}

	id := hex.EncodeToString(cards[0].rec.ID)
	challenge := func() []byte {
		var ch struct{ Challenge string }
		if code := e.json(t, RoleVerifier, "POST", "/v1/cards/"+id+"/challenge", nil, &ch); code != 200 {
			t.Fatalf("challenge: %d", code)
		}
		c, _ := hex.DecodeString(ch.Challenge)
		return c
	}
	verify := func(ch, mac []byte) VerifyResponse {
		var v VerifyResponse
		if code := e.json(t, RoleVerifier, "POST", "/v1/cards/"+id+"/verify",
			map[string]string{"challenge": hex.EncodeToString(ch), "mac": hex.EncodeToString(mac)}, &v); code != 200 {
			t.Fatalf("verify: %d", code)
		}
		return v
	}
	ch := challenge()
	if v := verify(ch, authenticate(t, cards[0].a, ch)); v.Result != AuthOK || v.FailedAuth != 0 {
		t.Fatalf("genuine: %+v", v)
	}
	// Every kind of failure answers the same shape.
	ch2 := challenge()
	badMAC := authenticate(t, cards[0].a, ch2)
	badMAC[0] ^= 1
	if v := verify(ch2, badMAC); v != (VerifyResponse{AuthFailed, 1}) {
		t.Fatalf("bad MAC: %+v", v)
	}
	if v := verify(ch, authenticate(t, cards[0].a, ch)); v != (VerifyResponse{AuthFailed, 1}) {
		t.Fatalf("reused challenge: %+v", v)
	}
	unknown := make([]byte, 16)
	if v := verify(unknown, authenticate(t, cards[0].a, unknown)); v != (VerifyResponse{AuthFailed, 1}) {
		t.Fatalf("unknown challenge: %+v", v)
	}
	if v := metric(t, e, `blindperso_issuer_verifications_total{result="failed"}`); v != 3 {
		t.Errorf("failed verifications metric %v", v)
	}
	if v := metric(t, e, `blindperso_issuer_verifications_total{result="ok"}`); v != 1 {
		t.Errorf("ok verifications metric %v", v)
	}
	if v := metric(t, e, `blindperso_issuer_token_op_seconds_count{op="verify"}`); v != 2 {
		t.Errorf("verify latency count %v", v)
	}

	// Admin: block, verify refused, unblock.
	var sc StoredCard
	if code := e.json(t, RoleAdmin, "POST", "/v1/cards/"+id+"/block", map[string]string{"reason": "lost"}, &sc); code != 200 || sc.State != StateBlocked {
		t.Fatalf("block: %d %+v", code, sc)
	}
	if code := e.json(t, RoleVerifier, "POST", "/v1/cards/"+id+"/challenge", nil, nil); code != http.StatusConflict {
		t.Fatalf("challenge for a blocked card: %d", code)
	}
	if code := e.json(t, RoleAdmin, "POST", "/v1/cards/"+id+"/unblock", nil, &sc); code != 200 || sc.State != StateActive {
		t.Fatalf("unblock: %d %+v", code, sc)
	}
	if code := e.json(t, RoleAdmin, "POST", "/v1/cards/"+id+"/unblock", nil, nil); code != http.StatusConflict {
		t.Fatalf("unblock an active card: %d", code)
	}
	if code := e.json(t, RoleAdmin, "GET", "/v1/cards/B1FF", nil, nil); code != http.StatusNotFound {
		t.Fatalf("unknown card: %d", code)
	}

	// mTLS: a verifier certificate, an admin one, one without a role.
	for _, tc := range []struct {
		ous  []string
		path string
		want int
	}{
		{[]string{"verifier"}, "/v1/cards/" + id + "/challenge", 200},
		{[]string{"verifier"}, "/v1/cards", 403},
		{[]string{"admin"}, "/v1/cards", 200},
		{[]string{"ops"}, "/v1/cards", 403},
		{[]string{"admin", "verifier"}, "/v1/cards", 403},
	} {
		c := e.certClient(e.clientCert(t, "client", tc.ous...))
		method := "GET"
		if strings.HasSuffix(tc.path, "challenge") {
			method = "POST"
		}
		if code, b := e.do(t, c, "", method, tc.path, "", nil); code != tc.want {
			t.Errorf("cert OU %v %s: %d, want %d: %s", tc.ous, tc.path, code, tc.want, b)
		}
	}
	// A certificate from another CA does not even complete the handshake.
}

func TestAPIAuthorizationMatrix(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	cards := makeCards(t, is, p, 1)
	path := batchOf(t, is, p, cards...)
	e := newAPIEnv(t, is, 1<<20)
	importBatch(t, is, e.st, path)
	bs, _ := e.st.Batches(context.Background())
	id := hex.EncodeToString(cards[0].rec.ID)
	batch := bs[0].ID

	type ep struct {
		method, path string
		body         func() (string, io.Reader)
		roles        []string // roles answered 200
	}
	js := func(s string) func() (string, io.Reader) {
		return func() (string, io.Reader) { return "application/json", strings.NewReader(s) }
	}
	upload := func() (string, io.Reader) {
		ct, b := multipartBatch(t, path)
		return ct, bytes.NewReader(b)
	}
	verifyBody := func() (string, io.Reader) {
		ch, err := (&Authenticator{Store: e.st}).Challenge(context.Background(), cards[0].rec.ID)
		if err != nil {
			t.Fatal(err)
		}
		return js(fmt.Sprintf(`{"challenge":"%x","mac":"%x"}`, []byte(ch.Challenge), authenticate(t, cards[0].a, ch.Challenge)))()
	}
	eps := []ep{
		{"GET", "/healthz", nil, append([]string{"", "wrong"}, Roles...)},
		{"GET", "/metrics", nil, []string{RoleAdmin, RoleMetrics}},
		{"POST", "/v1/batches", upload, []string{RolePerso}},
		{"GET", "/v1/batches/" + batch, nil, []string{RolePerso, RoleAdmin}},
		{"GET", "/v1/batches", nil, []string{RoleAdmin}},
		{"POST", "/v1/cards/" + id + "/challenge", nil, []string{RoleVerifier}},
		{"POST", "/v1/cards/" + id + "/verify", verifyBody, []string{RoleVerifier}},
		{"GET", "/v1/cards", nil, []string{RoleAdmin}},
		{"GET", "/v1/cards/" + id, nil, []string{RoleAdmin}},
		{"POST", "/v1/cards/" + id + "/block", js(`{"reason":"matrix"}`), []string{RoleAdmin}},
		{"POST", "/v1/cards/" + id + "/unblock", nil, []string{RoleAdmin}},
	}
	for _, x := range eps {
		for _, who := range append([]string{"", "wrong"}, Roles...) {
			want := http.StatusForbidden
			if who == "" || who == "wrong" {
				want = http.StatusUnauthorized
			}
			for _, r := range x.roles {
				if r == who {
					want = 200
				}
			}
			name := who
			if name == "" {
				name = "none"
			}
			t.Run(x.method+x.path+"/"+name, func(t *testing.T) {
				var ct string
				var body io.Reader
				if x.body != nil && want == 200 {
					ct, body = x.body()
				}
				code, b := e.do(t, nil, who, x.method, x.path, ct, body)
				if code != want {
					t.Errorf("%s %s as %s: %d, want %d: %s", x.method, x.path, name, code, want, b)
				}
			})
		}
	}
}

func TestAPILimits(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	cards := makeCards(t, is, p, 1, 2, 3)
	path := batchOf(t, is, p, cards...)
	e := newAPIEnv(t, is, 600) // smaller than the batch
	ct, body := multipartBatch(t, path)
	for _, tc := range []struct {
		name, method, path, ctype string
		body                      []byte
		want                      int
		error                     string
	}{
		{"batch over the limit", "POST", "/v1/batches", ct, body, 413, "batch too large"},
		{"not multipart", "POST", "/v1/batches", "application/json", []byte(`{}`), 400, "want multipart/form-data"},
		{"JSON body over the limit", "POST", "/v1/cards/B101/block", "application/json",
			[]byte(`{"reason":"` + strings.Repeat("x", 20<<10) + `"}`), 413, "request body too large"},
		{"unknown field", "POST", "/v1/cards/B101/block", "application/json", []byte(`{"why":"x"}`), 400, "bad JSON body"},
		{"bad card Id", "GET", "/v1/cards/zz", "", nil, 400, "bad card Id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			role := RoleAdmin
			if tc.path == "/v1/batches" {
				role = RolePerso
			}
			code, b := e.do(t, nil, role, tc.method, tc.path, tc.ctype, bytes.NewReader(tc.body))
			var ae apiError
			json.Unmarshal(b, &ae)
			if code != tc.want || ae.Error != tc.error {
				t.Errorf("%d %s, want %d %q", code, b, tc.want, tc.error)
			}
		})
	}
	if v := metric(t, e, "blindperso_issuer_imported_cards_total"); v != 0 {
		t.Errorf("imported %v after refused uploads", v)
	}
}

func TestParseTokens(t *testing.T) {
	h := HashToken("tok\n")
	if h != HashToken("tok") || len(h) != 64 {
		t.Fatal("HashToken")
	}
	for _, tc := range []struct {
		in string
		ok bool
	}{
		{"admin " + h, true},
		{"# c\n\nperso " + h + "\n", true},
		{"root " + h, false},
		{"admin tok", false},
		{"admin", false},
	} {
		if _, err := ParseTokens(strings.NewReader(tc.in)); (err == nil) != tc.ok {
			t.Errorf("%q: %v", tc.in, err)
		}
	}
}
