package hsm

/*
#include <stdlib.h>
*/
import "C"

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// A module is one loaded PKCS#11 library. C_Initialize may run only once
// per process per library, and login state is per process too, so every
// Token of the same library shares one module (two SoftHSM2 tokens, say).
type module struct {
	path     string
	initArgs string
	ctx      *pkcs11.Ctx
	cArgs    *C.char // pReserved of C_Initialize; C memory, freed only when finalized for good

	mu   sync.Mutex // guards refs and (re)initialization
	refs int
	// gen counts initializations. Sessions and object handles belong to
	// one generation: after the library is re-initialized they are void,
	// and whoever holds one must reopen or find it again.
	gen atomic.Uint64
}

var registry = struct {
	sync.Mutex
	mods map[string]*module
}{mods: map[string]*module{}}

// acquireModule loads and initializes the library at path, or takes a
// reference to the one already loaded.
func acquireModule(path, initArgs string) (*module, error) {
	registry.Lock()
	defer registry.Unlock()
	m := registry.mods[path]
	if m == nil {
		ctx := pkcs11.New(path)
		if ctx == nil {
			return nil, fmt.Errorf("load PKCS#11 module %s: not found or not a PKCS#11 library", path)
		}
		m = &module{path: path, initArgs: initArgs, ctx: ctx}
		registry.mods[path] = m
	} else if m.initArgs != initArgs {
		return nil, fmt.Errorf("PKCS#11 module %s is already initialized in this process with other parameters (one NSS database per process)", path)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.refs == 0 {
		done, err := m.initialize()
		if err != nil {
			return nil, fmt.Errorf("initialize PKCS#11 module %s: %w", path, err)
		}
		if !done {
			// Initialized by other code of this process: it works, but
			// that code's C_Finalize will pull the module from under us.
			m.gen.Add(1)
		}
	}
	m.refs++
	return m, nil
}

// initialize runs C_Initialize; m.mu is held. It reports whether the
// library was initialized by this call (false: it already was).
func (m *module) initialize() (bool, error) {
	var opts []pkcs11.InitializeOption
	if m.initArgs != "" {
		if m.cArgs == nil {
			// NSS keeps parsing from this pointer during C_Initialize; C
			// memory so that the Go collector can neither move nor free it.
			m.cArgs = C.CString(m.initArgs)
		}
		opts = append(opts, pkcs11.InitializeWithReserved(unsafe.Pointer(m.cArgs)))
	}
	err := m.ctx.Initialize(opts...)
	if IsRV(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		return false, nil
	}
	if err != nil {
		return false, Call("C_Initialize", nil, err)
	}
	m.gen.Add(1)
	return true, nil
}

// reinit initializes the library again if it was finalized behind our
// back, as seen by a caller in generation seen. Only the first of several
// goroutines that saw it does the work; on a library that is initialized
// C_Initialize just answers CKR_CRYPTOKI_ALREADY_INITIALIZED. (Not every
// library says CKR_CRYPTOKI_NOT_INITIALIZED once finalized: NSS softokn
// answers CKR_SESSION_HANDLE_INVALID and lists no slots.)
func (m *module) reinit(seen uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.gen.Load() != seen || m.refs == 0 {
		return nil
	}
	_, err := m.initialize()
	return err
}

// release drops a reference; the last one finalizes the library. The
// library stays mapped (no dlclose): unloading and reloading NSS softokn
// in one process is not something its authors test, and the mapping
// costs nothing.
func (m *module) release() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.refs--
	if m.refs > 0 {
		return nil
	}
	err := m.ctx.Finalize()
	m.gen.Add(1)
	if m.cArgs != nil {
		C.free(unsafe.Pointer(m.cArgs))
		m.cArgs = nil
	}
	if IsRV(err, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED) {
		err = nil
	}
	return Call("C_Finalize", nil, err)
}

