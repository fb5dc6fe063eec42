package issuer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"blindperso/hsm"
)

// The tests of group commit (authgroup.go) drive the store with cards of
// their own and a verifier that needs no token: a card's "key" is its
// wrapped blob, and the right MAC over a challenge is fakeMAC of both.
// What they test is the store's part: which verification consumes what,
// counts and blocks, when the caller is answered.

func fakeMAC(blob hsm.Blob, challenge []byte) []byte {
	h := sha256.New()
	h.Write([]byte(blob.KEK))
	h.Write(blob.Wrapped)
	h.Write(challenge)
	return h.Sum(nil)[:16]
}

// fakeVerifier checks fakeMAC; it counts its calls, and before, if set,
// runs first (it may block, fail, or change the store meanwhile).
type fakeVerifier struct {
	calls  atomic.Int32
	before func(ck CardKey) error
}

func (f *fakeVerifier) Verify(ctx context.Context, ck CardKey, challenge, mac []byte) (bool, error) {
	f.calls.Add(1)
	if f.before != nil {
		if err := f.before(ck); err != nil {
			return false, err
		}
	}
	return bytes.Equal(mac, fakeMAC(ck.Blob, challenge)), nil
}

// fakeCards stores n active cards with random blobs (no token) and
// returns their keys.
func fakeCards(t testing.TB, s Store, n int) []CardKey {
	t.Helper()
	ctx := context.Background()
	b := make([]byte, 32)
	rand.Read(b)
	batchID := hex.EncodeToString(b)
	if err := s.BeginBatch(ctx, batchID, []byte(`{}`), n); err != nil {
		t.Fatal(err)
	}
	var rs []RecordResult
	var out []CardKey
	for i := range n {
		id := make([]byte, 8)
		rand.Read(id)
		w := make([]byte, 40)
		rand.Read(w)
		ck := CardKey{ID: id, Profile: "ecdh-p256-aes", IssuerFingerprint: make([]byte, 32),
			Blob: hsm.Blob{Scheme: hsm.WrapRFC5649, Mechanism: 0x2109, KEK: "kek", Wrapped: w}}
		sum := sha256.Sum256(id)
		rs = append(rs, RecordResult{Batch: batchID, Line: i + 1, Card: &StoredCard{CardKey: ck, IssuerKeyLabel: "issuer", CSHA256: sum[:], Batch: batchID, Line: i + 1}})
		out = append(out, ck)
	}
	if _, err := s.PutResults(ctx, rs); err != nil {
		t.Fatal(err)
	}
	return out
}

func committer(s Store) *authCommitter { return s.(*sqlStore).ac }

// issue gives a challenge for ck, fatal on error.
func issue(t testing.TB, a *Authenticator, ck CardKey) []byte {
	t.Helper()
	ch, err := a.Challenge(context.Background(), ck.ID)
	if err != nil {
		t.Fatal(err)
	}
	return ch.Challenge
}

func challengeUsed(t testing.TB, s Store, ch []byte) (used, found bool) {
	t.Helper()
	var u int
	err := s.(*sqlStore).db.QueryRow(s.(*sqlStore).d.q(`SELECT used FROM challenges WHERE id = ?`), hex.EncodeToString(ch)).Scan(&u)
	if err != nil {
		return false, false
	}
	return u == 1, true
}

func authLogCounts(t testing.TB, s Store, id []byte) map[string]int {
	t.Helper()
	log, err := s.AuthLog(context.Background(), id, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]int{}
	for _, e := range log {
		m[e.Result]++
	}
	return m
}

// holdFirstGroup makes the committer's next group wait before its commit
// until want more operations are queued (or 10 s), so that they all land
// in the following group; entered is closed when that hold begins.
func holdFirstGroup(t *testing.T, c *authCommitter, want int) (entered <-chan struct{}) {
	t.Helper()
	var once sync.Once
	in := make(chan struct{})
	c.beforeCommit = func([]*authOp) error {
		once.Do(func() {
			close(in)
			deadline := time.Now().Add(10 * time.Second)
			for c.queued() < want && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
		})
		return nil
	}
	t.Cleanup(func() { c.beforeCommit = nil })
	return in
}

