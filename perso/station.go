// Package perso is the personalization station: the untrusted middle party
// of the paper. It sends the issuer's public key to each card, collects
// (Id, c) and locks the card once the record is durable. It holds no
// secret: everything it sees and writes is public.
package perso

import (
	"bytes"
	"errors"
	"fmt"
	"time"

	"blindperso/card"
	"blindperso/protocol"
)

// Record is what the station keeps of one card. Every field is public.
type Record struct {
	ID          protocol.Hex `json:"id"`
	C           protocol.Hex `json:"c"`
	Profile     string       `json:"profile"`
	Fingerprint protocol.Hex `json:"issuer_fingerprint"`
	Reader      string       `json:"reader,omitempty"`
	Time        time.Time    `json:"time"`
}

// Job is what every card of a run gets: one profile, one issuer key.
type Job struct {
	Profile protocol.Profile
	Key     *protocol.IssuerKey
}

// NewJob checks that key fits profile and, if expect is given, that the
// key's SHA-256 fingerprint is the one the operator expects.
func NewJob(p protocol.Profile, key *protocol.IssuerKey, expect []byte) (Job, error) {
	if err := key.Fits(p); err != nil {
		return Job{}, err
	}
	if fp := key.Fingerprint(); expect != nil && !bytes.Equal(fp[:], expect) {
		return Job{}, fmt.Errorf("issuer key fingerprint is %x, operator expects %x: refusing to personalize under this key", fp, expect)
	}
	return Job{Profile: p, Key: key}, nil
}

// ErrLocked reports a card that was already locked when it arrived.
var ErrLocked = errors.New("card is already locked")

// Store makes a record durable. The station calls it before LOCK: when it
// returns nil the record must survive a crash.
type Store func(Record) error

// Personalize takes one card from whatever state it is in to locked:
// a blank card is personalized; a personalized one (the station crashed
// before LOCK) has its c read back; a locked one is reported with
// ErrLocked and its Id. The record is stored before LOCK is sent.
func (j Job) Personalize(c *card.Client, reader string, store Store) (Record, error) {
	if err := c.Select(); err != nil {
		return Record{}, err
	}
	id, err := c.ID()
	if err != nil {
		return Record{}, err
	}
	fp := j.Key.Fingerprint()
	rec := Record{ID: id, Profile: j.Profile.Name, Fingerprint: fp[:], Reader: reader}
	st, err := c.Status()
	if err != nil {
		return rec, fmt.Errorf("card %X: %w", id, err)
	}
	switch st.State {
	case protocol.Locked:
		return rec, fmt.Errorf("card %X: %w", id, ErrLocked)
	case protocol.Personalized:
		if st.ProfileID != j.Profile.ID || st.Fingerprint != fp {
			return rec, fmt.Errorf("card %X was personalized under another profile or issuer key (profile id %#x, key %x): set it aside", id, st.ProfileID, st.Fingerprint)
		}
		rec.C, err = c.ReadCiphertext()
	default:
		rec.C, err = c.Personalize(j.Profile, j.Key.SPKI)
	}
	if err != nil {
		return rec, fmt.Errorf("card %X: %w", id, err)
	}
	if err := protocol.ValidCiphertext(j.Profile, j.Key, rec.C); err != nil {
		return rec, fmt.Errorf("card %X answered a malformed c: %w", id, err)
	}
	rec.Time = time.Now().UTC()
	if err := store(rec); err != nil {
		return rec, fmt.Errorf("card %X: store record (card left unlocked, c can be read back): %w", id, err)
	}
	if err := c.Lock(rec.C); err != nil {
		return rec, fmt.Errorf("card %X: %w", id, err)
	}
	return rec, nil
}
