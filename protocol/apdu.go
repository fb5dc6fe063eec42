package protocol

import "fmt"

// The card's command set; docs/PROTOCOL.md §4 is the normative text.

// AID is the applet's application identifier: F0 (proprietary, not
// registered) followed by "blindperso" and the applet major version 01.
var AID = []byte{0xF0, 'b', 'l', 'i', 'n', 'd', 'p', 'e', 'r', 's', 'o', 0x01}

// Class bytes.
const (
	CLAISO         = 0x00 // SELECT, GET RESPONSE
	CLAProprietary = 0x80 // the applet's own commands
	CLAChaining    = 0x10 // OR-ed into CLA: more command data follows
)

// Instruction bytes.
const (
	INSSelect         = 0xA4
	INSGetResponse    = 0xC0
	INSGetID          = 0x10
	INSGetStatus      = 0x12
	INSPersonalize    = 0x20
	INSReadCiphertext = 0x22
	INSLock           = 0x24
	INSAuthenticate   = 0x30
)

// MaxChainedData bounds the data a chained PERSONALIZE may carry: an
// RSA-4096 SubjectPublicKeyInfo is 550 bytes.
const MaxChainedData = 1024

// LifeCycle is the card's persistent state.
type LifeCycle byte

const (
	Blank        LifeCycle = 0x01 // manufactured: Id set, no key
	Personalized LifeCycle = 0x02 // K_I kept, c held for read-back
	Locked       LifeCycle = 0x03 // c erased; only AUTHENTICATE works
)

func (l LifeCycle) String() string {
	switch l {
	case Blank:
		return "blank"
	case Personalized:
		return "personalized"
	case Locked:
		return "locked"
	}
	return fmt.Sprintf("life-cycle(0x%02X)", byte(l))
}

// MarshalText encodes the life cycle by name.
func (l LifeCycle) MarshalText() ([]byte, error) { return []byte(l.String()), nil }

// UnmarshalText decodes a life-cycle name.
func (l *LifeCycle) UnmarshalText(b []byte) error {
	for _, v := range []LifeCycle{Blank, Personalized, Locked} {
		if v.String() == string(b) {
			*l = v
			return nil
		}
	}
	return fmt.Errorf("unknown life cycle %q", b)
}

// AppletVersion is byte 0 of GET STATUS.
const AppletVersion = 0x01

// StatusLen is the length of the GET STATUS response:
//
//	version(1) ‖ life cycle(1) ‖ profile id(1) ‖ flags(1) ‖
//	SHA-256 of the personalizing SPKI(32) ‖ pinned fingerprint(32)
const StatusLen = 4 + 32 + 32

// StatusFlagPinned is set in the flags byte of GET STATUS when an issuer
// key fingerprint was pinned at manufacture.
const StatusFlagPinned = 0x01

// Status is the decoded GET STATUS response.
type Status struct {
	Version     byte
	State       LifeCycle
	ProfileID   byte // 0 while blank
	Pinned      bool
	Attested    bool     // the card has an attestation key (§10)
	Fingerprint [32]byte // of the key the card was personalized under; zero while blank
	PinnedKey   [32]byte // zero unless Pinned
}

// Marshal encodes s as the card sends it.
func (s Status) Marshal() []byte {
	b := make([]byte, 0, StatusLen)
	var flags byte
	if s.Pinned {
		flags |= StatusFlagPinned
	}
	if s.Attested {
		flags |= StatusFlagAttested
	}
	b = append(b, s.Version, byte(s.State), s.ProfileID, flags)
	b = append(b, s.Fingerprint[:]...)
	return append(b, s.PinnedKey[:]...)
}

// ParseStatus decodes a GET STATUS response.
func ParseStatus(b []byte) (Status, error) {
	if len(b) != StatusLen {
		return Status{}, fmt.Errorf("GET STATUS response is %d bytes, want %d", len(b), StatusLen)
	}
	s := Status{Version: b[0], State: LifeCycle(b[1]), ProfileID: b[2], Pinned: b[3]&StatusFlagPinned != 0,
		Attested: b[3]&StatusFlagAttested != 0}
	copy(s.Fingerprint[:], b[4:36])
	copy(s.PinnedKey[:], b[36:68])
	switch s.State {
	case Blank, Personalized, Locked:
	default:
		return Status{}, fmt.Errorf("GET STATUS: unknown life cycle 0x%02X", b[1])
	}
	return s, nil
}
