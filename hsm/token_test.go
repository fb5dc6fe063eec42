package hsm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"blindperso/hsm/hsmtest"
)

// TestMain runs the tests in a private mount namespace where
// opencryptoki can run (hsmtest.Run) and removes the test tokens
// (hsmtest.Dir) after the package's tests and benchmarks.
func TestMain(m *testing.M) {
	os.Exit(hsmtest.Run(m))
}

// scratchKey is an operation that needs a live, logged-in session: it
// makes a private AES session object and destroys it. Idempotent, as
// With requires.
func scratchKey(s Session) error {
	m := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}
	h, err := s.P.GenerateKey(s.H, m, []*pkcs11.Attribute{
		attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_PRIVATE, true), attr(pkcs11.CKA_VALUE_LEN, 16),
		attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false),
	})
	if err != nil {
		return Call("C_GenerateKey", m[0], err)
	}
	return Call("C_DestroyObject", nil, s.P.DestroyObject(s.H, h))
}

func TestOpen(t *testing.T) {
	soft := hsmtest.SoftHSM(t)
	for name, ht := range map[string]hsmtest.Token{"SoftHSM2": soft, "NSS": hsmtest.NSS(t)} {
		t.Run(name, func(t *testing.T) {
			tok, err := OpenURI(ht.URI, 3)
			if err != nil {
				t.Fatal(err)
			}
			defer tok.Close()
			info := tok.Info()
			if info.Label != ht.Label || info.Module != ht.Module {
				t.Errorf("Info = %+v", info)
			}
			if tok.Sessions() != 3 {
				t.Errorf("Sessions = %d", tok.Sessions())
			}
			// SoftHSM2 wants a login; an NSS database with an empty
			// password does not (the session is usable as is).
			if info.LoginRequired != (name == "SoftHSM2") {
				t.Errorf("LoginRequired = %v", info.LoginRequired)
			}
			if err := tok.With(context.Background(), scratchKey); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestOpenDefaultSessions(t *testing.T) {
	tok, err := OpenURI(hsmtest.SoftHSM(t).URI, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	if tok.Sessions() < 1 {
		t.Errorf("Sessions = %d", tok.Sessions())
	}
}

func TestOpenErrors(t *testing.T) {
	soft := hsmtest.SoftHSM(t)
	wrongPIN := filepath.Join(t.TempDir(), "wrong.pin")
	os.WriteFile(wrongPIN, []byte("0000-wrong"), 0o600)
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
		rv   uint // 0: no PKCS#11 return code expected
	}{
		{"wrong PIN", Config{Module: soft.Module, TokenLabel: soft.Label, PIN: "0000-wrong"},
			"wrong PIN for token \"" + soft.Label + "\" (check the pin-source file)", pkcs11.CKR_PIN_INCORRECT},
		{"no PIN", Config{Module: soft.Module, TokenLabel: soft.Label}, "the token requires a PIN: add pin-source=file:", 0},
		{"no such token", Config{Module: soft.Module, TokenLabel: "no-such-token", PIN: soft.PIN},
			"no such token in module " + soft.Module + " (present: ", 0},
		{"no such serial", Config{Module: soft.Module, Serial: "0000", PIN: soft.PIN}, "no such token", 0},
		{"no module", Config{Module: "/nonexistent/libp11.so", TokenLabel: "x"}, "load PKCS#11 module /nonexistent/libp11.so", 0},
		{"empty config", Config{}, "needs Module", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok, err := Open(tc.cfg)
			if err == nil {
				tok.Close()
				t.Fatal("opened")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
			if strings.Contains(err.Error(), `"" (serial`) {
				t.Errorf("error lists SoftHSM2's free slot as a token: %v", err)
			}
			if strings.Contains(err.Error(), "0000-wrong") {
				t.Errorf("error shows the PIN: %v", err)
			}
			if tc.rv != 0 {
				var te *Error
				if !errors.As(err, &te) || !IsRV(err, tc.rv) {
					t.Errorf("error %v is not an *Error with 0x%X", err, tc.rv)
				}
			}
		})
	}
	// The URI form says the same.
	_, err := OpenURI(strings.Replace(soft.URI, soft.PINFile, wrongPIN, 1), 1)
	if err == nil || !strings.Contains(err.Error(), "wrong PIN") {
		t.Errorf("OpenURI with a wrong pin-source file: %v", err)
	}
}

// Two tokens of one module share its initialization; closing one leaves
// the other working.
func TestSharedModule(t *testing.T) {
	// SoftHSM2 sees the tokens that exist at C_Initialize: make them all
	// before opening the first.
	ta, tb, tc := hsmtest.SoftHSM(t), hsmtest.SoftHSM(t), hsmtest.SoftHSM(t)
	a, err := OpenURI(ta.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	b, err := OpenURI(tb.URI, 1)
	if err != nil {
		a.Close()
		t.Fatal(err)
	}
	if a.mod != b.mod {
		t.Error("two tokens of one module do not share it")
	}
	if err := a.Close(); err != nil {
		t.Error(err)
	}
	if err := a.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := a.With(context.Background(), scratchKey); !errors.Is(err, ErrClosed) {
		t.Errorf("With after Close = %v, want ErrClosed", err)
	}
	if err := b.With(context.Background(), scratchKey); err != nil {
		t.Errorf("the other token after Close: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Error(err)
	}
	// The module was finalized with its last token; it initializes again.
	c, err := OpenURI(tc.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.With(context.Background(), scratchKey); err != nil {
		t.Error(err)
	}
}

func TestNSSInitArgsConflict(t *testing.T) {
	nss := hsmtest.NSS(t)
	tok, err := OpenURI(nss.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	_, err = Open(Config{Module: nss.Module, TokenLabel: nss.Label, InitArgs: NSSInitArgs(t.TempDir())})
	if err == nil || !strings.Contains(err.Error(), "one NSS database per process") {
		t.Errorf("second NSS database: %v", err)
	}
}

// TestRecovery breaks the pool's state behind its back, the ways a
// long-running issuer meets, and checks that With repairs it, runs fn
// again, and returns no error; and that key references survive.
func TestRecovery(t *testing.T) {
	ctx := context.Background()
	for name, ht := range map[string]hsmtest.Token{"SoftHSM2": hsmtest.SoftHSM(t), "NSS": hsmtest.NSS(t)} {
		tok, err := OpenURI(ht.URI, 1) // one session: the broken one is the one With lends
		if err != nil {
			t.Fatal(err)
		}
		defer tok.Close()
		key, err := tok.GenerateIssuerKey(ctx, KindP256, uniqueLabel("recovery"))
		if err != nil {
			t.Fatal(err)
		}
		breakers := []struct {
			name  string
			brk   func(s Session) error
			calls int // runs of fn expected: 2 after a repair
		}{
			{"close session", func(s Session) error { return s.P.CloseSession(s.H) }, 2},
			{"close all sessions", func(s Session) error { return s.P.CloseAllSessions(tok.Info().Slot) }, 2},
			{"finalize", func(s Session) error { return s.P.Finalize() }, 2},
			{"nothing", func(s Session) error { return nil }, 1},
		}
		if tok.Info().LoginRequired {
			breakers = append(breakers, struct {
				name  string
				brk   func(s Session) error
				calls int
			}{"logout", func(s Session) error { return s.P.Logout(s.H) }, 2})
		}
		for _, b := range breakers {
			t.Run(name+"/"+b.name, func(t *testing.T) {
				if err := tok.With(ctx, b.brk); err != nil {
					t.Fatalf("break: %v", err)
				}
				calls := 0
				err := tok.With(ctx, func(s Session) error {
					calls++
					if err := scratchKey(s); err != nil {
						return err
					}
					// The issuer key's handle is found again after a
					// re-initialization.
					h, err := key.Handle(s)
					if err != nil {
						return err
					}
					_, err = s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_KEY_TYPE, nil)})
					return Call("C_GetAttributeValue", nil, err)
				})
				if err != nil {
					t.Fatalf("With after %s: %v", b.name, err)
				}
				if calls != b.calls {
					t.Errorf("fn ran %d times, want %d", calls, b.calls)
				}
			})
		}
	}
}

// An error that is not about the session is returned as is, after one run.
func TestNoRetryOnOtherErrors(t *testing.T) {
	tok, err := OpenURI(hsmtest.SoftHSM(t).URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	calls := 0
	err = tok.With(context.Background(), func(s Session) error {
		calls++
		m := pkcs11.NewMechanism(pkcs11.CKM_SHA1_KEY_DERIVATION, nil)
		_, err := s.P.DeriveKey(s.H, []*pkcs11.Mechanism{m}, 0, nil)
		return Call("C_DeriveKey", m, err)
	})
	if calls != 1 {
		t.Errorf("fn ran %d times", calls)
	}
	var te *Error
	if !errors.As(err, &te) || te.Token != tok.Info().Label {
		t.Fatalf("error %v is not an *Error of the token", err)
	}
	if !strings.Contains(err.Error(), "C_DeriveKey(CKM_SHA1_KEY_DERIVATION)") {
		t.Errorf("error does not name the call and mechanism: %v", err)
	}
	// A plain Go error passes through untouched.
	plain := errors.New("plain")
	if err := tok.With(context.Background(), func(Session) error { return plain }); err != plain {
		t.Errorf("With returned %v, want the fn's own error", err)
	}
}

// The pool is safe for concurrent use, and hands out each session to one
// goroutine at a time.
func TestPoolConcurrency(t *testing.T) {
	tok, err := OpenURI(hsmtest.SoftHSM(t).URI, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	var (
		inUse sync.Map
		max   atomic.Int32
		cur   atomic.Int32
		wg    sync.WaitGroup
	)
	errs := make(chan error, 16)
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20 {
				err := tok.With(context.Background(), func(s Session) error {
					if _, busy := inUse.LoadOrStore(s.H, true); busy {
						return errors.New("session lent twice")
					}
					defer inUse.Delete(s.H)
					if n := cur.Add(1); n > max.Load() {
						max.Store(n)
					}
					defer cur.Add(-1)
					return scratchKey(s)
				})
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if max.Load() > 3 {
		t.Errorf("%d sessions in use at once, pool has 3", max.Load())
	}
}

func TestWithContext(t *testing.T) {
	tok, err := OpenURI(hsmtest.SoftHSM(t).URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	hold := make(chan struct{})
	held := make(chan struct{})
	go tok.With(context.Background(), func(Session) error { close(held); <-hold; return nil })
	<-held
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := tok.With(ctx, scratchKey); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("With on an exhausted pool = %v, want the context's error", err)
	}
	close(hold)
}

// The SO's login replaces the user's for the whole process; afterwards
// the pool's sessions work as the user again.
func TestWithSO(t *testing.T) {
	ht := hsmtest.SoftHSM(t)
	tok, err := OpenURI(ht.URI, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	err = tok.WithSO(context.Background(), ht.SOPIN, func(s Session) error {
		si, err := s.P.GetSessionInfo(s.H)
		if err == nil && si.State != pkcs11.CKS_RW_SO_FUNCTIONS {
			t.Errorf("session state %d, want SO functions", si.State)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := tok.With(context.Background(), scratchKey); err != nil {
			t.Fatalf("user session after SO work: %v", err)
		}
	}
	err = tok.WithSO(context.Background(), "wrong-so-pin", func(Session) error { return nil })
	if !IsRV(err, pkcs11.CKR_PIN_INCORRECT) {
		t.Errorf("wrong SO PIN: %v", err)
	}
	if err := tok.With(context.Background(), scratchKey); err != nil {
		t.Fatalf("user session after a failed SO login: %v", err)
	}
}

// Many goroutines meet one re-initialization: each repairs its own
// session (one re-initializes the library) and none fails.
func TestRecoveryConcurrent(t *testing.T) {
	for name, ht := range map[string]hsmtest.Token{"SoftHSM2": hsmtest.SoftHSM(t), "NSS": hsmtest.NSS(t)} {
		t.Run(name, func(t *testing.T) {
			tok, err := OpenURI(ht.URI, 3)
			if err != nil {
				t.Fatal(err)
			}
			defer tok.Close()
			key, err := tok.GenerateKEK(context.Background(), uniqueLabel("kek"), soPIN(tok))
			if err != nil {
				t.Fatal(err)
			}
			if err := tok.With(context.Background(), func(s Session) error { return s.P.Finalize() }); err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			errs := make(chan error, 12)
			for range 12 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					errs <- tok.With(context.Background(), func(s Session) error {
						if err := scratchKey(s); err != nil {
							return err
						}
						h, err := key.Handle(s)
						if err != nil {
							return err
						}
						_, err = s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_KEY_TYPE, nil)})
						return Call("C_GetAttributeValue", nil, err)
					})
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Error(err)
				}
			}
		})
	}
}
