package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// DefaultDeadline is how long a Group waits for one import or
// verification on a member before it takes the member out and redoes the
// work on another. SoftHSM2 answers in 0.1–2 ms and holds calls off for
// at most ≈ 85 ms while it recycles; a network HSM answers in
// milliseconds. Half a second is far above both and keeps the failover
// pause of a hung member under a second (docs/BENCHMARKS.md).
const DefaultDeadline = 500 * time.Millisecond

// NoDeadline as GroupOptions.Deadline runs each call in its caller's
// goroutine with no deadline: device errors still take a member out and
// the work goes to another, but a hung call is waited for. It saves the
// goroutine hand-off a deadline needs (a PKCS#11 call cannot be
// interrupted, so a call with a deadline runs in a goroutine of its own),
// which costs 10–30 % of the import rate on an idle 2-vCPU VM
// (docs/BENCHMARKS.md, "Several HSMs").
const NoDeadline time.Duration = -1

// DefaultProbeEvery is how often a Group re-probes a member it took out.
const DefaultProbeEvery = time.Second

// Member is one token of an issuer's group: the issuer key and the KEK
// as found in it (under the same labels in every member).
type Member struct {
	Token *Token
	Key   *IssuerKeyRef
	KEK   *KEKRef
}

// GroupOptions tune a Group; the zero value is the defaults.
type GroupOptions struct {
	// Deadline is DefaultDeadline if 0; NoDeadline (negative): none.
	Deadline time.Duration
	// ProbeEvery is DefaultProbeEvery if 0.
	ProbeEvery time.Duration
	// TokenObjects and RecycleEvery are each member's CardKeys's.
	TokenObjects bool
	RecycleEvery int64
	// Log gets one line per change of a member's state (nil: slog.Default()).
	Log *slog.Logger
	// Pending are members that could not be opened at start: they start
	// out, and the re-probing opens them and lets them in once they
	// prove the group's keys, as members that come back do.
	Pending []Pending
}

// Pending is a member that could not be opened when the group was made
// (its HSM in maintenance, say): Open opens it and finds its keys, Err
// says why it could not, Name names it until it is open.
type Pending struct {
	Name string
	Open func(context.Context) (Member, error)
	Err  error
}

// ErrNoMember is the error of an operation when every member of its
// Group is out; the message says why each is.
var ErrNoMember = errors.New("no token of the group is available")

// ErrDeadline is a member's failure to answer within the Group's deadline.
var ErrDeadline = errors.New("the token did not answer within the deadline")

// Group is the issuer's card-key work over several tokens that hold the
// same issuer key and KEK (an HA group without one virtual slot, an
// nShield load-sharing set, a CloudHSM cluster's HSMs, or SoftHSM2 tokens
// replicated by the ceremony). Imports and verifications go to the
// healthy member with the least work in flight. A member that fails as a
// device (Unavailable) or does not answer within the deadline is taken
// out, and the operation is redone from its input on another member:
// the token work of an import or a verification creates only session
// objects, so redoing it elsewhere is safe (a CloudHSM session object
// exists on one HSM only; nothing of it is needed elsewhere). A member
// taken out is re-probed in the background with the throwaway card of
// NewGroup and rejoins only if it still gives that card the same blob:
// the same issuer key and the same KEK.
type Group struct {
	members    []*member
	deadline   time.Duration
	probeEvery time.Duration
	log        *slog.Logger
	probe      probeCard
	keysOf     func(Member) *CardKeys // a member's CardKeys, as the options make them
	rr         atomic.Uint64
	failovers  atomic.Int64
	// probeCtx is the re-probing's context, cancelled by Close: it stops
	// the re-probing, and no probe holds Close up.
	probeCtx    context.Context
	cancelProbe context.CancelFunc
	closeMu     sync.Mutex // orders Close and starting a re-probe
	closed      bool
	wg          sync.WaitGroup
}