// waitQueued waits until n operations are queued.
func waitQueued(t *testing.T, c *authCommitter, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for c.queued() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d operations queued, want %d", c.queued(), n)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// N concurrent wrong answers for one card, over two store handles (two
// issuer instances on one PostgreSQL; two processes on one SQLite file):
// the card is blocked at exactly MaxFailures, failed_auth counts exactly,
// every later verification is refused, and the log says the same.
func TestAuthGroupFailureCounting(t *testing.T) {
	const n, limit = 40, 3
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := context.Background()
			db, _ := k.open(t)
			s1, s2 := openStore(t, db), openStore(t, db)
			ck := fakeCards(t, s1, 1)[0]
			v := &fakeVerifier{}
			auths := []*Authenticator{{Verifier: v, Store: s1, MaxFailures: limit}, {Verifier: v, Store: s2, MaxFailures: limit}}
			chs := make([][]byte, n)
			for i := range chs {
				chs[i] = issue(t, auths[i%2], ck)
			}
			results := make([]AuthResult, n)
			errs := make([]error, n)
			var wg sync.WaitGroup
			start := make(chan struct{})
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					bad := fakeMAC(ck.Blob, chs[i])
					bad[0] ^= 1
					results[i], errs[i] = auths[i%2].Verify(ctx, ck.ID, chs[i], bad)
				}()
			}
			close(start)
			wg.Wait()
			got := map[string]int{}
			for i := range n {
				if errs[i] != nil || results[i].OK {
					t.Fatalf("verification %d: %+v, %v", i, results[i], errs[i])
				}
				got[results[i].Result]++
				if results[i].Result == AuthRefused && (results[i].State != StateBlocked || results[i].FailedAuth != limit) {
					t.Fatalf("refused: %+v", results[i])
				}
			}
			want := map[string]int{AuthFailed: limit - 1, AuthBlocked: 1, AuthRefused: n - limit}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("results %v, want %v", got, want)
			}
			sc, err := s1.Card(ctx, ck.ID)
			if err != nil || sc.State != StateBlocked || sc.FailedAuth != limit {
				t.Fatalf("card %+v, %v", sc, err)
			}
			if logs := authLogCounts(t, s1, ck.ID); fmt.Sprint(logs) != fmt.Sprint(want) {
				t.Fatalf("auth log %v, want %v", logs, want)
			}
			for _, ch := range chs {
				if used, _ := challengeUsed(t, s1, ch); !used {
					t.Fatalf("challenge %x not consumed", ch)
				}
			}
			// Later ones: no challenge, and an old one is refused.
			if _, err := auths[0].Challenge(ctx, ck.ID); !errors.Is(err, ErrCardNotActive) {
				t.Fatalf("challenge for the blocked card: %v", err)
			}
			g := committer(s1)
			t.Logf("%d verifications: store 1 committed %d operations in %d groups, store 2 %d in %d",
				n, g.ops.Load(), g.groups.Load(), committer(s2).ops.Load(), committer(s2).groups.Load())
		})
	}
}

