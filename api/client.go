package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"blindperso/batch"
	"blindperso/protocol"
)

// Config says where the issuer is and how to prove who we are. The
// credential is a bearer token (TokenFile: the file holds only the token)
// or a client certificate whose subject OU is the role (CertFile,
// KeyFile), never both.
type Config struct {
	URL       string        // https://host:port
	CAFile    string        // PEM roots for the issuer's certificate; "" for the system's
	TokenFile string        // a bearer token
	CertFile  string        // a client certificate (PEM)
	KeyFile   string        // its private key (PEM)
	Timeout   time.Duration // of each call, an upload's import included; 0 means 30 s
}

// Client is a client of the issuer's API.
type Client struct {
	url    string
	hc     *http.Client
	token  string
	caFile string
}

// NewClient checks cfg and loads the roots and the credential.
func NewClient(cfg Config) (*Client, error) {
	if !strings.HasPrefix(cfg.URL, "https://") {
		return nil, errors.New("the issuer URL must be https://: the issuer API is served only over TLS")
	}
	if (cfg.TokenFile == "") == (cfg.CertFile == "") || (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return nil, errors.New("give either a token file or both a client certificate and its key")
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.CAFile != "" {
		pool, err := LoadCertPool(cfg.CAFile)
		if err != nil {
			return nil, err
		}
		tc.RootCAs = pool
	}
	c := &Client{url: strings.TrimRight(cfg.URL, "/"), caFile: cfg.CAFile}
	if cfg.TokenFile != "" {
		b, err := os.ReadFile(cfg.TokenFile)
		if err != nil {
			return nil, err
		}
		if c.token = strings.TrimSpace(string(b)); c.token == "" {
			return nil, fmt.Errorf("%s is empty", cfg.TokenFile)
		}
	} else {
		kp, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
		if err != nil {
			return nil, err
		}
		tc.Certificates = []tls.Certificate{kp}
	}
	timeout := cfg.Timeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	// A verifier terminal or a fleet's gateway calls from many
	// goroutines: keep their connections alive (net/http keeps 2 per
	// host by default, and a TLS handshake costs more than a verification).
	c.hc = &http.Client{Timeout: timeout, Transport: &http.Transport{TLSClientConfig: tc, MaxIdleConnsPerHost: maxIdleConns}}
	return c, nil
}

// LoadCertPool reads PEM certificates into a pool.
func LoadCertPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s: no PEM certificate in it", path)
	}
	return pool, nil
}

// maxIdleConns is how many idle connections a Client keeps to the issuer.
const maxIdleConns = 64

// maxAnswer bounds every answer read (a batch report lists its rejects).
const maxAnswer = 64 << 20

// do sends a request and decodes a 200 answer's JSON into out; any other
// status is an *Error.
func (c *Client) do(ctx context.Context, method, path, ctype string, body io.Reader, out any) error {
	if body == nil {
		body = http.NoBody
	}
	req, err := http.NewRequestWithContext(ctx, method, c.url+path, body)
	if err != nil {
		return err
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return c.explainTLS(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return answerError(resp.StatusCode, b)
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s %s: the answer is not the expected JSON: %w", method, path, err)
	}
	return nil
}

// answerError is the *Error of a non-200 answer; a body that is not the
// issuer's JSON (a proxy's page) is quoted in Detail.
func answerError(status int, body []byte) *Error {
	e := &Error{Status: status}
	if json.Unmarshal(body, e) == nil && e.Title != "" {
		return e
	}
	e.Title, e.Detail = "", ""
	if b := bytes.TrimSpace(body); len(b) > 0 {
		if len(b) > 200 {
			b = append(b[:200:200], "…"...)
		}
		e.Detail = fmt.Sprintf("not an issuer answer: %q", b)
	}
	return e
}

// explainTLS says, for an error verifying the issuer's certificate, which
// roots it was checked against.
func (c *Client) explainTLS(err error) error {
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	var ci x509.CertificateInvalidError
	var cv *tls.CertificateVerificationError
	if !errors.As(err, &ua) && !errors.As(err, &he) && !errors.As(err, &ci) && !errors.As(err, &cv) {
		return err
	}
	roots := "the system's roots (give a CA file)"
	if c.caFile != "" {
		roots = "the CA file " + c.caFile
	}
	return fmt.Errorf("TLS: the issuer's certificate is not trusted by %s: %w", roots, err)
}

func (c *Client) postJSON(ctx context.Context, path string, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	return c.do(ctx, http.MethodPost, path, "application/json", bytes.NewReader(b), out)
}

func cardPath(id []byte, tail string) string {
	return "/v1/cards/" + hex.EncodeToString(id) + tail
}

// Upload sends the batch file and its manifest (batch.ManifestPath; the
// station's perso seal wrote it) as the multipart/form-data the server
// takes (parts "manifest", then "batch"), streaming the file, and
// returns the import's report. Uploading again is safe: the import is
// idempotent.
func (c *Client) Upload(ctx context.Context, batchFile string) (BatchDetail, error) {
	var rep BatchDetail
	mpath := batch.ManifestPath(batchFile)
	manifest, err := os.ReadFile(mpath)
	if err != nil {
		return rep, fmt.Errorf("%w (seal the batch first: perso seal)", err)
	}
	f, err := os.Open(batchFile)
	if err != nil {
		return rep, err
	}
	defer f.Close()
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		pw.CloseWithError(func() error {
			w, err := mw.CreateFormFile("manifest", filepath.Base(mpath))
			if err != nil {
				return err
			}
			if _, err := w.Write(manifest); err != nil {
				return err
			}
			if w, err = mw.CreateFormFile("batch", filepath.Base(batchFile)); err != nil {
				return err
			}
			if _, err := io.Copy(w, f); err != nil {
				return err
			}
			return mw.Close()
		}())
	}()
	err = c.do(ctx, http.MethodPost, "/v1/batches", mw.FormDataContentType(), pr, &rep)
	pr.Close() // the writer stops if the server answered before reading it all
	return rep, err
}

