package issuer

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"blindperso/card/cardtest"
	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// SoftHSM2 2.6.1 keeps every session object it destroyed until it is
// finalized, and a verification makes one (K_I unwrapped under the KEK
// for its C_Verify). These tests run many verifications through
// Issuer.Verify, the MACVerifier of issuer serve's Authenticator: without
// the recycling the library's C heap grows with every one; with it
// (hsm.CardKeys, the same mechanism as the importer's) it stays flat,
// while concurrent verifications go on across the recycles without an
// error and with a pause no longer than the recycle itself.

// rcCard is a card imported through the Issuer whose K_I the test knows,
// so it can answer any challenge (protocol.AuthMAC, as the card does).
type rcCard struct {
	ck CardKey
	ki []byte
}

// rcIssuer is a fresh SoftHSM2 token with sessions pooled, a P-256
// issuer key and a trusted KEK, and n ecdh-p256-aes cards imported (by
// another Issuer value); the Issuer returned recycles every every
// operations and has not been used yet.
func rcIssuer(t *testing.T, sessions, n int, every int64) (*Issuer, []rcCard) {
	t.Helper()
	ctx := context.Background()
	tt := hsmtest.SoftHSM(t)
	tok, err := hsm.OpenURI(tt.URI, sessions)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tok.Close() })
	if !tok.KeepsDestroyedObjects() {
		t.Fatal("SoftHSM2 is not marked as keeping destroyed objects")
	}
	key, err := tok.GenerateIssuerKey(ctx, hsm.KindP256, "issuer")
	if err != nil {
		t.Fatal(err)
	}
	kek, err := tok.GenerateKEK(ctx, "kek", tt.SOPIN)
	if err != nil {
		t.Fatal(err)
	}
	imp := &Issuer{Token: tok, Key: key, KEK: kek}
	defer imp.Close(ctx)
	ids := make([]byte, n)
	for i := range ids {
		ids[i] = byte(0x10 + i)
	}
	var cards []rcCard
	for _, c := range cardtest.Cards(t, protocol.ECDHP256AES, key.Public.SPKI, ids...) {
		ck, err := imp.Import(ctx, c.Rec)
		if err != nil {
			t.Fatal(err)
		}
		cards = append(cards, rcCard{ck: ck, ki: cardtest.KI(t, c.A.Path())})
	}
	return &Issuer{Token: tok, Key: key, KEK: kek, RecycleEvery: every}, cards
}

// rcResult is what a run of verifications did.
type rcResult struct {
	errs                  atomic.Int64
	firstErr              atomic.Value
	genuineFailed, forged atomic.Int64 // genuine MACs refused, forged ones accepted
	lat                   []time.Duration
	wall                  time.Duration
}

