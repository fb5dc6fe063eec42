package server

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

	"blindperso/api"
	"blindperso/batch"
	"blindperso/card/cardtest"
	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/internal/pgtest"
	"blindperso/issuer"
	"blindperso/issuer/issuertest"
	"blindperso/protocol"
)

func TestMain(m *testing.M) {
	code := m.Run()
	pgtest.Stop()
	hsmtest.Cleanup()
	os.Exit(code)
}

func newIssuer(t *testing.T, kind string) *issuer.Issuer { return issuertest.New(t, kind, 4) }

func fingerprint(is *issuer.Issuer) []byte {
	fp := is.Key.Fingerprint()
	return fp[:]
}

func makeCards(t *testing.T, is *issuer.Issuer, p protocol.Profile, ids ...byte) []cardtest.Card {
	return cardtest.Cards(t, p, is.Key.Public.SPKI, ids...)
}

func batchOf(t *testing.T, is *issuer.Issuer, p protocol.Profile, cards ...cardtest.Card) string {
	return cardtest.BatchOf(t, p, fingerprint(is), cards...)
}

func writeBatch(t *testing.T, is *issuer.Issuer, p protocol.Profile, content string) string {
	return cardtest.WriteBatch(t, p, fingerprint(is), content)
}

func openStore(t *testing.T, db string) issuer.Store {
	t.Helper()
	s, err := issuer.Open(context.Background(), db)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// storeKinds are the stores the API is tested on: SQLite, and
// PostgreSQL in pgtest's cluster.
var storeKinds = []struct {
	name string
	open func(t *testing.T) string
}{
	{"sqlite", func(t *testing.T) string { return filepath.Join(t.TempDir(), "data") }},
	{"postgres", func(t *testing.T) string { return pgtest.NewDatabase(t) }},
}

type apiEnv struct {
	srv    *httptest.Server
	api    *Handler
	is     *issuer.Issuer
	st     issuer.Store
	tokens map[string]string // role → bearer token
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
}

// newAPIEnv serves the API over TLS (httptest) on the store db (a
// storeKind's DSN or directory), with a bearer token for every role and a
// client CA for mTLS.
func newAPIEnv(t *testing.T, is *issuer.Issuer, db string, maxBatch int64, opts ...func(*Config)) *apiEnv {
	t.Helper()
	dir := t.TempDir()
	st := openStore(t, db)
	e := &apiEnv{is: is, st: st, tokens: map[string]string{}}
	var tf strings.Builder
	for _, r := range api.Roles {
		tok := "secret-" + r
		e.tokens[r] = tok
		fmt.Fprintf(&tf, "%s %s\n", r, HashToken(tok))
	}
	entries, err := ParseTokens(strings.NewReader("# test\n" + tf.String()))
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Issuer: is, Store: st, UploadDir: filepath.Join(dir, "uploads"), Tokens: entries, MaxBatchBytes: maxBatch}
	for _, o := range opts {
		o(&cfg)
	}
	h, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.api = h
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
	e.srv = httptest.NewUnstartedServer(h)
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
	if resp.StatusCode != http.StatusOK {
		var ae api.Error
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" || json.Unmarshal(b, &ae) != nil || ae.Title == "" {
			t.Errorf("%s %s: %d: error body is not a JSON error (%s): %q", method, path, resp.StatusCode, ct, b)
		}
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
	for _, p := range []struct{ name, file string }{{"manifest", batch.ManifestPath(path)}, {"batch", path}} {
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
	code, b := e.do(t, nil, api.RoleMetrics, "GET", "/metrics", "", nil)
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

// forStores runs f on a fresh store of each kind (SQLite, and PostgreSQL
// in the test cluster of pg_test.go).
func forStores(t *testing.T, f func(t *testing.T, db string)) {
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			f(t, k.open(t))
		})
	}
}

// upload posts the batch at path as perso and decodes the report.
func (e *apiEnv) upload(t *testing.T, path string) (int, api.BatchDetail, []byte) {
	t.Helper()
	ctype, body := multipartBatch(t, path)
	var rep api.BatchDetail
	code, b := e.do(t, nil, api.RolePerso, "POST", "/v1/batches", ctype, bytes.NewReader(body))
	if code == 200 {
		if err := json.Unmarshal(b, &rep); err != nil {
			t.Fatalf("upload report: %v: %s", err, b)
		}
	}
	return code, rep, b
}

