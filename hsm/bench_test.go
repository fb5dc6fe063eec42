package hsm

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"blindperso/protocol"
)

// Benchmarks of the in-token chains (make bench; docs/BENCHMARKS.md has
// the figures). Every ratio is measured within one run: the machines are
// noisy (±30 % between runs), a ratio within a run is not.
//
// BenchmarkImport: per token, per profile it can run, at 1 and 2
// sessions used in parallel (through the token layer's pool, With): the
// whole import (derive K_I + wrap + destroy, ImportCard), against the
// token's bare transport operation (RSA unwrap of c into a session key +
// destroy, or ECDH derive + destroy) measured in the same benchmark
// before and after. ns/op is the import; chain/s, bare/s and chain/bare
// are reported. Goal: chain/bare ≥ 0.85.
//
// The issuer keys and the KEK are session objects of the benchmark (the
// product may hold token objects; on SoftHSM2 a session copy is what
// avoids its file back end on every use, DESIGN.md §9).

// benchSessions are the parallel session counts measured.
var benchSessions = []int{1, 2}

// bareStep is each transport's bare operation: the chain's first step
// without any KDF.
var bareStep = map[protocol.Transport]step{
	protocol.RSARaw:   unwrapRawGeneric,
	protocol.RSAOAEP:  unwrapOAEPAES,
	protocol.ECDHP256: ecdhZ,
}

// benchFixture is a token with keys and ready-made cards.
type benchFixture struct {
	tt    *testToken
	keys  map[bool]generatedKey // by "is EC"
	cards map[string][]softCard // by profile
}

func newBenchFixture(b *testing.B, kind string) *benchFixture {
	f := &benchFixture{tt: openTestToken(b, kind, 2), cards: map[string][]softCard{}}
	f.keys = map[bool]generatedKey{false: f.tt.generateIssuerKey(b, false), true: f.tt.generateIssuerKey(b, true)}
	for _, name := range briefRunnable[kind] {
		p := mustProfile(b, name)
		for range 64 {
			f.cards[name] = append(f.cards[name], newSoftCard(b, p, f.keys[p.Transport == protocol.ECDHP256].pub))
		}
	}
	return f
}

