package perso

import (
	"context"
	"errors"
	"time"

	"blindperso/card"
)

// Slot is one place a card sits while the station works on it: a PC/SC
// reader (PCSCSlot) or an in-process hopper position (LocalSlot). The
// station drives every kind through the same loop (Station.runSlot), so
// what tests and benchmarks measure in process is the station's own code.
type Slot interface {
	Name() string
	// Connect waits until a card is present and connects to it
	// exclusively. It returns ErrSlotGone when the slot disappeared (the
	// reader was unplugged, pcscd stopped, the hopper is empty) and
	// ctx.Err() when ctx ended.
	Connect(ctx context.Context) (Conn, error)
	// WaitRemoved waits until the card last connected is out of the slot,
	// so the same card is not taken twice.
	WaitRemoved(ctx context.Context) error
	// Close releases the slot's resources.
	Close()
}

// Conn is a connection to one card.
type Conn interface {
	card.Transmitter
	// Close releases the card, powered off, so the machine can eject it.
	Close() error
}

var (
	// ErrSlotGone: the slot disappeared; the station drops it (a watcher
	// brings it back when it reappears).
	ErrSlotGone = errors.New("slot is gone")
	// ErrCardRemoved: the card left the slot in the middle of its job.
	ErrCardRemoved = errors.New("card was removed")
	// ErrTimeout: an APDU or the whole card took longer than allowed.
	ErrTimeout = errors.New("card timed out")
	// ErrTransient: a communication error worth retrying with the card
	// still in the slot.
	ErrTransient = errors.New("transient card communication error")
)

// timed bounds each APDU by apdu and the whole card by deadline. A timed
// out Transmit is abandoned (it may still be blocked in the driver), and
// the slot is told through stuck so it can discard its handle.
type timed struct {
	t        card.Transmitter
	apdu     time.Duration
	deadline time.Time
	stuck    bool
}

func (t *timed) Transmit(capdu []byte) ([]byte, error) {
	if t.stuck {
		return nil, ErrTimeout
	}
	d := time.Until(t.deadline)
	if d <= 0 {
		return nil, ErrTimeout
	}
	if t.apdu > 0 && t.apdu < d {
		d = t.apdu
	}
	type result struct {
		b   []byte
		err error
	}
	testHooks.lock(capdu)
	ch := make(chan result, 1)
	go func() {
		b, err := t.t.Transmit(capdu)
		ch <- result{b, err}
	}()
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case r := <-ch:
		return r.b, r.err
	case <-timer.C:
		t.stuck = true
		return nil, ErrTimeout
	}
}