// One group holding every case at once, in a known order: the outcome of
// each is what one transaction per verification gives, in that order.
// Two for the same card see each other; the same challenge twice: the
// second is "used"; and the refusals are the uniform ones (an error
// wrapping an ErrChallenge…, which the API answers as a wrong MAC), none
// moving the card's count.
func TestAuthGroupInOrder(t *testing.T) {
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := context.Background()
			db, _ := k.open(t)
			s := openStore(t, db)
			cks := fakeCards(t, s, 2)
			x, y := cks[0], cks[1]
			clock := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
			var mu sync.Mutex
			now := func() time.Time { mu.Lock(); defer mu.Unlock(); clock = clock.Add(time.Millisecond); return clock }
			v := &fakeVerifier{}
			a := &Authenticator{Verifier: v, Store: s, MaxFailures: 2, Now: now}
			c1, c2, c3, cy, c5 := issue(t, a, x), issue(t, a, x), issue(t, a, x), issue(t, a, y), issue(t, a, x)
			old := &Authenticator{Verifier: v, Store: s, MaxFailures: 2, TTL: time.Millisecond, Now: now}
			expired := issue(t, old, x)
			bad := func(ck CardKey, ch []byte) []byte { m := fakeMAC(ck.Blob, ch); m[0] ^= 1; return m }
			unknown := make([]byte, 16)
			cases := []struct {
				name      string
				id, ch    []byte
				mac       []byte
				result    string // "" for a refused challenge
				refusal   error
				failedNow int
			}{
				{"good", x.ID, c1, fakeMAC(x.Blob, c1), AuthOK, nil, 0},
				{"same challenge again", x.ID, c1, fakeMAC(x.Blob, c1), "", ErrChallengeUsed, 0},
				{"wrong MAC", x.ID, c2, bad(x, c2), AuthFailed, nil, 1},
				{"other card's challenge", x.ID, cy, fakeMAC(x.Blob, cy), "", ErrChallengeOtherCard, 1},
				{"unknown challenge", x.ID, unknown, fakeMAC(x.Blob, unknown), "", ErrChallengeUnknown, 1},
				{"expired challenge", x.ID, expired, fakeMAC(x.Blob, expired), "", ErrChallengeExpired, 1},
				{"wrong MAC at the limit", x.ID, c3, bad(x, c3), AuthBlocked, nil, 2},
				{"good, but blocked", x.ID, c5, fakeMAC(x.Blob, c5), AuthRefused, nil, 2},
				{"the other card", y.ID, cy, fakeMAC(y.Blob, cy), AuthOK, nil, 0},
			}
			c := committer(s)
			groups := c.groups.Load()
			entered := holdFirstGroup(t, c, len(cases))
			// The blocker: a challenge whose group holds its commit.
			blocked := make(chan error, 1)
			go func() { _, err := a.Challenge(ctx, y.ID); blocked <- err }()
			<-entered
			type answer struct {
				res AuthResult
				err error
			}
			answers := make([]chan answer, len(cases))
			for i, tc := range cases {
				answers[i] = make(chan answer, 1)
				go func() {
					res, err := a.Verify(ctx, tc.id, tc.ch, tc.mac)
					answers[i] <- answer{res, err}
				}()
				if i < len(cases)-1 {
					// Arrival order is the cases' order. (Once the last
					// is queued the group is taken at once.)
					waitQueued(t, c, i+1)
				}
			}
			if err := <-blocked; err != nil {
				t.Fatal(err)
			}
			for i, tc := range cases {
				an := <-answers[i]
				switch {
				case tc.refusal != nil:
					if !errors.Is(an.err, tc.refusal) {
						t.Errorf("%s: %+v, %v; want %v", tc.name, an.res, an.err, tc.refusal)
					}
					if !uniformRefusal(an.err) {
						t.Errorf("%s: %v is not one of the uniformly answered refusals", tc.name, an.err)
					}
				case an.err != nil || an.res.Result != tc.result || an.res.FailedAuth != tc.failedNow:
					t.Errorf("%s: %+v, %v; want %s with failed_auth %d", tc.name, an.res, an.err, tc.result, tc.failedNow)
				}
			}
			if n := c.groups.Load() - groups; n != 2 {
				t.Errorf("%d groups, want 2 (the blocker, then all the cases)", n)
			}
			sx, _ := s.Card(ctx, x.ID)
			if sx.State != StateBlocked || sx.FailedAuth != 2 {
				t.Errorf("card x: %+v", sx)
			}
			// The log: one row per case, but none for the unknown
			// challenge (nothing to log against), refusals logged as
			// challenge-refused.
			want := map[string]int{AuthOK: 1, AuthFailed: 1, AuthBlocked: 1, AuthRefused: 1, LogChallengeRefused: 3}
			if got := authLogCounts(t, s, x.ID); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("card x log %v, want %v", got, want)
			}
			// Every used challenge was consumed exactly once; the other
			// card's was consumed by its own card, not by x.
			for _, ch := range [][]byte{c1, c2, c3, c5, cy} {
				if used, _ := challengeUsed(t, s, ch); !used {
					t.Errorf("challenge %x not consumed", ch)
				}
			}
			if used, _ := challengeUsed(t, s, expired); used {
				t.Error("the expired challenge was consumed")
			}
		})
	}
}