// Batch reads a batch's report by its id (the file's SHA-256, hex).
func (c *Client) Batch(ctx context.Context, id string) (BatchDetail, error) {
	var rep BatchDetail
	return rep, c.do(ctx, http.MethodGet, "/v1/batches/"+url.PathEscape(id), "", nil, &rep)
}

// Batches lists every batch, oldest first.
func (c *Client) Batches(ctx context.Context) ([]Batch, error) {
	var bs []Batch
	return bs, c.do(ctx, http.MethodGet, "/v1/batches", "", nil, &bs)
}

// Challenge asks for a fresh challenge for card id. A card that is
// blocked or in conflict is ErrConflict; an unknown one ErrNotFound.
func (c *Client) Challenge(ctx context.Context, id []byte) (Challenge, error) {
	var ch Challenge
	if err := c.do(ctx, http.MethodPost, cardPath(id, "/challenge"), "", nil, &ch); err != nil {
		return ch, fmt.Errorf("card %x: challenge: %w", id, err)
	}
	if len(ch.Challenge) != protocol.ChallengeLen {
		return ch, fmt.Errorf("card %x: the issuer sent a challenge of %d bytes, not %d", id, len(ch.Challenge), protocol.ChallengeLen)
	}
	return ch, nil
}

// Verify posts a card's MAC over challenge for verification in the
// issuer's token.
func (c *Client) Verify(ctx context.Context, id, challenge, mac []byte) (VerifyResult, error) {
	var v VerifyResult
	if err := c.postJSON(ctx, cardPath(id, "/verify"), VerifyRequest{challenge, mac}, &v); err != nil {
		return v, fmt.Errorf("card %x: verify: %w", id, err)
	}
	return v, nil
}

// Cards lists the cards in state ("" for all), ordered by Id.
func (c *Client) Cards(ctx context.Context, state string) ([]Card, error) {
	path := "/v1/cards"
	if state != "" {
		path += "?state=" + url.QueryEscape(state)
	}
	var cs []Card
	return cs, c.do(ctx, http.MethodGet, path, "", nil, &cs)
}

// Card reads a card and its last auth log entries.
func (c *Client) Card(ctx context.Context, id []byte) (CardDetail, error) {
	var d CardDetail
	return d, c.do(ctx, http.MethodGet, cardPath(id, ""), "", nil, &d)
}

// Block blocks a card from any state; reason is required.
func (c *Client) Block(ctx context.Context, id []byte, reason string) (Card, error) {
	var k Card
	return k, c.postJSON(ctx, cardPath(id, "/block"), StateChange{reason}, &k)
}

// Unblock unblocks a blocked card (ErrConflict for one that is not).
func (c *Client) Unblock(ctx context.Context, id []byte, reason string) (Card, error) {
	var k Card
	return k, c.postJSON(ctx, cardPath(id, "/unblock"), StateChange{reason}, &k)
}
