package hsm

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// Which errors take a group member out: the device's, never the
// request's (a forged record must not be able to empty a group).
func TestUnavailable(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"device error", Call("C_DeriveKey", nil, pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)), true},
		{"device removed", Call("C_WrapKey", nil, pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)), true},
		{"token not present", pkcs11.Error(pkcs11.CKR_TOKEN_NOT_PRESENT), true},
		{"session lost after the pool's repair", fmt.Errorf("x: %w", pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID)), true},
		{"library finalized", pkcs11.Error(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED), true},
		{"C_OpenSession refused", Call("C_OpenSession", nil, pkcs11.Error(pkcs11.CKR_FUNCTION_FAILED)), true},
		{"C_Login refused", Call("C_Login", nil, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)), true},
		{"token gone from its slot", absentError{"no such token in module m (present: none)"}, true},
		{"deadline", fmt.Errorf("%w (500ms)", ErrDeadline), true},
		{"closed", ErrClosed, true},
		{"no member", ErrNoMember, true},
		{"wrapped as the token's Error", wrapToken("t", Call("C_DeriveKey", nil, pkcs11.Error(pkcs11.CKR_DEVICE_ERROR))), true},
		{"c the token refuses", Call("C_UnwrapKey", nil, pkcs11.Error(pkcs11.CKR_ENCRYPTED_DATA_INVALID)), false},
		{"bad blob (SoftHSM2)", Call("C_UnwrapKey", nil, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)), false},
		{"mechanism missing", Call("C_DeriveKey", nil, pkcs11.Error(pkcs11.CKR_MECHANISM_INVALID)), false},
		{"not a PKCS#11 error", errors.New("card id is 22 bytes"), false},
		{"nil", nil, false},
	} {
		if got := Unavailable(tc.err); got != tc.want {
			t.Errorf("%s: Unavailable(%v) = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}

// groupOf opens one SoftHSM2 token with an RSA-2048 issuer key and a
// trusted KEK twice: through its library, and through a p11fault copy of
// it; and returns the two as members, the token and the copy's Fault.
func groupOf(t *testing.T) ([]Member, hsmtest.Token, *hsmtest.Fault) {
	t.Helper()
	ctx := context.Background()
	tt := hsmtest.SoftHSM(t)
	f := hsmtest.Faulty(t, tt)
	var ms []Member
	for i, uri := range []string{tt.URI, f.Token.URI} {
		tok := openFaultToken(t, uri, 2)
		var key *IssuerKeyRef
		var kek *KEKRef
		var err error
		if i == 0 {
			if key, err = tok.GenerateIssuerKey(ctx, KindRSA2048, "issuer"); err != nil {
				t.Fatal(err)
			}
			if kek, err = tok.GenerateKEK(ctx, "kek", tt.SOPIN); err != nil {
				t.Fatal(err)
			}
		} else {
			if key, err = tok.FindIssuerKey(ctx, "issuer"); err != nil {
				t.Fatal(err)
			}
			if kek, err = tok.FindKEK(ctx, "kek"); err != nil {
				t.Fatal(err)
			}
		}
		ms = append(ms, Member{Token: tok, Key: key, KEK: kek})
	}
	return ms, tt, f
}

func quietGroup(t *testing.T, ms []Member) *Group {
	t.Helper()
	g, err := NewGroup(context.Background(), ms, GroupOptions{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close(context.Background()) })
	return g
}

// A c the token refuses is the record's error: it takes no member out,
// and is not tried on the other member as a failover.
func TestGroupRecordErrorKeepsMembers(t *testing.T) {
	ms, _, _ := groupOf(t)
	g := quietGroup(t, ms)
	ctx := context.Background()
	p := protocol.RSAOAEPAES
	bad := make([]byte, ms[0].Key.Public.CiphertextLen(p.Transport))
	rand.Read(bad[1:])
	for range 4 {
		if _, err := g.Import(ctx, p, bad); err == nil || Unavailable(err) {
			t.Fatalf("import of a forged c: %v, want the token's refusal", err)
		}
	}
	for _, st := range g.Stats() {
		if !st.Up || st.Downs != 0 {
			t.Fatalf("member %+v after forged records", st)
		}
	}
	if g.Failovers() != 0 {
		t.Fatalf("%d failovers for forged records", g.Failovers())
	}
	// Genuine cards still import, on both members.
	for range 8 {
		card := newSoftCard(t, p, ms[0].Key.Public)
		if _, err := g.Import(ctx, p, card.c); err != nil {
			t.Fatal(err)
		}
	}
	for _, st := range g.Stats() {
		if st.Imports == 0 {
			t.Fatalf("member %s got no work: %+v", st.Name, g.Stats())
		}
	}
}

// A member whose keys differ is refused at start, named, with the
// reason: another issuer key (fingerprints), and, with the same issuer
// key, another KEK (the throwaway card's blobs differ). The second needs
// one issuer key and two KEKs under one label: the second member is the
// first's token again, with a reference to another KEK of it under the
// group's label.
func TestGroupRefusesOtherKeys(t *testing.T) {
	ms, tt, _ := groupOf(t)
	ctx := context.Background()
	t.Run("issuer key", func(t *testing.T) {
		key, err := ms[0].Token.GenerateIssuerKey(ctx, KindRSA2048, uniqueLabel("other-issuer"))
		if err != nil {
			t.Fatal(err)
		}
		_, err = NewGroup(ctx, []Member{ms[0], {Token: ms[0].Token, Key: key, KEK: ms[0].KEK}}, GroupOptions{})
		if err == nil || !strings.Contains(err.Error(), "is refused: its issuer key") || !strings.Contains(err.Error(), "not the same key") {
			t.Fatalf("other issuer key: %v", err)
		}
	})
	t.Run("KEK", func(t *testing.T) {
		kek2, err := ms[0].Token.GenerateKEK(ctx, uniqueLabel("other-kek"), tt.SOPIN)
		if err != nil {
			t.Fatal(err)
		}
		kek2.Label = ms[0].KEK.Label // the same label, another key
		_, err = NewGroup(ctx, []Member{ms[0], {Token: ms[0].Token, Key: ms[0].Key, KEK: kek2}}, GroupOptions{})
		if err == nil || !strings.Contains(err.Error(), `its KEK "kek" is not the group's`) {
			t.Fatalf("other KEK: %v", err)
		}
	})
}

// A member that cannot be opened at start (its token gone) starts out:
// the group works on the others, and the member joins by itself once it
// opens and proves the group's keys; then it gets work.
func TestGroupMemberDownAtStart(t *testing.T) {
	ms, tt, _ := groupOf(t)
	ctx := context.Background()
	f := hsmtest.Faulty(t, tt)
	f.Vanish()
	open := func(ctx context.Context) (Member, error) {
		tok, err := OpenURI(f.Token.URI, 2)
		if err != nil {
			return Member{}, err
		}
		key, err := tok.FindIssuerKey(ctx, "issuer")
		if err == nil {
			var kek *KEKRef
			if kek, err = tok.FindKEK(ctx, "kek"); err == nil {
				t.Cleanup(func() { tok.Close() })
				return Member{Token: tok, Key: key, KEK: kek}, nil
			}
		}
		tok.Close()
		return Member{}, err
	}
	_, err := open(ctx)
	if !Unavailable(err) {
		t.Fatalf("opening a vanished token: %v, want a device failure", err)
	}
	g, err := NewGroup(ctx, ms[:1], GroupOptions{ProbeEvery: 20 * time.Millisecond, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Pending: []Pending{{Name: "late", Open: open, Err: err}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close(ctx) })
	p := protocol.RSAOAEPAES
	importSome := func() {
		for range 8 {
			if _, err := g.Import(ctx, p, newSoftCard(t, p, ms[0].Key.Public).c); err != nil {
				t.Fatal(err)
			}
		}
	}
	importSome()
	if st := g.Stats(); st[1].Up || st[1].Imports != 0 || len(g.Members()) != 1 {
		t.Fatalf("a member down at start: %+v", st)
	}
	f.Clear()
	for deadline := time.Now().Add(10 * time.Second); !g.Stats()[1].Up; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the member never joined: %+v", g.Stats()[1])
		}
	}
	importSome()
	if st := g.Stats(); st[1].Imports == 0 || len(g.Members()) != 2 {
		t.Fatalf("the member that joined got no work: %+v", st)
	}
}

// A member that fails in a way that looks like a refusal of the request
// (CKR_GENERAL_ERROR is also SoftHSM2's answer to a bad blob) would, on
// its own, refuse good cards: shown first with that member alone. In a
// group the request is asked once more of another member, so every good
// card imports, and the sick member is not taken out for it.
func TestGroupSecondOpinion(t *testing.T) {
	ms, _, f := groupOf(t)
	g := quietGroup(t, ms)
	ctx := context.Background()
	p := protocol.RSAOAEPAES
	f.Fail("C_WrapKey", pkcs11.CKR_GENERAL_ERROR)
	lone, err := NewGroup(ctx, ms[1:], GroupOptions{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lone.Import(ctx, p, newSoftCard(t, p, ms[0].Key.Public).c); err == nil || Unavailable(err) {
		t.Fatalf("a good card on the sick member alone: %v, want a refusal", err)
	}
	lone.Close(ctx)
	for range 16 {
		if _, err := g.Import(ctx, p, newSoftCard(t, p, ms[0].Key.Public).c); err != nil {
			t.Fatalf("a good card in the group: %v", err)
		}
	}
	st := g.Stats()
	if st[0].Imports != 16 || st[1].Imports != 0 || !st[1].Up || st[1].Downs != 0 {
		t.Fatalf("after 16 good cards with a sick member: %+v", st)
	}
	bad := make([]byte, ms[0].Key.Public.CiphertextLen(p.Transport))
	rand.Read(bad[1:])
	if _, err := g.Import(ctx, p, bad); err == nil || Unavailable(err) {
		t.Fatalf("a forged c: %v, want the refusal", err)
	}
}

// A member whose token refuses its PIN is never probed again (each
// probe's login would spend a PIN retry): shown against a login that
// fails as a device, whose member is re-probed and comes back once the
// fault clears. Both after the token vanished, which ends its login.
func TestGroupPINRefusedNotReprobed(t *testing.T) {
	ms, _, f := groupOf(t)
	ctx := context.Background()
	var log syncLog
	g, err := NewGroup(ctx, ms, GroupOptions{ProbeEvery: 20 * time.Millisecond, Log: slog.New(slog.NewTextHandler(&log, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close(ctx) })
	p := protocol.RSAOAEPAES
	importUntilOut := func() {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); g.Stats()[1].Up; {
			if _, err := g.Import(ctx, p, newSoftCard(t, p, ms[0].Key.Public).c); err != nil {
				t.Fatal(err)
			}
			if time.Now().After(deadline) {
				t.Fatal("the member was never taken out")
			}
		}
	}
	for _, tc := range []struct {
		name  string
		login uint
		back  bool
	}{{"login fails as a device", pkcs11.CKR_DEVICE_ERROR, true}, {"PIN refused", pkcs11.CKR_PIN_INCORRECT, false}} {
		// The token vanishes (its sessions closed, so its login gone),
		// and comes back with a login that fails.
		f.Vanish()
		importUntilOut()
		f.Set(fmt.Sprintf("fail C_Login 0x%X", tc.login))
		// Let the probes run into the failing login, then clear.
		time.Sleep(200 * time.Millisecond)
		f.Clear()
		deadline := time.Now().Add(2 * time.Second)
		for !g.Stats()[1].Up && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		st := g.Stats()[1]
		if st.Up != tc.back {
			t.Fatalf("%s: member up %v after the fault cleared, want %v: %+v\n%s", tc.name, st.Up, tc.back, st, log.String())
		}
		if !tc.back && (strings.Count(log.String(), "out for good") != 1 || !strings.Contains(st.Reason, "CKR_PIN_INCORRECT")) {
			t.Fatalf("%s: %+v\n%s", tc.name, st, log.String())
		}
		t.Logf("%s: member up %v: %s", tc.name, st.Up, st.Reason)
	}
}

type syncLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *syncLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *syncLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Member names label /metrics series: unique over open and pending
// members alike.
func TestMemberNamesPending(t *testing.T) {
	got := memberNames(nil, []Pending{{Name: "issuer"}, {Name: "issuer"}, {Name: "other"}})
	if want := []string{"issuer@1", "issuer@2", "other"}; !slices.Equal(got, want) {
		t.Fatalf("names %v, want %v", got, want)
	}
}
