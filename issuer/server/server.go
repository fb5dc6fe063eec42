// Package server is the issuer's HTTP API (issuer serve; docs/ISSUER.md
// "HTTP API", docs/openapi.yaml): routes, authentication and roles,
// metrics, the batch upload, and the one place where the issuer's errors
// become HTTP answers. Its requests and answers are package api's types,
// which the Go client shares.
//
// Every request but /healthz is authenticated, by a bearer token (stored
// only as its SHA-256) or by a verified TLS client certificate whose
// subject OU names the role, and every endpoint checks the caller's role.
package server

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"blindperso/api"
	"blindperso/attest"
	"blindperso/issuer"
	"blindperso/protocol"
)

// Default limits of the API.
const (
	DefaultMaxBatchBytes = 256 << 20 // largest batch an upload may carry
	maxManifestBytes     = 64 << 10
	maxJSONBody          = 16 << 10 // every JSON request body
)

// Config is what the API serves.
type Config struct {
	Issuer        *issuer.Issuer
	Store         issuer.Store
	UploadDir     string // uploaded batches are spooled here, then removed
	Workers       int    // token sessions per import; 0 means 2
	MaxBatchBytes int64  // 0 means DefaultMaxBatchBytes
	Tokens        []TokenEntry
	// Attest checks uploaded records' chip attestations under the issuer
	// key's policy; nil is the policy off.
	Attest       *attest.Checker
	ChallengeTTL time.Duration
	MaxFailures  int
	// ChallengeRetention is how long an expired challenge is kept before
	// it is purged; 0 means issuer.DefaultChallengeRetention.
	ChallengeRetention time.Duration
	Logger             *slog.Logger         // nil: discard
	Registry           *prometheus.Registry // nil: a new one
}

// Handler is the issuer's HTTP handler.
type Handler struct {
	cfg     Config
	auth    *issuer.Authenticator
	m       *metrics
	log     *slog.Logger
	mux     *http.ServeMux
	methods map[string][]string // path pattern → its methods, for 405 answers
}

// New builds the handler.
func New(cfg Config) (*Handler, error) {
	if cfg.Issuer == nil || cfg.Store == nil {
		return nil, errors.New("api: an issuer and a store are needed")
	}
	if cfg.UploadDir == "" {
		return nil, errors.New("api: no upload directory")
	}
	if err := os.MkdirAll(cfg.UploadDir, 0o700); err != nil {
		return nil, err
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 2
	}
	if cfg.MaxBatchBytes <= 0 {
		cfg.MaxBatchBytes = DefaultMaxBatchBytes
	}
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	h := &Handler{cfg: cfg, m: newMetrics(cfg.Registry, cfg.Issuer, cfg.Store), log: log, mux: http.NewServeMux(), methods: map[string][]string{}}
	h.auth = &issuer.Authenticator{
		Verifier: timedVerifier{cfg.Issuer, h.m.tokenLatency.WithLabelValues("verify")},
		Store:    cfg.Store, TTL: cfg.ChallengeTTL, MaxFailures: cfg.MaxFailures, Retention: cfg.ChallengeRetention,
	}
	perso, verifier, admin := []string{api.RolePerso}, []string{api.RoleVerifier}, []string{api.RoleAdmin}
	h.mux.HandleFunc("GET /healthz", h.healthz)
	h.methods["/healthz"] = []string{"GET"}
	h.handle("GET /metrics", []string{api.RoleAdmin, api.RoleMetrics}, promhttp.HandlerFor(cfg.Registry, promhttp.HandlerOpts{}).ServeHTTP)
	h.handle("POST /v1/batches", perso, h.upload)
	h.handle("GET /v1/batches/{id}", []string{api.RolePerso, api.RoleAdmin}, h.batch)
	h.handle("GET /v1/batches", admin, h.batches)
	h.handle("POST /v1/cards/{id}/challenge", verifier, h.challenge)
	h.handle("POST /v1/cards/{id}/verify", verifier, h.verify)
	h.handle("GET /v1/cards", admin, h.cards)
	h.handle("GET /v1/cards/{id}", admin, h.card)
	h.handle("POST /v1/cards/{id}/block", admin, h.block)
	h.handle("POST /v1/cards/{id}/unblock", admin, h.unblock)
	// A known path with another method: 405 in JSON, with Allow (the
	// mux's own answer would be plain text). Patterns with a method are
	// more specific, so these only get the other methods.
	for path, ms := range h.methods {
		allow := strings.Join(ms, ", ")
		h.mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allow)
			writeError(w, http.StatusMethodNotAllowed, "method not allowed", r.Method+" "+r.URL.Path+": use "+allow)
		})
	}
	h.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no such endpoint", r.Method+" "+r.URL.Path+" (see docs/openapi.yaml)")
	})
	return h, nil
}

