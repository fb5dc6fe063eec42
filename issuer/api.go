package issuer

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"blindperso/batch"
	"blindperso/protocol"
)

// The issuer's HTTP API (issuer serve; docs/ISSUER.md "HTTP API",
// docs/openapi.yaml). Every request but /healthz is authenticated, by a
// bearer token (stored only as its SHA-256) or by a verified TLS client
// certificate whose subject OU names the role, and every endpoint checks
// the caller's role.

// Roles.
const (
	RolePerso    = "perso"    // uploads batches, reads batch reports
	RoleVerifier = "verifier" // asks challenges, verifies cards' answers
	RoleAdmin    = "admin"    // reads and manages cards and batches, reads metrics
	RoleMetrics  = "metrics"  // reads /metrics only (a Prometheus scraper)
)

// Roles lists the roles a token or certificate may carry.
var Roles = []string{RolePerso, RoleVerifier, RoleAdmin, RoleMetrics}

func knownRole(r string) bool {
	for _, k := range Roles {
		if r == k {
			return true
		}
	}
	return false
}

// Default limits of the API.
const (
	DefaultMaxBatchBytes = 256 << 20 // largest batch an upload may carry
	maxManifestBytes     = 64 << 10
	maxJSONBody          = 16 << 10 // every JSON request body
)

// TokenEntry is one line of a tokens file: a role and the SHA-256 of a
// bearer token.
type TokenEntry struct {
	Role string
	Hash [sha256.Size]byte
}

// HashToken is the hex SHA-256 of a bearer token, as a tokens file holds
// it (surrounding white space, e.g. a newline, is not part of a token).
func HashToken(token string) string {
	h := sha256.Sum256([]byte(strings.TrimSpace(token)))
	return hex.EncodeToString(h[:])
}

// ParseTokens reads a tokens file: lines "ROLE SHA256HEX"; blank lines and
// lines starting with # are ignored.
func ParseTokens(r io.Reader) ([]TokenEntry, error) {
	var out []TokenEntry
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return nil, fmt.Errorf("tokens line %d: want \"ROLE SHA256HEX\", got %d fields", n, len(f))
		}
		if !knownRole(f[0]) {
			return nil, fmt.Errorf("tokens line %d: unknown role %q (roles: %s)", n, f[0], strings.Join(Roles, ", "))
		}
		b, err := hex.DecodeString(f[1])
		if err != nil || len(b) != sha256.Size {
			return nil, fmt.Errorf("tokens line %d: the second field must be the hex SHA-256 of the token (64 hex digits; issuer serve token-hash prints it)", n)
		}
		var e TokenEntry
		e.Role = f[0]
		copy(e.Hash[:], b)
		out = append(out, e)
	}
	return out, sc.Err()
}

