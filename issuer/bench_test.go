package issuer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"blindperso/attest"
	"blindperso/batch"
	"blindperso/card"
	"blindperso/card/cardtest"
	"blindperso/chipca"
	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// Benchmarks of the issuer's import and authentication (make bench;
// docs/BENCHMARKS.md, "Issuer import (issue 5)"). Every figure that
// matters is a ratio to a baseline measured in the same benchmark: the
// machines are noisy between runs, not within one.
//
//   - BenchmarkIssuerImport: Importer.ImportFile into a fresh SQLite store,
//     per token, profile and worker count, against the token's bare chain
//     (hsm.ImportCard in a loop on the same token, with the keys the
//     importer uses — the Issuer's session copies — and as many
//     goroutines, each on its own OS thread as the importer's workers
//     are), in alternating rounds. Goal: import/bare ≥ 0.85.
//   - BenchmarkIssuerNaive: one pkcs11-tool process per card (--decrypt
//     for RSA-OAEP, --derive for ECDH) against our import of the same
//     profile's cards. Goal: ≥ 45× faster.
//   - BenchmarkIssuerImportBig: one large ecdh-p256-aes batch, made by
//     in-process virtual cards, imported by a child process (peak RSS
//     from its rusage), at two sizes to show time linear in the count.
//     Only with BLINDPERSO_BENCH_BIG=1.
//   - BenchmarkIssuerVerify: Authenticator.Verify (in-token check, then
//     the store's group commit) against hsm.VerifyCardMAC alone, and
//     against the store's empty-transaction rate. Goal: verify/bare ≥ 0.8
//     on SoftHSM2, verify/ceiling ≥ 0.8 on NSS.

const (
	benchBigEnv   = "BLINDPERSO_BENCH_BIG"       // "1": run BenchmarkIssuerImportBig
	benchSizesEnv = "BLINDPERSO_BENCH_BIG_SIZES" // comma-separated record counts
	benchChildEnv = "BLINDPERSO_BENCH_IMPORT_CHILD"
)

// The big import's child process: the test binary re-run with
// benchChildEnv set imports one batch and exits before any test runs.
func init() {
	if os.Getenv(benchChildEnv) != "" {
		os.Exit(benchImportChild())
	}
}

var benchWorkers = []int{1, 2}

// benchToken is a token with an RSA-2048 and a P-256 issuer key and one
// KEK, made as the key ceremony makes them (token objects).
type benchToken struct {
	kind   string
	tt     hsmtest.Token
	tok    *hsm.Token
	rsa    *Issuer
	ec     *Issuer
	runs   []protocol.Profile
	prefix string
}

var benchNSSLabels atomic.Int32

func newBenchToken(b *testing.B, kind string) *benchToken {
	b.Helper()
	ctx := context.Background()
	bt := &benchToken{kind: kind}
	switch kind {
	case "softhsm2":
		bt.tt = hsmtest.SoftHSM(b)
		bt.runs = []protocol.Profile{protocol.RSAOAEPAES, protocol.ECDHP256AES}
	case "nss":
		bt.tt = hsmtest.NSS(b)
		bt.runs = []protocol.Profile{protocol.RSARawSHA1, protocol.RSAOAEPSHA1, protocol.RSAOAEPAES, protocol.ECDHP256X963, protocol.ECDHP256AES,
			protocol.RSAOAEPKBKDF, protocol.ECDHP256KBKDF}
	}
	// NSS keeps one database per process: labels must differ per call.
	bt.prefix = fmt.Sprintf("bench%d-", benchNSSLabels.Add(1))
	tok, err := hsm.OpenURI(bt.tt.URI, 2)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { tok.Close() })
	bt.tok = tok
	rk, err := tok.GenerateIssuerKey(ctx, hsm.KindRSA2048, bt.prefix+"rsa")
	if err != nil {
		b.Fatal(err)
	}
	ek, err := tok.GenerateIssuerKey(ctx, hsm.KindP256, bt.prefix+"ec")
	if err != nil {
		b.Fatal(err)
	}
	kek, err := tok.GenerateKEK(ctx, bt.prefix+"kek", bt.tt.SOPIN)
	if err != nil {
		b.Fatal(err)
	}
	bt.rsa = &Issuer{Token: tok, Key: rk, KEK: kek}
	bt.ec = &Issuer{Token: tok, Key: ek, KEK: kek}
	return bt
}

func (bt *benchToken) issuer(p protocol.Profile) *Issuer {
	if p.Transport == protocol.ECDHP256 {
		return bt.ec
	}
	return bt.rsa
}

// benchCard personalizes one in-process virtual card under is's key and
// returns its record and applet.
func benchCard(b *testing.B, is *Issuer, p protocol.Profile, id []byte) (batch.Record, *card.Applet) {
	b.Helper()
	a, err := card.Manufacture(filepath.Join(b.TempDir(), "card.json"), card.Options{ID: id})
	if err != nil {
		b.Fatal(err)
	}
	rec, err := cardtest.Personalize(a, p, is.Key.Public, "bench")
	if err != nil {
		b.Fatal(err)
	}
	return rec, a
}

