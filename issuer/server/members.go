package server

import (
	"github.com/prometheus/client_golang/prometheus"

	"blindperso/issuer"
)

// memberCollector exports the state and work of each token of the
// issuer (hsm.Group), read at each scrape: a member's rate is the rate()
// of its operations counter.
type memberCollector struct{ is *issuer.Issuer }

var (
	memberUp = prometheus.NewDesc("blindperso_issuer_token_member_up",
		"1 if the token member takes work, 0 while it is out (taken out after a device failure or a missed deadline; re-probed until it answers with the group's keys).",
		[]string{"member"}, nil)
	memberOps = prometheus.NewDesc("blindperso_issuer_token_member_operations_total",
		"Operations the token member answered, by op (import, verify).", []string{"member", "op"}, nil)
	memberOutages = prometheus.NewDesc("blindperso_issuer_token_member_outages_total",
		"Times the token member was taken out.", []string{"member"}, nil)
	memberInFlight = prometheus.NewDesc("blindperso_issuer_token_member_in_flight",
		"Operations waiting for one of the token member's sessions or in one now.", []string{"member"}, nil)
	memberFailovers = prometheus.NewDesc("blindperso_issuer_token_failovers_total",
		"Token calls redone after a device failure: on another member, or, for a lone token, in a new session.", nil, nil)
)

func (c memberCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{memberUp, memberOps, memberOutages, memberInFlight, memberFailovers} {
		ch <- d
	}
}

func (c memberCollector) Collect(ch chan<- prometheus.Metric) {
	for _, m := range c.is.Members() {
		up := 0.0
		if m.Up {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(memberUp, prometheus.GaugeValue, up, m.Name)
		ch <- prometheus.MustNewConstMetric(memberOps, prometheus.CounterValue, float64(m.Imports), m.Name, "import")
		ch <- prometheus.MustNewConstMetric(memberOps, prometheus.CounterValue, float64(m.Verifies), m.Name, "verify")
		ch <- prometheus.MustNewConstMetric(memberOutages, prometheus.CounterValue, float64(m.Downs), m.Name)
		ch <- prometheus.MustNewConstMetric(memberInFlight, prometheus.GaugeValue, float64(m.InFlight), m.Name)
	}
	ch <- prometheus.MustNewConstMetric(memberFailovers, prometheus.CounterValue, float64(c.is.Failovers()))
}