// member is a Member with its state in the Group. A pending member has
// open and no Member, keys or slots until the re-probing opens it
// (under mu).
type member struct {
	Member
	name string
	keys *CardKeys
	open func(context.Context) (Member, error)
	// slots holds one token per call on the member's sessions: a call
	// waits for one before its deadline starts, so that a member busy
	// with a burst is not taken for a failed one.
	slots    chan struct{}
	inflight atomic.Int64 // calls waiting for or holding a slot
	imports  atomic.Int64
	verifies atomic.Int64
	downs    atomic.Int64

	mu     sync.Mutex
	up     bool
	since  time.Time
	reason error
}

// probeCard is a throwaway card whose key the group's check computed on
// the host: its c, the blob every member must give it, and a challenge
// and MAC under its K_I. It is no card's key; it proves the members
// equal without reading any secret of theirs.
type probeCard struct {
	profile       protocol.Profile
	c             []byte
	blob          Blob
	id, chal, mac []byte
}

// NewGroup checks that the members hold the same keys and returns their
// Group. The check reads no secret: the issuer keys' public-key
// fingerprints must be equal; then a throwaway card is imported on every
// member, each member must verify a MAC made on the host with the
// throwaway K_I (its private key is its public key's), and every
// member's blob must equal the first's byte for byte (RFC 5649 is
// deterministic, so equal blobs of one K_I mean one KEK). A member that
// differs is refused, naming it and why. opts.Pending members start out
// and face the same check when the re-probing has opened them.
func NewGroup(ctx context.Context, members []Member, opts GroupOptions) (*Group, error) {
	if len(members) == 0 {
		return nil, errors.New("a token group needs at least one member that opens")
	}
	g := &Group{deadline: opts.Deadline, probeEvery: opts.ProbeEvery, log: opts.Log}
	g.probeCtx, g.cancelProbe = context.WithCancel(context.Background())
	if g.deadline == 0 {
		g.deadline = DefaultDeadline
	}
	if g.probeEvery <= 0 {
		g.probeEvery = DefaultProbeEvery
	}
	if g.log == nil {
		g.log = slog.Default()
	}
	g.keysOf = func(m Member) *CardKeys {
		return &CardKeys{Token: m.Token, Key: m.Key, KEK: m.KEK, TokenObjects: opts.TokenObjects, RecycleEvery: opts.RecycleEvery}
	}
	for i, m := range members {
		if err := complete(m); err != nil {
			return nil, fmt.Errorf("token group member %d: %w", i+1, err)
		}
	}
	names := memberNames(members, opts.Pending)
	for i, m := range members {
		g.members = append(g.members, &member{Member: m, name: names[i], up: true, since: time.Now(), keys: g.keysOf(m), slots: slotsOf(m)})
	}
	if len(members)+len(opts.Pending) > 1 {
		if err := g.check(ctx); err != nil {
			for _, m := range g.members {
				m.keys.Close(ctx)
			}
			return nil, err
		}
	}
	for i, p := range opts.Pending {
		m := &member{name: names[len(members)+i], open: p.Open, since: time.Now(), reason: p.Err}
		g.members = append(g.members, m)
		m.downs.Add(1)
		g.log.Error("token group member out at start: it could not be opened; it is re-probed, and joins once it holds the group's keys", "member", m.name, "reason", p.Err)
		g.wg.Add(1)
		go g.reprobe(m)
	}
	return g, nil
}

// complete refuses a Member without its token or keys.
func complete(m Member) error {
	if m.Token == nil || m.Key == nil || m.KEK == nil {
		return errors.New("no token, issuer key or KEK")
	}
	return nil
}

// slotsOf is a member's slots: one per session of its token.
func slotsOf(m Member) chan struct{} { return make(chan struct{}, max(1, m.Token.Sessions())) }