// PurgeChallenges deletes every challenge that expired more than the
// retention ago; issuer serve calls it at start (issuing a challenge
// purges a few more each time).
func (h *Handler) PurgeChallenges(ctx context.Context) (int64, error) {
	return h.auth.Purge(ctx)
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	h.mux.ServeHTTP(w, r)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, code int, title, detail string) {
	writeJSON(w, code, api.Error{Title: title, Detail: detail})
}

// fail answers an error of the store, the importer or the
// authenticator: the one place where their errors become HTTP answers
// (issuer.Classify). An internal error's detail goes to the log only; a
// refused batch's detail is its reason.
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	kind, title := issuer.Classify(err)
	detail := err.Error()
	var br *issuer.BatchRefusedError
	switch {
	case kind == issuer.KindInternal:
		h.log.Error("internal error", "method", r.Method, "path", r.URL.Path, "err", err)
		detail = "see the server log"
	case kind == issuer.KindUnavailable:
		h.log.Error("token unavailable", "method", r.Method, "path", r.URL.Path, "err", err)
		detail = "the issuer's token is unavailable; try again (the server log says why)"
		w.Header().Set("Retry-After", "1")
	case errors.As(err, &br):
		detail = br.Reason
	}
	writeError(w, kind.HTTPStatus(), title, detail)
}

func (h *Handler) healthz(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, api.Health{Status: "ok"})
}

// readJSON decodes a small JSON body into v; false means it answered.
// With optional, an empty body leaves v as it is.
func readJSON(w http.ResponseWriter, r *http.Request, v any, optional bool) bool {
	r.Body = http.MaxBytesReader(w, r.Body, maxJSONBody)
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if optional && errors.Is(err, io.EOF) {
			return true
		}
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeError(w, http.StatusRequestEntityTooLarge, "request body too large", fmt.Sprintf("at most %d bytes", mbe.Limit))
			return false
		}
		writeError(w, http.StatusBadRequest, "bad JSON body", err.Error())
		return false
	}
	return true
}

func cardID(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	id, err := hex.DecodeString(r.PathValue("id"))
	if err != nil || len(id) < 1 || len(id) > 16 {
		writeError(w, http.StatusBadRequest, "bad card Id", "the card Id is 1 to 16 bytes in hex")
		return nil, false
	}
	return id, true
}

// Cards.

// toCard is a stored card as the API shows it: without its wrapped key
// (public, but of no use to a reader of the API).
func toCard(c issuer.StoredCard) api.Card {
	return api.Card{
		ID: c.ID, Profile: c.Profile, IssuerFingerprint: c.IssuerFingerprint,
		Blob:           api.Blob{Scheme: c.Blob.Scheme, Mechanism: c.Blob.Mechanism, KEK: c.Blob.KEK},
		IssuerKeyLabel: c.IssuerKeyLabel, CSHA256: c.CSHA256, Batch: c.Batch, Line: c.Line,
		State: c.State, FailedAuth: c.FailedAuth, StateReason: c.StateReason, Attested: c.Attested,
		Created: c.Created, Updated: c.Updated,
	}
}