// TokenInfo identifies an open token.
type TokenInfo struct {
	Label        string `json:"label"`
	Manufacturer string `json:"manufacturer"`
	Model        string `json:"model"`
	Serial       string `json:"serial"`
	Slot         uint   `json:"slot"`
	Module       string `json:"module"`
	// LoginRequired is CKF_LOGIN_REQUIRED: SoftHSM2 sets it; an NSS
	// database with an empty password does not.
	LoginRequired bool `json:"login_required"`
}

// Token is an open PKCS#11 token with a pool of logged-in sessions. It is
// safe for concurrent use.
type Token struct {
	mod  *module
	cfg  Config // PIN cleared; the rest finds the slot again
	pin  string
	info TokenInfo
	mech *Mechanisms
	pool *pool

	// slot is found again after the library is re-initialized: NSS
	// softokn numbers its slots anew each time.
	slotMu  sync.Mutex
	slot    uint
	slotGen uint64
	// epoch counts recoveries. Object handles found before one may be
	// void: SoftHSM2 drops the handles of a slot when its last session
	// closes or the user logs out.
	epoch atomic.Uint64

	// excl is held shared by With and exclusively by security-officer
	// work and Close: login state is per process, so an SO login would
	// log out every user session in flight.
	excl   sync.RWMutex
	closed bool
}

// ErrClosed is returned by a Token's methods after Close.
var ErrClosed = errors.New("hsm: token is closed")

// OpenURI opens the token named by an RFC 7512 URI (see ParseURI) with a
// pool of sessions (0: GOMAXPROCS).
func OpenURI(uri string, sessions int) (*Token, error) {
	cfg, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	cfg.Sessions = sessions
	return Open(cfg)
}

// Open loads the module (or shares it with other Tokens of this process),
// finds the token by label and/or serial, chooses its mechanism table,
// and opens and logs in the session pool. A wrong PIN fails here.
func Open(cfg Config) (*Token, error) {
	name := cfg.TokenLabel
	if name == "" {
		name = "serial " + cfg.Serial
	}
	if cfg.Module == "" || (cfg.TokenLabel == "" && cfg.Serial == "") {
		return nil, errors.New("open token: Config needs Module and TokenLabel or Serial")
	}
	n := cfg.Sessions
	if n <= 0 {
		n = runtime.GOMAXPROCS(0)
	}
	m, err := acquireModule(cfg.Module, cfg.InitArgs)
	if err != nil {
		return nil, fmt.Errorf("open token %q: %w", name, err)
	}
	t := &Token{mod: m, cfg: cfg, pin: cfg.PIN, pool: newPool(n)}
	t.cfg.PIN = ""
	if err := t.find(); err != nil {
		m.release()
		return nil, fmt.Errorf("open token %q: %w", name, wrapToken(name, err))
	}
	if t.info.LoginRequired && t.pin == "" {
		m.release()
		return nil, fmt.Errorf("open token %q: the token requires a PIN: add pin-source=file:/path/to/pin (or env:VAR) to its URI", name)
	}
	for _, ps := range t.pool.all {
		if err := t.reopen(ps); err != nil {
			t.closeSessions()
			m.release()
			return nil, fmt.Errorf("open token %q: %w", name, wrapToken(name, err))
		}
	}
	return t, nil
}

// find selects the slot whose token matches the configuration, chooses
// the token's mechanism table, and refuses an unsuitable token.
func (t *Token) find() error {
	slot, ti, err := t.lookup()
	if err != nil {
		return err
	}
	t.info = TokenInfo{
		Label: ti.Label, Manufacturer: ti.ManufacturerID, Model: ti.Model, Serial: ti.SerialNumber,
		Slot: slot, Module: t.cfg.Module, LoginRequired: ti.Flags&pkcs11.CKF_LOGIN_REQUIRED != 0,
	}
	mech, err := TableFor(t.cfg.Table, ti.ManufacturerID, ti.Model)
	if err != nil {
		return err
	}
	// A token that cannot keep secrets inside is refused here, before
	// any login: every command opens its token through Open.
	if err := mech.Refusal(ti.Label); err != nil {
		return err
	}
	t.mech = mech
	t.slot, t.slotGen = slot, t.mod.gen.Load()
	return nil
}