// memberNames names the members, then the pending ones, uniquely (the
// names label /metrics series): by token label (a pending member by its
// Name), with the serial where two labels are the same, and the place in
// the group where even those are (one token through two libraries).
func memberNames(ms []Member, pending []Pending) []string {
	var names, serials []string
	for _, m := range ms {
		names, serials = append(names, m.Token.Info().Label), append(serials, m.Token.Info().Serial)
	}
	for _, p := range pending {
		names, serials = append(names, p.Name), append(serials, "")
	}
	for _, suffix := range []func(int) string{
		func(i int) string {
			if serials[i] == "" {
				return ""
			}
			return "#" + serials[i]
		},
		func(i int) string { return fmt.Sprintf("@%d", i+1) },
	} {
		count := map[string]int{}
		for _, n := range names {
			count[n]++
		}
		for i := range names {
			if count[names[i]] > 1 {
				names[i] += suffix(i)
			}
		}
	}
	return names
}

// check is NewGroup's proof that the members hold the same keys.
func (g *Group) check(ctx context.Context) error {
	first := g.members[0]
	for _, m := range g.members[1:] {
		if err := g.sameNames(m); err != nil {
			return fmt.Errorf("token group: member %q is refused: %w", m.name, err)
		}
	}
	pc, err := newProbeCard(ctx, first)
	if err != nil {
		return fmt.Errorf("token group: member %q: %w", first.name, err)
	}
	g.probe = pc
	for _, m := range g.members {
		if err := g.same(ctx, m, startDeadline); err != nil {
			return fmt.Errorf("token group: member %q is refused: %w", m.name, err)
		}
	}
	return nil
}

// sameNames compares what m says of its keys with the first member's
// (whose keys the others must hold): the issuer key's fingerprint and
// the KEK's label.
func (g *Group) sameNames(m *member) error {
	first := g.members[0]
	f, ff := m.Key.Fingerprint(), first.Key.Fingerprint()
	if f != ff {
		return fmt.Errorf("its issuer key %q has fingerprint %x, member %q's has %x: not the same key", m.Key.Label, f, first.name, ff)
	}
	if m.KEK.Label != first.KEK.Label {
		return fmt.Errorf("KEK %q, not %q", m.KEK.Label, first.KEK.Label)
	}
	return nil
}

// newProbeCard makes the throwaway card on the first member, with the
// first profile of the key's kind that member runs.
func newProbeCard(ctx context.Context, m *member) (probeCard, error) {
	pub := m.Key.Public
	var errs []error
	for _, p := range protocol.Profiles() {
		if pub.Fits(p) != nil {
			continue
		}
		s, c, err := protocol.Encapsulate(p, pub, rand.Reader)
		if err != nil {
			return probeCard{}, err
		}
		ki, err := protocol.DeriveKey(p, s, protocol.Binding(p, pub.SPKI))
		if err != nil {
			return probeCard{}, err
		}
		blob, err := m.keys.Import(ctx, p, c)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", p.Name, err))
			continue
		}
		pc := probeCard{profile: p, c: c, blob: blob, id: []byte("bp-group-probe"), chal: make([]byte, 16)}
		rand.Read(pc.chal)
		if pc.mac, err = protocol.AuthMAC(ki, pc.id, pc.chal); err != nil {
			return probeCard{}, err
		}
		return pc, nil
	}
	return probeCard{}, fmt.Errorf("no profile imports a test card: %w", errors.Join(errs...))
}

// startDeadline bounds each call of the check at start, which may open
// the member's first sessions and log in (and, on SoftHSM2, copy the
// keys into session objects): generous, since nothing waits for it.
const startDeadline = 10 * time.Second

