package hsm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// The tests of this file run real SoftHSM2 tokens through p11fault, the
// project's fault-injecting PKCS#11 module (p11fault/, docs/HSM.md "Fault
// injection for tests"): the token, the hsm package and its recovery are
// the real ones, only the module's control file decides what fails.

// openFaultToken opens uri with n sessions, closed at the end of the test.
func openFaultToken(t *testing.T, uri string, n int) *Token {
	t.Helper()
	tok, err := OpenURI(uri, n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tok.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return tok
}

// faultRig is a token with an issuer key, a KEK, and one card imported.
type faultRig struct {
	tok  *Token
	ck   *CardKeys
	card softCard
	mac  []byte // the card's answer to faultChallenge
	blob Blob
}

var faultChallenge = []byte("challenge-012345")

func newFaultRig(t *testing.T, tok *Token, prefix string) *faultRig {
	t.Helper()
	key, kek := p256Keys(t, tok, prefix)
	r := &faultRig{tok: tok, ck: &CardKeys{Token: tok, Key: key, KEK: kek, RecycleEvery: NeverRecycle},
		card: newSoftCard(t, protocol.ECDHP256AES, key.Public)}
	r.mac = r.card.answer(t, faultChallenge)
	t.Cleanup(func() { r.ck.Close(context.Background()) })
	var err error
	if r.blob, err = r.ck.Import(context.Background(), protocol.ECDHP256AES, r.card.c); err != nil {
		t.Fatal(err)
	}
	return r
}

// verify checks the card's MAC; a MAC that does not verify is an error
// here too.
func (r *faultRig) verify() error {
	ok, err := r.ck.Verify(context.Background(), r.blob, r.card.id, faultChallenge, r.mac)
	if err == nil && !ok {
		err = errors.New("the genuine MAC did not verify")
	}
	return err
}

func (r *faultRig) mustVerify(t *testing.T, what string) {
	t.Helper()
	if err := r.verify(); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// wantFaultRV fails the test unless err carries rv, as a *CallError of call
// ("" for any) inside the *Error of the token.
func wantFaultRV(t *testing.T, what string, err error, rv uint, call string) {
	t.Helper()
	var te *Error
	var ce *CallError
	switch {
	case !IsRV(err, rv):
		t.Errorf("%s: %v, want %s", what, err, pkcs11.Error(rv))
	case !errors.As(err, &te) || !errors.As(err, &ce):
		t.Errorf("%s: %v is not an *Error with a *CallError", what, err)
	case call != "" && ce.Call != call:
		t.Errorf("%s: failed in %s, want %s", what, ce.Call, call)
	}
}

// TestFaultForwarding: a token opened through the fault module, with no
// rules, is the real token: keys generated through it are found in it
// directly, and a card imported through each gives the same wrapped K_I
// (RFC 5649 is deterministic), which verifies through the other.
func TestFaultForwarding(t *testing.T) {
	ctx := context.Background()
	ht := hsmtest.SoftHSM(t)
	f := hsmtest.Faulty(t, ht)
	ft := openFaultToken(t, f.Token.URI, 2)
	dt := openFaultToken(t, ht.URI, 2)
	if ft.mod == dt.mod {
		t.Fatal("the fault module and SoftHSM2 share one hsm module")
	}
	fi, di := ft.Info(), dt.Info()
	if fi.Module != f.Token.Module || fi.Label != ht.Label || fi.Serial != di.Serial || ft.Mechanisms().Name != "SoftHSM2" {
		t.Errorf("through the fault module: %+v, table %s; directly: %+v", fi, ft.Mechanisms().Name, di)
	}
	if a, err := ft.mod.ctx.GetInfo(); err != nil {
		t.Error(err)
	} else if b, _ := dt.mod.ctx.GetInfo(); a != b {
		t.Errorf("C_GetInfo through the fault module %+v, directly %+v", a, b)
	}

	key, kek := p256Keys(t, ft, "fault-fwd")
	dkey, err := dt.FindIssuerKey(ctx, key.Label)
	if err != nil {
		t.Fatal(err)
	}
	dkek, err := dt.FindKEK(ctx, kek.Label)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dkey.Public.SPKI, key.Public.SPKI) || !dkek.Trusted {
		t.Errorf("keys found directly differ: SPKI equal %v, KEK trusted %v", bytes.Equal(dkey.Public.SPKI, key.Public.SPKI), dkek.Trusted)
	}
	fck := &CardKeys{Token: ft, Key: key, KEK: kek}
	dck := &CardKeys{Token: dt, Key: dkey, KEK: dkek}
	defer fck.Close(ctx)
	defer dck.Close(ctx)
	p := protocol.ECDHP256AES
	for i := range 3 {
		card := newSoftCard(t, p, key.Public)
		fb, err := fck.Import(ctx, p, card.c)
		if err != nil {
			t.Fatalf("import %d through the fault module: %v", i, err)
		}
		db, err := dck.Import(ctx, p, card.c)
		if err != nil {
			t.Fatalf("import %d directly: %v", i, err)
		}
		if !bytes.Equal(fb.Wrapped, db.Wrapped) || fb.KEK != db.KEK {
			t.Errorf("card %d: blob %x through the fault module, %x directly", i, fb.Wrapped, db.Wrapped)
		}
		mac := card.answer(t, faultChallenge)
		for name, v := range map[string]struct {
			ck   *CardKeys
			blob Blob
		}{"directly": {dck, fb}, "through the fault module": {fck, db}} {
			if ok, err := v.ck.Verify(ctx, v.blob, card.id, faultChallenge, mac); err != nil || !ok {
				t.Errorf("card %d verified %s: %v %v", i, name, ok, err)
			}
			if ok, err := v.ck.Verify(ctx, v.blob, card.id, []byte("challenge-other!"), mac); err != nil || ok {
				t.Errorf("card %d, forged MAC verified %s: %v %v", i, name, ok, err)
			}
		}
	}
}

// TestFaultFail: fail rules answer the chosen code in place of the token,
// through Import and Verify, and clearing them makes the token work
// again; after= and count= choose which calls, counters restart when the
// control file changes, '*' is every call, and a code With recovers from
// (CKR_SESSION_HANDLE_INVALID) is recovered from once.
func TestFaultFail(t *testing.T) {
	f := hsmtest.Faulty(t, hsmtest.SoftHSM(t))
	r := newFaultRig(t, openFaultToken(t, f.Token.URI, 1), "fault-fail")

	f.Fail("C_UnwrapKey", pkcs11.CKR_DEVICE_ERROR)
	wantFaultRV(t, "verify, C_UnwrapKey failing", r.verify(), pkcs11.CKR_DEVICE_ERROR, "C_UnwrapKey")
	wantFaultRV(t, "verify again", r.verify(), pkcs11.CKR_DEVICE_ERROR, "C_UnwrapKey")
	f.Clear()
	r.mustVerify(t, "verify after Clear")

	f.Fail("C_DeriveKey", pkcs11.CKR_DEVICE_MEMORY)
	_, err := r.ck.Import(context.Background(), protocol.ECDHP256AES, r.card.c)
	wantFaultRV(t, "import, C_DeriveKey failing", err, pkcs11.CKR_DEVICE_MEMORY, "C_DeriveKey")
	f.Clear()
	if b, err := r.ck.Import(context.Background(), protocol.ECDHP256AES, r.card.c); err != nil || !bytes.Equal(b.Wrapped, r.blob.Wrapped) {
		t.Fatalf("import after Clear: %x %v, want %x", b.Wrapped, err, r.blob.Wrapped)
	}

	// pattern runs n verifications and says which failed with rv ('x')
	// and which passed ('.').
	pattern := func(n int, rv uint) string {
		t.Helper()
		var b strings.Builder
		for i := range n {
			err := r.verify()
			switch {
			case err == nil:
				b.WriteByte('.')
			case IsRV(err, rv):
				b.WriteByte('x')
			default:
				t.Fatalf("verification %d: %v", i, err)
			}
		}
		return b.String()
	}
	for _, tc := range []struct {
		rules []string
		want  string
	}{
		{[]string{"fail C_UnwrapKey CKR_DEVICE_ERROR after=2 count=1"}, "..x.."},
		{[]string{"fail C_UnwrapKey CKR_DEVICE_ERROR count=2"}, "xx..."},
		{[]string{"fail C_UnwrapKey 0x30 after=3"}, "...xx"},
		// Each Verify makes one C_VerifyInit: the second rule counts its own calls.
		{[]string{"fail C_UnwrapKey CKR_DEVICE_ERROR after=1 count=1", "fail C_VerifyInit CKR_DEVICE_ERROR after=3 count=1"}, ".x..x"},
		{[]string{"# a comment", "", "fail * CKR_DEVICE_ERROR count=1 # the first call of all"}, "x...."},
	} {
		// A failure can make the pool reopen its session on next use
		// (hsm.Token.With after a device error): start each case on a
		// session that works, so that the calls counted are the
		// verifications' own.
		f.Clear()
		r.mustVerify(t, fmt.Sprintf("before %q", tc.rules))
		f.Set(tc.rules...)
		if got := pattern(5, pkcs11.CKR_DEVICE_ERROR); got != tc.want {
			t.Errorf("%q: %s, want %s", tc.rules, got, tc.want)
		}
	}
	// Writing the file again starts the counters again.
	rule := "fail C_UnwrapKey CKR_DEVICE_ERROR after=1 count=1"
	f.Set(rule)
	got := pattern(1, pkcs11.CKR_DEVICE_ERROR)
	f.Set(rule)
	if got += pattern(3, pkcs11.CKR_DEVICE_ERROR); got != "..x." {
		t.Errorf("counters across a rewrite: %s, want ..x.", got)
	}
	// FailAfter adds to the rules in force.
	f.Clear()
	f.FailAfter("C_UnwrapKey", pkcs11.CKR_DEVICE_ERROR, 1, 1)
	f.FailAfter("C_UnwrapKey", pkcs11.CKR_DEVICE_ERROR, 3, 0)
	if got := pattern(5, pkcs11.CKR_DEVICE_ERROR); got != ".x.xx" {
		t.Errorf("two FailAfter rules: %s, want .x.xx", got)
	}

	// With reopens the session and runs fn again after one
	// CKR_SESSION_HANDLE_INVALID, not after two.
	f.Set("fail C_UnwrapKey CKR_SESSION_HANDLE_INVALID count=1")
	r.mustVerify(t, "one CKR_SESSION_HANDLE_INVALID (recovered)")
	f.Set("fail C_UnwrapKey CKR_SESSION_HANDLE_INVALID count=2")
	wantFaultRV(t, "two CKR_SESSION_HANDLE_INVALID", r.verify(), pkcs11.CKR_SESSION_HANDLE_INVALID, "C_UnwrapKey")
	r.mustVerify(t, "after the two")
	f.Clear()
	r.mustVerify(t, "after Clear")
}

// TestFaultDelay: a delayed call takes at least the delay; count= limits
// it, and the delays of several rules add up.
func TestFaultDelay(t *testing.T) {
	f := hsmtest.Faulty(t, hsmtest.SoftHSM(t))
	r := newFaultRig(t, openFaultToken(t, f.Token.URI, 1), "fault-delay")
	timed := func(what string) time.Duration {
		t.Helper()
		start := time.Now()
		r.mustVerify(t, what)
		return time.Since(start)
	}
	base := timed("no delay")

	const d = 200 * time.Millisecond
	f.Delay("C_UnwrapKey", d)
	for i := range 2 {
		if got := timed("delayed"); got < d {
			t.Errorf("verification %d with C_UnwrapKey delayed %v took %v", i, d, got)
		}
	}
	f.Set("delay C_Verify 150 count=1")
	if got := timed("first"); got < 150*time.Millisecond {
		t.Errorf("first verification, C_Verify delayed 150 ms once: %v", got)
	}
	if got := timed("second"); got >= 150*time.Millisecond {
		t.Errorf("second verification, after the one delay: %v (without delay: %v)", got, base)
	}
	// A verification makes at least C_UnwrapKey, C_VerifyInit, C_Verify
	// and C_DestroyObject.
	f.Set("delay C_UnwrapKey 100", "delay * 25")
	if got := timed("delays added"); got < 200*time.Millisecond {
		t.Errorf("delays of 100 ms + 4 × 25 ms: %v", got)
	}
	f.Clear()
	if got := timed("after Clear"); got >= 100*time.Millisecond {
		t.Errorf("verification after Clear: %v (before any delay: %v)", got, base)
	}
}

// TestFaultVanish: while the token has vanished, operations fail with
// CKR_DEVICE_REMOVED, the slot lists no token, slot calls answer
// CKR_TOKEN_NOT_PRESENT and the token cannot be opened; the sessions of
// before are closed in SoftHSM2 itself (CKR_SESSION_HANDLE_INVALID from
// it once the token is back), and With recovers from that: after Clear
// import and verification work again, on the same Token and key refs.
func TestFaultVanish(t *testing.T) {
	f := hsmtest.Faulty(t, hsmtest.SoftHSM(t))
	tok := openFaultToken(t, f.Token.URI, 2)
	r := newFaultRig(t, tok, "fault-vanish")
	slot := tok.Info().Slot
	var old []pkcs11.SessionHandle
	for _, ps := range tok.pool.all {
		if ps.ok {
			old = append(old, ps.h)
		}
	}
	if len(old) != 2 {
		t.Fatalf("%d open sessions in the pool, want 2", len(old))
	}

	f.Vanish()
	wantFaultRV(t, "verify", r.verify(), pkcs11.CKR_DEVICE_REMOVED, "")
	// Later operations may meet a session the pool reopens, which the
	// token refuses: then the slot has no token.
	for i := range 3 {
		_, err := r.ck.Import(context.Background(), protocol.ECDHP256AES, r.card.c)
		if !IsRV(err, pkcs11.CKR_DEVICE_REMOVED) && !IsRV(err, pkcs11.CKR_TOKEN_NOT_PRESENT) &&
			(err == nil || !strings.Contains(err.Error(), "no initialized token")) {
			t.Errorf("import %d while vanished: %v", i, err)
		}
	}
	p := tok.mod.ctx
	if slots, err := p.GetSlotList(true); err != nil || len(slots) != 0 {
		t.Errorf("C_GetSlotList(tokenPresent): %v %v, want no slot", slots, err)
	}
	if all, err := p.GetSlotList(false); err != nil || len(all) == 0 {
		t.Errorf("C_GetSlotList(all): %v %v, want the slots", all, err)
	}
	if si, err := p.GetSlotInfo(slot); err != nil || si.Flags&pkcs11.CKF_TOKEN_PRESENT != 0 {
		t.Errorf("C_GetSlotInfo: flags %#x, %v; want no CKF_TOKEN_PRESENT", si.Flags, err)
	}
	if _, err := p.GetTokenInfo(slot); !IsRV(err, pkcs11.CKR_TOKEN_NOT_PRESENT) {
		t.Errorf("C_GetTokenInfo: %v, want CKR_TOKEN_NOT_PRESENT", err)
	}
	if _, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION); !IsRV(err, pkcs11.CKR_TOKEN_NOT_PRESENT) {
		t.Errorf("C_OpenSession: %v, want CKR_TOKEN_NOT_PRESENT", err)
	}
	if _, err := p.GetSessionInfo(old[0]); !IsRV(err, pkcs11.CKR_DEVICE_REMOVED) {
		t.Errorf("C_GetSessionInfo: %v, want CKR_DEVICE_REMOVED", err)
	}
	if other, err := OpenURI(f.Token.URI, 1); err == nil {
		other.Close()
		t.Error("opened the token that vanished")
	} else if !strings.Contains(err.Error(), "no initialized token") {
		t.Errorf("open while vanished: %v", err)
	}

	f.Clear()
	for _, h := range old {
		if _, err := p.GetSessionInfo(h); !IsRV(err, pkcs11.CKR_SESSION_HANDLE_INVALID) {
			t.Errorf("session %d of before, token back: %v, want CKR_SESSION_HANDLE_INVALID", h, err)
		}
	}
	epoch := tok.epoch.Load()
	r.mustVerify(t, "verify, token back")
	if tok.epoch.Load() == epoch {
		t.Error("With did not go through its recovery")
	}
	if b, err := r.ck.Import(context.Background(), protocol.ECDHP256AES, r.card.c); err != nil || !bytes.Equal(b.Wrapped, r.blob.Wrapped) {
		t.Errorf("import, token back: %x %v, want %x", b.Wrapped, err, r.blob.Wrapped)
	}
	r.mustVerify(t, "verify again")
}