// LoadTokens reads a tokens file (see ParseTokens).
func LoadTokens(path string) ([]TokenEntry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	t, err := ParseTokens(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}

// ServerTLSConfig loads the server's certificate and key; with clientCA
// set, client certificates signed by it are verified when given (mTLS);
// clients without one can still use a bearer token.
func ServerTLSConfig(certFile, keyFile, clientCA string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate: %w", err)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	if clientCA != "" {
		pool, err := LoadCertPool(clientCA)
		if err != nil {
			return nil, err
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.VerifyClientCertIfGiven
	}
	return cfg, nil
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

// APIConfig is what the API serves.
type APIConfig struct {
	Issuer        *Issuer
	Store         Store
	UploadDir     string // uploaded batches are spooled here, then removed
	Workers       int    // token sessions per import; 0 means 2
	MaxBatchBytes int64  // 0 means DefaultMaxBatchBytes
	Tokens        []TokenEntry
	ChallengeTTL  time.Duration
	MaxFailures   int
	// ChallengeRetention is how long an expired challenge is kept before
	// it is purged; 0 means DefaultChallengeRetention.
	ChallengeRetention time.Duration
	Logger             *slog.Logger         // nil: discard
	Registry           *prometheus.Registry // nil: a new one
}

// API is the issuer's HTTP handler.
type API struct {
	cfg     APIConfig
	auth    *Authenticator
	m       *apiMetrics
	log     *slog.Logger
	mux     *http.ServeMux
	methods map[string][]string // path pattern → its methods, for 405 answers
}

type apiMetrics struct {
	batches      *prometheus.CounterVec
	imported     prometheus.Counter
	rejects      prometheus.Counter
	conflicts    prometheus.Counter
	verifies     *prometheus.CounterVec
	tokenLatency *prometheus.HistogramVec
}

func newAPIMetrics(reg *prometheus.Registry) *apiMetrics {
	m := &apiMetrics{
		batches: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "blindperso_issuer_batch_imports_total",
			Help: "Batch uploads imported through the API, by outcome (done, refused, error)."}, []string{"status"}),
		imported: prometheus.NewCounter(prometheus.CounterOpts{Name: "blindperso_issuer_imported_cards_total",
			Help: "Cards imported (the imported count of each upload's report)."}),
		rejects: prometheus.NewCounter(prometheus.CounterOpts{Name: "blindperso_issuer_rejected_records_total",
			Help: "Records rejected (the rejects count of each upload's report)."}),
		conflicts: prometheus.NewCounter(prometheus.CounterOpts{Name: "blindperso_issuer_conflicts_total",
			Help: "Conflicting records: a known card Id with another c (the conflicts count of each upload's report)."}),
		verifies: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "blindperso_issuer_verifications_total",
			Help: "Card verifications by result (ok, failed, blocked, refused)."}, []string{"result"}),
		tokenLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "blindperso_issuer_token_op_seconds",
			Help:    "Latency of token operations: import (derive and wrap one card's K_I), verify (one MAC check).",
			Buckets: prometheus.ExponentialBuckets(0.0002, 2, 14)}, []string{"op"}),
	}
	reg.MustRegister(m.batches, m.imported, m.rejects, m.conflicts, m.verifies, m.tokenLatency)
	for _, r := range []string{AuthOK, AuthFailed, AuthBlocked, AuthRefused} {
		m.verifies.WithLabelValues(r)
	}
	// Upload outcomes: a batch's status, or batchError when the import
	// failed for another reason.
	for _, s := range []string{BatchDone, BatchRefused, batchError} {
		m.batches.WithLabelValues(s)
	}
	return m
}

// NewAPI builds the handler.
func NewAPI(cfg APIConfig) (*API, error) {
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
	a := &API{cfg: cfg, m: newAPIMetrics(cfg.Registry), log: log, mux: http.NewServeMux(), methods: map[string][]string{}}
	a.auth = &Authenticator{
		Verifier: timedVerifier{cfg.Issuer, a.m.tokenLatency.WithLabelValues("verify")},
		Store:    cfg.Store, TTL: cfg.ChallengeTTL, MaxFailures: cfg.MaxFailures, Retention: cfg.ChallengeRetention,
	}
	perso, verifier, admin := []string{RolePerso}, []string{RoleVerifier}, []string{RoleAdmin}
	a.mux.HandleFunc("GET /healthz", a.healthz)
	a.methods["/healthz"] = []string{"GET"}
	a.handle("GET /metrics", []string{RoleAdmin, RoleMetrics}, promhttp.HandlerFor(cfg.Registry, promhttp.HandlerOpts{}).ServeHTTP)
	a.handle("POST /v1/batches", perso, a.upload)
	a.handle("GET /v1/batches/{id}", []string{RolePerso, RoleAdmin}, a.batch)
	a.handle("GET /v1/batches", admin, a.batches)
	a.handle("POST /v1/cards/{id}/challenge", verifier, a.challenge)
	a.handle("POST /v1/cards/{id}/verify", verifier, a.verify)
	a.handle("GET /v1/cards", admin, a.cards)
	a.handle("GET /v1/cards/{id}", admin, a.card)
	a.handle("POST /v1/cards/{id}/block", admin, a.block)
	a.handle("POST /v1/cards/{id}/unblock", admin, a.unblock)
	// A known path with another method: 405 in JSON, with Allow (the
	// mux's own answer would be plain text). Patterns with a method are
	// more specific, so these only get the other methods.
	for path, ms := range a.methods {
		allow := strings.Join(ms, ", ")
		a.mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allow)
			writeError(w, http.StatusMethodNotAllowed, "method not allowed", r.Method+" "+r.URL.Path+": use "+allow)
		})
	}
	a.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no such endpoint", r.Method+" "+r.URL.Path+" (see docs/openapi.yaml)")
	})
	return a, nil
}