// same proves that m holds the group's keys with the throwaway card,
// each call within d.
func (g *Group) same(ctx context.Context, m *member, d time.Duration) error {
	pc := g.probe
	blob, err := call(ctx, d, func(ctx context.Context) (Blob, error) { return m.keys.Import(ctx, pc.profile, pc.c) })
	if err != nil {
		return fmt.Errorf("import of a test card failed: %w", err)
	}
	ok, err := call(ctx, d, func(ctx context.Context) (bool, error) { return m.keys.Verify(ctx, blob, pc.id, pc.chal, pc.mac) })
	if err != nil {
		return fmt.Errorf("verification of a test card failed: %w", err)
	}
	if !ok {
		return fmt.Errorf("its issuer private key %q gives a test card another K_I than its public key does (fingerprint %x): not the key it claims", m.Key.Label, m.Key.Fingerprint())
	}
	if blob.Scheme != pc.blob.Scheme || blob.Mechanism != pc.blob.Mechanism || !bytes.Equal(blob.Wrapped, pc.blob.Wrapped) {
		return fmt.Errorf("its KEK %q is not the group's: the same test key wrapped under it differs from the first member's", m.KEK.Label)
	}
	return nil
}

// Import derives a card's K_I from c on a healthy member and returns it
// wrapped under the KEK (see CardKeys.Import and Group).
func (g *Group) Import(ctx context.Context, p protocol.Profile, c []byte) (Blob, error) {
	return do(ctx, g, func(m *member) *atomic.Int64 { return &m.imports }, func(ctx context.Context, m *member) (Blob, error) {
		return m.keys.Import(ctx, p, c)
	})
}

// Verify checks a card's MAC on a healthy member (see CardKeys.Verify).
func (g *Group) Verify(ctx context.Context, blob Blob, id, challenge, mac []byte) (bool, error) {
	return do(ctx, g, func(m *member) *atomic.Int64 { return &m.verifies }, func(ctx context.Context, m *member) (bool, error) {
		return m.keys.Verify(ctx, blob, id, challenge, mac)
	})
}

// do runs op on the healthy members until one answers without a device
// failure, and counts the answer in the member's counter. A request the
// member refuses (a c it will not decapsulate, a blob it will not
// unwrap) is asked once more of another member: a record is refused
// only if two members refuse it, so a member that fails in ways that
// look like refusals (CKR_GENERAL_ERROR, CKR_FUNCTION_FAILED) rejects no
// good record; a forged record costs two token calls and takes no
// member out.
func do[T any](ctx context.Context, g *Group, counter func(*member) *atomic.Int64, op func(context.Context, *member) (T, error)) (T, error) {
	if len(g.members) == 1 {
		// Nothing to fail over to: no deadline (it would only turn a
		// slow answer into an error) and no taking out. A device failure
		// is tried once more, in a new session: behind one slot of a
		// CloudHSM cluster it may land on another HSM, and redoing the
		// chain from its input is what a cluster needs (its session
		// objects live on one HSM).
		m := g.members[0]
		v, err := op(ctx, m)
		if err != nil && ctx.Err() == nil && Unavailable(err) && !errors.Is(err, ErrClosed) {
			g.failovers.Add(1)
			v, err = op(ctx, m)
		}
		if err == nil {
			counter(m).Add(1)
		}
		return v, err
	}
	var zero T
	var tried []*member
	var refused error
	for {
		m := g.pick(tried)
		if m == nil {
			if refused != nil {
				return zero, refused
			}
			return zero, g.noMember()
		}
		if len(tried) > 0 && refused == nil {
			g.failovers.Add(1)
		}
		v, err := run(ctx, m, g.deadline, op)
		if err == nil {
			counter(m).Add(1)
			return v, nil
		}
		if ctx.Err() != nil || (refused != nil && !Unavailable(err)) {
			return v, err
		}
		tried = append(tried, m)
		if Unavailable(err) {
			g.takeOut(m, err)
		} else {
			refused = err
		}
	}
}

// run runs op on m within d, once a slot of m's sessions is free. The
// wait for the slot is not under the deadline (a busy member is not a
// failed one); it ends when m is taken out. The slot is given back when
// op really returns: a call left at its deadline still holds its
// session.
func run[T any](ctx context.Context, m *member, d time.Duration, op func(context.Context, *member) (T, error)) (T, error) {
	var zero T
	m.inflight.Add(1)
	if err := m.acquire(ctx); err != nil {
		m.inflight.Add(-1)
		return zero, err
	}
	return call(ctx, d, func(ctx context.Context) (T, error) {
		defer func() { <-m.slots; m.inflight.Add(-1) }()
		return op(ctx, m)
	})
}