// benchTemplates are n genuine records of p under is's key. The batches
// reuse their c under fresh Ids: the token's work does not depend on the
// Id, and the store does not index c.
func benchTemplates(b *testing.B, is *Issuer, p protocol.Profile, n int) []batch.Record {
	var out []batch.Record
	for i := range n {
		rec, _ := benchCard(b, is, p, []byte{0xBE, byte(i)})
		out = append(out, rec)
	}
	return out
}

// benchIDs numbers the records of every batch of the process, so that no
// two share an Id and every record needs the token.
var benchIDs atomic.Uint64

func nextID() []byte {
	return binary.BigEndian.AppendUint64(nil, benchIDs.Add(1))
}

// writeBenchBatch writes n records in the station's format (one JSON
// line each, docs/BATCH.md) and the manifest beside them, streaming:
// rec(i) makes the i-th record.
func writeBenchBatch(b *testing.B, dir string, is *Issuer, p protocol.Profile, n int, rec func(i int) batch.Record) string {
	b.Helper()
	path := filepath.Join(dir, fmt.Sprintf("batch-%d.ndjson", benchIDs.Load()))
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	h := sha256.New()
	cw := &countWriter{w: h}
	w := bufio.NewWriterSize(f, 1<<20)
	enc := json.NewEncoder(&teeWriter{w, cw})
	for i := range n {
		if err := enc.Encode(rec(i)); err != nil { // Encode ends the line with '\n'
			b.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	fp := is.Key.Fingerprint()
	m := batch.Manifest{Format: batch.Format, Batch: filepath.Base(path), Count: n, Bytes: cw.n,
		SHA256: h.Sum(nil), Profile: p.Name, IssuerFingerprint: fp[:], Station: "bench", Written: time.Now().UTC()}
	mb, err := json.Marshal(m)
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(batch.ManifestPath(path), mb, 0o644); err != nil {
		b.Fatal(err)
	}
	return path
}

type countWriter struct {
	w interface{ Write([]byte) (int, error) }
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return c.w.Write(p) }

type teeWriter struct {
	a, b interface{ Write([]byte) (int, error) }
}

func (t *teeWriter) Write(p []byte) (int, error) {
	if _, err := t.a.Write(p); err != nil {
		return 0, err
	}
	return t.b.Write(p)
}

// cycled makes record i from the templates with a fresh Id.
func cycled(tmpl []batch.Record) func(int) batch.Record {
	return func(i int) batch.Record {
		r := tmpl[i%len(tmpl)]
		r.ID = nextID()
		return r
	}
}

// parallelOps runs op(0) … op(n-1) on w goroutines, each locked to an
// OS thread as the importer's workers are, and returns the wall time.
func parallelOps(b *testing.B, w, n int, op func(i int) error) time.Duration {
	return runOps(b, w, n, true, op)
}

// callOps runs op(0) … op(n-1) from callers goroutines not tied to OS
// threads (the API's request goroutines are not either), and returns the
// wall time.
func callOps(b *testing.B, callers, n int, op func(i int) error) time.Duration {
	return runOps(b, callers, n, false, op)
}

func runOps(b *testing.B, w, n int, lockThread bool, op func(i int) error) time.Duration {
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	start := time.Now()
	for range w {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if lockThread {
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
			}
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := op(i); err != nil {
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

// bareImport is the baseline: the token's whole chain, hsm.ImportCard
// through the issuer's hsm.CardKeys (the keys and session copies the
// importer uses too), in a session of the issuer's token.
func bareImport(is *Issuer, p protocol.Profile, tmpl []batch.Record) func(i int) error {
	return func(i int) error {
		g, err := is.cardKeys()
		if err != nil {
			return err
		}
		_, err = g.Import(context.Background(), p, tmpl[i%len(tmpl)].C)
		return err
	}
}

// withProcs runs fn with GOMAXPROCS at least workers+1, as cmd/issuer
// sets it for an import or a rotation (cmd/issuer/procs.go); the bare
// loops run without, as before.
func withProcs[T any](workers int, fn func() (T, error)) (T, error) {
	if prev := runtime.GOMAXPROCS(0); prev < workers+1 {
		runtime.GOMAXPROCS(workers + 1)
		defer runtime.GOMAXPROCS(prev)
	}
	return fn()
}

func openBenchStore(b *testing.B) Store {
	b.Helper()
	s, err := OpenSQLite(context.Background(), filepath.Join(b.TempDir(), "data"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	return s
}

// importRounds imports b.N records in rounds of fresh batches into s and,
// before each, runs the bare chain on half as many, after an untimed
// warm-up of both; the timer counts the imports only. It returns both
// rates.
func importRounds(b *testing.B, is *Issuer, s Store, p protocol.Profile, w int, tmpl []batch.Record) (importRate, bareRate float64) {
	return importRoundsWith(b, is, s, p, w, tmpl, cycled(tmpl), nil)
}

// importRoundsWith is importRounds with the records gen makes and the
// attestation checker ck (nil: the policy off).
func importRoundsWith(b *testing.B, is *Issuer, s Store, p protocol.Profile, w int, tmpl []batch.Record,
	gen func(int) batch.Record, ck *attest.Checker) (importRate, bareRate float64) {
	const rounds = 4
	dir := b.TempDir()
	bare := bareImport(is, p, tmpl)
	im := &Importer{Issuer: is, Store: s, Workers: w, Attest: ck}
	// Warm-up, untimed, for both: the first import of a process opens the
	// store's connections and starts its threads (≈ 30 ms).
	parallelOps(b, w, 64, bare)
	if _, err := im.ImportFile(context.Background(), writeBenchBatch(b, dir, is, p, 64, gen)); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	b.StopTimer()
	var impT, bareT time.Duration
	impN, bareN := 0, 0
	for r := range rounds {
		n := b.N/rounds + boolInt(r < b.N%rounds)
		if n == 0 {
			continue
		}
		path := writeBenchBatch(b, dir, is, p, n, gen)
		nb := max(n/2, 1)
		bareT += parallelOps(b, w, nb, bare)
		bareN += nb
		b.StartTimer()
		start := time.Now()
		rep, err := withProcs(w, func() (BatchReport, error) { return im.ImportFile(context.Background(), path) })
		impT += time.Since(start)
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		if rep.Imported != n || rep.Rejects != 0 {
			b.Fatalf("imported %d of %d, %d rejects", rep.Imported, n, rep.Rejects)
		}
		impN += n
		os.Remove(path)
	}
	return float64(impN) / impT.Seconds(), float64(bareN) / bareT.Seconds()
}

func boolInt(v bool) int {
	if v {
		return 1
	}
	return 0
}

func BenchmarkIssuerImport(b *testing.B) {
	for _, kind := range []string{"softhsm2", "nss"} {
		b.Run(kind, func(b *testing.B) {
			bt := newBenchToken(b, kind)
			for _, p := range bt.runs {
				is := bt.issuer(p)
				tmpl := benchTemplates(b, is, p, 16)
				for _, w := range benchWorkers {
					b.Run(fmt.Sprintf("%s/workers=%d", p.Name, w), func(b *testing.B) {
						s := openBenchStore(b)
						imp, bare := importRounds(b, is, s, p, w, tmpl)
						b.ReportMetric(imp, "cards/s")
						b.ReportMetric(bare, "bare/s")
						b.ReportMetric(imp/bare, "import/bare")
					})
				}
			}
		})
	}
}

// BenchmarkIssuerImportAttested: the import of ecdh-p256-aes on SoftHSM2
// with the attestation policy required (PROTOCOL.md §10: every record's
// chain and signature checked on the host, beside the token's work),
// against the token's bare chain and the import without attestation,
// measured in the same run. Goal: import/bare ≥ 0.85.
func BenchmarkIssuerImportAttested(b *testing.B) {
	bt := newBenchToken(b, "softhsm2")
	p := protocol.ECDHP256AES
	is := bt.issuer(p)
	tmpl := benchTemplates(b, is, p, 16)
	ca, err := chipca.New("")
	if err != nil {
		b.Fatal(err)
	}
	roots, err := attest.ParseRoots(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Root.Raw}))
	if err != nil {
		b.Fatal(err)
	}
	ck := &attest.Checker{Policy: attest.Required, Roots: roots, Issuer: is.Key.Fingerprint()}
	for _, w := range benchWorkers {
		b.Run(fmt.Sprintf("%s/workers=%d", p.Name, w), func(b *testing.B) {
			plain, _ := importRoundsWith(b, is, openBenchStore(b), p, w, tmpl, cycled(tmpl), nil)
			imp, bare := importRoundsWith(b, is, openBenchStore(b), p, w, tmpl, attestedCycled(b, ca, tmpl), ck)
			b.ReportMetric(imp, "cards/s")
			b.ReportMetric(bare, "bare/s")
			b.ReportMetric(imp/bare, "import/bare")
			b.ReportMetric(imp/plain, "attested/unattested")
		})
	}
}

// attestedCycled is cycled with each record attested as a genuine card
// of ca would attest it: a card certificate for its new Id and the
// signature over A (made here, not by a card: the issuer checks only the
// record, and a card per record would make the set-up the benchmark).
func attestedCycled(b *testing.B, ca *chipca.CA, tmpl []batch.Record) func(int) batch.Record {
	next := cycled(tmpl)
	return func(i int) batch.Record {
		r := next(i)
		cc, err := ca.NewCard(r.ID, chipca.CertOptions{})
		if err != nil {
			b.Fatal(err)
		}
		h := sha256.Sum256(r.C)
		msg, err := protocol.AttestMessage(r.ID, r.Profile, r.Fingerprint, h[:])
		if err != nil {
			b.Fatal(err)
		}
		d := sha256.Sum256(msg)
		sig, err := ecdsa.SignASN1(rand.Reader, cc.Key, d[:])
		if err != nil {
			b.Fatal(err)
		}
		r.V = batch.Version
		r.Attestation = &batch.Attestation{Fingerprint: r.Fingerprint, CSHA256: h[:], Sig: sig}
		for _, der := range cc.Chain {
			r.Attestation.Chain = append(r.Attestation.Chain, der)
		}
		return r
	}
}

// BenchmarkIssuerNaive: the naive import, one pkcs11-tool process per
// card, against our import of the same profile's cards on the same
// SoftHSM2 token in the same run:
//
//   - rsa-oaep-aes: `pkcs11-tool --decrypt -m RSA-PKCS-OAEP` (SHA-1), which
//     puts S — r — on the host;
//   - ecdh-p256-aes: `pkcs11-tool --derive -m ECDH1-DERIVE`, which puts the
//     shared secret Z on the host.
//
// Each runs over 20 cards with a throwaway key (the issuer keys refuse
// C_Decrypt, and a derived key that may be read), written into a
// throwaway token with pkcs11-tool itself. Reported per profile: the
// naive time per card, our import rate at 1 and 2 workers (ImportFile
// into a fresh store) and the speed-up, and the token's bare chain rate
// with the issuer's keys (bare-…) with the speed-up it would give
// (ceiling-…): no import can beat its token's bare chain. It runs once
// whatever b.N is; only its metrics mean anything.
func BenchmarkIssuerNaive(b *testing.B) {
	if _, err := exec.LookPath("pkcs11-tool"); err != nil {
		b.Skip("pkcs11-tool not installed (opensc: make deps)")
	}
	bt := newBenchToken(b, "softhsm2")
	nt := hsmtest.SoftHSM(b)
	for _, p := range []protocol.Profile{protocol.RSAOAEPAES, protocol.ECDHP256AES} {
		b.Run(p.Name, func(b *testing.B) {
			is := bt.issuer(p)
			tmpl := benchTemplates(b, is, p, 16)
			perCard := naivePerCard(b, nt, p)
			b.ReportMetric(float64(perCard.Microseconds())/1000, "naive-ms/card")
			n := 2000
			if p.Transport != protocol.ECDHP256 {
				n = 1000
			}
			dir := b.TempDir()
			for _, w := range benchWorkers {
				bare := float64(n) / parallelOps(b, w, n, bareImport(is, p, tmpl)).Seconds()
				s := openBenchStore(b)
				path := writeBenchBatch(b, dir, is, p, n, cycled(tmpl))
				im := &Importer{Issuer: is, Store: s, Workers: w}
				start := time.Now()
				rep, err := withProcs(w, func() (BatchReport, error) { return im.ImportFile(context.Background(), path) })
				d := time.Since(start)
				if err != nil || rep.Imported != n {
					b.Fatalf("import: %+v, %v", rep, err)
				}
				rate := float64(n) / d.Seconds()
				b.ReportMetric(rate, fmt.Sprintf("import-cards/s-w%d", w))
				b.ReportMetric(rate*perCard.Seconds(), fmt.Sprintf("speedup-w%d", w))
				b.ReportMetric(bare, fmt.Sprintf("bare/s-w%d", w))
				b.ReportMetric(bare*perCard.Seconds(), fmt.Sprintf("ceiling-w%d", w))
			}
		})
	}
}

// naivePerCard runs the naive path for 20 cards of p on the throwaway
// token nt and returns the mean wall time per card (the process, its
// module load, login, key lookup and the one operation).
func naivePerCard(b *testing.B, nt hsmtest.Token, p protocol.Profile) time.Duration {
	const cards = 20
	dir := b.TempDir()
	keyFile := filepath.Join(dir, "naive.der")
	id := "4e41"
	var pub *protocol.IssuerKey
	var usage string
	if p.Transport == protocol.ECDHP256 {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			b.Fatal(err)
		}
		os.WriteFile(keyFile, der, 0o600)
		spki, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
		if pub, err = protocol.ParseIssuerKey(spki); err != nil {
			b.Fatal(err)
		}
		id, usage = "4e42", "--usage-derive"
	} else {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			b.Fatal(err)
		}
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			b.Fatal(err)
		}
		os.WriteFile(keyFile, der, 0o600)
		spki, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
		if pub, err = protocol.ParseIssuerKey(spki); err != nil {
			b.Fatal(err)
		}
		usage = "--usage-decrypt"
	}
	if out, err := exec.Command("pkcs11-tool", "--module", nt.Module, "--token-label", nt.Label, "--login", "--pin", nt.PIN,
		"--write-object", keyFile, "--type", "privkey", "--id", id, "--label", "naive-"+p.Name, usage).CombinedOutput(); err != nil {
		b.Fatalf("pkcs11-tool --write-object: %v\n%s", err, out)
	}
	var total time.Duration
	for i := range cards {
		in := filepath.Join(dir, fmt.Sprintf("c%d.bin", i))
		out := filepath.Join(dir, fmt.Sprintf("r%d.bin", i))
		// The card's own encapsulation: S (r, or Z) and c.
		secret, c, err := protocol.Encapsulate(p, pub, rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		args := []string{"--module", nt.Module, "--token-label", nt.Label, "--login", "--pin", nt.PIN, "--id", id, "-i", in, "-o", out}
		if p.Transport == protocol.ECDHP256 {
			// pkcs11-tool takes the peer's key as a DER SubjectPublicKeyInfo.
			pk, err := ecdh.P256().NewPublicKey(c)
			if err != nil {
				b.Fatal(err)
			}
			if c, err = x509.MarshalPKIXPublicKey(pk); err != nil {
				b.Fatal(err)
			}
			args = append(args, "--derive", "-m", "ECDH1-DERIVE")
		} else {
			args = append(args, "--decrypt", "-m", "RSA-PKCS-OAEP", "--hash-algorithm", "SHA-1", "--mgf", "MGF1-SHA1")
		}
		if err := os.WriteFile(in, c, 0o600); err != nil {
			b.Fatal(err)
		}
		cmd := exec.Command("pkcs11-tool", args...)
		start := time.Now()
		outb, err := cmd.CombinedOutput()
		total += time.Since(start)
		if err != nil {
			b.Fatalf("pkcs11-tool: %v\n%s", err, outb)
		}
		got, err := os.ReadFile(out)
		if err != nil || !bytes.Equal(got, secret) {
			b.Fatalf("pkcs11-tool gave %x, want %x (%v)", got, secret, err)
		}
	}
	return total / cards
}

// BenchmarkIssuerImportBig imports one large ecdh-p256-aes batch per size
// (BLINDPERSO_BENCH_BIG_SIZES, default 100000,1000000). Every record is
// made by a genuine virtual card through the in-process card transport
// (card.Manufacture, cardtest.Personalize: SELECT, GET ID, PERSONALIZE,
// LOCK, the station's own steps), its state on tmpfs (/dev/shm) so that
// making a million cards takes minutes; Ids are sequential. The import
// runs in a child process (the test binary, 2 workers, a fresh SQLite
// store), so its peak RSS is its own (rusage Maxrss); the child also
// samples its RSS and, with BLINDPERSO_BENCH_MEMDIAG=1, says where the
// memory is (Go heap, SQLite, mappings). Afterwards 16 cards spread over
// the batch answer a challenge and are verified against the store, in
// the token. It runs once per size whatever b.N is.
func BenchmarkIssuerImportBig(b *testing.B) {
	if os.Getenv(benchBigEnv) != "1" {
		b.Skip("set " + benchBigEnv + "=1 (takes minutes)")
	}
	sizes := []int{100000, 1000000}
	if v := os.Getenv(benchSizesEnv); v != "" {
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				b.Fatal(err)
			}
			sizes = append(sizes, n)
		}
	}
	bt := newBenchToken(b, "softhsm2")
	is := bt.ec
	p := protocol.ECDHP256AES
	ctx := context.Background()
	for _, n := range sizes {
		b.Run(fmt.Sprintf("records=%d", n), func(b *testing.B) {
			dir := b.TempDir()
			gen := newCardMaker(b, is, p, n)
			genStart := time.Now()
			path := writeBenchBatch(b, dir, is, p, n, gen.record)
			b.Logf("%d records made by in-process cards in %v", n, time.Since(genStart).Round(time.Second))
			arg, _ := json.Marshal(benchChildArgs{URI: bt.tt.URI, Key: is.Key.Label, KEK: is.KEK.Label,
				DB: filepath.Join(dir, "data"), Batch: path, Workers: 2})
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), benchChildEnv+"="+string(arg))
			var stdout, stderr strings.Builder
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			start := time.Now()
			if err := cmd.Run(); err != nil {
				b.Fatalf("child: %v\n%s", err, stderr.String())
			}
			wall := time.Since(start)
			if stderr.Len() > 0 { // b.Log would truncate it
				fmt.Fprintf(os.Stderr, "%s: the child said:\n%s", b.Name(), stderr.String())
			}
			var res benchChildResult
			if err := json.Unmarshal([]byte(stdout.String()), &res); err != nil {
				b.Fatalf("child said %q: %v", stdout.String(), err)
			}
			if res.Imported != n {
				b.Fatalf("child imported %d of %d", res.Imported, n)
			}
			ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
			b.ReportMetric(float64(ru.Maxrss)/1024, "peak-RSS-MiB") // Maxrss is in KiB on Linux
			b.ReportMetric(float64(res.ImportNs)/float64(n)/1000, "µs/record")
			b.ReportMetric(float64(n)/(float64(res.ImportNs)/1e9), "cards/s")
			b.ReportMetric(float64(res.ImportNs)/1e9, "import-s")
			b.ReportMetric(wall.Seconds(), "child-wall-s")
			cpu := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
			b.ReportMetric(float64(cpu.Microseconds())/float64(n), "cpu-µs/record")
			// The cards kept aside authenticate against the store.
			s, err := OpenSQLite(ctx, filepath.Join(dir, "data"))
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			for _, c := range gen.kept {
				sc, err := s.Card(ctx, c.id)
				if err != nil {
					b.Fatal(err)
				}
				challenge := make([]byte, 16)
				rand.Read(challenge)
				mac, err := protocol.AuthMAC(c.ki, c.id, challenge)
				if err != nil {
					b.Fatal(err)
				}
				if ok, err := is.Verify(ctx, sc.CardKey, challenge, mac); err != nil || !ok {
					b.Fatalf("card %x does not authenticate after the import: %v %v", c.id, ok, err)
				}
			}
		})
	}
}

