package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/issuer"
	"blindperso/issuer/issuertest"
	"blindperso/issuer/server"
	"blindperso/perso"
	"blindperso/protocol"
)

// pki is a test CA and what it signs.
type pki struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newCA(t *testing.T, cn string) pki {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	must(t, err)
	c, err := x509.ParseCertificate(der)
	must(t, err)
	return pki{c, k}
}

// issue writes a certificate signed by the CA (and its key) as PEM files
// dir/name.pem and dir/name.key; a server certificate for 127.0.0.1, or a
// client certificate with the subject OUs.
func (ca pki) issue(t *testing.T, dir, name string, server bool, ous ...string) (certFile, keyFile string) {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:   pkix.Name{CommonName: name, OrganizationalUnit: ous},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &k.PublicKey, ca.key)
	must(t, err)
	kder, err := x509.MarshalPKCS8PrivateKey(k)
	must(t, err)
	certFile, keyFile = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	must(t, os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644))
	must(t, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600))
	return certFile, keyFile
}

func (ca pki) write(t *testing.T, path string) string {
	must(t, os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw}), 0o644))
	return path
}

// stationBatch personalizes virtual cards with the given Ids under spki
// through the station's own journal and seals it, as perso run does.
func stationBatch(t *testing.T, path string, spki []byte, ids ...byte) {
	t.Helper()
	key, err := protocol.ParseIssuerKey(spki)
	must(t, err)
	p := protocol.ECDHP256AES
	job, err := perso.NewJob(p, key, nil)
	must(t, err)
	fp := key.Fingerprint()
	j, err := perso.OpenJournal(path, p.Name, fp[:], nil)
	must(t, err)
	for _, id := range ids {
		a, err := card.Manufacture(filepath.Join(filepath.Dir(path), filepath.Base(path)+"-card-"+string(rune('a'+id))+".json"),
			card.Options{ID: []byte{0xB1, id}})
		must(t, err)
		_, _, err = job.Personalize(&card.Client{T: a.Local()}, "test", j)
		must(t, err)
	}
	_, err = perso.WriteManifest(j, "upload-test")
	must(t, err)
	must(t, j.Close())
}

// insertLine puts line into the batch before line n (1-based) and writes
// a manifest that matches the result, as a station whose disk mangled
// one record would have sealed it.
func insertLine(t *testing.T, path string, n int, line string) {
	t.Helper()
	b, err := os.ReadFile(path)
	must(t, err)
	lines := strings.SplitAfter(string(b), "\n")
	lines = append(lines[:n-1], append([]string{line + "\n"}, lines[n-1:]...)...)
	content := strings.Join(lines, "")
	must(t, os.WriteFile(path, []byte(content), 0o644))
	var m batch.Manifest
	mb, err := os.ReadFile(batch.ManifestPath(path))
	must(t, err)
	must(t, json.Unmarshal(mb, &m))
	sum := sha256.Sum256([]byte(content))
	m.SHA256, m.Bytes, m.Count = sum[:], int64(len(content)), strings.Count(content, "\n")
	mb, err = json.Marshal(m)
	must(t, err)
	must(t, os.WriteFile(batch.ManifestPath(path), mb, 0o644))
}