// errOut ends a wait for a slot of a member taken out meanwhile.
var errOut = errors.New("the token group member was taken out while the call waited for one of its sessions")

// acquire takes a slot of m's sessions, waiting for as long as ctx
// allows while m stays up.
func (m *member) acquire(ctx context.Context) error {
	select {
	case m.slots <- struct{}{}:
		return nil
	default:
	}
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case m.slots <- struct{}{}:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			if !m.isUp() {
				return errOut
			}
		}
	}
}

// call runs fn with a deadline (none if d < 0). On timeout fn is left to
// finish on its own (a PKCS#11 call cannot be interrupted); its context
// is cancelled, so it waits for no session, and its result is dropped.
func call[T any](ctx context.Context, d time.Duration, fn func(context.Context) (T, error)) (T, error) {
	if d < 0 {
		return fn(ctx)
	}
	type result struct {
		v   T
		err error
	}
	cctx, cancel := context.WithCancel(ctx)
	ch := make(chan result, 1)
	go func() {
		v, err := fn(cctx)
		ch <- result{v, err}
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case r := <-ch:
		cancel()
		return r.v, r.err
	case <-t.C:
		cancel()
		var zero T
		return zero, fmt.Errorf("%w (%v)", ErrDeadline, d)
	case <-ctx.Done():
		cancel()
		var zero T
		return zero, ctx.Err()
	}
}

// pick is the healthy member not in tried with the least work in flight
// (ties in turn).
func (g *Group) pick(tried []*member) *member {
	n := len(g.members)
	start := int(g.rr.Add(1) % uint64(n))
	var best *member
	for i := range n {
		m := g.members[(start+i)%n]
		if !m.isUp() || slices.Contains(tried, m) {
			continue
		}
		if best == nil || m.inflight.Load() < best.inflight.Load() {
			best = m
		}
	}
	return best
}

func (m *member) isUp() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.up
}

// noMember says why every member is out.
func (g *Group) noMember() error {
	var why []string
	for _, m := range g.members {
		m.mu.Lock()
		if !m.up {
			why = append(why, fmt.Sprintf("%q out since %s: %v", m.name, m.since.UTC().Format(time.RFC3339), m.reason))
		}
		m.mu.Unlock()
	}
	return fmt.Errorf("%w (%s); each is re-probed every %v", ErrNoMember, strings.Join(why, "; "), g.probeEvery)
}

// takeOut marks m out for err and starts its re-probing, once.
func (g *Group) takeOut(m *member, err error) {
	m.mu.Lock()
	if !m.up {
		m.mu.Unlock()
		return
	}
	m.up, m.since, m.reason = false, time.Now(), err
	m.mu.Unlock()
	m.downs.Add(1)
	if pinRefused(err) {
		g.log.Error(pinStop, "member", m.name, "reason", err)
		return
	}
	g.log.Error("token group member taken out; its work goes to the others", "member", m.name, "reason", err)
	g.closeMu.Lock()
	defer g.closeMu.Unlock()
	if g.closed {
		return
	}
	g.wg.Add(1)
	go g.reprobe(m)
}

// reprobe probes m every probeEvery until it gives the throwaway card
// the group's blob again (or the group is closed), then lets it rejoin.
func (g *Group) reprobe(m *member) {
	defer g.wg.Done()
	t := time.NewTicker(g.probeEvery)
	defer t.Stop()
	for {
		select {
		case <-g.probeCtx.Done():
			return
		case <-t.C:
		}
		err := g.rejoinable(m)
		if err == nil {
			m.mu.Lock()
			out := time.Since(m.since)
			m.up, m.since, m.reason = true, time.Now(), nil
			m.mu.Unlock()
			g.log.Info("token group member back: it answered the probe with the group's keys", "member", m.name, "out_for", out.Round(time.Millisecond))
			return
		}
		m.mu.Lock()
		m.reason = err
		m.mu.Unlock()
		if pinRefused(err) {
			g.log.Error(pinStop, "member", m.name, "reason", err)
			return
		}
	}
}

