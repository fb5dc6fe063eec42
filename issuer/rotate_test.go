package issuer

import (
	"blindperso/internal/pgtest"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"blindperso/batch"
	"blindperso/card/cardtest"
	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// hostCard is a card made on the host side: the test drew S, encrypted
// it to the issuer key (protocol.Encapsulate) and derived K_I itself, so
// it can answer challenges and look for K_I in files.
type hostCard struct{ id, ki []byte }

// hostBatch makes n such cards (Ids from base) and writes their batch,
// with a manifest that matches it, in dir.
func hostBatch(tb testing.TB, is *Issuer, p protocol.Profile, n int, base uint64, dir string) ([]hostCard, string) {
	tb.Helper()
	cards := make([]hostCard, n)
	lines := make([][]byte, n)
	fp := is.Key.Fingerprint()
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for g := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := g; i < n; i += 2 {
				sec, c, err := protocol.Encapsulate(p, is.Key.Public, rand.Reader)
				if err == nil {
					cards[i].ki, err = protocol.DeriveKey(p, sec, protocol.Binding(p, is.Key.Public.SPKI))
				}
				if err != nil {
					errs <- err
					return
				}
				cards[i].id = binary.BigEndian.AppendUint64([]byte{0xB2}, base+uint64(i))
				rec := batch.Record{V: batch.Version, ID: cards[i].id, C: c, Profile: p.Name, Fingerprint: fp[:], Time: time.Unix(0, 0).UTC()}
				lines[i], _ = json.Marshal(rec)
			}
		}()
	}
	wg.Wait()
	select {
	case err := <-errs:
		tb.Fatal(err)
	default:
	}
	content := append(bytes.Join(lines, []byte("\n")), '\n')
	path := filepath.Join(dir, fmt.Sprintf("batch-%d.ndjson", base))
	if err := os.WriteFile(path, content, 0o644); err != nil {
		tb.Fatal(err)
	}
	sum := sha256.Sum256(content)
	m := batch.Manifest{Format: batch.Format, Batch: filepath.Base(path), Count: n, Bytes: int64(len(content)),
		SHA256: sum[:], Profile: p.Name, IssuerFingerprint: fp[:], Station: "test", Written: time.Unix(0, 0).UTC()}
	b, _ := json.Marshal(m)
	if err := os.WriteFile(batch.ManifestPath(path), b, 0o644); err != nil {
		tb.Fatal(err)
	}
	return cards, path
}

// rotToken is a token with an issuer key and two KEKs, A and B, made as
// the ceremony makes them.
type rotToken struct {
	uri, soPIN string
	tok        *hsm.Token
	is         *Issuer // KEK A
	a, b       *hsm.KEKRef
}

func newRotToken(tb testing.TB, kind string, sessions int) *rotToken {
	tb.Helper()
	var ht hsmtest.Token
	if kind == "softhsm2" {
		ht = hsmtest.SoftHSM(tb)
	} else {
		ht = hsmtest.NSS(tb)
	}
	rt := &rotToken{uri: ht.URI, soPIN: ht.SOPIN}
	rt.open(tb, sessions)
	ctx := context.Background()
	sfx := fmt.Sprintf("-%x", time.Now().UnixNano()) // the NSS database is shared
	key, err := rt.tok.GenerateIssuerKey(ctx, hsm.KindP256, "issuer"+sfx)
	if err != nil {
		tb.Fatal(err)
	}
	if rt.a, err = rt.tok.GenerateKEK(ctx, "kek-a"+sfx, rt.soPIN); err != nil {
		tb.Fatal(err)
	}
	if rt.b, err = rt.tok.GenerateKEK(ctx, "kek-b"+sfx, rt.soPIN); err != nil {
		tb.Fatal(err)
	}
	rt.is = &Issuer{Token: rt.tok, Key: key, KEK: rt.a}
	return rt
}

func (rt *rotToken) open(tb testing.TB, sessions int) {
	tb.Helper()
	tok, err := hsm.OpenURI(rt.uri, sessions)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { tok.Close() })
	rt.tok = tok
}