// PurgeChallenges deletes every challenge that expired more than the
// retention ago; issuer serve calls it at start (issuing a challenge
// purges a few more each time).
func (a *API) PurgeChallenges(ctx context.Context) (int64, error) {
	return a.auth.Purge(ctx)
}

// NewServer is an http.Server for h with the API's timeouts.
func NewServer(addr string, h http.Handler, tlsCfg *tls.Config, writeTimeout time.Duration) *http.Server {
	if writeTimeout <= 0 {
		writeTimeout = 15 * time.Minute
	}
	return &http.Server{
		Addr: addr, Handler: h, TLSConfig: tlsCfg,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       writeTimeout, // an upload of a large batch takes a while
		WriteTimeout:      writeTimeout, // the import runs before the response
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
	}
}

func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	a.mux.ServeHTTP(w, r)
}

// apiError is the body of every error response.
type apiError struct {
	Error  string `json:"error"`
	Detail string `json:"detail,omitempty"`
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// batchError labels uploads whose import failed (not a batch status).
const batchError = "error"

func writeError(w http.ResponseWriter, code int, msg, detail string) {
	writeJSON(w, code, apiError{Error: msg, Detail: detail})
}

type ctxKey struct{}

// caller returns the caller's role and how it was established, or an
// HTTP status and message.
func (a *API) caller(r *http.Request) (role, via string, code int, msg string) {
	if h := r.Header.Get("Authorization"); h != "" {
		tok, ok := strings.CutPrefix(h, "Bearer ")
		if !ok || strings.TrimSpace(tok) == "" {
			return "", "", http.StatusUnauthorized, "the Authorization header must be \"Bearer TOKEN\""
		}
		sum := sha256.Sum256([]byte(strings.TrimSpace(tok)))
		match := -1
		for i := range a.cfg.Tokens { // every entry compared, in constant time
			if subtle.ConstantTimeCompare(sum[:], a.cfg.Tokens[i].Hash[:]) == 1 {
				match = i
			}
		}
		if match < 0 {
			return "", "", http.StatusUnauthorized, "unknown bearer token"
		}
		return a.cfg.Tokens[match].Role, "token", 0, ""
	}
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
		leaf := r.TLS.VerifiedChains[0][0]
		var roles []string
		for _, ou := range leaf.Subject.OrganizationalUnit {
			if knownRole(ou) {
				roles = append(roles, ou)
			}
		}
		if len(roles) != 1 {
			return "", "", http.StatusForbidden, fmt.Sprintf("client certificate %q must carry exactly one role in its subject OU (one of %s), it has %d", leaf.Subject.CommonName, strings.Join(Roles, ", "), len(roles))
		}
		return roles[0], "certificate " + leaf.Subject.CommonName, 0, ""
	}
	return "", "", http.StatusUnauthorized, "no credentials: send \"Authorization: Bearer TOKEN\" or a client certificate"
}

func (a *API) handle(pattern string, roles []string, h http.HandlerFunc) {
	method, path, _ := strings.Cut(pattern, " ")
	a.methods[path] = append(a.methods[path], method)
	a.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		role, via, code, msg := a.caller(r)
		if code != 0 {
			if code == http.StatusUnauthorized {
				w.Header().Set("WWW-Authenticate", `Bearer realm="blindperso-issuer"`)
			}
			a.log.Info("refused", "method", r.Method, "path", r.URL.Path, "status", code, "why", msg, "remote", r.RemoteAddr)
			writeError(w, code, http.StatusText(code), msg)
			return
		}
		allowed := false
		for _, x := range roles {
			allowed = allowed || x == role
		}
		if !allowed {
			a.log.Info("forbidden", "method", r.Method, "path", r.URL.Path, "role", role, "via", via)
			writeError(w, http.StatusForbidden, "Forbidden", fmt.Sprintf("role %q may not %s %s (needs %s)", role, r.Method, pattern[strings.IndexByte(pattern, ' ')+1:], strings.Join(roles, " or ")))
			return
		}
		r = r.WithContext(context.WithValue(r.Context(), ctxKey{}, role))
		a.log.Info("request", "method", r.Method, "path", r.URL.Path, "role", role, "via", via)
		h(w, r)
	})
}

