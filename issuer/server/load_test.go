package server

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	vegeta "github.com/tsenart/vegeta/v12/lib"

	"blindperso/api"
	"blindperso/card/cardtest"
	"blindperso/hsm"
	"blindperso/internal/pgtest"
	"blindperso/issuer"
	"blindperso/issuer/issuertest"
	"blindperso/protocol"
)

// The API under load (issue 14): card verifications, each a challenge
// and its verify, over HTTPS on the loopback from many keep-alive
// connections, sent by a real HTTP load generator (vegeta, as a
// library), bounded in count and in time, with a few planted wrong MACs.
//
// How a verification's pair is produced. A verify needs a challenge the
// server issued for that card, answered by the card, and each challenge
// can be used once. A vegeta Targeter runs inside the hit it produces
// (vegeta starts a hit's latency clock before it calls the Targeter), so
// a Targeter that asked for the challenge itself would be a hand-written
// client timed inside vegeta's latency, and one that alternated challenge
// and verify targets would have to wait for a challenge's answer to come
// back through the results channel, its wait again counted as the
// verify's latency, and its mix of the two depending on the latency it
// measures. So each round is two vegeta attacks over the same pool of
// keep-alive connections (one http.Client, one Transport):
//
//  1. challenges: n POST /v1/cards/{id}/challenge, round-robin over the
//     card pool; each answer's challenge is kept with its card;
//  2. the cards answer, untimed, in process (cardtest.Authenticate: the
//     applet's AUTHENTICATE, its AES-CMAC in memory, no part of the
//     issuer's latency); every 100th answer gets one bit flipped: a
//     planted wrong MAC;
//  3. verifies: n POST /v1/cards/{id}/verify, each with a challenge of
//     phase 1 (used once, within its TTL) and its answer.
//
// This is also how BenchmarkIssuerVerify (package issuer) times the
// Authenticator: challenges issued before the timer, verifications timed,
// so the two rates compare like with like. Both phases are measured; the
// pair rate is n over the two phases' time together.
//
// Every hit is accounted for: a challenge must be a 200 with a 16-byte
// challenge; a verify a 200 whose result is "ok", or "failed" for a
// planted MAC, counted per card, which must match what was planted on
// that card. Anything else is an unexpected error. (The planted MACs
// are spread over the pool, a few per card among hundreds of genuine
// answers: none reaches the default three failures in a row that block a
// card.)
const (
	loadCards = 64 // the card pool (Ids B100…B13F)
	loadConns = 16 // keep-alive connections; vegeta's workers in the closed loop
	// loadPlantEvery: every loadPlantEvery-th verify carries a wrong MAC
	// (1 %), from the loadPlantAt-th on.
	loadPlantEvery = 100
	loadPlantAt    = 50
	// loadGoal is the goal verify rate over HTTPS, as a fraction of the
	// Authenticator's own; the paced attack offers that rate.
	loadGoal = 0.5
)

// loadEnv is the API over TLS (httptest, with the timeouts issuer serve
// uses) on one store, with the card pool imported and a verifier's bearer
// token, and the client whose connections every attack shares.
type loadEnv struct {
	is     *issuer.Issuer
	st     issuer.Store
	cards  []cardtest.Card
	base   string      // https://127.0.0.1:port
	header http.Header // the verifier's token, JSON
	client *http.Client
	card   map[string]int // challenge URL → card index
}

func newLoadEnv(tb testing.TB, is *issuer.Issuer, cards []cardtest.Card, db string) *loadEnv {
	tb.Helper()
	ctx := context.Background()
	st, err := issuer.Open(ctx, db)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { st.Close() })
	fp := is.Key.Fingerprint()
	p := protocol.ECDHP256AES
	rep, err := (&issuer.Importer{Issuer: is, Store: st, Workers: 2}).ImportFile(ctx, cardtest.BatchOf(tb, p, fp[:], cards...))
	if err != nil || rep.Imported != len(cards) {
		tb.Fatalf("import of the card pool: %+v %v", rep, err)
	}
	const token = "load-test-verifier"
	h, err := New(Config{Issuer: is, Store: st, UploadDir: filepath.Join(tb.TempDir(), "uploads"),
		Tokens: []TokenEntry{{Role: api.RoleVerifier, Hash: sha256.Sum256([]byte(token))}}})
	if err != nil {
		tb.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Config = NewHTTP("", h, nil, time.Minute)
	srv.StartTLS()
	tb.Cleanup(srv.Close)
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	e := &loadEnv{is: is, st: st, cards: cards, base: srv.URL, card: map[string]int{},
		header: http.Header{"Authorization": {"Bearer " + token}, "Content-Type": {"application/json"}},
		client: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			TLSClientConfig:     &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
			MaxConnsPerHost:     loadConns,
			MaxIdleConnsPerHost: loadConns,
			ForceAttemptHTTP2:   false, // HTTP/1.1 keep-alive, as the server offers
		}},
	}
	for i := range cards {
		e.card[e.cardURL(i, "challenge")] = i
	}
	tb.Cleanup(e.client.CloseIdleConnections)
	return e
}

