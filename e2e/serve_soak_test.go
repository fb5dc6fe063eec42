package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"blindperso/api"
	"blindperso/batch"
	"blindperso/card"
	"blindperso/card/cardtest"
	"blindperso/protocol"
)

// TestServeSoak is the soak run of issuer serve (docs/BENCHMARKS.md,
// "Verifications"): the real binary, built here, serving over TLS on
// loopback from a SoftHSM2 token and a SQLite store, answers challenge +
// verify pairs for a pool of genuine cards (personalized virtual cards,
// imported with issuer import) from concurrent HTTPS clients, while the
// test samples the server process's VmRSS from /proc/PID/status. It
// checks that every request succeeds, that every genuine MAC verifies
// and every forged one (1 in 97) fails, and that the RSS after the
// warm-up (the first 10 % of the verifications) stays flat within 10 %:
// no stretch of the run higher than another, no upward trend.
//
// Only with BLINDPERSO_BENCH_SOAK=1 (it takes many minutes). Settings:
//
//	BLINDPERSO_SOAK_VERIFICATIONS  pairs to run (default 1000000)
//	BLINDPERSO_SOAK_CARDS          cards in the pool (default 1000)
//	BLINDPERSO_SOAK_CLIENTS        concurrent clients (default 16)
//	BLINDPERSO_SOAK_SAMPLE         RSS sampling period (default 2s)
//	BLINDPERSO_SOAK_DB             the server's --db (default a fresh SQLite store)
//	BLINDPERSO_SOAK_OUT            a file for the RSS samples (TSV)
//	BLINDPERSO_HSM_RECYCLE_EVERY   passed to the server (hsm.RecycleEnv):
//	                               "off" shows the leak the recycling stops
func TestServeSoak(t *testing.T) {
	if os.Getenv("BLINDPERSO_BENCH_SOAK") != "1" {
		t.Skip("set BLINDPERSO_BENCH_SOAK=1 (runs issuer serve for many minutes)")
	}
	n := soakEnvInt(t, "BLINDPERSO_SOAK_VERIFICATIONS", 1000000)
	nCards := soakEnvInt(t, "BLINDPERSO_SOAK_CARDS", 1000)
	clients := soakEnvInt(t, "BLINDPERSO_SOAK_CLIENTS", 16)
	if nCards%97 == 0 {
		t.Fatalf("BLINDPERSO_SOAK_CARDS=%d: a multiple of 97 would forge one card's every answer (soakIsForged)", nCards)
	}
	period := 2 * time.Second
	if v := os.Getenv("BLINDPERSO_SOAK_SAMPLE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			t.Fatalf("BLINDPERSO_SOAK_SAMPLE=%q: %v", v, err)
		}
		period = d
	}
	dir := t.TempDir()
	file := func(name string) string { return filepath.Join(dir, name) }

	// The binary, and a SoftHSM2 token of its own (only the children
	// load the library: SOFTHSM2_CONF is in their environment alone).
	bin := file("issuer")
	build := exec.Command(goTool(), "build", "-o", bin, "./cmd/issuer")
	build.Dir = repoRoot(t)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	env := soakToken(t, file("softhsm"))
	uri := fmt.Sprintf("pkcs11:token=soak?module-path=%s&pin-source=file:%s", soakModule, file("softhsm/user.pin"))
	run := func(stdin string, args ...string) string {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = env
		cmd.Stdin = strings.NewReader(stdin)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			t.Fatalf("issuer %s: %v\n%s", strings.Join(args, " "), err, errb.String())
		}
		return out.String()
	}
	run("", "keygen", "--token", uri, "--kind", "p256", "--label", "issuer", "--out", file("issuer.pub.pem"))
	run("", "kek", "--token", uri, "--label", "kek", "--so-pin-file", file("softhsm/so.pin"))
	pub, err := os.ReadFile(file("issuer.pub.pem"))
	if err != nil {
		t.Fatal(err)
	}
	key, err := protocol.ParseIssuerKeyPEM(pub)
	if err != nil {
		t.Fatal(err)
	}

	// The card pool: genuine virtual cards, whose K_I the test reads
	// from their state to answer challenges as they would.
	start := time.Now()
	p := protocol.ECDHP256AES
	cards, lines := soakCards(t, key, p, nCards)
	fp := key.Fingerprint()
	batchPath := cardtest.WriteBatch(t, p, fp[:], lines)
	db := os.Getenv("BLINDPERSO_SOAK_DB")
	if db == "" {
		db = file("data")
	}
	keyFlags := []string{"--token", uri, "--key", "issuer", "--kek", "kek", "--db", db}
	run("", append([]string{"import", "--batch", batchPath}, keyFlags...)...)
	t.Logf("%d cards personalized and imported in %v", nCards, time.Since(start).Round(time.Millisecond))

	secret := map[string]string{"verifier": soakSecret(), "metrics": soakSecret()}
	var tokens strings.Builder
	for role, s := range secret {
		tokens.WriteString(run(s+"\n", "serve", "token-hash", "--role", role))
	}
	if err := os.WriteFile(file("tokens"), []byte(tokens.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	certPEM := soakCert(t, file("server.pem"), file("server.key"))

	// The server, a child process.
	srv := exec.Command(bin, append([]string{"serve", "--addr", "127.0.0.1:0", "--tls-cert", file("server.pem"),
		"--tls-key", file("server.key"), "--tokens", file("tokens")}, keyFlags...)...)
	srv.Env = env
	if v, ok := os.LookupEnv("BLINDPERSO_HSM_RECYCLE_EVERY"); ok {
		srv.Env = append(srv.Env, "BLINDPERSO_HSM_RECYCLE_EVERY="+v)
	}
	logr, err := srv.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	srvDone := make(chan error, 1)
	tail := &soakTail{}
	addrc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(logr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		re := regexp.MustCompile(`msg=serving addr=(\S+)`)
		for sc.Scan() {
			tail.add(sc.Text())
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				addrc <- m[1]
			}
		}
		io.Copy(io.Discard, logr)
		srvDone <- srv.Wait()
	}()
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		srv.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-srvDone:
			return err
		case <-time.After(45 * time.Second):
			srv.Process.Kill()
			return fmt.Errorf("issuer serve did not stop on SIGTERM")
		}
	}
	defer stop()
	var base string
	select {
	case a := <-addrc:
		base = "https://" + a
	case err := <-srvDone:
		t.Fatalf("issuer serve stopped: %v\n%s", err, tail.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("issuer serve did not start\n%s", tail.String())
	}
	pid := srv.Process.Pid

	if err := os.WriteFile(file("verifier.token"), []byte(secret["verifier"]), 0o600); err != nil {
		t.Fatal(err)
	}
	cl, err := api.NewClient(api.Config{URL: base, CAFile: file("server.pem"), TokenFile: file("verifier.token"), Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}

	// The RSS sampler.
	type sample struct {
		at                      time.Duration
		done                    int64
		rss, anon, file, thread int64 // KiB, but threads
	}
	var done atomic.Int64
	var samples []sample
	sampleStop := make(chan struct{})
	sampled := make(chan struct{})
	loadStart := time.Now()
	go func() {
		defer close(sampled)
		tick := time.NewTicker(period)
		defer tick.Stop()
		next := int64(n / 10)
		for {
			select {
			case <-sampleStop:
				return
			case <-tick.C:
			}
			rss, _ := soakStatus(pid)
			d := done.Load()
			samples = append(samples, sample{time.Since(loadStart), d, rss["VmRSS"], rss["RssAnon"], rss["RssFile"], rss["Threads"]})
			if d >= next {
				fmt.Fprintf(os.Stderr, "soak: %7d verifications, %6.0f/s, server RSS %.1f MiB\n",
					d, float64(d)/time.Since(loadStart).Seconds(), float64(rss["VmRSS"])/1024)
				next += int64(n / 10)
			}
		}
	}()

	// The load: challenge + verify pairs; verification i is of card
	// i mod nCards, genuine but for 1 in 97 (the MAC of another challenge).
	lat := make([]time.Duration, n) // of the verify request
	var next atomic.Int64
	var errs, genuineFailed, forgedPassed atomic.Int64
	var firstErr atomic.Value
	fail := func(err error) {
		if errs.Add(1) == 1 {
			firstErr.Store(err)
		}
	}
	ctx := context.Background()
	var wg sync.WaitGroup
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				c := cards[i%len(cards)]
				id := hex.EncodeToString(c.id)
				ch, err := cl.Challenge(ctx, c.id)
				if err != nil {
					fail(fmt.Errorf("challenge %d: %w", i, err))
					continue
				}
				over := ch.Challenge
				forged := soakIsForged(i)
				if forged {
					over = slices.Clone(over)
					over[0] ^= 0x80
				}
				mac, err := protocol.AuthMAC(c.ki, c.id, over)
				if err != nil {
					fail(err)
					continue
				}
				t0 := time.Now()
				res, err := cl.Verify(ctx, c.id, ch.Challenge, mac)
				lat[i] = time.Since(t0)
				done.Add(1)
				switch {
				case err != nil:
					fail(fmt.Errorf("verify %d: %w", i, err))
				case !forged && res.Result != api.ResultOK:
					genuineFailed.Add(1)
				case forged && res.Result != api.ResultFailed:
					if forgedPassed.Add(1) <= 3 {
						fmt.Fprintf(os.Stderr, "soak: forged verification %d (card %s): %+v\n", i, id, res)
					}
				}
			}
		}()
	}
	wg.Wait()
	wall := time.Since(loadStart)
	close(sampleStop)
	<-sampled
	final, err := soakStatus(pid)
	if err != nil {
		t.Fatal(err)
	}
	metrics := soakMetrics(t, base, certPEM, secret["metrics"])
	if err := stop(); err != nil {
		t.Errorf("issuer serve: %v\n%s", err, tail.String())
	}

	// The verdicts.
	if e := errs.Load(); e > 0 {
		t.Errorf("%d requests failed; the first: %v\nserver log tail:\n%s", e, firstErr.Load(), tail.String())
	}
	if g, f := genuineFailed.Load(), forgedPassed.Load(); g > 0 || f > 0 {
		t.Errorf("%d genuine MACs refused, %d forged ones not refused", g, f)
	}
	okWant := fmt.Sprintf(`blindperso_issuer_verifications_total{result="ok"} %d`, n-soakForged(n))
	if !strings.Contains(metrics, okWant+"\n") {
		t.Errorf("the server's metrics lack %q", okWant)
	}
	sorted := slices.Clone(lat)
	slices.Sort(sorted)
	q := func(f float64) time.Duration {
		return sorted[min(len(sorted)-1, int(f*float64(len(sorted))))].Round(10 * time.Microsecond)
	}
	slow := len(sorted) - sort0(sorted, 50*time.Millisecond)
	t.Logf("%d verifications (+ as many challenges) on %d clients in %v: %.0f verifications/s; verify latency p50 %v, p99 %v, p99.9 %v, max %v; %d over 50 ms",
		n, clients, wall.Round(time.Second), float64(n)/wall.Seconds(), q(0.5), q(0.99), q(0.999), sorted[len(sorted)-1].Round(time.Millisecond), slow)

	// RSS: flat after the warm-up (the first tenth of the verifications):
	// the medians of ten consecutive stretches of the rest within 10 %
	// of each other, and the trend (least squares) over the rest less
	// than 10 % of the RSS. Single samples may spike (a GC cycle, a
	// thread more); the largest is reported, as is the peak.
	var warm []sample
	for _, s := range samples {
		if s.done >= int64(n/10) {
			warm = append(warm, s)
		}
	}
	if len(warm) < 20 {
		t.Fatalf("only %d RSS samples after the warm-up: run more verifications or sample more often", len(warm))
	}
	var medians []int64
	for j := range 10 {
		part := slices.Clone(warm[j*len(warm)/10 : (j+1)*len(warm)/10])
		slices.SortFunc(part, func(a, b sample) int { return int(a.rss - b.rss) })
		medians = append(medians, part[len(part)/2].rss)
	}
	flat := float64(slices.Max(medians)-slices.Min(medians)) / float64(slices.Min(medians))
	lo, hi := warm[0].rss, warm[0].rss
	for _, s := range warm {
		lo, hi = min(lo, s.rss), max(hi, s.rss)
	}
	var sx, sy, sxx, sxy float64
	for _, s := range warm {
		x, y := float64(s.done), float64(s.rss)*1024
		sx, sy, sxx, sxy = sx+x, sy+y, sxx+x*x, sxy+x*y
	}
	k := float64(len(warm))
	slope := (k*sxy - sx*sy) / (k*sxx - sx*sx) // bytes per verification
	growth := slope * float64(warm[len(warm)-1].done-warm[0].done) / (float64(medians[0]) * 1024)
	mb := func(kib int64) string { return fmt.Sprintf("%.1f", float64(kib)/1024) }
	var ms []string
	for _, m := range medians {
		ms = append(ms, mb(m))
	}
	t.Logf("server RSS after the warm-up (%d verifications): medians of ten stretches %s MiB (spread %.1f %%); trend %+.1f B per verification (%+.1f %% over the run); samples %s–%s MiB (%.1f %%); at the end %s MiB (anon %s, file %s, %d threads); peak (VmHWM) %s MiB; %d samples every %v",
		n/10, strings.Join(ms, " "), 100*flat, slope, 100*growth, mb(lo), mb(hi), 100*float64(hi-lo)/float64(lo),
		mb(final["VmRSS"]), mb(final["RssAnon"]), mb(final["RssFile"]), final["Threads"], mb(final["VmHWM"]), len(samples), period)
	var trace strings.Builder
	for i, s := range samples {
		if i%max(1, len(samples)/20) == 0 || i == len(samples)-1 {
			fmt.Fprintf(&trace, "  t=%5.0fs %8d verifications  RSS %6.1f MiB (anon %5.1f, file %5.1f, %3d threads)\n",
				s.at.Seconds(), s.done, float64(s.rss)/1024, float64(s.anon)/1024, float64(s.file)/1024, s.thread)
		}
	}
	t.Logf("RSS over the run:\n%s", trace.String())
	if out := os.Getenv("BLINDPERSO_SOAK_OUT"); out != "" {
		var tsv strings.Builder
		tsv.WriteString("seconds\tverifications\trss_kib\tanon_kib\tfile_kib\tthreads\n")
		for _, s := range samples {
			fmt.Fprintf(&tsv, "%.1f\t%d\t%d\t%d\t%d\t%d\n", s.at.Seconds(), s.done, s.rss, s.anon, s.file, s.thread)
		}
		if err := os.WriteFile(out, []byte(tsv.String()), 0o644); err != nil {
			t.Error(err)
		}
	}
	if flat > 0.10 || growth > 0.10 {
		t.Errorf("the server's RSS is not flat after the warm-up: stretch medians %s–%s MiB (%.1f %%), trend %+.1f %% over the run (limit 10 %% each)",
			mb(slices.Min(medians)), mb(slices.Max(medians)), 100*flat, 100*growth)
	}
}