// cardMaker makes a batch's records with genuine in-process virtual
// cards, in parallel chunks, in order; it keeps the K_I of 16 of them.
type cardMaker struct {
	b     *testing.B
	p     protocol.Profile
	key   *protocol.IssuerKey
	dir   string
	n     int
	chunk []batch.Record
	base  int // index of chunk[0]
	keep  map[int]bool
	kept  []keptCard
	mu    sync.Mutex
}

type keptCard struct{ id, ki []byte }

func newCardMaker(b *testing.B, is *Issuer, p protocol.Profile, n int) *cardMaker {
	if err := is.Key.Public.Fits(p); err != nil {
		b.Fatal(err)
	}
	dir := "/dev/shm"
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		dir = os.TempDir() // no tmpfs: slower (each card syncs its state)
	}
	dir, err := os.MkdirTemp(dir, "blindperso-bench-cards-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	m := &cardMaker{b: b, p: p, key: is.Key.Public, dir: dir, n: n, base: -1, keep: map[int]bool{}}
	for k := range 16 {
		m.keep[k*n/16] = true
	}
	return m
}

// record returns record i; i goes 0, 1, 2… (writeBenchBatch).
func (m *cardMaker) record(i int) batch.Record {
	const chunk = 1024
	if m.base < 0 || i >= m.base+len(m.chunk) {
		m.base = i
		m.chunk = make([]batch.Record, min(chunk, m.n-i))
		var wg sync.WaitGroup
		for g := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				path := filepath.Join(m.dir, fmt.Sprintf("card-%d.json", g))
				for k := g; k < len(m.chunk); k += 2 {
					m.chunk[k] = m.card(path, m.base+k)
				}
			}()
		}
		wg.Wait()
	}
	return m.chunk[i-m.base]
}

