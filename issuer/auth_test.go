package issuer

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"blindperso/hsm"
	"blindperso/protocol"
)

// countingVerifier is the token verifier, counting its calls.
type countingVerifier struct {
	v     MACVerifier
	calls atomic.Int32
}

func (c *countingVerifier) Verify(ctx context.Context, ck CardKey, challenge, mac []byte) (bool, error) {
	c.calls.Add(1)
	return c.v.Verify(ctx, ck, challenge, mac)
}

// substitutedCard is a card an insider personalized under her own key
// (paper Fig. 2), whose record she rewrote to the issuer's key.
func substitutedCard(t *testing.T, is *Issuer, id byte) vcard {
	t.Helper()
	attacker := readKey(t, "../testdata/keys/rsa2048-attacker.pem")
	spki, _ := x509.MarshalPKIXPublicKey(&attacker.PublicKey)
	rec, a := personalize(t, protocol.RSAOAEPAES, spki, id)
	s, err := rsa.DecryptOAEP(sha1.New(), nil, attacker, rec.C, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rec.C, err = rsa.EncryptOAEP(sha1.New(), rand.Reader, is.Key.Public.RSA, s, nil); err != nil {
		t.Fatal(err)
	}
	fp := is.Key.Fingerprint()
	rec.Fingerprint = fp[:]
	return vcard{rec, a}
}

func TestAuthenticate(t *testing.T) {
	is := newIssuer(t, hsm.KindRSA2048)
	p := protocol.RSAOAEPAES
	cards := makeCards(t, is, p, 1, 2, 3)
	genuine, other, wrong := cards[0], cards[1], cards[2]
	bad := substitutedCard(t, is, 9)
	path := batchOf(t, is, p, genuine, other, wrong, bad)
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := context.Background()
			db, _ := k.open(t)
			s := openStore(t, db)
			importBatch(t, is, s, path)
			clock := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
			v := &countingVerifier{v: is}
			// The clock ticks 1 ms per reading, so the log has an order.
			a := &Authenticator{Verifier: v, Store: s, Now: func() time.Time { clock = clock.Add(time.Millisecond); return clock }}
			challenge := func(c vcard) []byte {
				t.Helper()
				ch, err := a.Challenge(ctx, c.rec.ID)
				if err != nil {
					t.Fatal(err)
				}
				if len(ch.Challenge) != protocol.ChallengeLen || ch.Expires.Sub(ch.Created) != DefaultChallengeTTL {
					t.Fatalf("challenge %+v", ch)
				}
				return ch.Challenge
			}
			state := func(c vcard) StoredCard {
				t.Helper()
				sc, err := s.Card(ctx, c.rec.ID)
				if err != nil {
					t.Fatal(err)
				}
				return sc
			}
			wantResult := func(res AuthResult, err error, result string, failed int) {
				t.Helper()
				if err != nil || res.Result != result || res.FailedAuth != failed || res.OK != (result == AuthOK) {
					t.Fatalf("got %+v, %v; want %s with failed_auth %d", res, err, result, failed)
				}
			}

			// A genuine card authenticates, and again with a new challenge.
			for range 2 {
				ch := challenge(genuine)
				res, err := a.Verify(ctx, genuine.rec.ID, ch, authenticate(t, genuine.a, ch))
				wantResult(res, err, AuthOK, 0)
			}

			// A used challenge is refused, without a token call, and the
			// card's count does not move.
			ch := challenge(genuine)
			mac := authenticate(t, genuine.a, ch)
			if res, err := a.Verify(ctx, genuine.rec.ID, ch, mac); err != nil || !res.OK {
				t.Fatal(res, err)
			}
			calls := v.calls.Load()
			if _, err := a.Verify(ctx, genuine.rec.ID, ch, mac); !errors.Is(err, ErrChallengeUsed) {
				t.Fatalf("reused challenge: %v", err)
			}
			// Expired: the clock moves past the TTL.
			ch = challenge(genuine)
			mac = authenticate(t, genuine.a, ch)
			clock = clock.Add(DefaultChallengeTTL)
			if _, err := a.Verify(ctx, genuine.rec.ID, ch, mac); !errors.Is(err, ErrChallengeExpired) {
				t.Fatalf("expired challenge: %v", err)
			}
			// Issued for another card; never issued.
			ch = challenge(other)
			if _, err := a.Verify(ctx, genuine.rec.ID, ch, authenticate(t, genuine.a, ch)); !errors.Is(err, ErrChallengeOtherCard) {
				t.Fatalf("other card's challenge: %v", err)
			}
			if _, err := a.Verify(ctx, genuine.rec.ID, make([]byte, 16), mac); !errors.Is(err, ErrChallengeUnknown) {
				t.Fatalf("unknown challenge: %v", err)
			}
			if v.calls.Load() != calls {
				t.Fatal("a refused challenge reached the token")
			}
			if sc := state(genuine); sc.FailedAuth != 0 || sc.State != StateActive {
				t.Fatalf("genuine card after refused challenges: %+v", sc)
			}
			// The other card's challenge was not consumed by the wrong card.
			if res, err := a.Verify(ctx, other.rec.ID, ch, authenticate(t, other.a, ch)); err != nil || !res.OK {
				t.Fatal(res, err)
			}

			// Wrong MACs count, a good one resets, then the limit blocks.
			failOnce := func(c vcard, result string, n int) {
				t.Helper()
				ch := challenge(c)
				mac := authenticate(t, c.a, ch)
				mac[0] ^= 1
				res, err := a.Verify(ctx, c.rec.ID, ch, mac)
				wantResult(res, err, result, n)
			}
			failOnce(wrong, AuthFailed, 1)
			failOnce(wrong, AuthFailed, 2)
			ch = challenge(wrong)
			res, err := a.Verify(ctx, wrong.rec.ID, ch, authenticate(t, wrong.a, ch))
			wantResult(res, err, AuthOK, 0)
			failOnce(wrong, AuthFailed, 1)
			failOnce(wrong, AuthFailed, 2)
			failOnce(wrong, AuthBlocked, 3)
			if sc := state(wrong); sc.State != StateBlocked || sc.FailedAuth != 3 || sc.StateReason == "" {
				t.Fatalf("after 3 failures: %+v", sc)
			}
			// Blocked: no challenge, and a verification (with a challenge
			// issued before the block) is refused without the token.
			if _, err := a.Challenge(ctx, wrong.rec.ID); !errors.Is(err, ErrCardNotActive) {
				t.Fatalf("challenge for a blocked card: %v", err)
			}
			if _, err := s.UnblockCard(ctx, wrong.rec.ID, "test", clock); err != nil {
				t.Fatal(err)
			}
			if sc := state(wrong); sc.State != StateActive || sc.FailedAuth != 0 || sc.StateReason != "" {
				t.Fatalf("after unblock: %+v", sc)
			}
			ch = challenge(wrong)
			if _, err := s.BlockCard(ctx, wrong.rec.ID, "reported lost", clock); err != nil {
				t.Fatal(err)
			}
			calls = v.calls.Load()
			res, err = a.Verify(ctx, wrong.rec.ID, ch, authenticate(t, wrong.a, ch))
			if err != nil || res.OK || res.Result != AuthRefused || res.State != StateBlocked {
				t.Fatalf("blocked card: %+v, %v", res, err)
			}
			if v.calls.Load() != calls {
				t.Fatal("a blocked card's verification reached the token")
			}
			if _, err := a.Verify(ctx, wrong.rec.ID, ch, authenticate(t, wrong.a, ch)); !errors.Is(err, ErrChallengeUsed) {
				t.Fatalf("the refused verification did not consume its challenge: %v", err)
			}
			if _, err := s.UnblockCard(ctx, genuine.rec.ID, "", clock); err == nil {
				t.Fatal("unblocked an active card")
			}
			if _, err := s.UnblockCard(ctx, wrong.rec.ID, "found", clock); err != nil {
				t.Fatal(err)
			}
			ch = challenge(wrong)
			res, err = a.Verify(ctx, wrong.rec.ID, ch, authenticate(t, wrong.a, ch))
			wantResult(res, err, AuthOK, 0)

			// The substituted-key card answers correctly under its own key,
			// never under the issuer's: it fails every time, ends blocked.
			for i := 1; i <= DefaultMaxFailures; i++ {
				ch := challenge(bad)
				res, err := a.Verify(ctx, bad.rec.ID, ch, authenticate(t, bad.a, ch))
				want := AuthFailed
				if i == DefaultMaxFailures {
					want = AuthBlocked
				}
				wantResult(res, err, want, i)
			}
			if sc := state(bad); sc.State != StateBlocked {
				t.Fatalf("substituted card: %+v", sc)
			}
			log, err := s.AuthLog(ctx, bad.rec.ID, 10)
			if err != nil || len(log) != DefaultMaxFailures || log[0].Result != AuthBlocked || log[2].Result != AuthFailed {
				t.Fatalf("auth log %+v, %v", log, err)
			}
			if cs, err := s.Cards(ctx, StateBlocked); err != nil || len(cs) != 1 || string(cs[0].ID) != string(bad.rec.ID) {
				t.Fatalf("blocked cards %+v, %v", cs, err)
			}
		})
	}
}