// rcLoad runs n verifications through is.Verify on workers goroutines.
// Verification i is of card i mod len(cards); even ones carry the card's
// MAC over a fresh challenge, odd ones a forgery (the MAC of another
// card's key, or of the card's key over another challenge).
func rcLoad(is *Issuer, cards []rcCard, n, workers int) *rcResult {
	ctx := context.Background()
	r := &rcResult{lat: make([]time.Duration, n)}
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ch := make([]byte, protocol.ChallengeLen)
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				c := cards[i%len(cards)]
				rand.Read(ch)
				ki, over := c.ki, ch
				genuine := i%2 == 0
				if !genuine {
					if i%4 == 1 {
						ki = cards[(i+1)%len(cards)].ki
					} else {
						over = append([]byte{^ch[0]}, ch[1:]...)
					}
				}
				mac, err := protocol.AuthMAC(ki, c.ck.ID, over)
				if err != nil {
					panic(err)
				}
				t0 := time.Now()
				ok, err := is.Verify(ctx, c.ck, ch, mac)
				r.lat[i] = time.Since(t0)
				switch {
				case err != nil:
					if r.errs.Add(1) == 1 {
						r.firstErr.Store(fmt.Errorf("verification %d: %w", i, err))
					}
				case genuine && !ok:
					r.genuineFailed.Add(1)
				case !genuine && ok:
					r.forged.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	r.wall = time.Since(start)
	return r
}

// check fails t unless every verification gave the right answer.
func (r *rcResult) check(t *testing.T) {
	t.Helper()
	if n := r.errs.Load(); n > 0 {
		t.Errorf("%d verifications failed; the first: %v", n, r.firstErr.Load())
	}
	if n := r.genuineFailed.Load(); n > 0 {
		t.Errorf("%d genuine MACs did not verify", n)
	}
	if n := r.forged.Load(); n > 0 {
		t.Errorf("%d forged MACs verified", n)
	}
}

// quantile of the latencies (q in [0,1]).
func (r *rcResult) quantile(q float64) time.Duration {
	s := slices.Clone(r.lat)
	slices.Sort(s)
	return s[min(len(s)-1, int(q*float64(len(s))))]
}

// rcHeap is hsm.CHeapInUse, or a skip where the C library cannot say.
func rcHeap(t *testing.T) int64 {
	t.Helper()
	n, ok := hsm.CHeapInUse()
	if !ok {
		t.Skip("the C library does not report its heap (glibc ≥ 2.33 does)")
	}
	return n
}

// rcRSS is the process's VmRSS in bytes.
func rcRSS() int64 {
	raw, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// rcSpan runs n verifications in steps, sampling the C heap after each,
// and returns the samples' spread (max − min) and the samples.
func rcSpan(t *testing.T, is *Issuer, cards []rcCard, n, step int) (int64, []int64) {
	t.Helper()
	samples := []int64{rcHeap(t)}
	for done := 0; done < n; done += step {
		rcLoad(is, cards, step, 2).check(t)
		samples = append(samples, rcHeap(t))
	}
	return slices.Max(samples) - slices.Min(samples), samples
}

func mib(n int64) string { return fmt.Sprintf("%.2f MiB", float64(n)/(1<<20)) }

// TestVerifyLeakAndRecycling shows the defect, then the fix, on the same
// token and keys: 20 000 verifications with the recycling off grow the C
// heap (where SoftHSM2 keeps its objects) by a few hundred bytes each,
// steadily; the same 20 000 with an Issuer that recycles every 2000
// (hsm.CardKeys, as the importer) leave it flat within one period's
// worth.
func TestVerifyLeakAndRecycling(t *testing.T) {
	const n, step, every = 20000, 1500, 2000
	leaky, cards := rcIssuer(t, 2, 4, hsm.NeverRecycle)
	// Start from a library without the imports' dead objects, warm.
	if err := leaky.Token.Recycle(); err != nil {
		t.Fatal(err)
	}
	rcLoad(leaky, cards, 1000, 2).check(t)
	gen, rss0 := leaky.Token.Generation(), rcRSS()
	leak, samples := rcSpan(t, leaky, cards, n, step)
	rss1 := rcRSS()
	if g := leaky.Token.Generation(); g != gen {
		t.Fatalf("the token was re-initialized %d times with the recycling off", g-gen)
	}
	perOp := float64(leak) / n
	t.Logf("recycling off: C heap %s → %s (+%s, %.0f B per verification), RSS %s → %s",
		mib(samples[0]), mib(samples[len(samples)-1]), mib(leak), perOp, mib(rss0), mib(rss1))
	// The defect: every step adds to the heap, ≥ 100 B per verification.
	for i := 1; i < len(samples); i++ {
		if samples[i] <= samples[i-1] {
			t.Errorf("recycling off, step %d: the C heap did not grow (%d → %d): is the leak gone from SoftHSM2?", i, samples[i-1], samples[i])
		}
	}
	if perOp < 100 {
		t.Fatalf("recycling off: %.0f B per verification, want the leak (≥ 100 B) shown", perOp)
	}

	// The fix: the same token and keys through an Issuer that recycles.
	fixed := &Issuer{Token: leaky.Token, Key: leaky.Key, KEK: leaky.KEK, RecycleEvery: every}
	rcLoad(fixed, cards, every, 2).check(t) // its first recycle frees the leak above
	rss0 = rcRSS()
	spread, samples := rcSpan(t, fixed, cards, n, step)
	rss1 = rcRSS()
	st := fixed.RecycleStats()
	t.Logf("recycling every %d: C heap %s → %s (spread %s), RSS %s → %s; %d recycles, pause max %v, mean %v",
		every, mib(samples[0]), mib(samples[len(samples)-1]), mib(spread), mib(rss0), mib(rss1),
		st.Recycles, st.Max.Round(time.Microsecond), (st.Total / time.Duration(max(1, st.Recycles))).Round(time.Microsecond))
	if want := int64((n + every) / every); st.Recycles < want-1 || st.Failures != 0 {
		t.Errorf("recycles %d (want ≥ %d), failures %d (%v)", st.Recycles, want-1, st.Failures, st.LastErr)
	}
	// Flat: at most one period's dead objects (plus allocator slack),
	// and far below the leak.
	if limit := int64(perOp*every) + 512<<10; spread > limit || spread > leak/4 {
		t.Errorf("recycling every %d: the C heap spread over %d verifications is %s, want ≤ %s and ≤ a quarter of the leak (%s)",
			every, n, mib(spread), mib(limit), mib(leak))
	}
}

// TestVerifyConcurrentAcrossRecycles: 20 000 verifications on 8
// goroutines over a pool of 4 sessions (issuer serve's: workers + 2)
// through Issuer.Verify, recycling every 1000: about 20 recycles, no
// verification fails, every genuine MAC verifies and every forged one
// does not; the latency tail is logged beside the same load's without
// recycling (the machine's own).
func TestVerifyConcurrentAcrossRecycles(t *testing.T) {
	const n, workers, every = 20000, 8, 1000
	is, cards := rcIssuer(t, 4, 8, every)
	gen := is.Token.Generation()
	r := rcLoad(is, cards, n, workers)
	r.check(t)
	st := is.RecycleStats()
	p50, p99, worst := r.quantile(0.5), r.quantile(0.99), slices.Max(r.lat)
	mean := st.Total / time.Duration(max(1, st.Recycles))
	t.Logf("%d verifications on %d goroutines in %v (%.0f/s); latency p50 %v, p99 %v, max %v; %d recycles (pause mean %v, max %v)",
		n, workers, r.wall.Round(time.Millisecond), float64(n)/r.wall.Seconds(), p50.Round(time.Microsecond),
		p99.Round(time.Microsecond), worst.Round(time.Microsecond), st.Recycles, mean.Round(time.Microsecond), st.Max.Round(time.Microsecond))
	if st.Recycles < n/every-1 || st.Failures != 0 {
		t.Errorf("recycles %d (want ≥ %d), failures %d (%v)", st.Recycles, n/every-1, st.Failures, st.LastErr)
	}
	if g := is.Token.Generation() - gen; g != uint64(2*st.Recycles) {
		t.Errorf("%d module generations for %d recycles (want two each)", g, st.Recycles)
	}
	// The same load with the recycling off, for the machine's own tail.
	base := &Issuer{Token: is.Token, Key: is.Key, KEK: is.KEK, RecycleEvery: hsm.NeverRecycle}
	br := rcLoad(base, cards, n, workers)
	br.check(t)
	t.Logf("the same without recycling: %.0f/s; latency p50 %v, p99 %v, max %v", float64(n)/br.wall.Seconds(),
		br.quantile(0.5).Round(time.Microsecond), br.quantile(0.99).Round(time.Microsecond), slices.Max(br.lat).Round(time.Microsecond))
	// The worst wait is the recycle itself plus the re-opening after it
	// and ordinary queueing: the log has the numbers, to read against
	// the same load's tail without recycling. Not asserted: a timed
	// bound failed CI once when the machine stalled a call for 1.2 s
	// (other suites ran beside it), which says nothing about recycling.
}
