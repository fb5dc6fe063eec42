package issuer

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"blindperso/hsm"
	"blindperso/protocol"
)

// BenchmarkExport: Exporter.Export (store pages, hsm.ExportCardKey in
// the token — unwrap under the KEK, wrap under the KTK, destroy — the
// lines in Id order into the partial file, synced every 1024 lines, each
// group's cards logged in SQLite, WAL, synchronous=FULL, then the rename
// and the manifest) against the token's bare loop: hsm.ExportCardKey of
// the same blobs on the same token with the same keys (a session copy of
// the KEK, the KTK token object, as the Exporter uses them) and as many
// goroutines as workers, each on its own OS thread, run just before or
// just after each export (alternately), in 4 rounds, after an untimed
// warm-up of both. b.N is the
// number of cards (at least 500). Goal: export/bare ≥ 0.85.
func BenchmarkExport(b *testing.B) {
	for _, kind := range []string{tokSoftHSM2, tokNSS} {
		b.Run(kind, func(b *testing.B) {
			for _, w := range benchWorkers {
				b.Run(fmt.Sprintf("workers=%d", w), func(b *testing.B) {
					benchExport(b, kind, w)
				})
			}
		})
	}
}

func benchExport(b *testing.B, kind string, w int) {
	ctx := context.Background()
	g := newExpRig(b, kind, w)
	n := max(b.N, 500)
	_, path := hostBatch(b, g.is, protocol.ECDHP256AES, n, 1, b.TempDir())
	st := openBenchStore(b)
	importAll(b, g.is, st, path)
	sel := ExportSelection{Batch: batchID(b, path)}
	cards, err := st.SelectCards(ctx, sel.Batch, "", nil, n)
	if err != nil || len(cards) != n {
		b.Fatalf("%d cards: %v", len(cards), err)
	}
	dir := b.TempDir()
	rounds := 0
	round := func() (exp, bare time.Duration) {
		rounds++
		// Which goes first alternates: SoftHSM2 slows down as the
		// session objects it keeps pile up between recycles, which
		// would count against whichever always ran second.
		if rounds%2 == 0 {
			bare = bareExport(b, g, cards, w)
		}
		ex := &Exporter{Store: st, Token: g.tok, KEK: g.kek, KTK: g.ktk, Workers: w, Operator: "bench"}
		out := filepath.Join(dir, fmt.Sprintf("round-%d.ndjson", rounds))
		start := time.Now()
		res, err := withProcs(w, func() (ExportResult, error) { return ex.Export(ctx, sel, out) })
		exp = time.Since(start)
		if err != nil || res.Manifest.Count != n {
			b.Fatalf("export: %+v %v", res, err)
		}
		if rounds%2 == 1 {
			bare = bareExport(b, g, cards, w)
		}
		return exp, bare
	}
	round() // warm-up
	b.ResetTimer()
	var expT, bareT time.Duration
	const timed = 4
	for range timed {
		e, bb := round()
		expT += e
		bareT += bb
	}
	b.StopTimer()
	expRate := float64(timed*n) / expT.Seconds()
	bareRate := float64(timed*n) / bareT.Seconds()
	b.ReportMetric(expRate, "export/s")
	b.ReportMetric(bareRate, "bare/s")
	b.ReportMetric(expRate/bareRate, "export/bare")
	b.ReportMetric(0, "ns/op")
}

// bareExport exports cards' keys in the token and drops the results: the
// token's part of an export alone.
func bareExport(b *testing.B, g *expRig, cards []ExportCard, w int) time.Duration {
	ctx := context.Background()
	kc := g.kek.SessionCopy()
	defer kc.Destroy(ctx)
	return parallelOps(b, w, len(cards), func(i int) error {
		return g.tok.With(ctx, func(s hsm.Session) error {
			kh, err := kc.Handle(s)
			if err != nil {
				return err
			}
			th, err := g.ktk.Handle(s)
			if err != nil {
				return err
			}
			_, err = hsm.ExportCardKey(s, kh, th, cards[i].Blob)
			return err
		})
	})
}