func (e *loadEnv) cardURL(i int, op string) string {
	return e.base + "/v1/cards/" + hex.EncodeToString(e.cards[i].Rec.ID) + "/" + op
}

// countPacer is pace, stopped after n hits: an attack of exactly n
// targets (with vegeta's static targeter over them, each hit once).
type countPacer struct {
	pace vegeta.Pacer
	n    uint64
}

func (p countPacer) Pace(elapsed time.Duration, hits uint64) (time.Duration, bool) {
	if hits >= p.n {
		return 0, true
	}
	return p.pace.Pace(elapsed, hits)
}

func (p countPacer) Rate(elapsed time.Duration) float64 { return p.pace.Rate(elapsed) }

// loadMode is how an attack is paced: rate 0 is the closed loop, each
// of loadConns workers sending its next request when its last one is
// answered (as fast as the issuer goes); else an open loop at that many
// requests per second, whatever the answers' latency (vegeta adds workers
// when all are busy, up to 4 per connection).
type loadMode struct {
	name string
	rate int
}

// phase is one attack's figures, from vegeta's metrics.
type phase struct {
	n              int
	wall           time.Duration // first hit to last answer
	rate           float64       // answered requests per second over wall
	p50, p99, p999 time.Duration
}

func toPhase(m *vegeta.Metrics) phase {
	return phase{n: int(m.Requests), wall: m.Duration + m.Wait, rate: m.Throughput,
		p50: m.Latencies.P50, p99: m.Latencies.P99, p999: m.Latencies.Quantile(0.999)}
}

// attack sends every target once, paced by mode, within limit, and hands
// each result to each (on one goroutine).
func (e *loadEnv) attack(name string, ts []vegeta.Target, mode loadMode, limit time.Duration, each func(*vegeta.Result)) (phase, error) {
	pace, workers := vegeta.Pacer(vegeta.ConstantPacer{}), uint64(loadConns) // zero: no pause between hits
	if mode.rate > 0 {
		pace, workers = vegeta.ConstantPacer{Freq: mode.rate, Per: time.Second}, uint64(4*loadConns)
	}
	atk := vegeta.NewAttacker(vegeta.Client(e.client), vegeta.MaxBody(4<<10),
		vegeta.Workers(uint64(loadConns)), vegeta.MaxWorkers(workers))
	var m vegeta.Metrics
	for r := range atk.Attack(vegeta.NewStaticTargeter(ts...), countPacer{pace, uint64(len(ts))}, limit, name) {
		m.Add(r)
		each(r)
	}
	m.Close()
	if int(m.Requests) != len(ts) {
		return toPhase(&m), fmt.Errorf("%s: %d of %d requests sent within the %v bound", name, m.Requests, len(ts), limit)
	}
	return toPhase(&m), nil
}

// loadResult is one round of n verifications.
type loadResult struct {
	challenge, verify phase
	planted, failed   int      // wrong MACs planted; "failed" answers to them
	unexpected        int      // any other error, wrong status or wrong result
	errs              []string // the first few of them
}

func (r *loadResult) unexpectedf(format string, args ...any) {
	r.unexpected++
	if len(r.errs) < 8 {
		r.errs = append(r.errs, fmt.Sprintf(format, args...))
	}
}

// pairRate is verifications per second over both phases.
func (r *loadResult) pairRate() float64 {
	return float64(r.verify.n) / (r.challenge.wall + r.verify.wall).Seconds()
}

