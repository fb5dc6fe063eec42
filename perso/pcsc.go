package perso

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/ebfe/scard"

	"blindperso/card"
)

// Reader drives one PC/SC reader: it waits for a card, personalizes it,
// releases it (powered off, so the machine can eject it) and waits for the
// next. It has its own scard context, as pcsc-lite's threading rules ask.
type Reader struct {
	Name  string
	Job   Job
	Store Store
	Log   *slog.Logger
	// OnRecord, if set, is called after each card is locked.
	OnRecord func(Record)
}

// Run personalizes cards until count cards are locked (count ≤ 0: until
// ctx ends). Cards that arrive locked are skipped.
func (r *Reader) Run(ctx context.Context, count int) (done int, err error) {
	log := r.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	sc, err := scard.EstablishContext()
	if err != nil {
		return 0, fmt.Errorf("PC/SC: establish context (is pcscd running?): %w", err)
	}
	defer sc.Release()
	stop := context.AfterFunc(ctx, func() { sc.Cancel() })
	defer stop()

	for count <= 0 || done < count {
		if err := waitState(ctx, sc, r.Name, scard.StatePresent); err != nil {
			if ctx.Err() != nil {
				return done, nil
			}
			return done, err
		}
		rec, err := r.one(sc)
		switch {
		case err == nil:
			done++
			log.Info("card locked", "card", fmt.Sprintf("%X", []byte(rec.ID)), "reader", r.Name)
			if r.OnRecord != nil {
				r.OnRecord(rec)
			}
		case errors.Is(err, ErrLocked):
			log.Info("card already locked; skipping", "reader", r.Name, "err", err)
		default:
			log.Error("card failed", "reader", r.Name, "err", err)
		}
		if err := waitState(ctx, sc, r.Name, scard.StateEmpty); err != nil {
			if ctx.Err() != nil {
				return done, nil
			}
			return done, err
		}
	}
	return done, nil
}

func (r *Reader) one(sc *scard.Context) (Record, error) {
	h, err := sc.Connect(r.Name, scard.ShareExclusive, scard.ProtocolAny)
	if err != nil {
		return Record{}, fmt.Errorf("connect to card in %q: %w", r.Name, err)
	}
	defer h.Disconnect(scard.UnpowerCard)
	return r.Job.Personalize(&card.Client{T: h}, r.Name, r.Store)
}

// waitState blocks until the reader's state has flag set or ctx ends.
// SCardCancel only interrupts a call already blocked, so the wait is cut
// into short slices with ctx checked between them.
func waitState(ctx context.Context, sc *scard.Context, reader string, flag scard.StateFlag) error {
	rs := []scard.ReaderState{{Reader: reader, CurrentState: scard.StateUnaware}}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := sc.GetStatusChange(rs, 500*time.Millisecond); err != nil && !errors.Is(err, scard.ErrTimeout) {
			return fmt.Errorf("PC/SC: watch reader %q: %w", reader, err)
		}
		if rs[0].EventState&scard.StateUnknown != 0 {
			return fmt.Errorf("PC/SC: reader %q is gone", reader)
		}
		if rs[0].EventState&flag != 0 {
			return nil
		}
		rs[0].CurrentState = rs[0].EventState &^ scard.StateChanged
	}
}