func (a *API) healthz(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// readJSON decodes a small JSON body into v; false means it answered.
func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	return decodeJSON(w, r, v, false)
}

// decodeJSON is readJSON; with optional, an empty body leaves v as it is.
func decodeJSON(w http.ResponseWriter, r *http.Request, v any, optional bool) bool {
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

func (a *API) cardID(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	id, err := hex.DecodeString(r.PathValue("id"))
	if err != nil || len(id) < 1 || len(id) > 16 {
		writeError(w, http.StatusBadRequest, "bad card Id", "the card Id is 1 to 16 bytes in hex")
		return nil, false
	}
	return id, true
}

// fail answers an error of the store, the importer or the
// authenticator: the one place where their errors become HTTP answers
// (Classify). An internal error's detail goes to the log only; a refused
// batch's detail is its reason.
func (a *API) fail(w http.ResponseWriter, r *http.Request, err error) {
	kind, title := Classify(err)
	detail := err.Error()
	var br *BatchRefusedError
	switch {
	case kind == KindInternal:
		a.log.Error("internal error", "method", r.Method, "path", r.URL.Path, "err", err)
		detail = "see the server log"
	case errors.As(err, &br):
		detail = br.Reason
	}
	writeError(w, kind.HTTPStatus(), title, detail)
}

// Batches.

// upload takes multipart/form-data with a part "manifest" (the station's
// FILE.manifest.json) followed by a part "batch" (the NDJSON file),
// spools the batch to the upload directory, imports it and answers the
// report.
func (a *API) upload(w http.ResponseWriter, r *http.Request) {
	max := a.cfg.MaxBatchBytes
	r.Body = http.MaxBytesReader(w, r.Body, max+maxManifestBytes+64<<10)
	mr, err := r.MultipartReader()
	if err != nil {
		writeError(w, http.StatusBadRequest, "want multipart/form-data", "parts: manifest (the batch's .manifest.json), then batch (the NDJSON file): "+err.Error())
		return
	}
	tooLarge := func(err error) bool {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeError(w, http.StatusRequestEntityTooLarge, "upload too large", fmt.Sprintf("a batch may be at most %d bytes", max))
			return true
		}
		return false
	}
	part, err := mr.NextPart()
	if err != nil || part.FormName() != "manifest" {
		if err == nil || !tooLarge(err) {
			writeError(w, http.StatusBadRequest, "the first part must be \"manifest\"", "parts: manifest, then batch")
		}
		return
	}
	mraw, err := io.ReadAll(io.LimitReader(part, maxManifestBytes+1))
	if err != nil {
		if !tooLarge(err) {
			writeError(w, http.StatusBadRequest, "could not read the manifest part", err.Error())
		}
		return
	}
	if len(mraw) > maxManifestBytes {
		writeError(w, http.StatusRequestEntityTooLarge, "manifest too large", fmt.Sprintf("at most %d bytes", maxManifestBytes))
		return
	}
	m, err := batch.ParseManifest(mraw)
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad manifest", err.Error())
		return
	}
	if m.Bytes > max {
		writeError(w, http.StatusRequestEntityTooLarge, "batch too large", fmt.Sprintf("the manifest says %d bytes; a batch may be at most %d", m.Bytes, max))
		return
	}
	part, err = mr.NextPart()
	if err != nil || part.FormName() != "batch" {
		if err == nil || !tooLarge(err) {
			writeError(w, http.StatusBadRequest, "the second part must be \"batch\"", "parts: manifest, then batch")
		}
		return
	}
	dir, err := os.MkdirTemp(a.cfg.UploadDir, "upload-")
	if err != nil {
		a.fail(w, r, err)
		return
	}
	defer os.RemoveAll(dir)
	// The batch is spooled under the name its manifest gives it (a plain
	// file name: batch.ParseManifest), which the import checks.
	path := filepath.Join(dir, m.Batch)
	if err := os.WriteFile(batch.ManifestPath(path), mraw, 0o600); err != nil {
		a.fail(w, r, err)
		return
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	n, err := io.Copy(f, io.LimitReader(part, max+1))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		if !tooLarge(err) {
			writeError(w, http.StatusBadRequest, "could not read the batch part", err.Error())
		}
		return
	}
	if n > max {
		writeError(w, http.StatusRequestEntityTooLarge, "batch too large", fmt.Sprintf("a batch may be at most %d bytes", max))
		return
	}
	h := a.m.tokenLatency.WithLabelValues("import")
	im := &Importer{Issuer: a.cfg.Issuer, Store: a.cfg.Store, Workers: a.cfg.Workers, Log: a.log,
		TokenTime: func(d time.Duration) { h.Observe(d.Seconds()) }}
	ctx := r.Context()
	rep, ierr := im.ImportFile(ctx, path)
	id := hex.EncodeToString(m.SHA256)
	if ierr != nil {
		var br *BatchRefusedError
		if errors.As(ierr, &br) {
			a.m.batches.WithLabelValues(BatchRefused).Inc()
			a.log.Warn("batch refused", "batch", id, "reason", br.Reason)
		} else {
			a.m.batches.WithLabelValues(batchError).Inc()
		}
		a.fail(w, r, ierr)
		return
	}
	a.m.batches.WithLabelValues(BatchDone).Inc()
	a.m.imported.Add(float64(rep.Imported))
	a.m.rejects.Add(float64(rep.Rejects))
	a.m.conflicts.Add(float64(rep.Conflicts))
	a.log.Info("batch imported", "batch", rep.ID, "records", rep.Records, "imported", rep.Imported,
		"duplicates", rep.Duplicates, "conflicts", rep.Conflicts, "rejects", rep.Rejects)
	d, err := Detail(ctx, a.cfg.Store, rep)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