const soakModule = "/usr/lib/softhsm/libsofthsm2.so"

// soakIsForged: verification i carries a forged MAC, 1 in 97; a card
// (i mod the pool) never gets two forgeries on consecutive visits, so
// none is blocked (3 failures in a row).
func soakIsForged(i int) bool { return i%97 == 13 }

// soakForged is how many of n verifications carry a forged MAC.
func soakForged(n int) int {
	f := 0
	for i := range n {
		if soakIsForged(i) {
			f++
		}
	}
	return f
}

// sort0 is the index of the first latency ≥ d in sorted.
func sort0(sorted []time.Duration, d time.Duration) int {
	i, _ := slices.BinarySearch(sorted, d)
	return i
}

func soakEnvInt(t *testing.T, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive count", name, v)
	}
	return n
}

// soakToken makes a SoftHSM2 configuration and a token labelled "soak"
// (PINs in dir/user.pin and dir/so.pin) and returns the environment the
// children run with.
func soakToken(t *testing.T, dir string) []string {
	t.Helper()
	if _, err := os.Stat(soakModule); err != nil {
		t.Skipf("SoftHSM2 is not installed (make deps): %v", err)
	}
	tokens := filepath.Join(dir, "tokens")
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	tmpl, err := os.ReadFile(filepath.Join(repoRoot(t), "softhsm-config", "softhsm2.conf.in"))
	if err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	if err := os.WriteFile(conf, bytes.ReplaceAll(tmpl, []byte("@TOKENDIR@"), []byte(tokens)), 0o600); err != nil {
		t.Fatal(err)
	}
	const userPIN, soPIN = "soak-user-1234", "soak-so-5678"
	for name, pin := range map[string]string{"user.pin": userPIN, "so.pin": soPIN} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(pin), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SOFTHSM2_CONF=") && !strings.HasPrefix(kv, "BLINDPERSO_HSM_RECYCLE_EVERY=") {
			env = append(env, kv)
		}
	}
	env = append(env, "SOFTHSM2_CONF="+conf)
	init := exec.Command("softhsm2-util", "--init-token", "--free", "--label", "soak", "--pin", userPIN, "--so-pin", soPIN)
	init.Env = env
	if out, err := init.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
	return env
}

