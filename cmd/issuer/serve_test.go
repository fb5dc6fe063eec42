package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"blindperso/api"
	"blindperso/batch"
	"blindperso/hsm/hsmtest"
	"blindperso/issuer"
)

// runCmd runs the issuer command in process with args and stdin.
func runCmd(t *testing.T, stdin string, args ...string) (string, error) {
	t.Helper()
	c := root()
	var out, errb bytes.Buffer
	c.SetArgs(args)
	c.SetIn(strings.NewReader(stdin))
	c.SetOut(&out)
	c.SetErr(&errb)
	err := c.ExecuteContext(context.Background())
	if err != nil {
		err = fmt.Errorf("issuer %s: %w\n%s", strings.Join(args, " "), err, errb.String())
	}
	return out.String(), err
}

// syncBuffer is the server's log, written by the server, read by the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// issuer serve as an operator starts it: keys made with issuer keygen and
// issuer kek, tokens hashed with issuer serve token-hash, a batch
// imported with issuer import before; then over HTTPS: health, an upload,
// a challenge answered by the card and verified, metrics; at start the
// expired challenges are purged; SIGINT-like cancellation stops it.
func TestServe(t *testing.T) {
	tok := hsmtest.SoftHSM(t)
	dir := t.TempDir()
	file := func(name string) string { return filepath.Join(dir, name) }
	must := func(_ string, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(file("so.pin"), []byte(tok.SOPIN), 0o600); err != nil {
		t.Fatal(err)
	}
	must(runCmd(t, "", "keygen", "--token", tok.URI, "--kind", "p256", "--label", "issuer", "--out", file("issuer.pub.pem")))
	must(runCmd(t, "", "kek", "--token", tok.URI, "--label", "kek", "--so-pin-file", file("so.pin")))
	pub, err := os.ReadFile(file("issuer.pub.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stationBatch(pub, file("one.ndjson"), []string{"B101"}); err != nil {
		t.Fatal(err)
	}
	if _, err := stationBatch(pub, file("two.ndjson"), []string{"B102", "bad", "B103"}); err != nil {
		t.Fatal(err)
	}
	db := file("data")
	keyFlags := []string{"--token", tok.URI, "--key", "issuer", "--kek", "kek", "--db", db}
	must(runCmd(t, "", append([]string{"import", "--batch", file("one.ndjson")}, keyFlags...)...))

	// A challenge that expired two days ago, left by an earlier run.
	st, err := issuer.Open(context.Background(), db)
	if err != nil {
		t.Fatal(err)
	}
	past := time.Now().Add(-48 * time.Hour)
	if err := st.PutChallenge(context.Background(), issuer.Challenge{Challenge: make([]byte, 16), CardID: []byte{0xB1, 0x01},
		Created: past, Expires: past.Add(time.Minute)}); err != nil {
		t.Fatal(err)
	}
	st.Close()

	var tokens strings.Builder
	secret := map[string]string{}
	for _, role := range []string{"perso", "verifier", "metrics"} {
		secret[role] = "token-of-" + role
		line, err := runCmd(t, secret[role]+"\n", "serve", "token-hash", "--role", role)
		if err != nil {
			t.Fatal(err)
		}
		tokens.WriteString(line)
	}
	if err := os.WriteFile(file("tokens"), []byte(tokens.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := selfSigned("localhost")
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(file("server.pem"), certPEM, 0o644)
	os.WriteFile(file("server.key"), keyPEM, 0o600)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	logw := &syncBuffer{}
	pr, pw := io.Pipe()
	addrc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			logw.Write(append(sc.Bytes(), '\n'))
			if m := regexp.MustCompile(`msg=serving addr=(\S+)`).FindStringSubmatch(sc.Text()); m != nil {
				addrc <- m[1]
			}
		}
	}()
	done := make(chan error, 1)
	go func() {
		c := root()
		c.SetArgs(append([]string{"serve", "--addr", "127.0.0.1:0", "--tls-cert", file("server.pem"), "--tls-key", file("server.key"),
			"--tokens", file("tokens")}, keyFlags...))
		c.SetOut(io.Discard)
		c.SetErr(pw)
		done <- c.ExecuteContext(ctx)
		pw.Close()
	}()
	var base string
	select {
	case a := <-addrc:
		base = "https://" + a
	case err := <-done:
		t.Fatalf("serve stopped: %v\n%s", err, logw.String())
	}
	if !strings.Contains(logw.String(), "msg=\"purged expired challenges\" count=1") {
		t.Errorf("the expired challenge was not purged at start:\n%s", logw.String())
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(certPEM)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	call := func(role, method, path, ctype string, body io.Reader, out any) int {
		t.Helper()
		req, _ := http.NewRequest(method, base+path, body)
		if ctype != "" {
			req.Header.Set("Content-Type", ctype)
		}
		if role != "" {
			req.Header.Set("Authorization", "Bearer "+secret[role])
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if out != nil {
			if err := json.Unmarshal(b, out); err != nil {
				t.Fatalf("%s %s: %d %v: %s", method, path, resp.StatusCode, err, b)
			}
		}
		return resp.StatusCode
	}
	if code := call("", "GET", "/healthz", "", nil, nil); code != 200 {
		t.Fatalf("healthz: %d", code)
	}
	if code := call("", "GET", "/v1/cards", "", nil, nil); code != 401 {
		t.Fatalf("no credentials: %d", code)
	}

	// Upload: the bad line is rejected with its number, the others land.
	var mp bytes.Buffer
	mw := multipart.NewWriter(&mp)
	for _, p := range []struct{ part, path string }{{"manifest", batch.ManifestPath(file("two.ndjson"))}, {"batch", file("two.ndjson")}} {
		b, _ := os.ReadFile(p.path)
		w, _ := mw.CreateFormFile(p.part, filepath.Base(p.path))
		w.Write(b)
	}
	mw.Close()
	var rep api.BatchDetail
	if code := call("perso", "POST", "/v1/batches", mw.FormDataContentType(), &mp, &rep); code != 200 ||
		rep.Imported != 2 || rep.Rejects != 1 || len(rep.RejectList) != 1 || rep.RejectList[0].Line != 2 {
		t.Fatalf("upload: %d %+v", code, rep)
	}

	// A card authenticates through the API.
	var ch struct{ Challenge string }
	if code := call("verifier", "POST", "/v1/cards/b103/challenge", "", nil, &ch); code != 200 {
		t.Fatalf("challenge: %d", code)
	}
	chb, _ := hex.DecodeString(ch.Challenge)
	mac, err := cardAnswer(file("card-B103.json"), chb)
	if err != nil {
		t.Fatal(err)
	}
	var v api.VerifyResult
	body := fmt.Sprintf(`{"challenge":%q,"mac":"%x"}`, ch.Challenge, mac)
	if code := call("verifier", "POST", "/v1/cards/b103/verify", "application/json", strings.NewReader(body), &v); code != 200 || v.Result != "ok" {
		t.Fatalf("verify: %d %+v", code, v)
	}
	req, _ := http.NewRequest("GET", base+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+secret["metrics"])
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	m, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`blindperso_issuer_verifications_total{result="ok"} 1`, "blindperso_issuer_rejected_records_total 1",
		"blindperso_issuer_imported_cards_total 2"} {
		if !bytes.Contains(m, []byte(want)) {
			t.Errorf("metrics lack %q", want)
		}
	}

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("serve: %v\n%s", err, logw.String())
	}
	// The server's log names the role of each request, never a token.
	for _, s := range secret {
		if strings.Contains(logw.String(), s) {
			t.Errorf("the log holds a bearer token")
		}
	}
	if !strings.Contains(logw.String(), "role=verifier via=token") {
		t.Errorf("log:\n%s", logw.String())
	}
}
