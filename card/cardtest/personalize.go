package cardtest

import (
	"fmt"
	"time"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/protocol"
)

// Personalize runs a blank in-process card through the station's one-card
// flow (SELECT, GET ID, PERSONALIZE, LOCK) under key and returns the
// record a station would write, without the station (so that the
// issuer's tests need no PC/SC stack).
func Personalize(a *card.Applet, p protocol.Profile, key *protocol.IssuerKey, reader string) (batch.Record, error) {
	if err := key.Fits(p); err != nil {
		return batch.Record{}, err
	}
	c := &card.Client{T: a.Local()}
	if err := c.Select(); err != nil {
		return batch.Record{}, err
	}
	id, err := c.ID()
	if err != nil {
		return batch.Record{}, err
	}
	ct, err := c.Personalize(p, key.SPKI)
	if err != nil {
		return batch.Record{}, fmt.Errorf("card %x: %w", id, err)
	}
	if err := protocol.ValidCiphertext(p, key, ct); err != nil {
		return batch.Record{}, fmt.Errorf("card %x: %w", id, err)
	}
	fp := key.Fingerprint()
	rec := batch.Record{V: batch.Version, ID: id, C: ct, Profile: p.Name, Fingerprint: fp[:], Reader: reader, Time: time.Now().UTC()}
	if err := c.Lock(ct); err != nil {
		return rec, fmt.Errorf("card %x: %w", id, err)
	}
	return rec, nil
}