// soakCard is a card of the pool: its Id and its K_I.
type soakCard struct{ id, ki []byte }

// soakCards personalizes n virtual cards (state on tmpfs where there is
// one) under key and returns them and their batch lines.
func soakCards(t *testing.T, key *protocol.IssuerKey, p protocol.Profile, n int) ([]soakCard, string) {
	t.Helper()
	base := "/dev/shm"
	if st, err := os.Stat(base); err != nil || !st.IsDir() {
		base = ""
	}
	dir, err := os.MkdirTemp(base, "blindperso-soak-cards-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	cards := make([]soakCard, n)
	var lines strings.Builder
	for i := range n {
		id := binary.BigEndian.AppendUint32([]byte{0x50}, uint32(i+1))
		path := filepath.Join(dir, fmt.Sprintf("card-%d.json", i))
		a, err := card.Manufacture(path, card.Options{ID: id})
		if err != nil {
			t.Fatal(err)
		}
		rec, err := cardtest.Personalize(a, p, key, "soak")
		if err != nil {
			t.Fatal(err)
		}
		b, err := batch.MarshalRecord(rec)
		if err != nil {
			t.Fatal(err)
		}
		lines.Write(b)
		cards[i] = soakCard{id: id, ki: cardtest.KI(t, path)}
	}
	return cards, lines.String()
}

func soakSecret() string {
	b := make([]byte, 24)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// soakCert writes a self-signed certificate for 127.0.0.1 and its key,
// and returns the certificate's PEM.
func soakCert(t *testing.T, certFile, keyFile string) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "issuer soak"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(48 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA: true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certPEM
}

// soakMetrics reads the server's /metrics (api.Client has no call for
// it: Prometheus scrapes it).
func soakMetrics(t *testing.T, base string, certPEM []byte, token string) string {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(certPEM)
	hc := &http.Client{Timeout: time.Minute, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	defer hc.CloseIdleConnections()
	req, _ := http.NewRequest(http.MethodGet, base+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	return string(b)
}

// soakStatus reads the numeric lines of /proc/PID/status ("VmRSS: N
// kB", "RssAnon", "Threads: N"), sizes in KiB.
func soakStatus(pid int) (map[string]int64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for _, l := range strings.Split(string(raw), "\n") {
		name, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		if kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64); err == nil {
			out[name] = kb
		}
	}
	return out, nil
}

// soakTail keeps the last lines of the server's log.
type soakTail struct {
	mu    sync.Mutex
	lines []string
}

func (s *soakTail) add(l string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lines = append(s.lines, l)
	if len(s.lines) > 400 {
		s.lines = slices.Delete(s.lines, 0, 200)
	}
}

func (s *soakTail) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.lines[max(0, len(s.lines)-40):], "\n")
}