// A card in conflict gets no challenge, is refused, and an unblock after
// an admin block brings it back to conflict, not active.
func TestAuthConflictRefused(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	a1 := makeCards(t, is, p, 1)[0]
	a2 := makeCards(t, is, p, 1)[0]
	b1, b2 := batchOf(t, is, p, a1), batchOf(t, is, p, a2)
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := context.Background()
			db, _ := k.open(t)
			s := openStore(t, db)
			importBatch(t, is, s, b1)
			a := &Authenticator{Verifier: is, Store: s}
			ch, err := a.Challenge(ctx, a1.rec.ID)
			if err != nil {
				t.Fatal(err)
			}
			importBatch(t, is, s, b2)
			if _, err := a.Challenge(ctx, a1.rec.ID); !errors.Is(err, ErrCardNotActive) {
				t.Fatalf("challenge for a card in conflict: %v", err)
			}
			res, err := a.Verify(ctx, a1.rec.ID, ch.Challenge, authenticate(t, a1.a, ch.Challenge))
			if err != nil || res.OK || res.Result != AuthRefused || res.State != StateConflict {
				t.Fatalf("card in conflict: %+v, %v", res, err)
			}
			if _, err := s.BlockCard(ctx, a1.rec.ID, "investigating", time.Now()); err != nil {
				t.Fatal(err)
			}
			sc, err := s.UnblockCard(ctx, a1.rec.ID, "", time.Now())
			if err != nil || sc.State != StateConflict {
				t.Fatalf("unblock of a conflicted card: %+v, %v", sc, err)
			}
			if _, err := s.BlockCard(ctx, []byte{0xEE}, "x", time.Now()); !errors.Is(err, ErrNotFound) {
				t.Fatalf("block of an unknown card: %v", err)
			}
			if _, err := a.Challenge(ctx, []byte{0xEE}); !errors.Is(err, ErrNotFound) {
				t.Fatalf("challenge for an unknown card: %v", err)
			}
		})
	}
}