// TestFaultVanishConcurrent: the token vanishes and comes back while
// eight goroutines verify: calls in flight finish, operations fail while
// it is gone, nothing crashes, and once it is back every goroutine works.
func TestFaultVanishConcurrent(t *testing.T) {
	f := hsmtest.Faulty(t, hsmtest.SoftHSM(t))
	r := newFaultRig(t, openFaultToken(t, f.Token.URI, 4), "fault-vanish-conc")
	var stop atomic.Bool
	var oks, fails atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for !stop.Load() {
				if r.verify() == nil {
					oks.Add(1)
				} else {
					fails.Add(1)
				}
			}
		})
	}
	for range 5 {
		time.Sleep(30 * time.Millisecond)
		f.Vanish()
		time.Sleep(30 * time.Millisecond)
		f.Clear()
	}
	stop.Store(true)
	wg.Wait()
	if oks.Load() == 0 || fails.Load() == 0 {
		t.Errorf("%d verifications passed, %d failed: want both", oks.Load(), fails.Load())
	}
	var errs [8]error
	wg = sync.WaitGroup{}
	for i := range errs {
		wg.Go(func() {
			// The first call of a session may meet the old handle: With
			// recovers within the call.
			for range 3 {
				if errs[i] = r.verify(); errs[i] != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("goroutine %d, token back: %v", i, err)
		}
	}
}

// TestFaultTwoCopies: two tokens behind two fault modules and a third
// opened directly are three SoftHSM2 instances in one process: one
// module's rules touch only its token, and finalizing one instance
// (Recycle, Close) while the others work disturbs neither.
func TestFaultTwoCopies(t *testing.T) {
	ta, tb, tc := hsmtest.SoftHSM(t), hsmtest.SoftHSM(t), hsmtest.SoftHSM(t)
	fa, fb := hsmtest.Faulty(t, ta), hsmtest.Faulty(t, tb)
	if fa.Token.Module == fb.Token.Module || fa.Real == fb.Real {
		t.Fatalf("two Faulty tokens share a library: %s, %s", fa.Token.Module, fb.Token.Module)
	}
	a, err := OpenURI(fa.Token.URI, 2)
	if err != nil {
		t.Fatal(err)
	}
	aOpen := true
	defer func() {
		if aOpen {
			a.Close()
		}
	}()
	b := openFaultToken(t, fb.Token.URI, 2)
	c, err := OpenURI(tc.URI, 2)
	if err != nil {
		t.Fatal(err)
	}
	cOpen := true
	defer func() {
		if cOpen {
			c.Close()
		}
	}()
	if a.mod == b.mod || a.mod == c.mod || b.mod == c.mod {
		t.Fatal("two tokens share one hsm module")
	}
	ra, rb, rc := newFaultRig(t, a, "fault-a"), newFaultRig(t, b, "fault-b"), newFaultRig(t, c, "fault-c")
	check := func(what string, wa, wb uint) {
		t.Helper()
		for _, x := range []struct {
			name string
			r    *faultRig
			rv   uint
		}{{"a", ra, wa}, {"b", rb, wb}, {"c (direct)", rc, 0}} {
			err := x.r.verify()
			if x.rv == 0 && err != nil {
				t.Errorf("%s: token %s: %v", what, x.name, err)
			} else if x.rv != 0 {
				wantFaultRV(t, what+": token "+x.name, err, x.rv, "")
			}
		}
	}
	check("no rules", 0, 0)
	fa.Fail("C_UnwrapKey", pkcs11.CKR_DEVICE_ERROR)
	check("a failing", pkcs11.CKR_DEVICE_ERROR, 0)
	fb.Vanish()
	check("a failing, b vanished", pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_REMOVED)
	fa.Clear()
	fb.Clear()
	check("rules cleared", 0, 0)

	// Finalize and initialize a's SoftHSM2 again and again while b and c
	// verify, then finalize it for good, then c's (the direct one).
	var stop atomic.Bool
	var wg sync.WaitGroup
	var bad sync.Map
	var nb, nc atomic.Int64
	for _, x := range []struct {
		r *faultRig
		n *atomic.Int64
	}{{rb, &nb}, {rc, &nc}, {rb, &nb}, {rc, &nc}} {
		wg.Go(func() {
			for !stop.Load() {
				if err := x.r.verify(); err != nil {
					bad.Store(err.Error(), true)
				}
				x.n.Add(1)
			}
		})
	}
	genB, genC := b.Generation(), c.Generation()
	for i := range 5 {
		genA := a.Generation()
		if err := a.Recycle(); err != nil {
			t.Fatalf("recycle %d of a: %v", i, err)
		}
		if a.Generation() != genA+2 {
			t.Errorf("recycle of a: generation %d → %d", genA, a.Generation())
		}
		ra.mustVerify(t, "a after its recycle")
	}
	time.Sleep(50 * time.Millisecond)
	aOpen = false
	if err := a.Close(); err != nil {
		t.Errorf("close a: %v", err)
	}
	time.Sleep(50 * time.Millisecond)
	rb.mustVerify(t, "b, a finalized")
	rc.mustVerify(t, "c, a finalized")
	if b.Generation() != genB || c.Generation() != genC {
		t.Errorf("a's recycles moved b (%d → %d) or c (%d → %d)", genB, b.Generation(), genC, c.Generation())
	}
	cOpen = false
	rc.ck.Close(context.Background())
	if err := c.Close(); err != nil {
		t.Errorf("close c: %v", err)
	}
	time.Sleep(50 * time.Millisecond)
	stop.Store(true)
	wg.Wait()
	bad.Range(func(k, _ any) bool {
		if !strings.Contains(k.(string), ErrClosed.Error()) {
			t.Errorf("a verification failed while another instance was finalized: %s", k)
		}
		return true
	})
	if nb.Load() == 0 || nc.Load() == 0 {
		t.Errorf("verifications: b %d, c %d", nb.Load(), nc.Load())
	}
	rb.mustVerify(t, "b, a and c finalized")
}