// card personalizes one fresh virtual card (state at path) as card i.
func (m *cardMaker) card(path string, i int) batch.Record {
	id := binary.BigEndian.AppendUint64(nil, uint64(i+1))
	os.Remove(path)
	a, err := card.Manufacture(path, card.Options{ID: id})
	if err != nil {
		m.b.Error(err)
		return batch.Record{}
	}
	rec, err := cardtest.Personalize(a, m.p, m.key, "bench")
	if err != nil {
		m.b.Error(err)
		return batch.Record{}
	}
	if m.keep[i] {
		// Made on a worker goroutine: Errorf, not cardtest.KI's Fatal.
		raw, err := os.ReadFile(path)
		var st struct {
			KI protocol.Hex `json:"k_i"`
		}
		if err == nil {
			err = json.Unmarshal(raw, &st)
		}
		if err != nil || len(st.KI) == 0 {
			m.b.Errorf("card %d: no K_I in its state: %v", i, err)
		}
		m.mu.Lock()
		m.kept = append(m.kept, keptCard{id, st.KI})
		m.mu.Unlock()
	}
	return rec
}

type benchChildArgs struct {
	URI, Key, KEK, DB, Batch string
	Workers                  int
}

type benchChildResult struct {
	Imported int
	ImportNs int64
}