// Two verifiers with a store handle each (two issuer instances) race for
// each challenge: exactly one consumes it. Both may have asked the token
// (it checks the MAC before the group transaction), but only the
// winner's verdict is recorded.
func TestAuthConcurrentChallenge(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	c := makeCards(t, is, p, 1)[0]
	path := batchOf(t, is, p, c)
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := context.Background()
			db, _ := k.open(t)
			s1, s2 := openStore(t, db), openStore(t, db)
			importBatch(t, is, s1, path)
			v := &countingVerifier{v: is}
			auths := []*Authenticator{{Verifier: v, Store: s1}, {Verifier: v, Store: s2}}
			for round := range 8 {
				ch, err := auths[round%2].Challenge(ctx, c.rec.ID)
				if err != nil {
					t.Fatal(err)
				}
				mac := authenticate(t, c.a, ch.Challenge)
				before := v.calls.Load()
				var wg sync.WaitGroup
				results := make([]error, 2)
				oks := make([]bool, 2)
				start := make(chan struct{})
				for i, a := range auths {
					wg.Add(1)
					go func() {
						defer wg.Done()
						<-start
						res, err := a.Verify(ctx, c.rec.ID, ch.Challenge, mac)
						results[i], oks[i] = err, res.OK
					}()
				}
				close(start)
				wg.Wait()
				won, used := 0, 0
				for i := range 2 {
					switch {
					case results[i] == nil && oks[i]:
						won++
					case errors.Is(results[i], ErrChallengeUsed):
						used++
					default:
						t.Fatalf("round %d verifier %d: ok %v, %v", round, i, oks[i], results[i])
					}
				}
				if won != 1 || used != 1 {
					t.Fatalf("round %d: %d consumed the challenge, %d were refused", round, won, used)
				}
				if n := v.calls.Load() - before; n < 1 || n > 2 {
					t.Fatalf("round %d: %d token calls, want 1 or 2", round, n)
				}
			}
		})
	}
}

