package vcard

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
	"net/http"
	"os"
	"strings"
	"time"

	"blindperso/card"
	"blindperso/protocol"
)

// IssuerClient is a verifier terminal's client of the issuer's HTTP API
// (docs/openapi.yaml): it asks for a challenge for a card and posts the
// card's answer for verification in the issuer's token.
type IssuerClient struct {
	URL   string       // https://host:port
	HTTP  *http.Client // trusts the issuer's TLS certificate
	Token string       // bearer token of the verifier role; "" with a client certificate
}

// NewIssuerClient makes a client for the API at url (https only). caFile
// (PEM) names the CA of the issuer's certificate ("" for the system's
// roots). Credentials: a bearer token of the verifier role in tokenFile,
// or a client certificate (certFile, keyFile) whose subject OU is
// "verifier".
func NewIssuerClient(url, caFile, tokenFile, certFile, keyFile string) (*IssuerClient, error) {
	if !strings.HasPrefix(url, "https://") {
		return nil, errors.New("the issuer URL must be https://: the issuer API is served only over TLS")
	}
	if (tokenFile == "") == (certFile == "") || (certFile == "") != (keyFile == "") {
		return nil, errors.New("give either a token file or both a client certificate and its key")
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		b, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("%s: no PEM certificate in it", caFile)
		}
	}
	c := &IssuerClient{URL: strings.TrimRight(url, "/")}
	if tokenFile != "" {
		b, err := os.ReadFile(tokenFile)
		if err != nil {
			return nil, err
		}
		if c.Token = strings.TrimSpace(string(b)); c.Token == "" {
			return nil, fmt.Errorf("%s is empty", tokenFile)
		}
	} else {
		kp, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{kp}
	}
	c.HTTP = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
	return c, nil
}

// ErrNotActive: the issuer gives no challenge for the card (409): it is
// blocked or in conflict.
var ErrNotActive = errors.New("card is not active at the issuer (blocked or in conflict): no challenge")

// APIError is an answer of the issuer other than 200.
type APIError struct {
	Status  int    `json:"-"`
	Message string `json:"error"`
	Detail  string `json:"detail"`
}

func (e *APIError) Error() string {
	s := fmt.Sprintf("issuer answered %d %s", e.Status, http.StatusText(e.Status))
	if e.Message != "" {
		s += ": " + e.Message
	}
	if e.Detail != "" {
		s += " (" + e.Detail + ")"
	}
	return s
}

func (c *IssuerClient) post(ctx context.Context, path string, body, out any) error {
	var rd io.Reader = http.NoBody
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.URL+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		e := &APIError{Status: resp.StatusCode}
		json.Unmarshal(b, e)
		return e
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("issuer %s: answer is not the expected JSON: %w", path, err)
	}
	return nil
}

// Challenge asks the issuer for a fresh challenge for card id
// (POST /v1/cards/{id}/challenge). A card that is blocked or in conflict
// gets ErrNotActive.
func (c *IssuerClient) Challenge(ctx context.Context, id []byte) ([]byte, error) {
	var out struct {
		Challenge string `json:"challenge"`
	}
	err := c.post(ctx, "/v1/cards/"+hex.EncodeToString(id)+"/challenge", nil, &out)
	if e := (*APIError)(nil); errors.As(err, &e) && e.Status == http.StatusConflict {
		return nil, fmt.Errorf("card %x: %w", id, ErrNotActive)
	}
	if err != nil {
		return nil, fmt.Errorf("card %x: challenge: %w", id, err)
	}
	ch, err := hex.DecodeString(out.Challenge)
	if err != nil || len(ch) != protocol.ChallengeLen {
		return nil, fmt.Errorf("card %x: issuer sent a challenge of the wrong shape: %q", id, out.Challenge)
	}
	return ch, nil
}

// VerifyResult is the issuer's verdict (docs/openapi.yaml VerifyResult).
type VerifyResult struct {
	// Result: ok; failed (wrong MAC, or a challenge the issuer does not
	// accept — it does not say which); blocked (this failure reached the
	// limit: the card is now blocked); refused (the card was already
	// blocked or in conflict).
	Result     string `json:"result"`
	FailedAuth int    `json:"failed_auth"`
}

// Verify posts a card's MAC over challenge (POST /v1/cards/{id}/verify).
func (c *IssuerClient) Verify(ctx context.Context, id, challenge, mac []byte) (VerifyResult, error) {
	var out VerifyResult
	err := c.post(ctx, "/v1/cards/"+hex.EncodeToString(id)+"/verify",
		map[string]string{"challenge": hex.EncodeToString(challenge), "mac": hex.EncodeToString(mac)}, &out)
	if err != nil {
		return out, fmt.Errorf("card %x: verify: %w", id, err)
	}
	return out, nil
}

// Result of an authentication when the issuer gave no challenge.
const ResultNotActive = "not-active"

// Authentication is one run of the paper's key-integrity check for one
// virtual card through the issuer.
type Authentication struct {
	ID         protocol.Hex `json:"id"`
	Challenge  protocol.Hex `json:"challenge,omitempty"`
	MAC        protocol.Hex `json:"mac,omitempty"`
	Result     string       `json:"result"` // VerifyResult.Result, or ResultNotActive
	FailedAuth int          `json:"failed_auth"`
}

// OK reports whether the issuer accepted the card's MAC.
func (a Authentication) OK() bool { return a.Result == "ok" }

// Authenticate plays the terminal between the virtual card in the state
// file path and the issuer: GET a challenge for the card's Id, send the
// card AUTHENTICATE (in process, docs/PROTOCOL.md §4), post its MAC. A
// card the issuer gives no challenge (blocked, in conflict) is
// ResultNotActive, not an error; errors are for everything else (no such
// card at the issuer, a card that is not locked, the network).
func Authenticate(ctx context.Context, c *IssuerClient, path string) (Authentication, error) {
	a, err := card.Open(path)
	if err != nil {
		return Authentication{}, err
	}
	out := Authentication{ID: a.ID()}
	ch, err := c.Challenge(ctx, a.ID())
	if errors.Is(err, ErrNotActive) {
		out.Result = ResultNotActive
		return out, nil
	}
	if err != nil {
		return out, err
	}
	out.Challenge = ch
	cl := &card.Client{T: a.Local()}
	if err := cl.Select(); err != nil {
		return out, fmt.Errorf("%s: %w", path, err)
	}
	if out.MAC, err = cl.Authenticate(ch); err != nil {
		return out, fmt.Errorf("%s: %w", path, err)
	}
	res, err := c.Verify(ctx, a.ID(), ch, out.MAC)
	if err != nil {
		return out, err
	}
	out.Result, out.FailedAuth = res.Result, res.FailedAuth
	return out, nil
}
