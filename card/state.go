package card

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"blindperso/internal/atomicfile"
	"blindperso/protocol"
)

// stateFormat names the layout of a card's state file.
const stateFormat = "blindperso-vcard/1"

// state is what a real card keeps in EEPROM. It is the only place K_I
// lives on the card side.
type state struct {
	Format string       `json:"format"`
	ID     protocol.Hex `json:"id"`
	// Pinned is SHA-256 of the one issuer SubjectPublicKeyInfo this card
	// accepts, set at manufacture (§4.4's ROM mask). Empty: any key.
	Pinned    protocol.Hex       `json:"pinned_fingerprint,omitempty"`
	LifeCycle protocol.LifeCycle `json:"life_cycle"`
	// ProfileID and IssuerKey (the SPKI fingerprint) are kept after LOCK
	// so GET STATUS can say what the card was personalized for.
	ProfileID byte         `json:"profile_id,omitempty"`
	IssuerKey protocol.Hex `json:"issuer_fingerprint,omitempty"`
	KI        protocol.Hex `json:"k_i,omitempty"`
	// C is kept only between PERSONALIZE and LOCK, so a station that
	// crashed can read it back.
	C protocol.Hex `json:"c,omitempty"`
}

func (s *state) validate() error {
	if s.Format != stateFormat {
		return fmt.Errorf("format %q, want %q", s.Format, stateFormat)
	}
	if len(s.ID) == 0 || len(s.ID) > protocol.MaxIDLen {
		return fmt.Errorf("id of %d bytes, want 1 to %d", len(s.ID), protocol.MaxIDLen)
	}
	if len(s.Pinned) != 0 && len(s.Pinned) != 32 {
		return fmt.Errorf("pinned fingerprint of %d bytes, want 32", len(s.Pinned))
	}
	switch s.LifeCycle {
	case protocol.Blank:
		if len(s.KI) != 0 || len(s.C) != 0 {
			return errors.New("blank card holds key material")
		}
	case protocol.Personalized, protocol.Locked:
		if len(s.KI) != protocol.KeySize {
			return fmt.Errorf("%s card has a K_I of %d bytes", s.LifeCycle, len(s.KI))
		}
		if s.LifeCycle == protocol.Personalized && len(s.C) == 0 {
			return errors.New("personalized card has no c to read back")
		}
		if s.LifeCycle == protocol.Locked && len(s.C) != 0 {
			return errors.New("locked card still holds c")
		}
	default:
		return fmt.Errorf("unknown life cycle %d", s.LifeCycle)
	}
	return nil
}

func (s *state) load(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, s); err != nil {
		return fmt.Errorf("card state %s: %w", path, err)
	}
	if err := s.validate(); err != nil {
		return fmt.Errorf("card state %s: %w", path, err)
	}
	return nil
}

// writeState is how state reaches the file. Only the fuzz test replaces it
// (with a write that skips fsync, to run thousands of cards a second).
var writeState = atomicfile.Write
