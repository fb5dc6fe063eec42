package perso

import (
	"context"
	"encoding/hex"
	"errors"
	"log/slog"
	"sync"
	"time"

	"blindperso/card"
	"blindperso/internal/iso7816"
)

// Source supplies slots. Watch calls add for every slot it finds — again
// and again if it likes: the station ignores slots it is already driving
// and starts a goroutine for each new one. Watch returns when ctx ends, or
// at once for a fixed set of slots.
type Source interface {
	Watch(ctx context.Context, add func(Slot)) error
}

// Station drives slots in parallel, one goroutine per slot, one card per
// slot at a time.
type Station struct {
	Job    Job
	Ledger Ledger
	Log    *slog.Logger
	// Count stops the station once this many cards were locked by this
	// run (personalized or recovered); 0 runs until ctx ends.
	Count int
	// APDUTimeout bounds one APDU, CardTimeout one card (0: 5 s, 30 s).
	APDUTimeout, CardTimeout time.Duration
	// Retries is how often a card that failed with a transient error is
	// tried again while it stays in the slot (0: 3).
	Retries int
	// Stats, if set, is kept up to date for a progress display.
	Stats *Stats

	mu       sync.Mutex
	running  map[string]bool
	done     int // cards locked this run
	inflight int
	stop     context.CancelFunc
	fatal    error
	wg       sync.WaitGroup
	pending  map[string]pendingCard // cards left mid-way, by hex Id
}

// pendingCard is a card this run left before it was seen locked.
type pendingCard struct {
	reader string
	// lockSent: the record was committed and LOCK sent, but its answer
	// was lost. If the card comes back locked, this run locked it.
	lockSent bool
}

// Run drives the slots src supplies until ctx ends (SIGINT/SIGTERM: each
// slot finishes the card in hand), Count is reached, or the ledger fails.
// For a fixed source it also returns once every slot is gone.
func (s *Station) Run(ctx context.Context, src Source) error {
	if s.Log == nil {
		s.Log = slog.New(slog.DiscardHandler)
	}
	if s.Stats == nil {
		s.Stats = NewStats()
	}
	s.running = map[string]bool{}
	s.pending = map[string]pendingCard{}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.stop = cancel
	werr := src.Watch(ctx, func(sl Slot) { s.add(ctx, sl) })
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fatal != nil {
		return s.fatal
	}
	if werr != nil && !errors.Is(werr, context.Canceled) {
		return werr
	}
	if len(s.pending) > 0 {
		for id, p := range s.pending {
			s.Log.Warn("card left personalized but unlocked; present it again to finish it", "card", id, "reader", p.reader)
		}
	}
	return nil
}

// Done is the number of cards locked by this run.
func (s *Station) Done() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.done
}

func (s *Station) add(ctx context.Context, sl Slot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running[sl.Name()] || ctx.Err() != nil {
		sl.Close()
		return
	}
	s.running[sl.Name()] = true
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer sl.Close()
		s.runSlot(ctx, sl)
		s.mu.Lock()
		delete(s.running, sl.Name())
		s.mu.Unlock()
	}()
}

// claim reserves one of Count's cards for the card just connected; false
// means the count is reached, or cannot be without the cards in hand.
func (s *Station) claim() (ok, finished bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Count > 0 && s.done >= s.Count {
		return false, true
	}
	if s.Count > 0 && s.done+s.inflight >= s.Count {
		return false, false
	}
	s.inflight++
	return true, false
}

func (s *Station) release(locked bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inflight--
	if locked {
		s.done++
		if s.Count > 0 && s.done >= s.Count {
			s.stop()
		}
	}
}

func (s *Station) runSlot(ctx context.Context, sl Slot) {
	name := sl.Name()
	log := s.Log.With("reader", name)
	s.Stats.SetReader(name, "waiting")
	defer s.Stats.SetReader(name, "gone")
	log.Info("reader ready")
	for ctx.Err() == nil {
		conn, err := sl.Connect(ctx)
		if err != nil {
			s.slotEnded(ctx, log, err)
			return
		}
		ok, finished := s.claim()
		if !ok {
			conn.Close()
			if finished {
				return
			}
			sleep(ctx, 100*time.Millisecond) // another reader may yet fail its card
			continue
		}
		locked, fatal := s.card(sl, conn, log)
		s.release(locked)
		if fatal != nil {
			s.mu.Lock()
			if s.fatal == nil {
				s.fatal = fatal
			}
			s.mu.Unlock()
			s.stop()
			return
		}
		s.Stats.SetReader(name, "waiting for removal")
		if err := sl.WaitRemoved(ctx); err != nil {
			s.slotEnded(ctx, log, err)
			return
		}
		s.Stats.SetReader(name, "waiting")
	}
}

func (s *Station) slotEnded(ctx context.Context, log *slog.Logger, err error) {
	switch {
	case ctx.Err() != nil:
	case errors.Is(err, ErrSlotGone):
		log.Warn("reader gone", "err", err)
	default:
		log.Error("reader failed", "err", err)
	}
}