// uniformRefusal is the API's test (issuer/server: verify) of a refused
// challenge, answered exactly as a wrong MAC.
func uniformRefusal(err error) bool {
	return errors.Is(err, ErrChallengeUnknown) || errors.Is(err, ErrChallengeOtherCard) ||
		errors.Is(err, ErrChallengeUsed) || errors.Is(err, ErrChallengeExpired)
}

// A verification is answered only after its group has committed; a
// group whose commit fails answers an error and leaves nothing: the
// challenge is still usable, the count unchanged.
func TestAuthAnsweredAfterCommit(t *testing.T) {
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := context.Background()
			db, _ := k.open(t)
			s := openStore(t, db)
			other := openStore(t, db) // another connection: sees only what is committed
			ck := fakeCards(t, s, 1)[0]
			a := &Authenticator{Verifier: &fakeVerifier{}, Store: s}
			c := committer(s)

			ch := issue(t, a, ck)
			entered, release := make(chan struct{}), make(chan struct{})
			c.beforeCommit = func([]*authOp) error { close(entered); <-release; return nil }
			done := make(chan error, 1)
			go func() {
				res, err := a.Verify(ctx, ck.ID, ch, fakeMAC(ck.Blob, ch))
				if err == nil && !res.OK {
					err = fmt.Errorf("%+v", res)
				}
				done <- err
			}()
			<-entered
			select {
			case err := <-done:
				t.Fatalf("answered before the commit: %v", err)
			case <-time.After(50 * time.Millisecond):
			}
			if used, _ := challengeUsed(t, other, ch); used {
				t.Fatal("the consumption is visible before the commit")
			}
			close(release)
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			c.beforeCommit = nil
			if used, _ := challengeUsed(t, other, ch); !used {
				t.Fatal("answered, but not committed")
			}

			// A failed commit: an error, and nothing happened.
			ch = issue(t, a, ck)
			bad := fakeMAC(ck.Blob, ch)
			bad[0] ^= 1
			before := authLogCounts(t, s, ck.ID)
			c.beforeCommit = func([]*authOp) error { return errors.New("disk on fire") }
			if res, err := a.Verify(ctx, ck.ID, ch, bad); err == nil || !strings.Contains(err.Error(), "disk on fire") {
				t.Fatalf("failed commit: %+v, %v", res, err)
			}
			c.beforeCommit = nil
			if used, found := challengeUsed(t, other, ch); used || !found {
				t.Fatalf("after a failed commit the challenge is used %v, found %v", used, found)
			}
			if sc, _ := s.Card(ctx, ck.ID); sc.FailedAuth != 0 {
				t.Fatalf("a failed commit counted: %+v", sc)
			}
			if after := authLogCounts(t, s, ck.ID); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Fatalf("a failed commit logged: %v → %v", before, after)
			}
			if res, err := a.Verify(ctx, ck.ID, ch, bad); err != nil || res.Result != AuthFailed || res.FailedAuth != 1 {
				t.Fatalf("retry after a failed commit: %+v, %v", res, err)
			}

			// A token error changes nothing either.
			ch = issue(t, a, ck)
			v := &fakeVerifier{before: func(CardKey) error { return errors.New("token gone") }}
			if _, err := (&Authenticator{Verifier: v, Store: s}).Verify(ctx, ck.ID, ch, fakeMAC(ck.Blob, ch)); err == nil {
				t.Fatal("a token error was not an error")
			}
			if used, _ := challengeUsed(t, other, ch); used {
				t.Fatal("a token error consumed the challenge")
			}
			if res, err := a.Verify(ctx, ck.ID, ch, fakeMAC(ck.Blob, ch)); err != nil || !res.OK {
				t.Fatalf("after a token error: %+v, %v", res, err)
			}
		})
	}
}