// verifyAll authenticates every card of the store under kek: a fresh
// challenge, the card's MAC, Issuer.Verify in the token.
func verifyAll(tb testing.TB, tok *hsm.Token, key *hsm.IssuerKeyRef, kek *hsm.KEKRef, st Store, cards []hostCard) {
	tb.Helper()
	ctx := context.Background()
	is := &Issuer{Token: tok, Key: key, KEK: kek}
	defer is.Close(ctx)
	stored, err := st.Cards(ctx, "")
	if err != nil {
		tb.Fatal(err)
	}
	if len(stored) != len(cards) {
		tb.Fatalf("%d cards in the store, want %d", len(stored), len(cards))
	}
	ki := make(map[string][]byte, len(cards))
	for _, c := range cards {
		ki[string(c.id)] = c.ki
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	bad := 0
	for g := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := g; i < len(stored); i += 2 {
				sc := stored[i]
				ch := make([]byte, protocol.ChallengeLen)
				rand.Read(ch)
				mac, err := protocol.AuthMAC(ki[string(sc.ID)], sc.ID, ch)
				var ok bool
				if err == nil {
					ok, err = is.Verify(ctx, sc.CardKey, ch, mac)
				}
				if !ok || err != nil {
					mu.Lock()
					if bad++; bad <= 5 {
						tb.Errorf("card %x does not authenticate under KEK %s: %v %v", []byte(sc.ID), kek.Label, ok, err)
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	if bad > 0 {
		tb.Fatalf("%d of %d cards do not authenticate", bad, len(stored))
	}
}

func importAll(tb testing.TB, is *Issuer, st Store, path string) {
	tb.Helper()
	rep, err := (&Importer{Issuer: is, Store: st, Workers: 2}).ImportFile(context.Background(), path)
	if err != nil {
		tb.Fatal(err)
	}
	if rep.Rejects+rep.Conflicts > 0 {
		tb.Fatalf("import: %+v", rep)
	}
}

func TestStoreKEKMethods(t *testing.T) {
	rt := newRotToken(t, "softhsm2", 2)
	p := protocol.ECDHP256AES
	cards, path := hostBatch(t, rt.is, p, 12, 100, t.TempDir())
	ctx := context.Background()
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			db, _ := k.open(t)
			st := openStore(t, db)
			importAll(t, rt.is, st, path)
			var got []CardBlob
			var after []byte
			for {
				page, err := st.BlobsUnderKEK(ctx, rt.a.Label, after, 5)
				if err != nil {
					t.Fatal(err)
				}
				if len(page) == 0 {
					break
				}
				if len(page) > 5 {
					t.Fatalf("page of %d, limit 5", len(page))
				}
				got = append(got, page...)
				after = page[len(page)-1].ID
			}
			if len(got) != len(cards) {
				t.Fatalf("%d blobs under %s, want %d", len(got), rt.a.Label, len(cards))
			}
			for i := 1; i < len(got); i++ {
				if bytes.Compare(got[i-1].ID, got[i].ID) >= 0 {
					t.Fatalf("not in Id order: %X then %X", []byte(got[i-1].ID), []byte(got[i].ID))
				}
			}
			if got[0].Blob.KEK != rt.a.Label || len(got[0].Blob.Wrapped) != 24 {
				t.Fatalf("blob %+v", got[0].Blob)
			}
			nb := hsm.Blob{Scheme: hsm.WrapRFC5649, Mechanism: 1, KEK: rt.b.Label, Wrapped: bytes.Repeat([]byte{7}, 24)}
			rs := []BlobReplacement{
				{ID: got[0].ID, Old: got[0].Blob.Wrapped, New: nb},
				{ID: got[1].ID, Old: got[2].Blob.Wrapped, New: nb}, // not its blob: left alone
			}
			done, err := st.ReplaceBlobs(ctx, rt.a.Label, rs)
			if err != nil || !done[0] || done[1] {
				t.Fatalf("replace: %v %v", done, err)
			}
			// Again: the row is no longer under A (compare-and-set).
			if done, err := st.ReplaceBlobs(ctx, rt.a.Label, rs[:1]); err != nil || done[0] {
				t.Fatalf("second replace: %v %v", done, err)
			}
			if _, err := st.ReplaceBlobs(ctx, rt.a.Label, []BlobReplacement{{ID: got[3].ID, Old: got[3].Blob.Wrapped, New: hsm.Blob{KEK: rt.a.Label}}}); err == nil {
				t.Error("a replacement under the same KEK was accepted")
			}
			c, err := st.Card(ctx, got[0].ID)
			if err != nil || c.Blob.KEK != rt.b.Label || !bytes.Equal(c.Blob.Wrapped, nb.Wrapped) || c.Blob.Mechanism != 1 {
				t.Fatalf("card after replace: %+v %v", c.Blob, err)
			}
			counts, err := st.KEKCounts(ctx)
			if err != nil || counts[rt.a.Label] != len(cards)-1 || counts[rt.b.Label] != 1 || len(counts) != 2 {
				t.Fatalf("counts %v %v", counts, err)
			}
			rest, err := st.BlobsUnderKEK(ctx, rt.a.Label, nil, 100)
			if err != nil || len(rest) != len(cards)-1 {
				t.Fatalf("%d under A after one replace: %v", len(rest), err)
			}
		})
	}
}

// TestRotate: a rotation in the token moves every blob, authenticates
// every card under the new KEK, and a rerun has nothing left to do.
func TestRotate(t *testing.T) {
	cases := []struct {
		kind  string
		n     int
		store []storeKind
	}{
		{"softhsm2", 60, storeKinds},
		{"nss", 200, storeKinds[:1]},
	}
	for _, tc := range cases {
		t.Run(tc.kind, func(t *testing.T) {
			rt := newRotToken(t, tc.kind, 2)
			p := protocol.ECDHP256AES
			cards, path := hostBatch(t, rt.is, p, tc.n, 1, t.TempDir())
			for _, k := range tc.store {
				t.Run(k.name, func(t *testing.T) {
					ctx := context.Background()
					db, files := k.open(t)
					st := openStore(t, db)
					importAll(t, rt.is, st, path)
					var progress []RotateProgress
					// Small pages, groups and recycling: every boundary is
					// crossed many times.
					opt := RotateOptions{Workers: 2, page: 7, group: 5, recycle: 17,
						Progress: func(p RotateProgress) { progress = append(progress, p) }}
					res, err := Rotate(ctx, st, rt.tok, rt.a, rt.b, opt)
					if err != nil {
						t.Fatal(err)
					}
					if res.Total != tc.n || res.Rewrapped != tc.n || res.AlreadyDone != 0 || res.Failed != 0 || res.UnderFrom != 0 || res.UnderTo != tc.n {
						t.Fatalf("result %+v", res)
					}
					if len(progress) == 0 || progress[len(progress)-1].Rewrapped != tc.n {
						t.Errorf("progress %v", progress)
					}
					verifyAll(t, rt.tok, rt.is.Key, rt.b, st, cards)
					res, err = Rotate(ctx, st, rt.tok, rt.a, rt.b, RotateOptions{Workers: 2})
					if err != nil || res.Rewrapped != 0 || res.AlreadyDone != tc.n || res.Total != 0 {
						t.Fatalf("rerun: %+v %v", res, err)
					}
					// And back: A is a trusted KEK too.
					res, err = Rotate(ctx, st, rt.tok, rt.b, rt.a, RotateOptions{Workers: 1})
					if err != nil || res.Rewrapped != tc.n {
						t.Fatalf("back to A: %+v %v", res, err)
					}
					verifyAll(t, rt.tok, rt.is.Key, rt.a, st, cards)
					assertNoHostKI(t, k.name, files, cards)
				})
			}
		})
	}
}

// TestRotateFailures: a corrupt blob is a failure with its reason and
// stays under the old KEK; bad requests are refused before any work.
func TestRotateFailures(t *testing.T) {
	rt := newRotToken(t, "softhsm2", 2)
	ctx := context.Background()
	p := protocol.ECDHP256AES
	cards, path := hostBatch(t, rt.is, p, 10, 1, t.TempDir())
	db := filepath.Join(t.TempDir(), "data")
	st := openStore(t, db)
	importAll(t, rt.is, st, path)
	bad := cards[3].id
	if _, err := st.(*sqlStore).db.Exec(`UPDATE cards SET blob_wrapped = ? WHERE id = ?`, strings.Repeat("ab", 24), hexID(bad)); err != nil {
		t.Fatal(err)
	}
	res, err := Rotate(ctx, st, rt.tok, rt.a, rt.b, RotateOptions{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	if res.Rewrapped != 9 || res.Failed != 1 || len(res.Failures) != 1 || !bytes.Equal(res.Failures[0].CardID, bad) || res.UnderFrom != 1 {
		t.Fatalf("result %+v", res)
	}
	t.Logf("failure reason: %s", res.Failures[0].Reason)
	res, err = Rotate(ctx, st, rt.tok, rt.a, rt.b, RotateOptions{Workers: 2})
	if err != nil || res.Rewrapped != 0 || res.AlreadyDone != 9 || res.Failed != 1 {
		t.Fatalf("rerun: %+v %v", res, err)
	}

	refused := []struct {
		name     string
		from, to *hsm.KEKRef
		want     string
	}{
		{"same", rt.a, rt.a, "same KEK"},
		{"missing", rt.a, nil, "required"},
		{"untrusted", rt.a, &hsm.KEKRef{Label: "mine"}, `"mine" is not CKA_TRUSTED`},
	}
	for _, r := range refused {
		if _, err := Rotate(ctx, st, rt.tok, r.from, r.to, RotateOptions{}); err == nil || !strings.Contains(err.Error(), r.want) {
			t.Errorf("%s: %v, want %q", r.name, err, r.want)
		}
	}
}

// assertNoHostKI looks for every card's K_I, in every encoding of
// cardtest.Encodings, in every file under dirs.
func assertNoHostKI(tb testing.TB, kind, dir string, cards []hostCard, more ...string) {
	tb.Helper()
	if kind == "postgres" {
		pgtest.Checkpoint(tb)
	}
	// Needles by their first 8 bytes: one map lookup per file offset.
	type needle struct {
		b    []byte
		what string
	}
	idx := map[uint64][]needle{}
	for _, c := range cards {
		for name, e := range cardtest.Encodings(c.ki) {
			k := binary.LittleEndian.Uint64(e)
			idx[k] = append(idx[k], needle{e, fmt.Sprintf("card %x's K_I (%s)", c.id, name)})
		}
	}
	files, size := 0, 0
	for _, d := range append([]string{dir}, more...) {
		err := filepath.WalkDir(d, func(path string, e fs.DirEntry, err error) error {
			if err != nil || e.IsDir() {
				return err
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return nil // sockets, files that vanish
			}
			files++
			size += len(b)
			for i := 0; i+8 <= len(b); i++ {
				for _, n := range idx[binary.LittleEndian.Uint64(b[i:])] {
					if bytes.HasPrefix(b[i:], n.b) {
						tb.Errorf("%s contains %s at offset %d", path, n.what, i)
					}
				}
			}
			return nil
		})
		if err != nil {
			tb.Fatal(err)
		}
	}
	if files == 0 {
		tb.Fatalf("no files under %s", dir)
	}
	tb.Logf("searched %d files (%d bytes) for %d K_I in %d encodings", files, size, len(cards), len(cardtest.Encodings(make([]byte, 16))))
}

// TestRotateKill9 is the crash test of KEK rotation: 10 000 cards made
// on the host side and imported into SQLite under KEK A; the real
// `issuer kek rotate` binary is killed with SIGKILL at random points of
// its run (at least 20 times), rerun after each kill, and finally run to
// completion. After every kill every blob is under A or B; at the end
// every card authenticates under B, none is left under A, and no file
// the test made (the store and its WAL, the processes' output, the
// batch, the token's files) holds any card's K_I.
func TestRotateKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("kill -9 test: 10 000 cards")
	}
	const n, minKills = 10000, 20
	begin := time.Now()
	ctx := context.Background()
	bin := filepath.Join(t.TempDir(), "issuer")
	build := exec.Command("go", "build", "-o", bin, "blindperso/cmd/issuer")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	t.Logf("built %s in %v", bin, time.Since(begin).Round(time.Millisecond))

	rt := newRotToken(t, "softhsm2", 2)
	work := t.TempDir()
	p := protocol.ECDHP256AES
	t0 := time.Now()
	cards, path := hostBatch(t, rt.is, p, n, 1, work)
	db := filepath.Join(work, "data")
	st := openStore(t, db)
	importAll(t, rt.is, st, path)
	t.Logf("%d cards made and imported in %v", n, time.Since(t0).Round(time.Millisecond))
	from, to, key := rt.a.Label, rt.b.Label, rt.is.Key.Label
	// SoftHSM2 and a second process on one token: never at once.
	rt.is.Close(ctx)
	rt.tok.Close()
	tokenFiles := hsmtest.TokenObjects(t)

	counts := func() (a, b int) {
		t.Helper()
		c, err := st.KEKCounts(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(c) > 2 || c[from]+c[to] != n {
			t.Fatalf("after a kill: blobs per KEK %v, want %d under %s or %s", c, n, from, to)
		}
		return c[from], c[to]
	}
	runs := 0
	var run func(kill time.Duration) (killed bool, out string)
	run = func(kill time.Duration) (killed bool, out string) {
		t.Helper()
		runs++
		stdout := filepath.Join(work, fmt.Sprintf("run-%02d.stdout", runs))
		stderr := filepath.Join(work, fmt.Sprintf("run-%02d.stderr", runs))
		fo, _ := os.Create(stdout)
		fe, _ := os.Create(stderr)
		defer fo.Close()
		defer fe.Close()
		cmd := exec.Command(bin, "kek", "rotate", "--token", rt.uri, "--db", db, "--from", from, "--to", to, "--workers", "2")
		cmd.Stdout, cmd.Stderr = fo, fe
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		var err error
		if kill > 0 {
			select {
			case err = <-done:
			case <-time.After(kill):
				cmd.Process.Signal(syscall.SIGKILL)
				<-done
				return true, ""
			}
		} else {
			err = <-done
		}
		o, _ := os.ReadFile(stdout)
		e, _ := os.ReadFile(stderr)
		if err != nil {
			// A kill inside an earlier run's C_Login can have emptied
			// the token's token.object (SoftHSM2's, not the rotation's:
			// hsmtest.RestoreLost): put it back. The run could not open
			// the token, so it changed nothing: a run to be killed
			// counts as killed at its start, a run to the end is run
			// again.
			if lost := hsmtest.RestoreLost(t, tokenFiles); len(lost) > 0 && strings.Contains(string(e), "no such token") {
				t.Logf("run %d: SoftHSM2 had lost the token (empty %s after a kill in its login); restored", runs, lost)
				if kill == 0 {
					return run(0)
				}
				return true, ""
			}
			t.Fatalf("issuer kek rotate: %v\nstdout: %s\nstderr: %s", err, o, e)
		}
		return false, string(o)
	}

	// The kill points: a random time in the run still to come, spread so
	// that at least minKills land before the end. startup is the time
	// to the first commit (process start, store, token login), rate the
	// blobs re-wrapped per second once running; both are learnt from the
	// kills so far.
	startup, rate := 100*time.Millisecond, 6000.0
	kills := 0
	var delays []string
	left, _ := counts()
	for kills < minKills {
		frac := randFloat() * 2 / float64(minKills-kills) // of what is left
		d := time.Duration(randFloat()*float64(startup)) + time.Duration(min(frac, 0.9)*float64(left)/rate*float64(time.Second))
		if randFloat() < 0.15 {
			d = time.Duration(randFloat() * float64(startup)) // in the start-up
		}
		killed, _ := run(d)
		a, _ := counts()
		if !killed {
			// Finished before the kill (the rate was underestimated):
			// go on killing the rotation back, B to A; the last runs
			// below bring every blob to B.
			t.Logf("run %d finished before its kill at %v; the kills go on with the rotation back", runs, d)
			from, to = to, from
			left, _ = counts()
			continue
		}
		kills++
		delays = append(delays, fmt.Sprintf("%v:%d", d.Round(time.Millisecond), left-a))
		if moved := left - a; moved > 0 && d > startup {
			rate = 0.5*rate + 0.5*float64(moved)/(d-startup).Seconds()
		} else if moved == 0 && d > startup {
			startup = (startup + d) / 2
		}
		left = a
	}
	t.Logf("%d kills (delay:blobs moved): %s", kills, strings.Join(delays, " "))
	t.Logf("%d blobs left under %s after the kills", left, from)
	_, out := run(0)
	t.Logf("final run: %s", strings.TrimSpace(out))
	if from != rt.a.Label {
		from, to = to, from
		_, out = run(0)
		t.Logf("final run: %s", strings.TrimSpace(out))
	}
	if a, b := counts(); a != 0 || b != n {
		t.Fatalf("after the final run: %d under %s, %d under %s", a, from, b, to)
	}
	_, out = run(0)
	if want := fmt.Sprintf("0 re-wrapped, %d already under %s, 0 failed; 0 left under %s", n, to, from); !strings.Contains(out, want) {
		t.Errorf("rerun printed %q, want %q", out, want)
	}

	// Every card authenticates under B, in the token (reopened).
	rt.open(t, 2)
	kb, err := rt.tok.FindKEK(ctx, to)
	if err != nil {
		t.Fatal(err)
	}
	ik, err := rt.tok.FindIssuerKey(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	t1 := time.Now()
	verifyAll(t, rt.tok, ik, kb, st, cards)
	t.Logf("%d cards authenticated under %s in %v", n, to, time.Since(t1).Round(time.Millisecond))
	st.Close()
	assertNoHostKI(t, "sqlite", filepath.Dir(work), cards, filepath.Join(hsmtest.Dir, "softhsm"))
	t.Logf("%d runs, %d kills, %v in all", runs, kills, time.Since(begin).Round(time.Millisecond))
}

func randFloat() float64 {
	var b [8]byte
	rand.Read(b[:])
	return float64(binary.BigEndian.Uint64(b[:])>>11) / (1 << 53)
}
