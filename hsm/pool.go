package hsm

/*
#include <stdlib.h>
#ifdef __GLIBC__
#include <malloc.h>
static void bp_malloc_trim(void) { malloc_trim(0); }
#else
static void bp_malloc_trim(void) {}
#endif
*/
import "C"

import (
	"context"
	"fmt"
	"sync"

	"github.com/miekg/pkcs11"
)

// pool holds a Token's sessions. A session is used by one goroutine at a
// time (PKCS#11 sessions are not safe for concurrent operations); the
// channel hands them out.
type pool struct {
	free chan *pooled
	all  []*pooled
}

// pooled is one session slot. It is (re)opened lazily when it is not ok
// or belongs to an older generation of the module.
type pooled struct {
	h   pkcs11.SessionHandle
	gen uint64
	ok  bool
}

func newPool(n int) *pool {
	p := &pool{free: make(chan *pooled, n)}
	for range n {
		ps := &pooled{}
		p.all = append(p.all, ps)
		p.free <- ps
	}
	return p
}

func (p *pool) take(ctx context.Context) (*pooled, error) {
	select {
	case ps := <-p.free:
		return ps, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (p *pool) give(ps *pooled) { p.free <- ps }

// With borrows a logged-in session for fn, waiting while all are in use
// (or until ctx is done). The Session is valid only during fn.
//
// If fn fails with CKR_SESSION_HANDLE_INVALID or CKR_SESSION_CLOSED (the
// session was closed under us), CKR_USER_NOT_LOGGED_IN (someone logged
// the process out) or CKR_CRYPTOKI_NOT_INITIALIZED (the library was
// finalized), With repairs the cause — reopens the session, logs in
// again, or re-initializes the library and reopens the pool — and runs fn
// once more. fn must therefore be idempotent: it may run twice, the first
// run cut short at any PKCS#11 call. The chains are: they create only
// session objects (which die with their session) and destroy them.
//
// Object handles can die with such events too (SoftHSM2 drops a slot's
// handles when its last session closes or the user logs out; NSS
// renumbers everything after re-initialization). So a *_HANDLE_INVALID
// error also earns one retry, and fn must take its key handles from
// IssuerKeyRef.Handle / KEKRef.Handle inside fn — never from a variable
// filled before — so that the retry gets fresh ones.
//
// Errors that carry a PKCS#11 return code come back as *Error, which
// says what to check (see Explain).
func (t *Token) With(ctx context.Context, fn func(Session) error) error {
	t.excl.RLock()
	defer t.excl.RUnlock()
	if t.closed {
		return ErrClosed
	}
	ps, err := t.pool.take(ctx)
	if err != nil {
		return err
	}
	defer t.pool.give(ps)
	u := useOf(t.mod)
	u.RLock()
	defer u.RUnlock()
	return wrapToken(t.info.Label, t.run(ps, fn))
}

// moduleUse is held shared by every With and exclusive call of every
// Token of a module, and exclusively while Recycle re-initializes the
// module: no call of this process is in the library during its
// C_Finalize.
type moduleUse struct{ sync.RWMutex }

var moduleUses sync.Map // *module → *moduleUse

func useOf(m *module) *moduleUse {
	if u, ok := moduleUses.Load(m); ok {
		return u.(*moduleUse)
	}
	u, _ := moduleUses.LoadOrStore(m, &moduleUse{})
	return u.(*moduleUse)
}

// Generation counts the library's initializations in this process
// (Recycle makes two: a finalization and an initialization), for tests.
func (t *Token) Generation() uint64 { return t.mod.gen.Load() }

// KeepsDestroyedObjects reports whether the token's library frees a
// destroyed session object only when it is finalized, so that a
// long-running process must Recycle it now and then. SoftHSM2 (2.6.1 and
// 2.7.0) does: C_DestroyObject takes the object out of the session
// object store's live set but keeps it in allObjects, which only
// C_Finalize clears (closing the session does not). Every import makes
// two or three session objects (S or Z, S ‖ B, K_I) and every
// verification one: ≈ 0.5 KiB per imported card, 480 MiB for a million.
// (A quirk of the library, which belongs with the others in the
// mechanism table.)
func (t *Token) KeepsDestroyedObjects() bool { return t.mech != nil && t.mech.Name == "SoftHSM2" }

// Recycle frees what the token's library keeps of destroyed objects
// (KeepsDestroyedObjects): it finalizes and initializes the library
// again, while every call of the process into it is held off (it waits
// for those in progress). On other tokens it does nothing.
//
// Afterwards every session, object handle and session object of the
// process in that library is void. The Tokens reopen their sessions and
// find their key objects again on next use, and SessionCopy makes its
// copy again, as after any re-initialization; but session objects a
// caller made itself are gone. Call it only where there are none (the
// issuer's importer does, every few thousand cards). It takes ≈ 10–40 ms
// on SoftHSM2.
func (t *Token) Recycle() error {
	if !t.KeepsDestroyedObjects() {
		return nil
	}
	t.excl.RLock() // not during Close or SO work
	defer t.excl.RUnlock()
	if t.closed {
		return ErrClosed
	}
	u := useOf(t.mod)
	u.Lock()
	defer u.Unlock()
	m := t.mod
	m.mu.Lock()
	defer m.mu.Unlock()
	err := m.ctx.Finalize()
	m.gen.Add(1)
	if err != nil && !IsRV(err, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED) {
		return wrapToken(t.info.Label, Call("C_Finalize", nil, err))
	}
	_, err = m.initialize()
	// The library freed its objects into the C heap; give the pages back
	// (glibc keeps them otherwise, spread over its per-thread arenas).
	C.bp_malloc_trim()
	return wrapToken(t.info.Label, err)
}

// run calls fn on ps, with one recovery and retry.
func (t *Token) run(ps *pooled, fn func(Session) error) error {
	if err := t.ready(ps); err != nil {
		return err
	}
	err := fn(t.session(ps))
	rv, ok := RV(err)
	if ok && deviceLost(uint(rv)) {
		// The session belongs to a device that failed (behind a
		// cluster's one slot, to one of its HSMs): the next user of
		// this slot opens a new one. The old one is not closed: the
		// session copies (SessionCopy) may belong to it, and die with it.
		ps.ok = false
	}
	if !ok || !recoverable(uint(rv)) {
		return err
	}
	if rerr := t.recover(ps, uint(rv)); rerr != nil {
		return fmt.Errorf("%w (recovery failed: %v)", err, rerr)
	}
	return fn(t.session(ps))
}

func deviceLost(rv uint) bool {
	switch rv {
	case pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_PRESENT:
		return true
	}
	return false
}

func recoverable(rv uint) bool {
	switch rv {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED,
		pkcs11.CKR_USER_NOT_LOGGED_IN, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED,
		pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID,
		pkcs11.CKR_WRAPPING_KEY_HANDLE_INVALID, pkcs11.CKR_UNWRAPPING_KEY_HANDLE_INVALID:
		return true
	}
	return false
}

// recover repairs what rv says is broken. Every recovery starts a new
// epoch, so that key references find their objects again.
func (t *Token) recover(ps *pooled, rv uint) error {
	defer t.epoch.Add(1)
	switch rv {
	case pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID,
		pkcs11.CKR_WRAPPING_KEY_HANDLE_INVALID, pkcs11.CKR_UNWRAPPING_KEY_HANDLE_INVALID:
		// A handle found before another goroutine's recovery (or before
		// the token dropped its handles): the new epoch is the repair.
		// A logout drops the handles of private objects too, and
		// destroys private session objects (the issuer's session
		// copies, SessionCopy): then log in again, or the objects cannot
		// be found.
		if t.info.LoginRequired {
			if si, err := t.mod.ctx.GetSessionInfo(ps.h); err == nil && si.State != pkcs11.CKS_RW_USER_FUNCTIONS {
				return t.login(ps.h)
			}
		}
		return nil
	case pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED:
		if err := t.mod.reinit(ps.gen); err != nil {
			return err
		}
		t.forgetSlot()
		return t.reopen(ps)
	case pkcs11.CKR_USER_NOT_LOGGED_IN:
		return t.login(ps.h)
	default: // the session is gone
		return t.reopen(ps)
	}
}

func (t *Token) session(ps *pooled) Session {
	return Session{P: t.mod.ctx, H: ps.h, M: t.mech, module: t.mod.path}
}

// ready reopens ps if it is void.
func (t *Token) ready(ps *pooled) error {
	if ps.ok && ps.gen == t.mod.gen.Load() {
		return nil
	}
	return t.reopen(ps)
}

// reopen opens a new R/W session for ps and makes sure the process is
// logged in. The old handle is not closed: it is invalid, or belongs to
// an earlier initialization, and its number may since have been given to
// another session.
func (t *Token) reopen(ps *pooled) error {
	ps.ok = false
	gen := t.mod.gen.Load()
	err := t.openSession(ps)
	if _, ok := RV(err); ok && !IsRV(err, pkcs11.CKR_PIN_INCORRECT) {
		// Perhaps the library was finalized behind our back, or
		// renumbered its slots: initialize it if needed, look the slot
		// up again, and try once more.
		if rerr := t.mod.reinit(gen); rerr != nil {
			return rerr
		}
		t.forgetSlot()
		err = t.openSession(ps)
	}
	return err
}

func (t *Token) openSession(ps *pooled) error {
	gen := t.mod.gen.Load()
	slot, err := t.currentSlot()
	if err != nil {
		return err
	}
	h, err := t.mod.ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return Call("C_OpenSession", nil, err)
	}
	ps.h, ps.gen, ps.ok = h, gen, true
	if !t.info.LoginRequired {
		return nil
	}
	si, err := t.mod.ctx.GetSessionInfo(h)
	if err == nil && si.State == pkcs11.CKS_RW_USER_FUNCTIONS {
		return nil
	}
	if err := t.login(h); err != nil {
		// Not a session to use: it would run without the user's
		// objects (and find no key).
		t.mod.ctx.CloseSession(h)
		ps.ok = false
		return err
	}
	return nil
}

// WithSO runs fn in a session logged in as the security officer, for the
// few operations only the SO may do (marking a KEK CKA_TRUSTED). It waits
// until no With is running and blocks new ones meanwhile, because the
// SO login replaces the user login for the whole process; afterwards the
// user is logged in again. The SO PIN is used once and not kept.
func (t *Token) WithSO(ctx context.Context, soPIN string, fn func(Session) error) error {
	return t.exclusive(ctx, func(ps *pooled) error { return t.asSO(ps, soPIN, fn) })
}

// asSO logs the process out as user and in as SO on ps, runs fn, and
// logs the user back in. The caller holds t.excl exclusively.
func (t *Token) asSO(ps *pooled, soPIN string, fn func(Session) error) (err error) {
	c := t.mod.ctx
	if err := c.Logout(ps.h); err != nil && !IsRV(err, pkcs11.CKR_USER_NOT_LOGGED_IN) {
		return Call("C_Logout", nil, err)
	}
	defer func() {
		// The logouts dropped the handles of private objects (SoftHSM2).
		t.epoch.Add(1)
		if lerr := t.login(ps.h); lerr != nil && err == nil {
			err = fmt.Errorf("log the user in again after SO work: %w", lerr)
		}
	}()
	if err := c.Login(ps.h, pkcs11.CKU_SO, soPIN); err != nil {
		return fmt.Errorf("security officer login (check the SO PIN source): %w", Call("C_Login", nil, err))
	}
	defer func() {
		if lerr := c.Logout(ps.h); lerr != nil && err == nil {
			err = Call("C_Logout", nil, lerr)
		}
	}()
	return fn(t.session(ps))
}

// exclusive runs fn on one session while no With runs, for work that
// changes the process's login (see WithSO).
func (t *Token) exclusive(ctx context.Context, fn func(*pooled) error) error {
	t.excl.Lock()
	defer t.excl.Unlock()
	if t.closed {
		return ErrClosed
	}
	ps, err := t.pool.take(ctx)
	if err != nil {
		return err
	}
	defer t.pool.give(ps)
	u := useOf(t.mod)
	u.RLock()
	defer u.RUnlock()
	if err := t.ready(ps); err != nil {
		return wrapToken(t.info.Label, err)
	}
	return wrapToken(t.info.Label, fn(ps))
}