func (h *Handler) cards(w http.ResponseWriter, r *http.Request) {
	state := r.URL.Query().Get("state")
	switch state {
	case "", api.StateActive, api.StateBlocked, api.StateConflict:
	default:
		writeError(w, http.StatusBadRequest, "bad state", "state is one of active, blocked, conflict")
		return
	}
	cs, err := h.cfg.Store.Cards(r.Context(), state)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	out := make([]api.Card, 0, len(cs))
	for _, c := range cs {
		out = append(out, toCard(c))
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *Handler) card(w http.ResponseWriter, r *http.Request) {
	id, ok := cardID(w, r)
	if !ok {
		return
	}
	c, err := h.cfg.Store.Card(r.Context(), id)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	log, err := h.cfg.Store.AuthLog(r.Context(), id, 20)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if log == nil {
		log = []api.AuthEntry{}
	}
	writeJSON(w, http.StatusOK, api.CardDetail{Card: toCard(c), Log: log})
}

func (h *Handler) block(w http.ResponseWriter, r *http.Request) {
	id, ok := cardID(w, r)
	if !ok {
		return
	}
	var body api.StateChange
	if !readJSON(w, r, &body, false) {
		return
	}
	if strings.TrimSpace(body.Reason) == "" {
		writeError(w, http.StatusBadRequest, "a reason is required", `body: {"reason": "why the card is blocked"}`)
		return
	}
	c, err := h.cfg.Store.BlockCard(r.Context(), id, body.Reason, time.Now())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, toCard(c))
}

func (h *Handler) unblock(w http.ResponseWriter, r *http.Request) {
	id, ok := cardID(w, r)
	if !ok {
		return
	}
	var body api.StateChange
	if !readJSON(w, r, &body, true) { // the body is optional
		return
	}
	c, err := h.cfg.Store.UnblockCard(r.Context(), id, body.Reason, time.Now())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, toCard(c))
}

// Challenge and verification.

func (h *Handler) challenge(w http.ResponseWriter, r *http.Request) {
	id, ok := cardID(w, r)
	if !ok {
		return
	}
	ch, err := h.auth.Challenge(r.Context(), id)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, api.Challenge{Challenge: ch.Challenge, Expires: ch.Expires})
}

func (h *Handler) verify(w http.ResponseWriter, r *http.Request) {
	id, ok := cardID(w, r)
	if !ok {
		return
	}
	var body api.VerifyRequest
	if !readJSON(w, r, &body, false) {
		return
	}
	if len(body.Challenge) != protocol.ChallengeLen || len(body.MAC) != protocol.MACLen {
		writeError(w, http.StatusBadRequest, "bad verification request",
			fmt.Sprintf("challenge and mac are %d and %d bytes in hex", protocol.ChallengeLen, protocol.MACLen))
		return
	}
	start := time.Now()
	res, err := h.auth.Verify(r.Context(), id, body.Challenge, body.MAC)
	h.m.verifyTime.Observe(time.Since(start).Seconds())
	switch {
	case err == nil:
	case errors.Is(err, issuer.ErrChallengeUnknown), errors.Is(err, issuer.ErrChallengeOtherCard),
		errors.Is(err, issuer.ErrChallengeUsed), errors.Is(err, issuer.ErrChallengeExpired):
		// Same answer as a wrong MAC: the card's current count.
		h.log.Info("verification failed", "card", fmt.Sprintf("%x", id), "why", err.Error())
		res = issuer.AuthResult{Result: api.ResultFailed}
		if c, cerr := h.cfg.Store.Card(r.Context(), id); cerr == nil {
			res.FailedAuth = c.FailedAuth
		}
	default:
		h.fail(w, r, err)
		return
	}
	if res.Result != api.ResultFailed || err == nil {
		h.log.Info("verification", "card", fmt.Sprintf("%x", id), "result", res.Result, "failed_auth", res.FailedAuth)
	}
	h.m.verifies.WithLabelValues(res.Result).Inc()
	writeJSON(w, http.StatusOK, api.VerifyResult{Result: res.Result, FailedAuth: res.FailedAuth})
}