// lookup finds the slot of the token by label and/or serial.
func (t *Token) lookup() (uint, pkcs11.TokenInfo, error) {
	cfg := t.cfg
	slots, err := t.mod.ctx.GetSlotList(true)
	if err != nil {
		return 0, pkcs11.TokenInfo{}, Call("C_GetSlotList", nil, err)
	}
	var seen []string
	for _, s := range slots {
		ti, err := t.mod.ctx.GetTokenInfo(s)
		if err != nil {
			continue // a token removed between the two calls
		}
		if ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			continue // SoftHSM2's free slot: no token to name
		}
		seen = append(seen, fmt.Sprintf("%q (serial %s)", ti.Label, ti.SerialNumber))
		if (cfg.TokenLabel != "" && ti.Label != cfg.TokenLabel) || (cfg.Serial != "" && ti.SerialNumber != cfg.Serial) {
			continue
		}
		return s, ti, nil
	}
	if len(seen) == 0 {
		return 0, pkcs11.TokenInfo{}, absentError{fmt.Sprintf("module %s has no initialized token (SoftHSM2: softhsm2-util --init-token --free --label LABEL)", cfg.Module)}
	}
	// SoftHSM2 reads its token directory in C_Initialize: a token made
	// since (softhsm2-util --init-token) is seen once every Token of
	// the module in this process is closed.
	return 0, pkcs11.TokenInfo{}, absentError{fmt.Sprintf("no such token in module %s (present: %s)", cfg.Module, strings.Join(seen, ", "))}
}

// errTokenAbsent marks lookup's failures: the token is not (or no longer)
// in any slot of its module. Unavailable counts it as a device failure.
var errTokenAbsent = errors.New("token not present")

type absentError struct{ msg string }

func (e absentError) Error() string        { return e.msg }
func (e absentError) Is(target error) bool { return target == errTokenAbsent }

// forgetSlot makes the next currentSlot look the slot up again.
func (t *Token) forgetSlot() {
	t.slotMu.Lock()
	t.slotGen = 0
	t.slotMu.Unlock()
}

// currentSlot is the token's slot in the module's current generation.
func (t *Token) currentSlot() (uint, error) {
	t.slotMu.Lock()
	defer t.slotMu.Unlock()
	gen := t.mod.gen.Load()
	if t.slotGen == gen {
		return t.slot, nil
	}
	slot, _, err := t.lookup()
	if err != nil {
		return 0, err
	}
	t.slot, t.slotGen = slot, gen
	return slot, nil
}

// Info identifies the token.
func (t *Token) Info() TokenInfo {
	t.slotMu.Lock()
	defer t.slotMu.Unlock()
	i := t.info
	i.Slot = t.slot
	return i
}

// Mechanisms is the token's mechanism table (shared; do not modify).
func (t *Token) Mechanisms() *Mechanisms { return t.mech }

// Sessions is the size of the session pool: the useful number of
// goroutines calling With at once.
func (t *Token) Sessions() int { return len(t.pool.all) }

// Close closes the pool's sessions and releases the module. It waits for
// calls of With in progress.
func (t *Token) Close() error {
	t.excl.Lock()
	defer t.excl.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	t.closeSessions()
	return wrapToken(t.info.Label, t.mod.release())
}

func (t *Token) closeSessions() {
	gen := t.mod.gen.Load()
	for _, ps := range t.pool.all {
		if ps.ok && ps.gen == gen {
			t.mod.ctx.CloseSession(ps.h)
		}
		ps.ok = false
	}
}

// login logs the user in on behalf of the whole process (PKCS#11 login
// state is per application, not per session), if the token wants it.
func (t *Token) login(h pkcs11.SessionHandle) error {
	if !t.info.LoginRequired {
		return nil
	}
	err := t.mod.ctx.Login(h, pkcs11.CKU_USER, t.pin)
	if IsRV(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		return nil
	}
	return Call("C_Login", nil, err)
}
