package perso

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/ebfe/scard"
)

// PCSC is the Source of PC/SC readers: a watcher, with its own scard
// context, lists the readers every slice (and at once when pcscd reports a
// reader added or removed) and hands every selected one to the station,
// which runs it in a goroutine with a context of its own (pcsc-lite's
// threading rules). When pcscd restarts, every context dies: the slots
// end, the watcher establishes a new context and the readers come back.
type PCSC struct {
	Select Selector
	Log    *slog.Logger
}

// pnp is pcsc-lite's pseudo reader whose state changes when a reader is
// added or removed.
const pnp = `\\?PnP?\Notification`

// slice bounds every blocking PC/SC wait: SCardCancel interrupts only a
// call already blocked, so a wait is cut into slices with ctx checked
// between them.
const slice = 500 * time.Millisecond

// Watch follows the readers until ctx ends.
func (p PCSC) Watch(ctx context.Context, add func(Slot)) error {
	log := p.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var sc *scard.Context
	defer func() {
		if sc != nil {
			sc.Release()
		}
	}()
	down := false
	rs := []scard.ReaderState{{Reader: pnp, CurrentState: scard.StateUnaware}}
	for ctx.Err() == nil {
		if sc == nil {
			c, err := scard.EstablishContext()
			if err != nil {
				if !down {
					log.Error("PC/SC unavailable; retrying (is pcscd running?)", "err", err)
					down = true
				}
				sleep(ctx, slice)
				continue
			}
			sc, down = c, false
			rs[0].CurrentState = scard.StateUnaware
		}
		names, err := sc.ListReaders()
		if err != nil && !errors.Is(err, scard.ErrNoReadersAvailable) {
			log.Warn("PC/SC: list readers failed; reconnecting", "err", err)
			sc.Release()
			sc = nil
			continue
		}
		for _, n := range p.Select.Filter(names) {
			add(&pcscSlot{name: n, log: log})
		}
		err = sc.GetStatusChange(rs, slice)
		switch {
		case err == nil:
			rs[0].CurrentState = rs[0].EventState
		case errors.Is(err, scard.ErrTimeout), errors.Is(err, scard.ErrUnknownReader):
			// ErrUnknownReader: this pcsc-lite has no PnP pseudo reader;
			// listing every slice still follows readers.
			if errors.Is(err, scard.ErrUnknownReader) {
				sleep(ctx, slice)
			}
		default:
			log.Warn("PC/SC: watch failed; reconnecting", "err", err)
			sc.Release()
			sc = nil
		}
	}
	return ctx.Err()
}

// pcscSlot is one PC/SC reader with its own context.
type pcscSlot struct {
	name string
	log  *slog.Logger
	sc   *scard.Context
}

func (s *pcscSlot) Name() string { return s.name }

func (s *pcscSlot) Close() {
	if s.sc != nil {
		s.sc.Release()
		s.sc = nil
	}
}

func (s *pcscSlot) context() (*scard.Context, error) {
	if s.sc == nil {
		sc, err := scard.EstablishContext()
		if err != nil {
			return nil, fmt.Errorf("PC/SC: establish context for %q: %w: %w", s.name, err, ErrSlotGone)
		}
		s.sc = sc
	}
	return s.sc, nil
}

// Connect waits for a card and connects to it exclusively. A sharing
// violation (another program holds the card) is waited out.
func (s *pcscSlot) Connect(ctx context.Context) (Conn, error) {
	for {
		sc, err := s.context()
		if err != nil {
			return nil, err
		}
		if err := s.wait(ctx, sc, scard.StatePresent); err != nil {
			return nil, err
		}
		h, err := sc.Connect(s.name, scard.ShareExclusive, scard.ProtocolAny)
		switch {
		case err == nil:
			return &pcscConn{h: h, slot: s}, nil
		case errors.Is(err, scard.ErrNoSmartcard), errors.Is(err, scard.ErrRemovedCard),
			errors.Is(err, scard.ErrSharingViolation), errors.Is(err, scard.ErrUnpoweredCard),
			errors.Is(err, scard.ErrUnresponsiveCard), errors.Is(err, scard.ErrResetCard):
			s.log.Debug("connect: card not ready; waiting", "reader", s.name, "err", err)
			sleep(ctx, 100*time.Millisecond)
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
		default:
			return nil, fmt.Errorf("PC/SC: connect to the card in %q: %w: %w", s.name, err, ErrSlotGone)
		}
	}
}

