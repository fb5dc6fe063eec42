// Package perso is the personalization station: the untrusted middle party
// of the paper. It sends the issuer's public key to each card, collects
// (Id, c) and locks the card once the record is durable. It holds no
// secret: everything it sees and writes is public (docs/STATION.md).
package perso

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"time"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/internal/iso7816"
	"blindperso/protocol"
)

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

// Ledger is where records become durable: the Journal, or a test double.
type Ledger interface {
	// Commit returns nil only once rec survives a crash. The station
	// calls it before LOCK.
	Commit(rec batch.Record) error
	// Lookup returns the c on record for a card Id.
	Lookup(id []byte) (c []byte, ok bool)
}

// Outcome says how a card that ended locked got there.
type Outcome int

const (
	// Personalized: the card arrived blank and was personalized and locked.
	Personalized Outcome = iota + 1
	// Recovered: the card arrived personalized but unlocked (a crash, a
	// pulled card, a lost reader) and its c was read back and locked.
	Recovered
	// AlreadyDone: the card arrived locked and its record is in the batch.
	AlreadyDone
)

func (o Outcome) String() string {
	switch o {
	case Personalized:
		return "personalized"
	case Recovered:
		return "recovered"
	case AlreadyDone:
		return "already done"
	}
	return "?"
}

// Errors for cards the station sets aside. None stops the station.
var (
	// ErrLockedUnknown: the card is locked but its Id is not in the batch
	// (another batch, another station): its record is not ours to give.
	ErrLockedUnknown = errors.New("card is locked but not in this batch")
	// ErrForeign: the card was personalized under another profile or key.
	ErrForeign = errors.New("card was personalized under another profile or issuer key")
	// ErrBadCiphertext: the card answered a c of the wrong shape.
	ErrBadCiphertext = errors.New("card answered a malformed c")
	// ErrAttestation: the card says it has an attestation key (GET
	// STATUS) but its chain or its signature could not be read, or is not
	// of the shape a record carries. It is not recorded and not locked:
	// a record without the attestation the card has would be refused by
	// an issuer that requires it, and could not be told from a forgery.
	ErrAttestation = errors.New("card claims an attestation key, but its attestation could not be read")
	// ErrLockUnconfirmed: the record is durable and LOCK was sent, but its
	// answer was lost (pcscd or the reader went away, the card was pulled
	// or timed out under it): the card may be locked. If it shows up
	// locked later, this run locked it.
	ErrLockUnconfirmed = errors.New("LOCK sent but not confirmed")
)

// Personalize takes one card from whatever state it is in to locked
// (docs/PROTOCOL.md §7): a blank card is personalized; a personalized one
// has its c read back; a locked one must already be in the ledger. The
// record is committed before LOCK is sent, and LOCK carries SHA-256(c), so
// a card is locked only once its exact c is durable.
//
// An attested card (GET STATUS flag, PROTOCOL.md §10) has its chain read
// before PERSONALIZE (or READ CIPHERTEXT) and its signature after it; the
// record carries both, with the fingerprint and SHA-256(c) the card
// signed, and is committed with them before LOCK. If either cannot be
// read the card is set aside unrecorded and unlocked (ErrAttestation).
// Personalize does not check the signature: the station is untrusted and
// the issuer verifies it; CheckAttestation is the operator's early look.
//
// The returned record carries the card's Id as soon as it is known, also
// with an error, so failures can name the card.
func (j Job) Personalize(c *card.Client, reader string, l Ledger) (batch.Record, Outcome, error) {
	if err := c.Select(); err != nil {
		return batch.Record{}, 0, err
	}
	id, err := c.ID()
	if err != nil {
		return batch.Record{}, 0, err
	}
	fp := j.Key.Fingerprint()
	rec := batch.Record{V: batch.Version, ID: id, Profile: j.Profile.Name, Fingerprint: fp[:], Reader: reader}
	st, err := c.Status()
	if err != nil {
		return rec, 0, fmt.Errorf("card %x: %w", id, err)
	}
	outcome := Personalized
	switch st.State {
	case protocol.Locked:
		if st.ProfileID != j.Profile.ID || st.Fingerprint != fp {
			return rec, 0, fmt.Errorf("card %x: %w (profile id %#x, key %x)", id, ErrForeign, st.ProfileID, st.Fingerprint)
		}
		if _, ok := l.Lookup(id); !ok {
			return rec, 0, fmt.Errorf("card %x: %w: set it aside", id, ErrLockedUnknown)
		}
		return rec, AlreadyDone, nil
	case protocol.Personalized:
		if st.ProfileID != j.Profile.ID || st.Fingerprint != fp {
			return rec, 0, fmt.Errorf("card %x: %w (profile id %#x, key %x): set it aside", id, ErrForeign, st.ProfileID, st.Fingerprint)
		}
		outcome = Recovered
	case protocol.Blank:
	default:
		return rec, 0, fmt.Errorf("card %x reports life-cycle state %v", id, st.State)
	}
	var chain [][]byte
	if st.Attested {
		// Before PERSONALIZE: a blank card whose chain cannot be read
		// stays blank.
		if chain, err = c.AttestationChain(); err != nil {
			return rec, 0, fmt.Errorf("card %x: %w: %w; not recorded, not locked", id, ErrAttestation, err)
		}
	}
	if outcome == Recovered {
		rec.C, err = c.ReadCiphertext()
	} else {
		rec.C, err = c.Personalize(j.Profile, j.Key.SPKI)
	}
	if err != nil {
		return rec, 0, fmt.Errorf("card %x: %w", id, err)
	}
	if err := protocol.ValidCiphertext(j.Profile, j.Key, rec.C); err != nil {
		return rec, 0, fmt.Errorf("card %x: %w (%d bytes): %v; not recorded, not locked", id, ErrBadCiphertext, len(rec.C), err)
	}
	if st.Attested {
		sig, err := c.ReadAttestation()
		if err != nil {
			return rec, 0, fmt.Errorf("card %x: %w: %w; not recorded, not locked (its c can be read back)", id, ErrAttestation, err)
		}
		ch := sha256.Sum256(rec.C)
		a := &batch.Attestation{Fingerprint: fp[:], CSHA256: ch[:], Sig: sig}
		for _, cert := range chain {
			a.Chain = append(a.Chain, cert)
		}
		if err := a.Check(); err != nil {
			return rec, 0, fmt.Errorf("card %x: %w: %w; not recorded, not locked", id, ErrAttestation, err)
		}
		rec.Attestation = a
	}
	rec.Time = time.Now().UTC()
	if err := l.Commit(rec); err != nil {
		return rec, 0, fmt.Errorf("card %x: record not stored, card left unlocked (c can be read back): %w", id, err)
	}
	if err := c.Lock(rec.C); err != nil {
		if sw := iso7816.SW(0); errors.As(err, &sw) {
			return rec, 0, fmt.Errorf("card %x: recorded but %w", id, err) // refused: not locked
		}
		return rec, 0, fmt.Errorf("card %x: recorded but %w: %w", id, ErrLockUnconfirmed, err)
	}
	return rec, outcome, nil
}