// parallel runs op n times on w goroutines, each through the pool, and
// returns the wall time.
func (f *benchFixture) parallel(b *testing.B, w, n int, op func(s Session, i int) error) time.Duration {
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	start := time.Now()
	for range w {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := f.tt.with(func(s Session) error { return op(s, i) }); err != nil {
					failed.CompareAndSwap(nil, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	d := time.Since(start)
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
	return d
}

// interleaved runs b.N chain operations and about b.N/2 bare ones in
// alternating rounds, so that the machine's drift during the run (other
// tenants, frequency changes) falls on both alike; the benchmark timer
// counts the chain rounds only. It returns both rates per second.
func (f *benchFixture) interleaved(b *testing.B, w int, chainOp, bareOp func(Session, int) error) (chainRate, bareRate float64) {
	const rounds = 8
	b.ResetTimer()
	b.StopTimer()
	var chainT, bareT time.Duration
	chainN, bareN := 0, 0
	for r := range rounds {
		n := b.N/rounds + boolInt(r < b.N%rounds)
		nb := max(n/2, 1)
		bareT += f.parallel(b, w, nb, bareOp)
		bareN += nb
		if n == 0 {
			continue
		}
		b.StartTimer()
		chainT += f.parallel(b, w, n, chainOp)
		b.StopTimer()
		chainN += n
	}
	return float64(chainN) / chainT.Seconds(), float64(bareN) / bareT.Seconds()
}

func boolInt(v bool) int {
	if v {
		return 1
	}
	return 0
}

func BenchmarkImport(b *testing.B) {
	for _, kind := range testTokenKinds {
		b.Run(kind, func(b *testing.B) {
			f := newBenchFixture(b, kind)
			for _, name := range briefRunnable[kind] {
				p := mustProfile(b, name)
				key := f.keys[p.Transport == protocol.ECDHP256]
				cards := f.cards[name]
				chainOp := func(s Session, i int) error {
					_, err := ImportCard(s, p, key.sk, f.tt.kek, key.pub.SPKI, cards[i%len(cards)].c)
					return err
				}
				bare := bareStep[p.Transport]
				bareOp := func(s Session, i int) error {
					in := chainInput{c: cards[i%len(cards)].c}
					h, err := bare.run(s, key.sk, &in, false, bare.lenByWrap(s.M))
					if err != nil {
						return err
					}
					return s.P.DestroyObject(s.H, h)
				}
				for _, w := range benchSessions {
					b.Run(fmt.Sprintf("%s/sessions=%d", name, w), func(b *testing.B) {
						chainRate, bareRate := f.interleaved(b, w, chainOp, bareOp)
						b.ReportMetric(chainRate, "chain/s")
						b.ReportMetric(bareRate, "bare/s")
						b.ReportMetric(chainRate/bareRate, "chain/bare")
					})
				}
			}
		})
	}
}

// BenchmarkImportTokenObjects is BenchmarkImport on SoftHSM2 with the
// keys as the issuer makes them (GenerateIssuerKey, GenerateKEK: token
// objects, found by handle), to price SoftHSM2's file back end, which
// re-reads a token object's file on every use (DESIGN.md §9).
func BenchmarkImportTokenObjects(b *testing.B) {
	ctx := context.Background()
	f := newBenchFixture(b, kindSoftHSM2)
	rsaKey, err := f.tt.tok.GenerateIssuerKey(ctx, KindRSA2048, "bench-rsa")
	if err != nil {
		b.Fatal(err)
	}
	ecKey, err := f.tt.tok.GenerateIssuerKey(ctx, KindP256, "bench-ec")
	if err != nil {
		b.Fatal(err)
	}
	kek, err := f.tt.tok.GenerateKEK(ctx, "bench-kek", f.tt.hs.SOPIN)
	if err != nil {
		b.Fatal(err)
	}
	for _, name := range briefRunnable[kindSoftHSM2] {
		p := mustProfile(b, name)
		ref := rsaKey
		if p.Transport == protocol.ECDHP256 {
			ref = ecKey
		}
		var cards []softCard
		for range 64 {
			cards = append(cards, newSoftCard(b, p, ref.Public))
		}
		chainOp := func(s Session, i int) error {
			sk, err := ref.Handle(s)
			if err != nil {
				return err
			}
			k, err := kek.Handle(s)
			if err != nil {
				return err
			}
			_, err = ImportCard(s, p, sk, k, ref.Public.SPKI, cards[i%len(cards)].c)
			return err
		}
		bare := bareStep[p.Transport]
		bareOp := func(s Session, i int) error {
			sk, err := ref.Handle(s)
			if err != nil {
				return err
			}
			in := chainInput{c: cards[i%len(cards)].c}
			h, err := bare.run(s, sk, &in, false, bare.lenByWrap(s.M))
			if err != nil {
				return err
			}
			return s.P.DestroyObject(s.H, h)
		}
		for _, w := range benchSessions {
			b.Run(fmt.Sprintf("%s/sessions=%d", name, w), func(b *testing.B) {
				chainRate, bareRate := f.interleaved(b, w, chainOp, bareOp)
				b.ReportMetric(chainRate, "chain/s")
				b.ReportMetric(bareRate, "bare/s")
				b.ReportMetric(chainRate/bareRate, "chain/bare")
			})
		}
	}
}

// BenchmarkAuthenticate: in-token verification of a card's MAC (unwrap
// the blob + CMAC verify — or sign and compare on NSS softokn — +
// destroy), per second, at 1 and 2 sessions.
func BenchmarkAuthenticate(b *testing.B) {
	for _, kind := range testTokenKinds {
		b.Run(kind, func(b *testing.B) {
			f := newBenchFixture(b, kind)
			p := protocol.ECDHP256AES
			key := f.keys[true]
			card := f.cards[p.Name][0]
			s := f.tt.session()
			blob, err := ImportCard(s, p, key.sk, f.tt.kek, key.pub.SPKI, card.c)
			if err != nil {
				b.Fatal(err)
			}
			challenge := make([]byte, protocol.ChallengeLen)
			mac := card.answer(b, challenge)
			for _, w := range benchSessions {
				b.Run(fmt.Sprintf("sessions=%d", w), func(b *testing.B) {
					d := f.parallel(b, w, b.N, func(s Session, _ int) error {
						ok, err := VerifyCardMAC(s, f.tt.kek, blob, card.id, challenge, mac)
						if err == nil && !ok {
							err = fmt.Errorf("the card's MAC does not verify")
						}
						return err
					})
					b.ReportMetric(float64(b.N)/d.Seconds(), "verify/s")
				})
			}
		})
	}
}

// BenchmarkOpenSSLSpeed records the machine's software limit in the same
// run: `openssl speed -mr -seconds 2 [-multi 2] rsa2048 ecdhp256`, RSA-2048
// private operations and P-256 ECDH per second, on 1 and 2 processes. It
// runs openssl once whatever b.N is; only its metrics mean anything.
func BenchmarkOpenSSLSpeed(b *testing.B) {
	if _, err := exec.LookPath("openssl"); err != nil {
		b.Skip("openssl not installed (make deps)")
	}
	for _, procs := range benchSessions {
		b.Run(fmt.Sprintf("procs=%d", procs), func(b *testing.B) {
			args := []string{"speed", "-mr", "-seconds", "2"}
			if procs > 1 {
				args = append(args, "-multi", strconv.Itoa(procs))
			}
			out, err := exec.Command("openssl", append(args, "rsa2048", "ecdhp256")...).Output()
			if err != nil {
				b.Fatalf("openssl speed: %v", err)
			}
			rsa, ecdh, err := parseOpenSSLSpeed(out)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(rsa, "rsa2048-priv/s")
			b.ReportMetric(ecdh, "ecdhp256/s")
		})
	}
}

// parseOpenSSLSpeed reads the machine-readable totals of openssl speed
// -mr (OpenSSL 3.0): "+F2:<n>:2048:<sign/s>:<verify/s>" for RSA and
// "+F5:<n>:256:<ops/s>:…" for ECDH. With -multi the per-process lines
// start with "Got:"; the totals do not.
func parseOpenSSLSpeed(out []byte) (rsa, ecdh float64, err error) {
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Split(sc.Text(), ":")
		if len(f) < 5 {
			continue
		}
		v, perr := strconv.ParseFloat(f[3], 64)
		switch {
		case perr != nil:
		case f[0] == "+F2" && f[2] == "2048":
			rsa = v
		case f[0] == "+F5" && f[2] == "256":
			ecdh = v
		}
	}
	if rsa == 0 || ecdh == 0 {
		return 0, 0, fmt.Errorf("openssl speed: no RSA-2048 or P-256 ECDH figure in %q", out)
	}
	return rsa, ecdh, nil
}