// WaitRemoved waits until the reader is empty.
func (s *pcscSlot) WaitRemoved(ctx context.Context) error {
	sc, err := s.context()
	if err != nil {
		return err
	}
	return s.wait(ctx, sc, scard.StateEmpty)
}

// wait blocks until the reader's state has flag set, in slices.
func (s *pcscSlot) wait(ctx context.Context, sc *scard.Context, flag scard.StateFlag) error {
	rs := []scard.ReaderState{{Reader: s.name, CurrentState: scard.StateUnaware}}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		err := sc.GetStatusChange(rs, slice)
		if err != nil && !errors.Is(err, scard.ErrTimeout) {
			return fmt.Errorf("PC/SC: watch reader %q: %w: %w", s.name, err, ErrSlotGone)
		}
		if rs[0].EventState&(scard.StateUnknown|scard.StateIgnore) != 0 {
			return fmt.Errorf("PC/SC: reader %q: %w", s.name, ErrSlotGone)
		}
		if rs[0].EventState&flag != 0 && rs[0].EventState&scard.StateUnavailable == 0 {
			return nil
		}
		rs[0].CurrentState = rs[0].EventState &^ scard.StateChanged
	}
}

// abandon drops the slot's context without waiting on it: a Transmit that
// timed out may hold it, and pcsc-lite serialises calls per context.
func (s *pcscSlot) abandon() {
	if sc := s.sc; sc != nil {
		s.sc = nil
		go sc.Release()
	}
}

// pcscConn maps PC/SC errors onto the station's: a removed card, and the
// errors a retry may cure.
type pcscConn struct {
	h         *scard.Card
	slot      *pcscSlot
	abandoned bool
}

func (c *pcscConn) Transmit(b []byte) ([]byte, error) {
	r, err := c.h.Transmit(b)
	if err != nil {
		return nil, classify(err)
	}
	if len(r) < 2 {
		// vpcd's driver (and some readers) answer an empty success when
		// the card vanished under the command.
		return nil, fmt.Errorf("%w: reader returned a %d-byte answer", ErrCardRemoved, len(r))
	}
	return r, nil
}

// Abandon is called when a Transmit timed out.
func (c *pcscConn) Abandon() {
	c.abandoned = true
	h := c.h
	go h.Disconnect(scard.ResetCard)
	c.slot.abandon()
}

// Close releases the card powered off: the feeder (or a real machine)
// takes that as the station being done with it.
func (c *pcscConn) Close() error { return c.disconnect(scard.UnpowerCard) }

// Leave releases the card as it is, powered, for another try: the station
// is not done with it.
func (c *pcscConn) Leave() error { return c.disconnect(scard.LeaveCard) }

func (c *pcscConn) disconnect(d scard.Disposition) error {
	if c.abandoned {
		return nil
	}
	err := c.h.Disconnect(d)
	if err != nil && (errors.Is(err, scard.ErrInvalidHandle) || errors.Is(err, scard.ErrNoService) ||
		errors.Is(err, scard.ErrServiceStopped) || errors.Is(err, scard.ErrReaderUnavailable)) {
		c.slot.Close()
	}
	return err
}

func classify(err error) error {
	switch {
	case errors.Is(err, scard.ErrRemovedCard), errors.Is(err, scard.ErrNoSmartcard):
		return fmt.Errorf("%w: %w", ErrCardRemoved, err)
	case errors.Is(err, scard.ErrResetCard), errors.Is(err, scard.ErrCommError),
		errors.Is(err, scard.ErrUnpoweredCard), errors.Is(err, scard.ErrNotTransacted),
		errors.Is(err, scard.ErrUnresponsiveCard), errors.Is(err, scard.ErrCommDataLost):
		return fmt.Errorf("%w: %w", ErrTransient, err)
	case errors.Is(err, scard.ErrNoService), errors.Is(err, scard.ErrServiceStopped),
		errors.Is(err, scard.ErrReaderUnavailable), errors.Is(err, scard.ErrUnknownReader),
		errors.Is(err, scard.ErrInvalidHandle):
		// pcscd or the reader went away: the card is as good as pulled,
		// and is finished when the reader comes back.
		return fmt.Errorf("%w: reader lost: %w", ErrCardRemoved, err)
	}
	return err
}