const (
	benchMemDiagEnv = "BLINDPERSO_BENCH_MEMDIAG"     // "1": the child says where its memory is
	benchHeapEnv    = "BLINDPERSO_BENCH_HEAPPROFILE" // file: the child writes a heap profile there
)

func benchImportChild() int {
	fail := func(err error) int { fmt.Fprintln(os.Stderr, err); return 2 }
	var a benchChildArgs
	if err := json.Unmarshal([]byte(os.Getenv(benchChildEnv)), &a); err != nil {
		return fail(err)
	}
	ctx := context.Background()
	tok, err := hsm.OpenURI(a.URI, a.Workers)
	if err != nil {
		return fail(err)
	}
	defer tok.Close()
	key, err := tok.FindIssuerKey(ctx, a.Key)
	if err != nil {
		return fail(err)
	}
	kek, err := tok.FindKEK(ctx, a.KEK)
	if err != nil {
		return fail(err)
	}
	s, err := OpenSQLite(ctx, a.DB)
	if err != nil {
		return fail(err)
	}
	defer s.Close()
	diag := os.Getenv(benchMemDiagEnv) == "1"
	stop := make(chan struct{})
	sampled := make(chan string)
	go func() { sampled <- sampleRSS(stop, diag) }()
	im := &Importer{Issuer: &Issuer{Token: tok, Key: key, KEK: kek}, Store: s, Workers: a.Workers}
	start := time.Now()
	rep, err := withProcs(a.Workers, func() (BatchReport, error) { return im.ImportFile(ctx, a.Batch) })
	d := time.Since(start)
	close(stop)
	samples := <-sampled
	if err != nil {
		return fail(err)
	}
	if diag {
		fmt.Fprint(os.Stderr, samples, memDiag())
	}
	if f := os.Getenv(benchHeapEnv); f != "" {
		if w, err := os.Create(f); err == nil {
			pprof.WriteHeapProfile(w)
			w.Close()
		}
	}
	json.NewEncoder(os.Stdout).Encode(benchChildResult{Imported: rep.Imported, ImportNs: d.Nanoseconds()})
	return 0
}