// round runs n verifications (module comment): a challenge attack, the
// cards' answers, a verify attack, each paced by mode.
func (e *loadEnv) round(tb testing.TB, n int, mode loadMode, limit time.Duration) *loadResult {
	tb.Helper()
	res := &loadResult{}
	ts := make([]vegeta.Target, n)
	for i := range ts {
		ts[i] = vegeta.Target{Method: "POST", URL: e.cardURL(i%len(e.cards), "challenge"), Header: e.header}
	}
	type issued struct {
		card      int
		challenge []byte
	}
	var got []issued
	var err error
	res.challenge, err = e.attack("challenge", ts, mode, limit, func(r *vegeta.Result) {
		var ch api.Challenge
		switch {
		case r.Code != http.StatusOK || r.Error != "":
			res.unexpectedf("challenge %s: %d %s %s", r.URL, r.Code, r.Error, r.Body)
		case json.Unmarshal(r.Body, &ch) != nil || len(ch.Challenge) != protocol.ChallengeLen:
			res.unexpectedf("challenge %s: answer %s", r.URL, r.Body)
		default:
			got = append(got, issued{e.card[r.URL], ch.Challenge})
		}
	})
	if err != nil {
		tb.Fatal(err)
	}
	// The cards answer, in process, off the clock; the planted wrong MACs.
	planted := make([]int, len(e.cards))
	ts = ts[:len(got)]
	for i, g := range got {
		mac := cardtest.Authenticate(tb, e.cards[g.card].A, g.challenge)
		if i%loadPlantEvery == loadPlantAt {
			mac[i%len(mac)] ^= 0x01
			planted[g.card]++
			res.planted++
		}
		body, _ := json.Marshal(api.VerifyRequest{Challenge: g.challenge, MAC: mac})
		ts[i] = vegeta.Target{Method: "POST", URL: e.cardURL(g.card, "verify"), Body: body, Header: e.header}
	}
	verifyCard := map[string]int{}
	for i := range e.cards {
		verifyCard[e.cardURL(i, "verify")] = i
	}
	failed := make([]int, len(e.cards))
	res.verify, err = e.attack("verify", ts, mode, limit, func(r *vegeta.Result) {
		var v api.VerifyResult
		if r.Code != http.StatusOK || r.Error != "" || json.Unmarshal(r.Body, &v) != nil {
			res.unexpectedf("verify %s: %d %s %s", r.URL, r.Code, r.Error, r.Body)
			return
		}
		switch c := verifyCard[r.URL]; v.Result {
		case api.ResultOK:
		case api.ResultFailed:
			failed[c]++
			res.failed++
		default:
			res.unexpectedf("verify %s: result %q", r.URL, v.Result)
		}
	})
	if err != nil {
		tb.Fatal(err)
	}
	for c := range e.cards {
		if failed[c] != planted[c] {
			res.unexpectedf("card %s: %d verifications failed, %d wrong MACs planted", hex.EncodeToString(e.cards[c].Rec.ID), failed[c], planted[c])
		}
	}
	return res
}