// A lone verification is committed at once, whatever the group wait;
// while others are in their token call, a verification waits for them at
// most the group wait.
func TestAuthGroupLatency(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir())
	cks := fakeCards(t, s, 2)
	c := committer(s)
	c.wait = time.Hour
	a := &Authenticator{Verifier: &fakeVerifier{}, Store: s}
	for range 3 {
		ch := issue(t, a, cks[0])
		start := time.Now()
		if res, err := a.Verify(ctx, cks[0].ID, ch, fakeMAC(cks[0].Blob, ch)); err != nil || !res.OK {
			t.Fatal(res, err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("a lone verification took %s", d)
		}
	}
	c.wait = 100 * time.Millisecond
	slowCh, ch := issue(t, a, cks[0]), issue(t, a, cks[1])
	inToken, release := make(chan struct{}), make(chan struct{})
	slow := &Authenticator{Store: s, Verifier: &fakeVerifier{before: func(CardKey) error { close(inToken); <-release; return nil }}}
	slowDone := make(chan error, 1)
	go func() { _, err := slow.Verify(ctx, cks[0].ID, slowCh, fakeMAC(cks[0].Blob, slowCh)); slowDone <- err }()
	<-inToken
	time.Sleep(50 * time.Millisecond) // the committer is idle again
	start := time.Now()
	if res, err := a.Verify(ctx, cks[1].ID, ch, fakeMAC(cks[1].Blob, ch)); err != nil || !res.OK {
		t.Fatal(res, err)
	}
	if d := time.Since(start); d < 90*time.Millisecond || d > 5*time.Second {
		t.Fatalf("with one verification in its token call, another took %s; want about the group wait", d)
	}
	close(release)
	if err := <-slowDone; err != nil {
		t.Fatal(err)
	}
}

// What changes between a verification's read and its group is seen:
// a card's key re-wrapped meanwhile has the token asked again under the
// new blob; a card unblocked meanwhile (not asked before: it was
// blocked) has the token asked — both alone, inside their transaction.
func TestAuthGroupDeferred(t *testing.T) {
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := context.Background()
			db, _ := k.open(t)
			s := openStore(t, db)
			ck := fakeCards(t, s, 1)[0]
			a := &Authenticator{Verifier: &fakeVerifier{}, Store: s}

			ch := issue(t, a, ck)
			nb := ck.Blob
			nb.KEK, nb.Wrapped = "kek-2", bytes.Repeat([]byte{7}, 40)
			var once sync.Once
			var blobs []hsm.Blob
			v := &fakeVerifier{before: func(k CardKey) error {
				blobs = append(blobs, k.Blob)
				var err error
				once.Do(func() {
					_, err = s.ReplaceBlobs(ctx, "kek", []BlobReplacement{{ID: ck.ID, Old: ck.Blob.Wrapped, New: nb}})
				})
				return err
			}}
			// The card answers under its key: after the re-wrap, the
			// key the new blob holds.
			res, err := (&Authenticator{Verifier: v, Store: s}).Verify(ctx, ck.ID, ch, fakeMAC(nb, ch))
			if err != nil || !res.OK {
				t.Fatalf("after a re-wrap: %+v, %v", res, err)
			}
			if len(blobs) != 2 || !sameBlob(blobs[0], ck.Blob) || !sameBlob(blobs[1], nb) {
				t.Fatalf("token asked under %+v", blobs)
			}

			ch = issue(t, a, ck)
			if _, err := s.BlockCard(ctx, ck.ID, "lost", time.Now()); err != nil {
				t.Fatal(err)
			}
			c := committer(s)
			c.afterPreRead = func() {
				if _, err := s.UnblockCard(ctx, ck.ID, "found", time.Now()); err != nil {
					t.Error(err)
				}
			}
			v2 := &fakeVerifier{}
			res, err = (&Authenticator{Verifier: v2, Store: s}).Verify(ctx, ck.ID, ch, fakeMAC(nb, ch))
			c.afterPreRead = nil
			if err != nil || !res.OK || v2.calls.Load() != 1 {
				t.Fatalf("unblocked meanwhile: %+v, %v, %d token calls", res, err, v2.calls.Load())
			}
		})
	}
}