// sampleRSS reads the process's RSS every 2 s until stop; with diag it
// returns the samples (time, RSS, Go heap in use) as text.
func sampleRSS(stop <-chan struct{}, diag bool) string {
	var out strings.Builder
	start := time.Now()
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return out.String()
		case <-t.C:
			if !diag {
				continue
			}
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			fmt.Fprintf(&out, "t=%4.0fs RSS %6.1f MiB  Go heap in use %5.1f MiB, Go sys %5.1f MiB\n",
				time.Since(start).Seconds(), float64(statusKiB("VmRSS"))/1024, float64(ms.HeapInuse)/(1<<20), float64(ms.Sys)/(1<<20))
		}
	}
}

// statusKiB reads one "Name: N kB" line of /proc/self/status.
func statusKiB(name string) int64 {
	raw, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(l, name+":"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

// memDiag says where the child's memory is at the end: the Go runtime's
// view and the largest mappings of /proc/self/smaps by RSS.
func memDiag() string {
	var b strings.Builder
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	fmt.Fprintf(&b, "VmHWM %d KiB, VmRSS %d KiB; Go: HeapInuse %.1f MiB, HeapIdle %.1f MiB (released %.1f), StackSys %.1f MiB, Sys %.1f MiB, NumGC %d\n",
		statusKiB("VmHWM"), statusKiB("VmRSS"), float64(ms.HeapInuse)/(1<<20), float64(ms.HeapIdle)/(1<<20),
		float64(ms.HeapReleased)/(1<<20), float64(ms.StackSys)/(1<<20), float64(ms.Sys)/(1<<20), ms.NumGC)
	raw, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		return b.String()
	}
	type mapping struct {
		name string
		rss  int64
	}
	var maps []mapping
	for _, l := range strings.Split(string(raw), "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) >= 5 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":"):
			name := "[anon]"
			if len(f) >= 6 {
				name = f[5]
			}
			maps = append(maps, mapping{name: f[0] + " " + name})
		case len(f) >= 2 && f[0] == "Rss:" && len(maps) > 0:
			maps[len(maps)-1].rss, _ = strconv.ParseInt(f[1], 10, 64)
		}
	}
	sort.Slice(maps, func(i, j int) bool { return maps[i].rss > maps[j].rss })
	for _, m := range maps[:min(8, len(maps))] {
		fmt.Fprintf(&b, "  %7d KiB %s\n", m.rss, m.name)
	}
	return b.String()
}