// directRate is BenchmarkIssuerVerify's measurement here: n
// verifications by an Authenticator on the same issuer (its token
// sessions) and store, without HTTP, challenges issued and answered
// before the clock, from as many concurrent callers as the attacks have
// connections (with the store's group commit, concurrency is what lets
// verifications share a transaction: fewer callers would understate it).
func (e *loadEnv) directRate(tb testing.TB, n int) float64 {
	tb.Helper()
	ctx := context.Background()
	auth := &issuer.Authenticator{Verifier: e.is, Store: e.st}
	chs, macs := make([][]byte, n), make([][]byte, n)
	for i := range n {
		ch, err := auth.Challenge(ctx, e.cards[i%len(e.cards)].Rec.ID)
		if err != nil {
			tb.Fatal(err)
		}
		chs[i], macs[i] = ch.Challenge, cardtest.Authenticate(tb, e.cards[i%len(e.cards)].A, ch.Challenge)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, loadConns)
	start := time.Now()
	for range loadConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				c := e.cards[i%len(e.cards)].Rec.ID
				if r, err := auth.Verify(ctx, c, chs[i], macs[i]); err != nil || !r.OK {
					errs <- fmt.Errorf("direct verify of card %s: %+v %v", hex.EncodeToString(c), r, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	d := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		tb.Fatal(err)
	}
	return float64(n) / d.Seconds()
}

// loadCardPool is the issuer (P-256, on a SoftHSM2 token, with the token
// sessions issuer serve opens by default) and the card pool.
func loadCardPool(tb testing.TB) (*issuer.Issuer, []cardtest.Card) {
	is := issuertest.New(tb, hsm.KindP256, 4)
	ids := make([]byte, loadCards)
	for i := range ids {
		ids[i] = byte(i)
	}
	return is, cardtest.Cards(tb, protocol.ECDHP256AES, is.Key.Public.SPKI, ids...)
}

// loadStores are the stores the load runs on.
var loadStores = []struct {
	name string
	db   func(testing.TB) string
}{
	{"sqlite", func(tb testing.TB) string { return filepath.Join(tb.TempDir(), "data") }},
	{"postgres", pgtest.NewDatabase},
}

// TestAPILoad is the load path in short, on both stores: a few hundred
// verifications in the closed loop and at a fixed rate, with no error but
// the planted wrong MACs, each answered 200 "failed" on its card.
func TestAPILoad(t *testing.T) {
	is, cards := loadCardPool(t)
	for _, k := range loadStores {
		t.Run(k.name, func(t *testing.T) {
			e := newLoadEnv(t, is, cards, k.db(t))
			for _, mode := range []loadMode{{"closed", 0}, {"paced", 400}} {
				r := e.round(t, 320, mode, time.Minute)
				if r.unexpected != 0 {
					t.Errorf("%s: %d unexpected errors: %q", mode.name, r.unexpected, r.errs)
				}
				if r.planted != 3 || r.failed != r.planted {
					t.Errorf("%s: %d wrong MACs planted, %d answered failed; want 3 and 3", mode.name, r.planted, r.failed)
				}
				if r.challenge.n != 320 || r.verify.n != 320 {
					t.Errorf("%s: %d challenges, %d verifies", mode.name, r.challenge.n, r.verify.n)
				}
			}
		})
	}
}

// BenchmarkAPILoad: b.N verifications through HTTPS (module comment),
// twice: in the closed loop (loadConns connections as fast as the issuer
// answers: its capacity) and then paced in the open loop at loadGoal
// times the Authenticator's own rate (the latency at the goal rate:
// paced-offered/s, measured by the first half below), against the
// Authenticator's Verify on the same token and store with as many
// callers (BenchmarkIssuerVerify's measurement, directRate), half of it
// before the attacks and half after, so that the store's growth weighs
// on both.
// Goal: http/direct ≥ 0.5 and, at that rate, p99 ≤ 20 ms, with no error
// but the planted wrong MACs. On SQLite and on PostgreSQL.
func BenchmarkAPILoad(b *testing.B) {
	is, cards := loadCardPool(b)
	for _, k := range loadStores {
		b.Run(k.name, func(b *testing.B) {
			e := newLoadEnv(b, is, cards, k.db(b))
			limit := 10 * time.Minute
			e.round(b, 4*loadConns, loadMode{"closed", 0}, limit) // warm-up: connections, statements
			half := max(b.N/2, 1)
			d1 := e.directRate(b, half)
			b.ResetTimer()
			closed := e.round(b, b.N, loadMode{"closed", 0}, limit)
			offered := max(int(loadGoal*d1), 1)
			paced := e.round(b, b.N, loadMode{"paced", offered}, limit)
			b.StopTimer()
			d2 := e.directRate(b, half)
			direct := 2 / (1/d1 + 1/d2) // both halves' count over both halves' time
			for _, r := range []*loadResult{closed, paced} {
				if r.unexpected != 0 || r.failed != r.planted {
					b.Fatalf("%d unexpected errors (%q); %d wrong MACs planted, %d answered failed", r.unexpected, r.errs, r.planted, r.failed)
				}
			}
			ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
			b.ReportMetric(direct, "direct-verify/s")
			b.ReportMetric(closed.verify.rate, "verify/s")
			b.ReportMetric(closed.verify.rate/direct, "http/direct")
			b.ReportMetric(ms(closed.verify.p50), "p50-ms")
			b.ReportMetric(ms(closed.verify.p99), "p99-ms")
			b.ReportMetric(ms(closed.verify.p999), "p999-ms")
			b.ReportMetric(closed.challenge.rate, "challenge/s")
			b.ReportMetric(ms(closed.challenge.p99), "challenge-p99-ms")
			b.ReportMetric(closed.pairRate(), "pair/s")
			b.ReportMetric(float64(offered), "paced-offered/s")
			b.ReportMetric(paced.verify.rate, "paced-verify/s")
			b.ReportMetric(paced.verify.rate/direct, "paced/direct")
			b.ReportMetric(ms(paced.verify.p50), "paced-p50-ms")
			b.ReportMetric(ms(paced.verify.p99), "paced-p99-ms")
			b.ReportMetric(ms(paced.verify.p999), "paced-p999-ms")
			b.ReportMetric(float64(closed.planted+paced.planted), "planted-failed")
			b.ReportMetric(0, "ns/op")
		})
	}
}