// Challenges issued at once are stored in shared transactions, and each
// is usable once.
func TestChallengesGrouped(t *testing.T) {
	const n = 32
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := context.Background()
			db, _ := k.open(t)
			s := openStore(t, db)
			cks := fakeCards(t, s, 4)
			a := &Authenticator{Verifier: &fakeVerifier{}, Store: s}
			c := committer(s)
			holdFirstGroup(t, c, n-1)
			groups := c.groups.Load()
			chs := make([]Challenge, n)
			errs := make([]error, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					chs[i], errs[i] = a.Challenge(ctx, cks[i%len(cks)].ID)
				}()
			}
			wg.Wait()
			if g := c.groups.Load() - groups; g >= n/2 {
				t.Errorf("%d challenges in %d groups", n, g)
			}
			for i, ch := range chs {
				if errs[i] != nil {
					t.Fatal(errs[i])
				}
				ck := cks[i%len(cks)]
				if res, err := a.Verify(ctx, ck.ID, ch.Challenge, fakeMAC(ck.Blob, ch.Challenge)); err != nil || !res.OK {
					t.Fatalf("challenge %d: %+v, %v", i, res, err)
				}
			}
		})
	}
}

// Many verifiers on two store handles (two instances on one PostgreSQL)
// race for the same challenges, several per challenge, in groups: each
// challenge is consumed exactly once — one OK, every other "already
// used" — and no group deadlocks with another.
func TestAuthGroupRaceAcrossInstances(t *testing.T) {
	const nch, per = 48, 4
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := context.Background()
			db, _ := k.open(t)
			stores := []Store{openStore(t, db), openStore(t, db)}
			cks := fakeCards(t, stores[0], 6)
			v := &fakeVerifier{}
			auths := []*Authenticator{{Verifier: v, Store: stores[0]}, {Verifier: v, Store: stores[1]}}
			type job struct {
				ck CardKey
				ch []byte
			}
			var jobs []job
			for i := range nch {
				ck := cks[i%len(cks)]
				ch := issue(t, auths[i%2], ck)
				for range per {
					jobs = append(jobs, job{ck, ch})
				}
			}
			wins := make([]atomic.Int32, nch)
			var wg sync.WaitGroup
			var failed atomic.Value
			start := make(chan struct{})
			for j, jb := range jobs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					res, err := auths[j%2].Verify(ctx, jb.ck.ID, jb.ch, fakeMAC(jb.ck.Blob, jb.ch))
					switch {
					case err == nil && res.OK:
						wins[j/per].Add(1)
					case errors.Is(err, ErrChallengeUsed):
					default:
						failed.CompareAndSwap(nil, fmt.Errorf("job %d: %+v, %v", j, res, err))
					}
				}()
			}
			close(start)
			wg.Wait()
			if err, _ := failed.Load().(error); err != nil {
				t.Fatal(err)
			}
			for i := range wins {
				if n := wins[i].Load(); n != 1 {
					t.Fatalf("challenge %d consumed by %d verifications", i, n)
				}
			}
			oks := 0
			for _, ck := range cks {
				oks += authLogCounts(t, stores[0], ck.ID)[AuthOK]
			}
			if oks != nch {
				t.Fatalf("%d ok rows in the log, want %d", oks, nch)
			}
			for i, s := range stores {
				t.Logf("store %d: %d operations in %d groups", i+1, committer(s).ops.Load(), committer(s).groups.Load())
			}
		})
	}
}

// The crash test: a process verifying at full speed is killed with
// SIGKILL. Every verification it answered is in the store, and the store
// holds no half of any: each consumed challenge has its log row and its
// count.
const authChildEnv = "ISSUER_TEST_AUTH_CHILD" // the file of its authChildArgs

type authChildArgs struct {
	DB   string
	Jobs []authChildJob
}

type authChildJob struct {
	Card, Challenge, MAC []byte
}