// BenchmarkIssuerVerify: verifications per second through the issuer's
// Authenticator (a read of the card and challenge, the in-token check,
// then the store's group commit: consume the challenge, record the
// result) against hsm.VerifyCardMAC alone on the same token, keys (the
// KEK's session copy, as Issuer.Verify uses) and worker count.
//
// workers is the token's concurrency: at most that many token calls at a
// time (limitVerifier), as the bare baseline's goroutines. Group commit
// needs verifications waiting for the store while others are in the
// token, so the Authenticator is driven by verifyCallers callers per
// worker (an API's concurrent requests): a group forms from what
// arrives during the commit before it, so the groups, and the commits
// (an fsync, ≈ 0.2–0.5 ms of CPU on the benchmark VM) each verification
// shares, grow with the callers; latency grows with them too (Little:
// callers / rate). Each caller's latency (its wait for a token slot
// included) gives p50-ms and p99-ms; group is the mean verifications per
// store transaction, store-busy the share of the time the committer was
// applying a group, cpu-us/verify and cpu-us/bare the process's CPU per
// operation (user + system).
//
// ceiling/s is the store's own limit, measured in the same run: empty
// transactions (BEGIN; COMMIT, with the store's durability settings),
// one after another — SQLite writes nothing for them, so they sync
// nothing; write-tx/s the same with one row written, a commit that must
// reach the disk. verify/ceiling is verify/s over ceiling/s.
// Challenges are issued and the cards' MACs computed before the timer.
func BenchmarkIssuerVerify(b *testing.B) {
	for _, kind := range []string{"softhsm2", "nss"} {
		b.Run(kind, func(b *testing.B) {
			bt := newBenchToken(b, kind)
			is := bt.ec
			p := protocol.ECDHP256AES
			ctx := context.Background()
			s := openBenchStore(b)
			type vc struct {
				id, ki []byte
				ck     CardKey
			}
			var cards []vc
			var recs []batch.Record
			var applets []*card.Applet
			for i := range 64 {
				rec, a := benchCard(b, is, p, []byte{0xAC, byte(i)})
				recs = append(recs, rec)
				applets = append(applets, a)
			}
			path := writeBenchBatch(b, b.TempDir(), is, p, len(recs), func(i int) batch.Record { return recs[i] })
			if _, err := (&Importer{Issuer: is, Store: s, Workers: 1}).ImportFile(ctx, path); err != nil {
				b.Fatal(err)
			}
			for i, rec := range recs {
				sc, err := s.Card(ctx, rec.ID)
				if err != nil {
					b.Fatal(err)
				}
				cards = append(cards, vc{rec.ID, cardtest.KI(b, applets[i].Path()), sc.CardKey})
			}
			for _, w := range benchWorkers {
				b.Run(fmt.Sprintf("workers=%d", w), func(b *testing.B) {
					callers := w * verifyCallers
					auth := &Authenticator{Verifier: &limitVerifier{v: is, slots: make(chan struct{}, w)}, Store: s}
					const warm = 256
					n := b.N + warm
					chs := make([][]byte, n)
					macs := make([][]byte, n)
					// Issued in parallel (and so in groups), untimed.
					var wg sync.WaitGroup
					var failed atomic.Value
					for g := range 16 {
						wg.Add(1)
						go func() {
							defer wg.Done()
							for i := g; i < n; i += 16 {
								c := cards[i%len(cards)]
								ch, err := auth.Challenge(ctx, c.id)
								if err == nil {
									chs[i] = ch.Challenge
									macs[i], err = protocol.AuthMAC(c.ki, c.id, ch.Challenge)
								}
								if err != nil {
									failed.CompareAndSwap(nil, err)
									return
								}
							}
						}()
					}
					wg.Wait()
					if err, _ := failed.Load().(error); err != nil {
						b.Fatal(err)
					}
					lat := make([]time.Duration, n)
					verify := func(i int) error {
						start := time.Now()
						r, err := auth.Verify(ctx, cards[i%len(cards)].id, chs[i], macs[i])
						lat[i] = time.Since(start)
						if err == nil && !r.OK {
							err = fmt.Errorf("card %x: %s", cards[i%len(cards)].id, r.Result)
						}
						return err
					}
					bare := func(i int) error {
						c := cards[i%len(cards)]
						// The KEK the issuer uses (its session copy, where made).
						g, _ := is.cardKeys()
						ok, err := g.Verify(ctx, c.ck.Blob, c.id, chs[i], macs[i])
						if err == nil && !ok {
							err = fmt.Errorf("card %x: MAC does not verify", c.id)
						}
						return err
					}
					// Warm-up, untimed: connections opened, threads started.
					callOps(b, callers, warm, func(i int) error { return verify(b.N + i) })
					parallelOps(b, w, warm, bare)
					ac := committer(s)
					ops0, groups0, busy0 := ac.ops.Load(), ac.groups.Load(), ac.busy.Load()
					b.ResetTimer()
					cpu0 := cpuTime()
					d := callOps(b, callers, b.N, verify)
					cpu := cpuTime() - cpu0
					b.StopTimer()
					ops, groups := ac.ops.Load()-ops0, ac.groups.Load()-groups0
					busy := time.Duration(ac.busy.Load() - busy0)
					cpu0 = cpuTime()
					bareD := parallelOps(b, w, b.N, bare)
					bareCPU := cpuTime() - cpu0
					empty, write := storeCeiling(b, s, b.N)
					sorted := slices.Clone(lat[:b.N])
					slices.Sort(sorted)
					pct := func(q float64) float64 { return float64(sorted[int(q*float64(len(sorted)-1))]) / 1e6 }
					rate := float64(b.N) / d.Seconds()
					b.ReportMetric(rate, "verify/s")
					b.ReportMetric(float64(b.N)/bareD.Seconds(), "bare/s")
					b.ReportMetric(bareD.Seconds()/d.Seconds(), "verify/bare")
					b.ReportMetric(pct(0.50), "p50-ms")
					b.ReportMetric(pct(0.99), "p99-ms")
					b.ReportMetric(float64(ops)/float64(max(groups, 1)), "group")
					b.ReportMetric(busy.Seconds()/d.Seconds(), "store-busy")
					b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-us/verify")
					b.ReportMetric(float64(bareCPU.Microseconds())/float64(b.N), "cpu-us/bare")
					b.ReportMetric(empty, "ceiling/s")
					b.ReportMetric(write, "write-tx/s")
					b.ReportMetric(rate/empty, "verify/ceiling")
				})
			}
		})
	}
}