func countChallenges(t *testing.T, s Store) int {
	t.Helper()
	var n int
	if err := s.(*sqlStore).db.QueryRow(`SELECT COUNT(*) FROM challenges`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// Expired challenges, used or not, are purged once the retention has
// passed: a few on every challenge issued (bounded), all by Purge. Within
// the retention a late answer is told "expired" or "already used"; after
// it "unknown"; a live challenge is never purged.
func TestPurgeChallenges(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	c := makeCards(t, is, p, 1)[0]
	path := batchOf(t, is, p, c)
	const old = purgePerChallenge + 6
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := context.Background()
			db, _ := k.open(t)
			s := openStore(t, db)
			importBatch(t, is, s, path)
			clock := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
			a := &Authenticator{Verifier: is, Store: s, Now: func() time.Time { return clock }}
			issue := func() []byte {
				t.Helper()
				ch, err := a.Challenge(ctx, c.rec.ID)
				if err != nil {
					t.Fatal(err)
				}
				return ch.Challenge
			}
			verify := func(ch []byte) error {
				t.Helper()
				res, err := a.Verify(ctx, c.rec.ID, ch, authenticate(t, c.a, ch))
				if err == nil && !res.OK {
					t.Fatalf("genuine card: %+v", res)
				}
				return err
			}
			var chs [][]byte
			for range old {
				chs = append(chs, issue())
			}
			used := chs[0]
			if err := verify(used); err != nil {
				t.Fatal(err)
			}
			// Expired, within the retention: nothing purged, precise errors.
			clock = clock.Add(DefaultChallengeTTL + DefaultChallengeRetention - time.Minute)
			if err := verify(chs[1]); !errors.Is(err, ErrChallengeExpired) {
				t.Fatalf("expired challenge: %v", err)
			}
			if err := verify(used); !errors.Is(err, ErrChallengeUsed) {
				t.Fatalf("used challenge: %v", err)
			}
			live := issue()
			if n := countChallenges(t, s); n != old+1 {
				t.Fatalf("%d challenges within the retention, want %d", n, old+1)
			}
			// Past the retention: the next challenge purges a bounded
			// number, Purge the rest; the live ones stay.
			clock = clock.Add(2 * time.Minute)
			live2 := issue()
			if n := countChallenges(t, s); n != old-purgePerChallenge+2 {
				t.Fatalf("%d challenges after one issue, want %d", n, old-purgePerChallenge+2)
			}
			n, err := a.Purge(ctx)
			if err != nil || n != old-purgePerChallenge {
				t.Fatalf("purge: %d, %v; want %d", n, err, old-purgePerChallenge)
			}
			if n := countChallenges(t, s); n != 2 {
				t.Fatalf("%d challenges after purge, want the 2 live ones", n)
			}
			if err := verify(used); !errors.Is(err, ErrChallengeUnknown) {
				t.Fatalf("purged used challenge: %v", err)
			}
			if err := verify(chs[2]); !errors.Is(err, ErrChallengeUnknown) {
				t.Fatalf("purged expired challenge: %v", err)
			}
			// A used challenge is kept until it expires: its reuse is
			// still "already used".
			for _, ch := range [][]byte{live, live2} {
				if err := verify(ch); err != nil {
					t.Fatal(err)
				}
			}
			if n, err := a.Purge(ctx); err != nil || n != 0 {
				t.Fatalf("purge of used, unexpired challenges: %d, %v", n, err)
			}
			if err := verify(live); !errors.Is(err, ErrChallengeUsed) {
				t.Fatalf("reused challenge: %v", err)
			}
		})
	}
}

// Two store handles (two issuer instances) purging the same challenges
// at once: every one is deleted exactly once, nothing fails (on
// PostgreSQL each skips the rows the other holds).
func TestPurgeChallengesConcurrent(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	c := makeCards(t, is, p, 1)[0]
	path := batchOf(t, is, p, c)
	const total = 100
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := context.Background()
			db, _ := k.open(t)
			s1, s2 := openStore(t, db), openStore(t, db)
			importBatch(t, is, s1, path)
			past := time.Now().Add(-48 * time.Hour)
			for i := range total {
				ch := make([]byte, protocol.ChallengeLen)
				rand.Read(ch)
				if err := s1.PutChallenge(ctx, Challenge{Challenge: ch, CardID: c.rec.ID, Created: past,
					Expires: past.Add(time.Duration(i) * time.Second)}); err != nil {
					t.Fatal(err)
				}
			}
			before := time.Now().Add(-DefaultChallengeRetention)
			var wg sync.WaitGroup
			counts, errs := make([]int64, 2), make([]error, 2)
			start := make(chan struct{})
			for i, s := range []Store{s1, s2} {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					for {
						n, err := s.PurgeChallenges(ctx, before, 10)
						counts[i] += n
						if err != nil || n == 0 {
							errs[i] = err
							return
						}
					}
				}()
			}
			close(start)
			wg.Wait()
			if errs[0] != nil || errs[1] != nil {
				t.Fatal(errs)
			}
			if counts[0]+counts[1] != total || countChallenges(t, s1) != 0 {
				t.Fatalf("purged %d + %d of %d, %d left", counts[0], counts[1], total, countChallenges(t, s1))
			}
		})
	}
}
