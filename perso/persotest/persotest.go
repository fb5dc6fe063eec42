// Package persotest is the in-process transport of the perso station's
// tests and benchmarks: a hopper of applets fed to slots, as a perso
// machine's hopper feeds contact stations, with no PC/SC in between.
package persotest

import (
	"context"
	"fmt"

	"blindperso/card"
	"blindperso/perso"
)

// Hopper feeds in-process cards to LocalSlots, as a perso machine's hopper
// feeds cards to its contact stations: each slot takes the next card.
// Close it when the last card is in; slots then report perso.ErrSlotGone.
type Hopper chan LocalCard

// LocalCard is a card as the in-process transport sees it: the applet
// (or a test double wrapping one) and its power switch.
type LocalCard interface {
	card.Transmitter
	PowerOn()
	PowerOff()
}

// AppletCard adapts an applet to LocalCard.
func AppletCard(a *card.Applet) LocalCard { return appletCard{a} }

type appletCard struct{ a *card.Applet }

func (c appletCard) Transmit(b []byte) ([]byte, error) { return c.a.Transmit(b), nil }
func (c appletCard) PowerOn()                          { c.a.PowerOn() }
func (c appletCard) PowerOff()                         { c.a.PowerOff() }

// LocalSlots is a Source of n in-process slots fed by one hopper: the
// second reader transport, which calls the applet directly. It runs the
// same station code as PC/SC, so tests and benchmarks can drive 16 or
// more readers on one machine (Debian's vpcd offers two per pcscd).
type LocalSlots struct {
	N      int
	Hopper Hopper
	Prefix string // slot names are Prefix + index; default "local "
}

// Watch adds the n slots and returns.
func (l LocalSlots) Watch(ctx context.Context, add func(perso.Slot)) error {
	p := l.Prefix
	if p == "" {
		p = "local "
	}
	for i := range l.N {
		add(&localSlot{name: fmt.Sprintf("%s%02d", p, i), hopper: l.Hopper})
	}
	return nil
}

type localSlot struct {
	name   string
	hopper Hopper
	cur    LocalCard
}

func (s *localSlot) Name() string { return s.name }
func (s *localSlot) Close()       {}

// Connect takes the card still in the slot (a retry) or the next one.
func (s *localSlot) Connect(ctx context.Context) (perso.Conn, error) {
	if s.cur == nil {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case c, ok := <-s.hopper:
			if !ok {
				return nil, fmt.Errorf("%s: hopper empty: %w", s.name, perso.ErrSlotGone)
			}
			s.cur = c
		}
	}
	s.cur.PowerOn()
	return localConn{s.cur}, nil
}

// WaitRemoved ejects the card: the slot is free at once.
func (s *localSlot) WaitRemoved(context.Context) error {
	s.cur = nil
	return nil
}

type localConn struct{ c LocalCard }

func (c localConn) Transmit(b []byte) ([]byte, error) { return c.c.Transmit(b) }
func (c localConn) Close() error                      { c.c.PowerOff(); return nil }