// rejoinable probes m with the throwaway card; a pending member is
// opened first, and its first probe is given startDeadline a call, as
// at start (opening logs in, the first calls make session copies).
func (g *Group) rejoinable(m *member) error {
	ctx := g.probeCtx
	m.mu.Lock()
	pending := m.keys == nil
	m.mu.Unlock()
	d := g.deadline
	if pending || d < 0 {
		// A probe has a deadline even without one for the work: a hung
		// probe would hold Close up.
		d = startDeadline
	}
	if pending {
		mm, err := call(ctx, startDeadline, func(ctx context.Context) (Member, error) {
			mm, err := m.open(ctx)
			if err == nil && ctx.Err() != nil {
				// Opened after call gave up on it: nobody will use it.
				mm.Token.Close()
				return Member{}, ctx.Err()
			}
			return mm, err
		})
		if err != nil {
			return err
		}
		if err := complete(mm); err != nil {
			if mm.Token != nil {
				mm.Token.Close()
			}
			return err
		}
		if err := g.sameNames(&member{Member: mm}); err != nil {
			mm.Token.Close()
			return err
		}
		m.mu.Lock()
		m.Member, m.keys, m.slots = mm, g.keysOf(mm), slotsOf(mm)
		m.mu.Unlock()
	}
	return g.same(ctx, m, d)
}

// pinRefused reports whether err is the token refusing the PIN: trying
// again would only spend the token's retry counter and lock the PIN.
func pinRefused(err error) bool {
	rv, _ := RV(err)
	switch uint(rv) {
	case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_PIN_EXPIRED, pkcs11.CKR_PIN_INVALID, pkcs11.CKR_PIN_LEN_RANGE:
		return true
	}
	return false
}

// pinStop is the log line of a member whose token refuses its PIN: it
// stays out, and is not probed again.
const pinStop = "token group member out for good: its token refuses the PIN, and probing it again would spend the token's PIN retries; fix the member's pin-source and restart the issuer"

// Unavailable reports whether err says the token failed as a device —
// it is gone, broken, did not answer, or its sessions cannot be reopened
// — rather than refusing this one request. An import that fails so is
// not the record's fault: it must stop or go to another token, never
// become a reject.
func Unavailable(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, ErrDeadline) || errors.Is(err, ErrNoMember) || errors.Is(err, ErrClosed) || errors.Is(err, errTokenAbsent) || errors.Is(err, errOut) {
		return true
	}
	rv, ok := RV(err)
	if !ok {
		return false
	}
	switch uint(rv) {
	case pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_DEVICE_MEMORY,
		pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_TOKEN_NOT_RECOGNIZED, pkcs11.CKR_SLOT_ID_INVALID,
		pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_SESSION_COUNT,
		pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, pkcs11.CKR_USER_NOT_LOGGED_IN,
		pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_PIN_EXPIRED:
		return true
	}
	var ce *CallError
	if errors.As(err, &ce) {
		switch ce.Call {
		case "C_Initialize", "C_GetSlotList", "C_GetTokenInfo", "C_OpenSession", "C_Login":
			return true
		}
	}
	return false
}

// MemberStats is one member's state and work, for /metrics and probes.
type MemberStats struct {
	Name     string
	Up       bool
	Since    time.Time // of the last change of state
	Reason   string    // why it is out
	InFlight int64     // calls waiting for one of its sessions or in one
	Imports  int64     // imports it answered
	Verifies int64     // verifications it answered
	Downs    int64     // times it was taken out
	Recycle  RecycleStats
}