func (a *API) batch(w http.ResponseWriter, r *http.Request) {
	id := strings.ToLower(r.PathValue("id"))
	if b, err := hex.DecodeString(id); err != nil || len(b) != sha256.Size {
		writeError(w, http.StatusBadRequest, "bad batch id", "a batch id is the batch file's SHA-256 in hex (64 digits)")
		return
	}
	rep, err := a.cfg.Store.Batch(r.Context(), id)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	d, err := Detail(r.Context(), a.cfg.Store, rep)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

func (a *API) batches(w http.ResponseWriter, r *http.Request) {
	bs, err := a.cfg.Store.Batches(r.Context())
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if bs == nil {
		bs = []BatchReport{}
	}
	writeJSON(w, http.StatusOK, bs)
}

// Cards.

// cardView is a card without its wrapped key (public, but of no use to a
// reader of the API).
func cardView(c StoredCard) StoredCard {
	c.Blob.Wrapped = nil
	return c
}

func (a *API) cards(w http.ResponseWriter, r *http.Request) {
	state := r.URL.Query().Get("state")
	switch state {
	case "", StateActive, StateBlocked, StateConflict:
	default:
		writeError(w, http.StatusBadRequest, "bad state", "state is one of active, blocked, conflict")
		return
	}
	cs, err := a.cfg.Store.Cards(r.Context(), state)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	out := make([]StoredCard, 0, len(cs))
	for _, c := range cs {
		out = append(out, cardView(c))
	}
	writeJSON(w, http.StatusOK, out)
}

// CardDetail is a card and its last auth log entries.
type CardDetail struct {
	Card StoredCard  `json:"card"`
	Log  []AuthEntry `json:"log"`
}

func (a *API) card(w http.ResponseWriter, r *http.Request) {
	id, ok := a.cardID(w, r)
	if !ok {
		return
	}
	c, err := a.cfg.Store.Card(r.Context(), id)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	log, err := a.cfg.Store.AuthLog(r.Context(), id, 20)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if log == nil {
		log = []AuthEntry{}
	}
	writeJSON(w, http.StatusOK, CardDetail{cardView(c), log})
}

func (a *API) block(w http.ResponseWriter, r *http.Request) {
	id, ok := a.cardID(w, r)
	if !ok {
		return
	}
	var body struct {
		Reason string `json:"reason"`
	}
	if !readJSON(w, r, &body) {
		return
	}
	if strings.TrimSpace(body.Reason) == "" {
		writeError(w, http.StatusBadRequest, "a reason is required", `body: {"reason": "why the card is blocked"}`)
		return
	}
	c, err := a.cfg.Store.BlockCard(r.Context(), id, body.Reason, time.Now())
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, cardView(c))
}