// perso upload against a real issuer API (server.New and
// server.NewHTTP, in process) on a SoftHSM2 token and a SQLite store,
// over TLS with a CA made here: bearer token and client certificate, the
// report, a re-upload, a reject with its line while the other records
// land, and the refusals a station operator can meet, each with its
// message and a non-zero exit.
func TestUpload(t *testing.T) {
	t.Cleanup(hsmtest.Cleanup)
	ctx := context.Background()
	is := issuertest.New(t, hsm.KindP256, 4)
	ikey := is.Key
	dir := t.TempDir()
	st, err := issuer.Open(ctx, filepath.Join(dir, "data"))
	must(t, err)
	t.Cleanup(func() { st.Close() })

	f := func(name string) string { return filepath.Join(dir, name) }
	secrets := map[string]string{"perso": "perso-secret-1", "verifier": "verifier-secret-1"}
	var lines strings.Builder
	for role, s := range secrets {
		lines.WriteString(role + " " + server.HashToken(s) + "\n")
		must(t, os.WriteFile(f(role+".token"), []byte(s+"\n"), 0o600))
	}
	tokens, err := server.ParseTokens(strings.NewReader(lines.String()))
	must(t, err)
	must(t, os.WriteFile(f("wrong.token"), []byte("not-a-token\n"), 0o600))

	serverCA, clientCA, otherCA := newCA(t, "issuer server CA"), newCA(t, "station CA"), newCA(t, "someone else")
	srvCert, srvKey := serverCA.issue(t, dir, "server", true)
	persoCert, persoKey := clientCA.issue(t, dir, "station-1", false, "perso")
	verifierCert, verifierKey := clientCA.issue(t, dir, "verifier-1", false, "verifier")
	tlsCfg, err := server.TLSConfig(srvCert, srvKey, clientCA.write(t, f("client-ca.pem")))
	must(t, err)
	h, err := server.New(server.Config{Issuer: is, Store: st, UploadDir: f("uploads"), Tokens: tokens})
	must(t, err)
	srv := server.NewHTTP("", h, tlsCfg, time.Minute)
	srv.ErrorLog = log.New(io.Discard, "", 0) // the refused handshakes below
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	url := "https://" + ln.Addr().String()
	ca := serverCA.write(t, f("server-ca.pem"))
	otherCAFile := otherCA.write(t, f("other-ca.pem"))

	spki := ikey.Public.SPKI
	stationBatch(t, f("good.ndjson"), spki, 1, 2, 3)
	stationBatch(t, f("mtls.ndjson"), spki, 4)
	stationBatch(t, f("mixed.ndjson"), spki, 5, 6)
	insertLine(t, f("mixed.ndjson"), 2, `{"v":2,"id":"b1ff","c":"00"`) // a torn record between the two cards
	stationBatch(t, f("changed.ndjson"), spki, 7)
	must(t, os.WriteFile(f("changed.ndjson"), []byte("{}\n"), 0o644)) // no longer the sealed file
	must(t, os.WriteFile(f("unsealed.ndjson"), nil, 0o644))

	type report struct {
		Records, Imported, Duplicates, Conflicts, Rejects int
		Status                                            string
		RejectList                                        []struct {
			Line   int
			Reason string
		} `json:"reject_list"`
	}
	for _, tc := range []struct {
		name   string
		args   []string
		ok     bool
		stdout *report // the report printed, if any
		stderr string  // in stderr, if not ""
	}{
		{"token", []string{"--batch", f("good.ndjson"), "--ca", ca, "--token-file", f("perso.token")}, true,
			&report{Records: 3, Imported: 3, Status: "done"}, ""},
		{"again is a no-op", []string{"--batch", f("good.ndjson"), "--ca", ca, "--token-file", f("perso.token")}, true,
			&report{Records: 3, Imported: 3, Status: "done"}, ""},
		{"client certificate", []string{"--batch", f("mtls.ndjson"), "--ca", ca, "--cert", persoCert, "--key", persoKey}, true,
			&report{Records: 1, Imported: 1, Status: "done"}, ""},
		{"a bad line", []string{"--batch", f("mixed.ndjson"), "--ca", ca, "--token-file", f("perso.token")}, false,
			&report{Records: 3, Imported: 2, Rejects: 1, Status: "done"},
			"mixed.ndjson line 2: rejected: "},
		{"wrong token", []string{"--batch", f("good.ndjson"), "--ca", ca, "--token-file", f("wrong.token")}, false, nil,
			"upload refused: issuer answered 401 Unauthorized: unknown bearer token (the issuer does not know this credential"},
		{"token of another role", []string{"--batch", f("good.ndjson"), "--ca", ca, "--token-file", f("verifier.token")}, false, nil,
			`upload refused: issuer answered 403 Forbidden: role "verifier" may not POST /v1/batches (needs perso) (the credential is not of the perso role)`},
		{"certificate of another role", []string{"--batch", f("good.ndjson"), "--ca", ca, "--cert", verifierCert, "--key", verifierKey}, false, nil,
			`role "verifier" may not POST /v1/batches`},
		{"wrong CA", []string{"--batch", f("good.ndjson"), "--ca", otherCAFile, "--token-file", f("perso.token")}, false, nil,
			"TLS: the issuer's certificate is not trusted by the CA file " + otherCAFile + ": "},
		{"no CA", []string{"--batch", f("good.ndjson"), "--token-file", f("perso.token")}, false, nil,
			"TLS: the issuer's certificate is not trusted by the system's roots (give a CA file): "},
		{"batch changed after sealing", []string{"--batch", f("changed.ndjson"), "--ca", ca, "--token-file", f("perso.token")}, false, nil,
			"upload refused: issuer answered 422 Unprocessable Entity: batch refused: "},
		{"not sealed", []string{"--batch", f("unsealed.ndjson"), "--ca", ca, "--token-file", f("perso.token")}, false, nil,
			"(seal the batch first: perso seal)"},
		{"plain http", []string{"--url", "http://" + ln.Addr().String(), "--batch", f("good.ndjson"), "--token-file", f("perso.token")}, false, nil,
			"the issuer URL must be https://"},
		{"token and certificate", []string{"--batch", f("good.ndjson"), "--ca", ca, "--token-file", f("perso.token"), "--cert", persoCert, "--key", persoKey}, false, nil,
			"give either a token file or both a client certificate and its key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"upload", "--url", url}, tc.args...)
			if tc.name == "plain http" {
				args = append([]string{"upload"}, tc.args...)
			}
			cmd := exec.Command("perso", args...)
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			t.Logf("perso %s\nstderr: %s", strings.Join(args, " "), stderr.String())
			var ee *exec.ExitError
			switch {
			case tc.ok && err != nil, !tc.ok && !errors.As(err, &ee):
				t.Fatalf("perso upload: %v, want ok %v\nstdout: %s\nstderr: %s", err, tc.ok, stdout.String(), stderr.String())
			}
			if tc.stderr != "" && !strings.Contains(stderr.String(), tc.stderr) {
				t.Errorf("stderr %q lacks %q", stderr.String(), tc.stderr)
			}
			if tc.stdout == nil {
				if stdout.Len() != 0 {
					t.Errorf("stdout %q, want nothing", stdout.String())
				}
				return
			}
			var got report
			if err := json.Unmarshal(stdout.Bytes(), &got); err != nil {
				t.Fatalf("report: %v: %s", err, stdout.String())
			}
			wantRejects := got.RejectList
			got.RejectList = nil
			if !reflect.DeepEqual(got, *tc.stdout) {
				t.Errorf("report %+v, want %+v", got, *tc.stdout)
			}
			if tc.stdout.Rejects > 0 && (len(wantRejects) != 1 || wantRejects[0].Line != 2 || wantRejects[0].Reason == "") {
				t.Errorf("reject list %+v, want line 2", wantRejects)
			}
		})
	}

	// The records landed: every card of every uploaded batch but the
	// torn line, active, with its line in its batch.
	for id, line := range map[byte]int{1: 1, 2: 2, 3: 3, 4: 1, 5: 1, 6: 3} {
		c, err := st.Card(ctx, []byte{0xB1, id})
		if err != nil || c.State != issuer.StateActive || c.Line != line {
			t.Errorf("card B1%02X: %+v, %v; want active from line %d", id, c, err, line)
		}
	}
	if _, err := st.Card(ctx, []byte{0xB1, 7}); err == nil {
		t.Error("a card of the changed batch was imported")
	}
}
