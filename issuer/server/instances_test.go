package server

import (
	"encoding/hex"
	"fmt"
	"sync"
	"testing"

	"blindperso/api"
	"blindperso/card/cardtest"
	"blindperso/hsm"
	"blindperso/internal/pgtest"
	"blindperso/protocol"
)

// Two issuer serve instances on one PostgreSQL behind one client: a
// batch uploaded to both at once imports once; a challenge issued by
// one is answered at the other; wrong answers for one card sent to both
// at once block it exactly at the limit, and each instance's answers
// agree with the store.
func TestTwoInstancesOneStore(t *testing.T) {
	is := newIssuer(t, hsm.KindP256)
	p := protocol.ECDHP256AES
	cards := makeCards(t, is, p, 0x51, 0x52)
	path := batchOf(t, is, p, cards...)
	db := pgtest.NewDatabase(t)
	envs := []*apiEnv{newAPIEnv(t, is, db, 1<<20), newAPIEnv(t, is, db, 1<<20)}

	// The same batch to both at once.
	reps := make([]api.BatchDetail, 2)
	var wg sync.WaitGroup
	for i, e := range envs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code, rep, b := e.upload(t, path)
			if code != 200 {
				t.Errorf("upload to instance %d: %d %s", i+1, code, b)
			}
			reps[i] = rep
		}()
	}
	wg.Wait()
	if reps[0].ID != reps[1].ID || reps[0].Status != "done" || reps[1].Status != "done" {
		t.Fatalf("reports %+v / %+v", reps[0].Batch, reps[1].Batch)
	}
	if got, err := envs[0].st.Cards(t.Context(), ""); err != nil || len(got) != 2 {
		t.Fatalf("%d cards stored (%v), want 2", len(got), err)
	}
	if n := reps[0].Imported + reps[1].Imported; n < 2 || reps[0].Imported+reps[0].Duplicates != 2 || reps[1].Imported+reps[1].Duplicates != 2 {
		t.Fatalf("imported %d and %d: %+v / %+v", reps[0].Imported, reps[1].Imported, reps[0].Batch, reps[1].Batch)
	}

	challenge := func(e *apiEnv, id string) []byte {
		var ch api.Challenge
		if code := e.json(t, api.RoleVerifier, "POST", "/v1/cards/"+id+"/challenge", nil, &ch); code != 200 {
			t.Fatalf("challenge: %d", code)
		}
		return ch.Challenge
	}
	verify := func(e *apiEnv, id string, ch, mac []byte) api.VerifyResult {
		var v api.VerifyResult
		if code := e.json(t, api.RoleVerifier, "POST", "/v1/cards/"+id+"/verify",
			map[string]string{"challenge": hex.EncodeToString(ch), "mac": hex.EncodeToString(mac)}, &v); code != 200 {
			t.Fatalf("verify: %d", code)
		}
		return v
	}
	// Challenge at one, answer at the other, both ways.
	good := hex.EncodeToString(cards[0].Rec.ID)
	for i := range 2 {
		ch := challenge(envs[i], good)
		if v := verify(envs[1-i], good, ch, cardtest.Authenticate(t, cards[0].A, ch)); v.Result != api.ResultOK {
			t.Fatalf("challenge at instance %d, answer at %d: %+v", i+1, 2-i, v)
		}
		// And not twice: the other instance consumed it.
		if v := verify(envs[i], good, ch, cardtest.Authenticate(t, cards[0].A, ch)); v.Result != api.ResultFailed {
			t.Fatalf("a challenge answered twice across instances: %+v", v)
		}
	}

	// 12 wrong answers for one card, spread over both instances at once.
	bad := hex.EncodeToString(cards[1].Rec.ID)
	const n, limit = 12, 3 // the API's default MaxFailures
	chs := make([][]byte, n)
	for i := range chs {
		chs[i] = challenge(envs[i%2], bad)
	}
	res := make([]api.VerifyResult, n)
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			mac := cardtest.Authenticate(t, cards[1].A, chs[i])
			mac[0] ^= 1
			res[i] = verify(envs[(i+1)%2], bad, chs[i], mac)
		}()
	}
	close(start)
	wg.Wait()
	count := map[string]int{}
	for _, r := range res {
		count[r.Result]++
	}
	if want := map[string]int{api.ResultFailed: limit - 1, api.ResultBlocked: 1, api.ResultRefused: n - limit}; fmt.Sprint(count) != fmt.Sprint(want) {
		t.Fatalf("results %v, want %v", count, want)
	}
	c, err := envs[1].st.Card(t.Context(), cards[1].Rec.ID)
	if err != nil || c.State != api.StateBlocked || c.FailedAuth != limit {
		t.Fatalf("the card after the race: %+v, %v", c, err)
	}
}
