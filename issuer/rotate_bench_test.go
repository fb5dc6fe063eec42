package issuer

import (
	"context"
	"fmt"
	"testing"
	"time"

	"blindperso/hsm"
	"blindperso/protocol"
)

// BenchmarkKEKRotate: Rotate (store pages, re-wrap in the token, group
// commits of the replaced blobs into SQLite, WAL, synchronous=FULL)
// against the token's bare loop — hsm.RewrapCardKey (unwrap, wrap,
// destroy) of the same blobs, same direction, on the same token with the
// same keys (session copies of both KEKs, as Rotate uses) and as many
// goroutines as workers, each on its own OS thread — run just before
// each rotation, in 4 rounds that alternate the direction (A → B, B →
// A, …); an untimed warm-up of both first. b.N is the number of cards
// (at least 500). Goal: rotate/bare ≥ 0.85 (docs/BENCHMARKS.md, "KEK
// rotation").
func BenchmarkKEKRotate(b *testing.B) {
	for _, kind := range []string{"softhsm2", "nss"} {
		b.Run(kind, func(b *testing.B) {
			for _, w := range benchWorkers {
				b.Run(fmt.Sprintf("workers=%d", w), func(b *testing.B) {
					benchRotate(b, kind, w)
				})
			}
		})
	}
}

func benchRotate(b *testing.B, kind string, w int) {
	ctx := context.Background()
	rt := newRotToken(b, kind, w)
	n := max(b.N, 500)
	_, path := hostBatch(b, rt.is, protocol.ECDHP256AES, n, 1, b.TempDir())
	st := openBenchStore(b)
	importAll(b, rt.is, st, path)
	from, to := rt.a, rt.b
	round := func() (rot, bare time.Duration) {
		blobs, err := st.BlobsUnderKEK(ctx, from.Label, nil, n)
		if err != nil || len(blobs) != n {
			b.Fatalf("%d blobs under %s: %v", len(blobs), from.Label, err)
		}
		bare = bareRewrap(b, rt.tok, from, to, blobs, w)
		start := time.Now()
		res, err := withProcs(w, func() (RotateResult, error) { return Rotate(ctx, st, rt.tok, from, to, RotateOptions{Workers: w}) })
		rot = time.Since(start)
		if err != nil || res.Rewrapped != n {
			b.Fatalf("rotate: %+v %v", res, err)
		}
		from, to = to, from
		return rot, bare
	}
	round() // warm-up
	b.ResetTimer()
	var rotT, bareT time.Duration
	const rounds = 4
	for range rounds {
		r, bb := round()
		rotT += r
		bareT += bb
	}
	b.StopTimer()
	rotRate := float64(rounds*n) / rotT.Seconds()
	bareRate := float64(rounds*n) / bareT.Seconds()
	b.ReportMetric(rotRate, "rotate/s")
	b.ReportMetric(bareRate, "bare/s")
	b.ReportMetric(rotRate/bareRate, "rotate/bare")
	b.ReportMetric(0, "ns/op")
}

// bareRewrap re-wraps blobs from → to in the token and drops the results:
// the token's part of a rotation alone.
func bareRewrap(b *testing.B, tok *hsm.Token, from, to *hsm.KEKRef, blobs []CardBlob, w int) time.Duration {
	ctx := context.Background()
	fc, tc := from.SessionCopy(), to.SessionCopy()
	defer fc.Destroy(ctx)
	defer tc.Destroy(ctx)
	return parallelOps(b, w, len(blobs), func(i int) error {
		return tok.With(ctx, func(s hsm.Session) error {
			fh, err := fc.Handle(s)
			if err != nil {
				return err
			}
			th, err := tc.Handle(s)
			if err != nil {
				return err
			}
			_, err = hsm.RewrapCardKey(s, fh, th, blobs[i].Blob)
			return err
		})
	})
}
