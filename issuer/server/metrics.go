package server

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"blindperso/api"
	"blindperso/issuer"
)

type metrics struct {
	batches      *prometheus.CounterVec
	imported     prometheus.Counter
	rejects      prometheus.Counter
	conflicts    prometheus.Counter
	unattested   prometheus.Counter
	verifies     *prometheus.CounterVec
	verifyTime   prometheus.Histogram
	tokenLatency *prometheus.HistogramVec
}

// batchError labels uploads whose import failed for another reason than
// a refusal (not a batch status).
const batchError = "error"

func newMetrics(reg *prometheus.Registry, is *issuer.Issuer, st issuer.Store) *metrics {
	m := &metrics{
		batches: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "blindperso_issuer_batch_imports_total",
			Help: "Batch uploads imported through the API, by outcome (done, refused, error)."}, []string{"status"}),
		imported: prometheus.NewCounter(prometheus.CounterOpts{Name: "blindperso_issuer_imported_cards_total",
			Help: "Cards imported (the imported count of each upload's report)."}),
		rejects: prometheus.NewCounter(prometheus.CounterOpts{Name: "blindperso_issuer_rejected_records_total",
			Help: "Records rejected (the rejects count of each upload's report)."}),
		conflicts: prometheus.NewCounter(prometheus.CounterOpts{Name: "blindperso_issuer_conflicts_total",
			Help: "Conflicting records: a known card Id with another c (the conflicts count of each upload's report)."}),
		unattested: prometheus.NewCounter(prometheus.CounterOpts{Name: "blindperso_issuer_unattested_cards_total",
			Help: "Cards imported without a verified chip attestation (the unattested count of each upload's report; PROTOCOL.md §10)."}),
		verifies: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "blindperso_issuer_verifications_total",
			Help: "Card verifications by result (ok, failed, blocked, refused)."}, []string{"result"}),
		verifyTime: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "blindperso_issuer_verify_seconds",
			Help:    "Latency of a whole verification: the read, the token's check, and the wait for the group commit that makes it durable.",
			Buckets: prometheus.ExponentialBuckets(0.0002, 2, 14)}),
		tokenLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "blindperso_issuer_token_op_seconds",
			Help:    "Latency of token operations: import (derive and wrap one card's K_I), verify (one MAC check).",
			Buckets: prometheus.ExponentialBuckets(0.0002, 2, 14)}, []string{"op"}),
	}
	reg.MustRegister(m.batches, m.imported, m.rejects, m.conflicts, m.unattested, m.verifies, m.verifyTime, m.tokenLatency)
	// Transactions PostgreSQL aborted for a concurrent one (another
	// instance) and the store ran again.
	if r, ok := st.(interface{ Retries() int64 }); ok {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "blindperso_issuer_store_retries_total",
			Help: "Store transactions run again because PostgreSQL aborted them for a concurrent one (deadlock, serialization failure)."},
			func() float64 { return float64(r.Retries()) }))
	}
	// The SoftHSM2 recycling (docs/HSM.md): how often, how long it held
	// the token's calls off, and whether one failed.
	rs := is.RecycleStats
	reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "blindperso_issuer_token_recycles_total",
			Help: "Re-initializations of a token library that keeps destroyed objects (SoftHSM2), to free them."},
			func() float64 { return float64(rs().Recycles) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "blindperso_issuer_token_recycle_failures_total",
			Help: "Recycles that failed (the next token call re-initializes the library)."},
			func() float64 { return float64(rs().Failures) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "blindperso_issuer_token_recycle_pause_seconds_total",
			Help: "Time the recycles held every token call off, in all."},
			func() float64 { return rs().Total.Seconds() }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "blindperso_issuer_token_recycle_pause_max_seconds",
			Help: "The longest pause of one recycle so far."},
			func() float64 { return rs().Max.Seconds() }),
	)
	reg.MustRegister(memberCollector{is})
	for _, r := range []string{api.ResultOK, api.ResultFailed, api.ResultBlocked, api.ResultRefused} {
		m.verifies.WithLabelValues(r)
	}
	for _, s := range []string{api.BatchDone, api.BatchRefused, batchError} {
		m.batches.WithLabelValues(s)
	}
	return m
}

// timedVerifier observes the latency of each MAC check in the token.
type timedVerifier struct {
	v issuer.MACVerifier
	h prometheus.Observer
}

func (t timedVerifier) Verify(ctx context.Context, ck issuer.CardKey, challenge, mac []byte) (bool, error) {
	start := time.Now()
	ok, err := t.v.Verify(ctx, ck, challenge, mac)
	t.h.Observe(time.Since(start).Seconds())
	return ok, err
}