// card runs one card to the end, retrying transient errors while the card
// stays in the slot. It closes conn. fatal is set when the ledger failed:
// the station must stop, since nothing more can be made durable.
func (s *Station) card(sl Slot, conn Conn, log *slog.Logger) (locked bool, fatal error) {
	retries := or(s.Retries, 3)
	for attempt := 0; ; attempt++ {
		start := time.Now()
		s.Stats.SetReader(sl.Name(), "working")
		t := &timed{t: conn, apdu: dur(s.APDUTimeout, 5*time.Second),
			deadline: start.Add(dur(s.CardTimeout, 30*time.Second))}
		rec, outcome, err := s.Job.Personalize(&card.Client{T: t}, sl.Name(), s.Ledger)
		if t.stuck {
			if st, ok := conn.(interface{ Abandon() }); ok {
				st.Abandon() // its Transmit may still be blocked in the driver
			}
		}
		retry := err != nil && !errors.Is(err, ErrCardRemoved) && !errors.Is(err, ErrJournalFailed) &&
			transient(err) && attempt < retries
		if l, ok := conn.(interface{ Leave() error }); ok && retry {
			// Not powered off: that tells the machine (and the feeder) the
			// station is done with the card, and it would eject it.
			l.Leave()
		} else {
			conn.Close()
		}
		id := hex.EncodeToString(rec.ID)
		if err == nil {
			p, wasPending := s.clearPending(id, log)
			switch {
			case outcome == AlreadyDone && wasPending && p.lockSent:
				// This run sent LOCK and lost its answer; the card was
				// unlocked when this run first saw it, so the LOCK was ours.
				log.Info("card locked", "card", id, "outcome", Recovered.String(), "lock_confirmed", true,
					"ms", time.Since(start).Milliseconds())
				s.Stats.Card(sl.Name(), id, Recovered.String())
				return true, nil
			case outcome == AlreadyDone:
				log.Info("card already locked and recorded; skipped", "card", id)
				s.Stats.Card(sl.Name(), id, "skipped")
				return false, nil
			default:
				if rec.Attestation != nil {
					// The operator's early look; the record stands as
					// the card gave it (docs/STATION.md).
					if aerr := CheckAttestation(rec); aerr != nil {
						log.Warn("attestation does not verify: recorded and locked as the card gave it; the issuer will refuse this record",
							"card", id, "err", aerr)
						s.Stats.Warning(sl.Name(), aerr)
					}
				}
				log.Info("card locked", "card", id, "outcome", outcome.String(), "attested", rec.Attestation != nil,
					"ms", time.Since(start).Milliseconds())
				s.Stats.Card(sl.Name(), id, outcome.String())
				return true, nil
			}
		}
		if errors.Is(err, ErrJournalFailed) {
			log.Error("journal failed: stopping; the card is left unlocked and will be read back", "card", id, "err", err)
			s.Stats.Error(sl.Name(), err)
			return false, err
		}
		s.Stats.Error(sl.Name(), err)
		if len(rec.ID) > 0 && !errors.Is(err, ErrForeign) && !errors.Is(err, ErrLockedUnknown) {
			s.setPending(id, sl.Name(), errors.Is(err, ErrLockUnconfirmed))
		}
		switch {
		case errors.Is(err, ErrCardRemoved):
			log.Warn("card pulled before it was locked; it is finished when it comes back", "card", id, "err", err)
			return false, nil
		case retry:
			log.Warn("transient error; trying the card again", "card", id, "attempt", attempt+1, "err", err)
			time.Sleep(time.Duration(50*(attempt+1)) * time.Millisecond)
			rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			c, cerr := sl.Connect(rctx)
			cancel()
			if cerr != nil {
				log.Error("card lost while retrying", "card", id, "err", cerr)
				return false, nil
			}
			conn = c
			continue
		default:
			log.Error("card set aside", "card", id, "err", err)
			return false, nil
		}
	}
}

func (s *Station) setPending(id, reader string, lockSent bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.pending[id]
	if !ok {
		p.reader = reader
	}
	p.lockSent = p.lockSent || lockSent // a LOCK once sent may have landed
	s.pending[id] = p
}

func (s *Station) clearPending(id string, log *slog.Logger) (pendingCard, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.pending[id]
	if ok {
		delete(s.pending, id)
		log.Info("card resumed", "card", id, "first_reader", p.reader)
	}
	return p, ok
}

// transient reports errors that another try may cure: timeouts, lost
// sessions, communication errors. A card's refusal (a status word) is not.
// 6986 (applet not selected) mid-card means the card was reset under us.
func transient(err error) bool {
	return errors.Is(err, ErrTimeout) || errors.Is(err, ErrTransient) ||
		errors.Is(err, iso7816.SWCommandNotAllowed)
}

func or(n, def int) int {
	if n > 0 {
		return n
	}
	return def
}

func dur(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