func (a *API) unblock(w http.ResponseWriter, r *http.Request) {
	id, ok := a.cardID(w, r)
	if !ok {
		return
	}
	var body struct {
		Reason string `json:"reason"`
	}
	if !decodeJSON(w, r, &body, true) { // the body is optional
		return
	}
	c, err := a.cfg.Store.UnblockCard(r.Context(), id, body.Reason, time.Now())
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, cardView(c))
}

// Challenge and verification.

type challengeResponse struct {
	Challenge string    `json:"challenge"`
	Expires   time.Time `json:"expires"`
}

func (a *API) challenge(w http.ResponseWriter, r *http.Request) {
	id, ok := a.cardID(w, r)
	if !ok {
		return
	}
	ch, err := a.auth.Challenge(r.Context(), id)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, challengeResponse{hex.EncodeToString(ch.Challenge), ch.Expires})
}

// VerifyResponse is the answer to a verification. Every failure that is
// about the challenge or the MAC (wrong MAC, unknown, used, expired or
// another card's challenge, unknown card) is the same "failed" answer;
// why is only in the server log.
type VerifyResponse struct {
	Result     string `json:"result"`
	FailedAuth int    `json:"failed_auth"`
}

func (a *API) verify(w http.ResponseWriter, r *http.Request) {
	id, ok := a.cardID(w, r)
	if !ok {
		return
	}
	var body struct {
		Challenge string `json:"challenge"`
		MAC       string `json:"mac"`
	}
	if !readJSON(w, r, &body) {
		return
	}
	ch, err1 := hex.DecodeString(body.Challenge)
	mac, err2 := hex.DecodeString(body.MAC)
	if err1 != nil || err2 != nil || len(ch) != protocol.ChallengeLen || len(mac) != protocol.MACLen {
		writeError(w, http.StatusBadRequest, "bad verification request",
			fmt.Sprintf("challenge and mac are %d and %d bytes in hex", protocol.ChallengeLen, protocol.MACLen))
		return
	}
	res, err := a.auth.Verify(r.Context(), id, ch, mac)
	switch {
	case err == nil:
	case errors.Is(err, ErrChallengeUnknown), errors.Is(err, ErrChallengeOtherCard),
		errors.Is(err, ErrChallengeUsed), errors.Is(err, ErrChallengeExpired):
		// Same answer as a wrong MAC: the card's current count.
		a.log.Info("verification failed", "card", fmt.Sprintf("%x", id), "why", err.Error())
		res = AuthResult{Result: AuthFailed}
		if c, cerr := a.cfg.Store.Card(r.Context(), id); cerr == nil {
			res.FailedAuth = c.FailedAuth
		}
	default:
		a.fail(w, r, err)
		return
	}
	if res.Result != AuthFailed || err == nil {
		a.log.Info("verification", "card", fmt.Sprintf("%x", id), "result", res.Result, "failed_auth", res.FailedAuth)
	}
	a.m.verifies.WithLabelValues(res.Result).Inc()
	writeJSON(w, http.StatusOK, VerifyResponse{res.Result, res.FailedAuth})
}

// Token latency.

type timedVerifier struct {
	v MACVerifier
	h prometheus.Observer
}

func (t timedVerifier) Verify(ctx context.Context, ck CardKey, challenge, mac []byte) (bool, error) {
	start := time.Now()
	ok, err := t.v.Verify(ctx, ck, challenge, mac)
	t.h.Observe(time.Since(start).Seconds())
	return ok, err
}