func authChild() int {
	var a authChildArgs
	raw, err := os.ReadFile(os.Getenv(authChildEnv))
	if err == nil {
		err = json.Unmarshal(raw, &a)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx := context.Background()
	s, err := Open(ctx, a.DB)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	au := &Authenticator{Store: s, MaxFailures: 1 << 30, Verifier: &fakeVerifier{before: func(CardKey) error {
		time.Sleep(200 * time.Microsecond) // a token's time
		return nil
	}}}
	var next atomic.Int64
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(a.Jobs) {
					return
				}
				j := a.Jobs[i]
				res, err := au.Verify(ctx, j.Card, j.Challenge, j.MAC)
				if err != nil {
					fmt.Fprintln(os.Stderr, err)
					os.Exit(1)
				}
				mu.Lock()
				fmt.Fprintf(os.Stdout, "%x %s\n", j.Challenge, res.Result) // unbuffered: answered
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return 0
}

func TestAuthKill9(t *testing.T) {
	const n = 4000
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := context.Background()
			db, _ := k.open(t)
			s := openStore(t, db)
			cks := fakeCards(t, s, 2)
			good, bad := cks[0], cks[1]
			a := &Authenticator{Verifier: &fakeVerifier{}, Store: s}
			var args authChildArgs
			args.DB = db
			args.Jobs = make([]authChildJob, n)
			var wg sync.WaitGroup
			for w := range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := w; i < n; i += 16 {
						ck := cks[i%2]
						ch := issue(t, a, ck)
						mac := fakeMAC(ck.Blob, ch)
						if i%2 == 1 {
							mac[0] ^= 1
						}
						args.Jobs[i] = authChildJob{ck.ID, ch, mac}
					}
				}()
			}
			wg.Wait()
			raw, _ := json.Marshal(args)
			argsFile := filepath.Join(t.TempDir(), "jobs.json")
			if err := os.WriteFile(argsFile, raw, 0o600); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), authChildEnv+"="+argsFile)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			answered := map[string]string{}
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				f := strings.Fields(sc.Text())
				if len(f) == 2 {
					answered[f[0]] = f[1]
				}
				if len(answered) == 300 {
					cmd.Process.Kill() // SIGKILL, mid-group
					break
				}
			}
			for sc.Scan() { // what it wrote before it died
				if f := strings.Fields(sc.Text()); len(f) == 2 {
					answered[f[0]] = f[1]
				}
			}
			cmd.Wait()
			if len(answered) < 300 {
				t.Fatalf("the child answered %d; stderr: %s", len(answered), stderr.String())
			}
			if len(answered) == n {
				t.Fatal("the child finished before it was killed")
			}
			used := map[string]int{}
			for i, j := range args.Jobs {
				u, _ := challengeUsed(t, s, j.Challenge)
				h := hex.EncodeToString(j.Challenge)
				want := AuthOK
				if i%2 == 1 {
					want = AuthFailed
				}
				if r, ok := answered[h]; ok {
					if !u || r != want {
						t.Fatalf("answered %s for challenge %s, but used %v in the store", r, h, u)
					}
				}
				if u {
					used[hex.EncodeToString(j.Card)]++
				}
			}
			gl, bl := authLogCounts(t, s, good.ID), authLogCounts(t, s, bad.ID)
			gs, _ := s.Card(ctx, good.ID)
			bs, _ := s.Card(ctx, bad.ID)
			if gl[AuthOK] != used[good.ID.String()] || len(gl) != 1 || gs.FailedAuth != 0 {
				t.Fatalf("good card: %d consumed, log %v, %+v", used[good.ID.String()], gl, gs)
			}
			if bl[AuthFailed] != used[bad.ID.String()] || len(bl) != 1 || bs.FailedAuth != used[bad.ID.String()] {
				t.Fatalf("bad card: %d consumed, log %v, failed_auth %d", used[bad.ID.String()], bl, bs.FailedAuth)
			}
			t.Logf("killed after %d answers; %d verifications in the store", len(answered), used[good.ID.String()]+used[bad.ID.String()])
		})
	}
}