// Stats says how each member is, in the order given to NewGroup.
func (g *Group) Stats() []MemberStats {
	out := make([]MemberStats, len(g.members))
	for i, m := range g.members {
		m.mu.Lock()
		st := MemberStats{Name: m.name, Up: m.up, Since: m.since}
		if m.reason != nil {
			st.Reason = m.reason.Error()
		}
		keys := m.keys
		m.mu.Unlock()
		st.InFlight, st.Imports, st.Verifies, st.Downs = m.inflight.Load(), m.imports.Load(), m.verifies.Load(), m.downs.Load()
		if keys != nil {
			st.Recycle = keys.Stats()
		}
		out[i] = st
	}
	return out
}

// MemberRate is a member's rate of throwaway imports and verifications,
// one session each, as Group.Measure found it.
type MemberRate struct {
	Name              string
	Imports, Verifies float64 // per second
	Err               error   // the member failed the measure
}

// Measure runs the group's throwaway card through each member in turn,
// d for imports and d for verifications, one call at a time, and says each
// member's rate (issuer probe): what a member gives alone, to compare
// members and to size a group.
func (g *Group) Measure(ctx context.Context, d time.Duration) []MemberRate {
	if g.probe.c == nil {
		pc, err := newProbeCard(ctx, g.members[0])
		if err != nil {
			return []MemberRate{{Name: g.members[0].name, Err: err}}
		}
		g.probe = pc
	}
	pc := g.probe
	out := make([]MemberRate, len(g.members))
	for i, m := range g.members {
		r := MemberRate{Name: m.name}
		if !m.isUp() {
			r.Err = errors.New("out of the group")
			out[i] = r
			continue
		}
		r.Imports, r.Err = rate(ctx, d, func() error { _, err := m.keys.Import(ctx, pc.profile, pc.c); return err })
		if r.Err == nil {
			r.Verifies, r.Err = rate(ctx, d, func() error { _, err := m.keys.Verify(ctx, pc.blob, pc.id, pc.chal, pc.mac); return err })
		}
		out[i] = r
	}
	return out
}

func rate(ctx context.Context, d time.Duration, op func() error) (float64, error) {
	start := time.Now()
	n := 0
	for time.Since(start) < d && ctx.Err() == nil {
		if err := op(); err != nil {
			return 0, err
		}
		n++
	}
	return float64(n) / time.Since(start).Seconds(), ctx.Err()
}

// Members are the group's members that are open, in the order given to
// NewGroup (the pending ones last, once open).
func (g *Group) Members() []Member {
	var out []Member
	for _, m := range g.members {
		m.mu.Lock()
		if m.keys != nil {
			out = append(out, m.Member)
		}
		m.mu.Unlock()
	}
	return out
}

// Failovers counts the calls redone after a device failure: on another
// member, or, for a lone token, once more in a new session.
func (g *Group) Failovers() int64 { return g.failovers.Load() }

// RecycleStats sums the members' recycling counts and times; Every,
// Last and LastErr are the last member's that has them.
func (g *Group) RecycleStats() RecycleStats {
	var sum RecycleStats
	for _, m := range g.members {
		m.mu.Lock()
		keys := m.keys
		m.mu.Unlock()
		if keys == nil {
			continue
		}
		st := keys.Stats()
		sum.Every = st.Every
		sum.Ops += st.Ops
		sum.Recycles += st.Recycles
		sum.Failures += st.Failures
		if st.LastErr != nil {
			sum.LastErr = st.LastErr
		}
		sum.Last = st.Last
		sum.Max = max(sum.Max, st.Max)
		sum.Total += st.Total
	}
	return sum
}

// Close stops the re-probing and destroys every member's session copies
// (the Tokens stay open: they are the caller's).
func (g *Group) Close(ctx context.Context) error {
	g.closeMu.Lock()
	if !g.closed {
		g.closed = true
		g.cancelProbe()
	}
	g.closeMu.Unlock()
	g.wg.Wait()
	var errs []error
	for _, m := range g.members {
		if m.keys != nil { // the re-probing has stopped
			errs = append(errs, m.keys.Close(ctx))
		}
	}
	return errors.Join(errs...)
}