// The API end to end on both stores: upload and report (imported, again
// as duplicates, a bad line rejected with its line while the others land,
// a conflict, a refused batch), challenge and verify (every failure the
// same answer), block and unblock, mTLS roles, metrics.
func TestAPI(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	cards := makeCards(t, is, p, 1, 2)
	path := batchOf(t, is, p, cards...)
	// Line 1: a second c for card B102 (conflict); line 2: not a record;
	// line 3: a new card B103.
	more := makeCards(t, is, p, 2, 3)
	mixed := writeBatch(t, is, p, cardtest.Line(t, more[0].Rec)+"{not a record\n"+cardtest.Line(t, more[1].Rec))
	// A batch whose file no longer matches its manifest.
	changed := batchOf(t, is, p, makeCards(t, is, p, 4)...)
	if err := os.WriteFile(changed, []byte("{}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	forStores(t, func(t *testing.T, db string) {
		e := newAPIEnv(t, is, db, 1<<20)
		code, rep, b := e.upload(t, path)
		if code != 200 {
			t.Fatalf("upload: %d %s", code, b)
		}
		if rep.Records != 2 || rep.Imported != 2 || rep.Rejects != 0 || rep.Conflicts != 0 || rep.Status != "done" ||
			len(rep.RejectList) != 0 || len(rep.ConflictList) != 0 {
			t.Fatalf("report %+v", rep)
		}
		if got := e.json(t, api.RolePerso, "GET", "/v1/batches/"+rep.ID, nil, &rep); got != 200 || rep.Imported != 2 {
			t.Fatalf("GET batch: %d %+v", got, rep)
		}
		// The same batch again changes nothing: the report is recomputed
		// from the store (the cards whose first record is in this batch),
		// so it is the first one.
		if code, rep2, b := e.upload(t, path); code != 200 || rep2.ID != rep.ID || rep2.Imported != 2 || rep2.Duplicates != 0 || rep2.Conflicts != 0 {
			t.Fatalf("second upload: %d %+v %s", code, rep2, b)
		}
		code, rep, b = e.upload(t, mixed)
		if code != 200 {
			t.Fatalf("mixed upload: %d %s", code, b)
		}
		if rep.Records != 3 || rep.Imported != 1 || rep.Conflicts != 1 || rep.Rejects != 1 ||
			len(rep.RejectList) != 1 || rep.RejectList[0].Line != 2 || rep.RejectList[0].Reason == "" ||
			len(rep.ConflictList) != 1 || rep.ConflictList[0].Line != 1 || !bytes.Equal(rep.ConflictList[0].CardID, cards[1].Rec.ID) {
			t.Fatalf("mixed report %+v", rep)
		}
		var sc api.Card
		if code := e.json(t, api.RoleAdmin, "GET", "/v1/cards/"+hex.EncodeToString(more[1].Rec.ID), nil, &api.CardDetail{}); code != 200 {
			t.Fatalf("card of line 3 after the bad line 2: %d", code)
		}
		var cd api.CardDetail
		if code := e.json(t, api.RoleAdmin, "GET", "/v1/cards/"+hex.EncodeToString(cards[1].Rec.ID), nil, &cd); code != 200 || cd.Card.State != api.StateConflict || cd.Card.Blob.KEK == "" {
			t.Fatalf("card in conflict: %d %+v", code, cd)
		}
		if _, b := e.do(t, nil, api.RoleAdmin, "GET", "/v1/cards/"+hex.EncodeToString(cards[1].Rec.ID), "", nil); bytes.Contains(b, []byte("wrapped")) {
			t.Fatalf("the API serves the wrapped key: %s", b)
		}
		if code := e.json(t, api.RoleVerifier, "POST", "/v1/cards/"+hex.EncodeToString(cards[1].Rec.ID)+"/challenge", nil, nil); code != http.StatusConflict {
			t.Fatalf("challenge for a card in conflict: %d", code)
		}
		code, _, b = e.upload(t, changed)
		var ae api.Error
		json.Unmarshal(b, &ae)
		if code != http.StatusUnprocessableEntity || ae.Title != "batch refused" || ae.Detail == "" {
			t.Fatalf("changed batch: %d %s", code, b)
		}
		for name, want := range map[string]float64{
			"blindperso_issuer_imported_cards_total":                  5, // 2 + 2 (counted again) + 1
			"blindperso_issuer_rejected_records_total":                1,
			"blindperso_issuer_conflicts_total":                       1,
			`blindperso_issuer_batch_imports_total{status="done"}`:    3,
			`blindperso_issuer_batch_imports_total{status="refused"}`: 1,
			`blindperso_issuer_token_op_seconds_count{op="import"}`:   3,
			`blindperso_issuer_verifications_total{result="ok"}`:      0,
			`blindperso_issuer_batch_imports_total{status="error"}`:   0,
		} {
			if v := metric(t, e, name); v != want {
				t.Errorf("%s = %v, want %v", name, v, want)
			}
		}

		id := hex.EncodeToString(cards[0].Rec.ID)
		challenge := func() []byte {
			var ch struct{ Challenge string }
			if code := e.json(t, api.RoleVerifier, "POST", "/v1/cards/"+id+"/challenge", nil, &ch); code != 200 {
				t.Fatalf("challenge: %d", code)
			}
			c, _ := hex.DecodeString(ch.Challenge)
			return c
		}
		verify := func(ch, mac []byte) api.VerifyResult {
			var v api.VerifyResult
			if code := e.json(t, api.RoleVerifier, "POST", "/v1/cards/"+id+"/verify",
				map[string]string{"challenge": hex.EncodeToString(ch), "mac": hex.EncodeToString(mac)}, &v); code != 200 {
				t.Fatalf("verify: %d", code)
			}
			return v
		}
		ch := challenge()
		if v := verify(ch, cardtest.Authenticate(t, cards[0].A, ch)); v.Result != api.ResultOK || v.FailedAuth != 0 {
			t.Fatalf("genuine: %+v", v)
		}
		// Every kind of failure answers the same shape.
		ch2 := challenge()
		badMAC := cardtest.Authenticate(t, cards[0].A, ch2)
		badMAC[0] ^= 1
		if v := verify(ch2, badMAC); v != (api.VerifyResult{Result: api.ResultFailed, FailedAuth: 1}) {
			t.Fatalf("bad MAC: %+v", v)
		}
		if v := verify(ch, cardtest.Authenticate(t, cards[0].A, ch)); v != (api.VerifyResult{Result: api.ResultFailed, FailedAuth: 1}) {
			t.Fatalf("reused challenge: %+v", v)
		}
		unknown := make([]byte, 16)
		if v := verify(unknown, cardtest.Authenticate(t, cards[0].A, unknown)); v != (api.VerifyResult{Result: api.ResultFailed, FailedAuth: 1}) {
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
		if v := metric(t, e, `blindperso_issuer_verify_seconds_count`); v != 4 {
			t.Errorf("whole-verification latency count %v, want 4 (1 ok, 3 failed)", v)
		}
		if v := metric(t, e, `blindperso_issuer_token_recycle_failures_total`); v != 0 {
			t.Errorf("recycle failures %v", v)
		}
		if v := metric(t, e, `blindperso_issuer_store_retries_total`); v != 0 {
			t.Errorf("store retries %v", v)
		}
		// Malformed verifications are 400s that say what is wrong.
		for _, body := range []string{`{"challenge":"00","mac":"00"}`, `{"challenge":"zz"}`, `not json`, `{"challenge":"` + hex.EncodeToString(ch) + `","mac":"` + hex.EncodeToString(ch) + `","x":1}`} {
			code, b := e.do(t, nil, api.RoleVerifier, "POST", "/v1/cards/"+id+"/verify", "application/json", strings.NewReader(body))
			if code != http.StatusBadRequest {
				t.Errorf("verify %s: %d %s", body, code, b)
			}
		}

		// Admin: block, challenge and verify refused, unblock.
		ch3 := challenge()
		if code := e.json(t, api.RoleAdmin, "POST", "/v1/cards/"+id+"/block", map[string]string{"reason": "lost"}, &sc); code != 200 || sc.State != api.StateBlocked || sc.StateReason != "admin: lost" {
			t.Fatalf("block: %d %+v", code, sc)
		}
		if code := e.json(t, api.RoleVerifier, "POST", "/v1/cards/"+id+"/challenge", nil, nil); code != http.StatusConflict {
			t.Fatalf("challenge for a blocked card: %d", code)
		}
		if v := verify(ch3, cardtest.Authenticate(t, cards[0].A, ch3)); v.Result != api.ResultRefused {
			t.Fatalf("verify a blocked card: %+v", v)
		}
		var blocked []api.Card
		if code := e.json(t, api.RoleAdmin, "GET", "/v1/cards?state=blocked", nil, &blocked); code != 200 || len(blocked) != 1 || !bytes.Equal(blocked[0].ID, cards[0].Rec.ID) {
			t.Fatalf("blocked cards: %d %+v", code, blocked)
		}
		if code := e.json(t, api.RoleAdmin, "POST", "/v1/cards/"+id+"/unblock", nil, &sc); code != 200 || sc.State != api.StateActive || sc.FailedAuth != 0 {
			t.Fatalf("unblock: %d %+v", code, sc)
		}
		if code := e.json(t, api.RoleAdmin, "GET", "/v1/cards/"+id, nil, &cd); code != 200 || len(cd.Log) == 0 || cd.Log[0].Result != issuer.LogAdminUnblock {
			t.Fatalf("card log: %d %+v", code, cd)
		}
		if code := e.json(t, api.RoleAdmin, "POST", "/v1/cards/"+id+"/unblock", nil, nil); code != http.StatusConflict {
			t.Fatalf("unblock an active card: %d", code)
		}
		for _, u := range []string{"/v1/cards/B1FF", "/v1/cards/B1FF/block"} {
			method, in := "GET", any(nil)
			if strings.HasSuffix(u, "block") {
				method, in = "POST", map[string]string{"reason": "x"}
			}
			if code := e.json(t, api.RoleAdmin, method, u, in, nil); code != http.StatusNotFound {
				t.Fatalf("%s unknown card: %d", u, code)
			}
		}
		if code := e.json(t, api.RoleAdmin, "GET", "/v1/batches/"+strings.Repeat("0", 64), nil, nil); code != http.StatusNotFound {
			t.Fatalf("unknown batch: %d", code)
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
	})
}

// A certificate from a CA the server does not trust gets nothing: a
// client that sends it anyway fails the handshake, and Go's client, which
// sends only a certificate of a CA the server names, arrives without one.
func TestAPIUntrustedClientCert(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	e := newAPIEnv(t, is, filepath.Join(t.TempDir(), "data"), 1<<20)
	other := &apiEnv{}
	other.caKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "other CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &other.caKey.PublicKey, other.caKey)
	other.ca, _ = x509.ParseCertificate(der)
	cert := other.clientCert(t, "intruder", api.RoleAdmin)

	c := e.certClient(cert)
	tr := c.Transport.(*http.Transport)
	tr.TLSClientConfig.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	if resp, err := c.Get(e.srv.URL + "/v1/cards"); err == nil {
		resp.Body.Close()
		t.Fatalf("a certificate of another CA, sent anyway: %s", resp.Status)
	}
	if code, b := e.do(t, e.certClient(cert), "", "GET", "/v1/cards", "", nil); code != http.StatusUnauthorized {
		t.Fatalf("a certificate of another CA: %d %s", code, b)
	}
}

// callers are the ways a request can present itself in the matrix: no
// credentials, an unknown token, a client certificate without a role, and
// each role by bearer token and by client certificate.
type caller struct {
	name string
	role string // "" none, "wrong" an unknown token
	cert []string
}

func TestAPIAuthorizationMatrix(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	cards := makeCards(t, is, p, 1)
	path := batchOf(t, is, p, cards...)
	forStores(t, func(t *testing.T, db string) {
		e := newAPIEnv(t, is, db, 1<<20)
		if _, err := (&issuer.Importer{Issuer: is, Store: e.st, Workers: 2}).ImportFile(context.Background(), path); err != nil {
			t.Fatal(err)
		}
		bs, _ := e.st.Batches(context.Background())
		id := hex.EncodeToString(cards[0].Rec.ID)
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
			ch, err := (&issuer.Authenticator{Store: e.st}).Challenge(context.Background(), cards[0].Rec.ID)
			if err != nil {
				t.Fatal(err)
			}
			return js(fmt.Sprintf(`{"challenge":"%x","mac":"%x"}`, []byte(ch.Challenge), cardtest.Authenticate(t, cards[0].A, ch.Challenge)))()
		}
		unblockBody := func() (string, io.Reader) { // block it first
			if _, err := e.st.BlockCard(context.Background(), cards[0].Rec.ID, "matrix", time.Now()); err != nil {
				t.Fatal(err)
			}
			return "", nil
		}
		eps := []ep{
			{"GET", "/healthz", nil, nil}, // everyone
			{"GET", "/metrics", nil, []string{api.RoleAdmin, api.RoleMetrics}},
			{"POST", "/v1/batches", upload, []string{api.RolePerso}},
			{"GET", "/v1/batches/" + batch, nil, []string{api.RolePerso, api.RoleAdmin}},
			{"GET", "/v1/batches", nil, []string{api.RoleAdmin}},
			{"POST", "/v1/cards/" + id + "/challenge", nil, []string{api.RoleVerifier}},
			{"POST", "/v1/cards/" + id + "/verify", verifyBody, []string{api.RoleVerifier}},
			{"GET", "/v1/cards", nil, []string{api.RoleAdmin}},
			{"GET", "/v1/cards/" + id, nil, []string{api.RoleAdmin}},
			{"POST", "/v1/cards/" + id + "/block", js(`{"reason":"matrix"}`), []string{api.RoleAdmin}},
			{"POST", "/v1/cards/" + id + "/unblock", unblockBody, []string{api.RoleAdmin}},
		}
		callers := []caller{{"none", "", nil}, {"wrong-token", "wrong", nil}, {"cert-without-role", "", []string{"ops"}}}
		for _, r := range api.Roles {
			callers = append(callers, caller{"token-" + r, r, nil}, caller{"cert-" + r, "", []string{r}})
		}
		clients := map[string]*http.Client{}
		for _, c := range callers {
			if c.cert != nil {
				clients[c.name] = e.certClient(e.clientCert(t, c.name, c.cert...))
			}
		}
		for _, x := range eps {
			for _, who := range callers {
				role := who.role
				if who.cert != nil {
					role = who.cert[0]
				}
				want := http.StatusForbidden
				if who.name == "none" || who.name == "wrong-token" {
					want = http.StatusUnauthorized
				}
				for _, r := range x.roles {
					if r == role {
						want = 200
					}
				}
				if x.roles == nil {
					want = 200
				}
				t.Run(x.method+x.path+"/"+who.name, func(t *testing.T) {
					var ct string
					var body io.Reader
					if x.body != nil && want == 200 {
						ct, body = x.body()
					}
					code, b := e.do(t, clients[who.name], who.role, x.method, x.path, ct, body)
					if code != want {
						t.Errorf("%s %s as %s: %d, want %d: %s", x.method, x.path, who.name, code, want, b)
					}
				})
			}
		}
	})
}

func TestAPILimits(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	cards := makeCards(t, is, p, 1, 2, 3)
	path := batchOf(t, is, p, cards...)
	ct, body := multipartBatch(t, path)
	forStores(t, func(t *testing.T, db string) {
		e := newAPIEnv(t, is, db, 600) // smaller than the batch
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
			{"no reason", "POST", "/v1/cards/B101/block", "application/json", []byte(`{"reason":" "}`), 400, "a reason is required"},
			{"bad card Id", "GET", "/v1/cards/zz", "", nil, 400, "bad card Id"},
			{"card Id too long", "GET", "/v1/cards/" + strings.Repeat("ab", 17), "", nil, 400, "bad card Id"},
			{"bad batch id", "GET", "/v1/batches/abc", "", nil, 400, "bad batch id"},
			{"bad state", "GET", "/v1/cards?state=lost", "", nil, 400, "bad state"},
			{"unknown endpoint", "GET", "/v1/keys", "", nil, 404, "no such endpoint"},
			{"wrong method", "DELETE", "/v1/cards/B101", "", nil, 405, "method not allowed"},
			{"wrong method on a collection", "PUT", "/v1/batches", "", nil, 405, "method not allowed"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				role := api.RoleAdmin
				if tc.path == "/v1/batches" && tc.method == "POST" {
					role = api.RolePerso
				}
				code, b := e.do(t, nil, role, tc.method, tc.path, tc.ctype, bytes.NewReader(tc.body))
				var ae api.Error
				json.Unmarshal(b, &ae)
				if code != tc.want || ae.Title != tc.error || ae.Detail == "" {
					t.Errorf("%d %s, want %d %q with a detail", code, b, tc.want, tc.error)
				}
			})
		}
		if v := metric(t, e, "blindperso_issuer_imported_cards_total"); v != 0 {
			t.Errorf("imported %v after refused uploads", v)
		}
	})
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