// verifyCallers is BenchmarkIssuerVerify's concurrent callers per worker.
const verifyCallers = 64

// limitVerifier lets at most cap(slots) token calls run at once: the
// benchmark's workers.
type limitVerifier struct {
	v     MACVerifier
	slots chan struct{}
}

func (l *limitVerifier) Verify(ctx context.Context, ck CardKey, challenge, mac []byte) (bool, error) {
	l.slots <- struct{}{}
	defer func() { <-l.slots }()
	return l.v.Verify(ctx, ck, challenge, mac)
}

// cpuTime is the process's CPU time so far, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// storeCeiling measures s's transaction rates, one transaction after
// another, each for at most n transactions or one second: empty (BEGIN;
// COMMIT: SQLite writes nothing, so syncs nothing), and with one row
// written (the schema version's applied_at, a new value each time, put
// back after: SQLite skips a write that changes no byte), which must
// reach the disk before COMMIT returns.
func storeCeiling(b *testing.B, s Store, n int) (empty, write float64) {
	ss := s.(*sqlStore)
	ctx := context.Background()
	var applied string
	if err := ss.queryRow(ctx, ss.db, `SELECT applied_at FROM schema_version WHERE version = 1`).Scan(&applied); err != nil {
		b.Fatal(err)
	}
	run := func(write bool) float64 {
		start := time.Now()
		i := 0
		for ; i < n && (i < 100 || time.Since(start) < time.Second); i++ {
			tx, err := ss.db.BeginTx(ctx, nil)
			if err != nil {
				b.Fatal(err)
			}
			if write {
				if _, err := ss.exec(ctx, tx, `UPDATE schema_version SET applied_at = ? WHERE version = 1`, strconv.Itoa(i)); err != nil {
					b.Fatal(err)
				}
			}
			if err := tx.Commit(); err != nil {
				b.Fatal(err)
			}
		}
		return float64(i) / time.Since(start).Seconds()
	}
	run(false) // warm
	empty, write = run(false), run(true)
	if _, err := ss.exec(ctx, ss.db, `UPDATE schema_version SET applied_at = ? WHERE version = 1`, applied); err != nil {
		b.Fatal(err)
	}
	return empty, write
}
