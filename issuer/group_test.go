package issuer

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"blindperso/batch"
	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// The tests of an issuer over two token members. Both members are one
// SoftHSM2 token seen through two library instances: the plain library,
// and a copy behind p11fault (hsmtest.Faulty), the project's
// fault-injecting PKCS#11 module, so that every fault comes through the
// real PKCS#11 path. (Two tokens replicated by the ceremony are tested in
// package ceremony; here the point is what the group does when one
// member's library fails.)

// syncBuffer is a log sink for the group's lines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// groupRig is an issuer over a plain member and len(faults) faulty ones.
type groupRig struct {
	is      *Issuer
	members []hsm.Member
	faults  []*hsmtest.Fault
	log     *syncBuffer
}

// newGroupRig makes a token with a P-256 issuer key and a trusted KEK,
// then an issuer over the token itself (unless plain is false) and
// faulty copies of it, with the deadline and probe period given.
func newGroupRig(t testing.TB, plain bool, faulty int, sessions int, deadline, probe time.Duration) *groupRig {
	t.Helper()
	ctx := context.Background()
	tt := hsmtest.SoftHSM(t)
	tok, err := hsm.OpenURI(tt.URI, sessions)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tok.Close() })
	if _, err := tok.GenerateIssuerKey(ctx, hsm.KindP256, "issuer"); err != nil {
		t.Fatal(err)
	}
	if _, err := tok.GenerateKEK(ctx, "kek", tt.SOPIN); err != nil {
		t.Fatal(err)
	}
	r := &groupRig{log: &syncBuffer{}}
	uris := []string{}
	if plain {
		uris = append(uris, tt.URI)
	}
	for range faulty {
		f := hsmtest.Faulty(t, tt)
		r.faults = append(r.faults, f)
		uris = append(uris, f.Token.URI)
	}
	for _, u := range uris {
		mt := tok
		if u != tt.URI {
			if mt, err = hsm.OpenURI(u, sessions); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { mt.Close() })
		}
		k, err := mt.FindIssuerKey(ctx, "issuer")
		if err != nil {
			t.Fatal(err)
		}
		w, err := mt.FindKEK(ctx, "kek")
		if err != nil {
			t.Fatal(err)
		}
		r.members = append(r.members, hsm.Member{Token: mt, Key: k, KEK: w})
	}
	g, err := hsm.NewGroup(ctx, r.members, hsm.GroupOptions{Deadline: deadline, ProbeEvery: probe,
		Log: slog.New(slog.NewTextHandler(r.log, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close(context.Background()) })
	m := r.members[0]
	r.is = &Issuer{Token: m.Token, Key: m.Key, KEK: m.KEK, Group: g}
	return r
}

// keyedRecords makes n records with Ids prefix‖i and returns each card's
// K_I too (computed on the host from the encapsulation: these are test
// cards, made to check the stored keys through each member).
func keyedRecords(t testing.TB, is *Issuer, p protocol.Profile, prefix uint32, n int) ([]batch.Record, [][]byte) {
	t.Helper()
	fp := is.Key.Fingerprint()
	rs, kis := make([]batch.Record, n), make([][]byte, n)
	for i := range rs {
		s, c, err := protocol.Encapsulate(p, is.Key.Public, rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		if kis[i], err = protocol.DeriveKey(p, s, protocol.Binding(p, is.Key.Public.SPKI)); err != nil {
			t.Fatal(err)
		}
		rs[i] = batch.Record{V: batch.Version, ID: binary.BigEndian.AppendUint32(nil, prefix<<16|uint32(i)),
			C: c, Profile: p.Name, Fingerprint: fp[:], Time: time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC)}
	}
	return rs, kis
}

// waitUp waits until every member of the group is up again.
func (r *groupRig) waitUp(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		all := true
		for _, m := range r.is.Members() {
			all = all && m.Up
		}
		if all {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("members still out: %+v", r.is.Members())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkThrough verifies the cards rs[i] for i in idx, as stored in st,
// through each member alone: the stored blob unwraps under every
// member's KEK and gives the card's K_I.
func (r *groupRig) checkThrough(t *testing.T, st Store, rs []batch.Record, kis [][]byte, idx []int) {
	t.Helper()
	ctx := context.Background()
	for _, m := range r.members {
		ck := &hsm.CardKeys{Token: m.Token, Key: m.Key, KEK: m.KEK, TokenObjects: true}
		for _, i := range idx {
			sc, err := st.Card(ctx, rs[i].ID)
			if err != nil {
				t.Fatal(err)
			}
			chal := make([]byte, 16)
			rand.Read(chal)
			mac, err := protocol.AuthMAC(kis[i], rs[i].ID, chal)
			if err != nil {
				t.Fatal(err)
			}
			ok, err := ck.Verify(ctx, sc.Blob, rs[i].ID, chal, mac)
			if err != nil || !ok {
				t.Fatalf("card %x through member %q: ok=%v err=%v", []byte(rs[i].ID), m.Token.Info().Label, ok, err)
			}
		}
	}
}

// sample is k indices of n, at random.
func sample(n, k int) []int {
	idx := make([]int, k)
	for j := range idx {
		idx[j] = mrand.IntN(n)
	}
	return idx
}

// faultKind is one way a member fails, injected at a random point of an
// import through the real PKCS#11 path.
type faultKind struct {
	name string
	// inject starts the fault; calls is a number of PKCS#11 calls the
	// faulty member surely makes in one round (for call-count points).
	inject func(f *hsmtest.Fault, calls int)
	// atRandomTime: inject at a random moment of the import (the others
	// count calls: after= a random number of them).
	atRandomTime bool
}

var faultKinds = []faultKind{
	{name: "device-error", inject: func(f *hsmtest.Fault, calls int) {
		f.FailAfter("C_DeriveKey", pkcs11.CKR_DEVICE_ERROR, mrand.IntN(calls/3), 0)
	}},
	{name: "device-removed", inject: func(f *hsmtest.Fault, calls int) {
		f.FailAfter("*", pkcs11.CKR_DEVICE_REMOVED, mrand.IntN(calls), 0)
	}},
	{name: "sessions-lost", inject: func(f *hsmtest.Fault, calls int) {
		// Every session dies and none can be opened again.
		f.Set(fmt.Sprintf("fail C_WrapKey 0x%X after=%d", pkcs11.CKR_SESSION_HANDLE_INVALID, mrand.IntN(calls/6)),
			fmt.Sprintf("fail C_OpenSession 0x%X", pkcs11.CKR_TOKEN_NOT_PRESENT))
	}},
	{name: "vanish", atRandomTime: true, inject: func(f *hsmtest.Fault, _ int) { f.Vanish() }},
	{name: "hang", atRandomTime: true, inject: func(f *hsmtest.Fault, _ int) { f.Delay("*", 3*time.Second) }},
}

// TestGroupImportFailover: 20 000 records imported over two members, one
// of which fails at a random point of each round (two rounds of each
// kind: a CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED, sessions that die and
// cannot be reopened, the token vanishing, calls that hang past the
// deadline). Every round: every record imported exactly once (the
// batch's counts exact, the store holds each card once), the member was
// taken out and logged once, it rejoins after the fault clears and gets
// work again, and sampled cards verify through either member.
func TestGroupImportFailover(t *testing.T) {
	r := newGroupRig(t, true, 1, 2, time.Second, 50*time.Millisecond)
	f := r.faults[0]
	p := protocol.ECDHP256AES
	const rounds, n = 10, 2000
	ctx := context.Background()
	for round := range rounds {
		kind := faultKinds[round%len(faultKinds)]
		rs, kis := keyedRecords(t, r.is, p, uint32(round+1), n)
		path := batchFile(t, r.is, p, rs)
		st := openStore(t, t.TempDir())
		before := r.is.Members()[1]
		im := &Importer{Issuer: r.is, Store: st, Workers: 2}
		var rep BatchReport
		var ierr error
		done := make(chan struct{})
		start := time.Now()
		if !kind.atRandomTime {
			// An import makes ≈ 6 calls of the faulty member per record
			// it gets, and it gets about half of them until the fault:
			// n calls are surely made (the kinds place their point in
			// the first n/6 to n).
			kind.inject(f, n)
		}
		go func() {
			defer close(done)
			rep, ierr = im.ImportFile(ctx, path)
		}()
		if kind.atRandomTime {
			time.Sleep(time.Duration(mrand.IntN(400)) * time.Millisecond)
			kind.inject(f, 0)
		}
		<-done
		took := time.Since(start)
		f.Clear()
		if ierr != nil {
			t.Fatalf("round %d (%s): %v", round, kind.name, ierr)
		}
		if rep.Status != BatchDone || rep.Records != n || rep.Imported != n || rep.Duplicates+rep.Conflicts+rep.Rejects != 0 {
			t.Fatalf("round %d (%s): report %+v", round, kind.name, rep)
		}
		cards, err := st.Cards(ctx, "")
		if err != nil {
			t.Fatal(err)
		}
		if len(cards) != n {
			t.Fatalf("round %d (%s): %d cards stored, want %d", round, kind.name, len(cards), n)
		}
		after := r.is.Members()[1]
		if after.Downs != before.Downs+1 {
			t.Fatalf("round %d (%s): the faulty member was taken out %d times, want once (%+v)", round, kind.name, after.Downs-before.Downs, after)
		}
		r.waitUp(t)
		// Back, it gets work again.
		back := r.is.Members()[1].Imports
		more, _ := keyedRecords(t, r.is, p, uint32(0x100+round), 64)
		if rep, err := (&Importer{Issuer: r.is, Store: st, Workers: 2}).ImportFile(ctx, batchFile(t, r.is, p, more)); err != nil || rep.Imported != len(more) {
			t.Fatalf("round %d (%s): import after the member came back: %+v, %v", round, kind.name, rep, err)
		}
		if got := r.is.Members()[1].Imports; got == back {
			t.Fatalf("round %d (%s): the member that came back got no work", round, kind.name)
		}
		r.checkThrough(t, st, rs, kis, sample(n, 8))
		t.Logf("round %d (%s): %d records in %v, faulty member answered %d of them, failovers so far %d",
			round, kind.name, n, took.Round(time.Millisecond), after.Imports-before.Imports, r.is.Failovers())
	}
	log := r.log.String()
	if outs, backs := strings.Count(log, "taken out"), strings.Count(log, "member back"); outs != rounds || backs != rounds {
		t.Fatalf("log: %d lines taken out and %d back, want %d each:\n%s", outs, backs, rounds, log)
	}
}

// TestGroupAllMembersDown: both members fail in the middle of an import.
// The import stops with an error naming every member; what it stored is
// whole (every stored card verifies through each member); once the
// members are back, the rerun completes the batch with exact counts.
func TestGroupAllMembersDown(t *testing.T) {
	r := newGroupRig(t, false, 2, 2, time.Second, 50*time.Millisecond)
	p := protocol.ECDHP256AES
	const n = 3000
	ctx := context.Background()
	rs, kis := keyedRecords(t, r.is, p, 0xDD, n)
	path := batchFile(t, r.is, p, rs)
	st := openStore(t, t.TempDir())
	var err error
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, err = (&Importer{Issuer: r.is, Store: st, Workers: 2}).ImportFile(ctx, path)
	}()
	// Both members fail once some cards are stored.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		cards, cerr := st.Cards(ctx, "")
		if cerr != nil {
			t.Fatal(cerr)
		}
		if len(cards) >= 200 || time.Now().After(deadline) {
			break
		}
	}
	for _, f := range r.faults {
		f.Fail("C_DeriveKey", pkcs11.CKR_DEVICE_ERROR)
	}
	<-done
	if !errors.Is(err, hsm.ErrNoMember) {
		t.Fatalf("import with every member failing: %v, want hsm.ErrNoMember", err)
	}
	for _, m := range r.is.Members() {
		if !strings.Contains(err.Error(), fmt.Sprintf("%q out since", m.Name)) {
			t.Fatalf("the error does not name member %q: %v", m.Name, err)
		}
	}
	cards, cerr := st.Cards(ctx, "")
	if cerr != nil {
		t.Fatal(cerr)
	}
	if len(cards) == 0 || len(cards) >= n {
		t.Fatalf("%d cards stored before every member failed, want some of %d", len(cards), n)
	}
	t.Logf("stopped with %d of %d stored: %v", len(cards), n, err)
	for _, f := range r.faults {
		f.Clear()
	}
	r.waitUp(t)
	// What was stored is whole: every card stored before the stop
	// verifies through each member.
	byID := map[string]int{}
	for i, rec := range rs {
		byID[string(rec.ID)] = i
	}
	var before []int
	for _, c := range cards {
		before = append(before, byID[string(c.ID)])
	}
	r.checkThrough(t, st, rs, kis, before)
	rep, err := (&Importer{Issuer: r.is, Store: st, Workers: 2}).ImportFile(ctx, path)
	if err != nil {
		t.Fatalf("rerun: %v", err)
	}
	if rep.Status != BatchDone || rep.Imported+rep.Duplicates != n || rep.Rejects+rep.Conflicts != 0 {
		t.Fatalf("rerun: %+v", rep)
	}
	if cards, err = st.Cards(ctx, ""); err != nil || len(cards) != n {
		t.Fatalf("after the rerun: %d cards, %v", len(cards), err)
	}
	r.checkThrough(t, st, rs, kis, sample(n, 8))
}
