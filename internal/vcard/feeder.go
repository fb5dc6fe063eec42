// Package vcard puts virtual cards into a vpcd reader slot one after
// another, the way a perso machine's hopper feeds physical cards past a
// contact station.
package vcard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"blindperso/card"
	"blindperso/internal/vpcd"
	"blindperso/protocol"
)

// Feeder inserts cards into one reader slot in turn. A card is ejected
// (its connection closed: removal, for pcscd) once it is locked and the
// station has released it — pcscd powered it off or reset it after the
// station sent it an APDU — or once it has been locked for EjectAfter,
// whichever comes first.
//
// A card inserted already locked (put back after the driver dropped it, say
// after a pcscd restart) is not ejected on a power-off or reset the station
// did not cause (pcscd powers an idle card off on its own) nor after
// EjectAfter: the station must see it to learn that its LOCK went through.
// It is ejected once the station released it, or after 5×EjectAfter
// if the station never speaks to it.
type Feeder struct {
	Addr  string   // the vpcd slot, host:port
	Cards []string // state files, in feeding order
	// EjectAfter bounds how long a locked card stays in the reader when
	// the station does not release it. Zero means 2 s.
	EjectAfter time.Duration
	// Gap is the pause between one card's removal and the next one's
	// insertion, long enough for pcscd's presence poll (400 ms) to see the
	// reader empty. Zero means 500 ms.
	Gap time.Duration
	Log *slog.Logger
}

// Run feeds every card, skipping those already locked, and returns when
// all are done or ctx ends. A card whose session ends for another reason
// (the driver went away) is inserted again.
func (f *Feeder) Run(ctx context.Context) error {
	log := f.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	for i, path := range f.Cards {
		a, err := card.Open(path)
		if err != nil {
			return err
		}
		id := fmt.Sprintf("%x", a.ID())
		if a.LifeCycle() == protocol.Locked {
			log.Info("skip locked card", "card", id, "file", path)
			continue
		}
		if i > 0 {
			if err := sleep(ctx, or(f.Gap, 500*time.Millisecond)); err != nil {
				return nil
			}
		}
		for {
			log.Info("insert card", "card", id, "reader", f.Addr, "state", a.LifeCycle())
			err := f.serve(ctx, a)
			if ctx.Err() != nil {
				return nil
			}
			if err == nil {
				log.Info("eject card", "card", id, "state", a.LifeCycle())
				break
			}
			log.Warn("card session ended; inserting it again", "card", id, "err", err)
			if err := sleep(ctx, time.Second); err != nil {
				return nil
			}
		}
	}
	return nil
}

// serve keeps a in the reader until it is done (nil) or the connection
// fails (error).
func (f *Feeder) serve(ctx context.Context, a *card.Applet) error {
	conn, err := vpcd.Dial(ctx, f.Addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, eject := context.WithCancel(ctx)
	defer eject()
	w := &watched{Applet: a, released: make(chan struct{}, 1)}
	lockedAtInsert := a.LifeCycle() == protocol.Locked
	done := make(chan error, 1)
	go func() { done <- conn.Serve(ctx, w) }()

	var lockedTimer <-chan time.Time
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			if err == nil && ctx.Err() != nil {
				return nil // we ejected it
			}
			if err == nil {
				err = errors.New("reader closed the connection")
			}
			return err
		case <-w.released:
			if a.LifeCycle() == protocol.Locked && w.talked.Load() {
				eject()
			}
		case <-tick.C:
			if lockedTimer == nil && a.LifeCycle() == protocol.Locked {
				d := or(f.EjectAfter, 2*time.Second)
				if lockedAtInsert && !w.talked.Load() {
					d *= 5
				}
				lockedTimer = time.After(d)
			}
		case <-lockedTimer:
			eject()
		}
	}
}

// watched reports power-off and reset: the station letting the card go,
// if it talked to the card (talked) during this insertion.
type watched struct {
	*card.Applet
	released chan struct{}
	talked   atomic.Bool
}

func (w *watched) Transmit(capdu []byte) []byte {
	w.talked.Store(true)
	return w.Applet.Transmit(capdu)
}

func (w *watched) PowerOff() { w.Applet.PowerOff(); w.signal() }
func (w *watched) Reset()    { w.Applet.Reset(); w.signal() }

func (w *watched) signal() {
	select {
	case w.released <- struct{}{}:
	default:
	}
}

func or(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
