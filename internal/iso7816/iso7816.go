// Package iso7816 encodes and decodes short ISO/IEC 7816-4 APDUs and names
// the status words the applet uses. Extended length is not supported: the
// vpcd driver does not advertise it, so long data travels by command
// chaining and long responses by GET RESPONSE.
package iso7816

import (
	"errors"
	"fmt"
)

// SW is a status word (SW1 ‖ SW2).
type SW uint16

// Status words used by the applet (ISO/IEC 7816-4 §5.6).
const (
	SWOK                  SW = 0x9000
	SWBytesRemaining      SW = 0x6100 // low byte: how many (00 = 256 or more)
	SWMemoryFailure       SW = 0x6581
	SWWrongLength         SW = 0x6700
	SWLogicalChannel      SW = 0x6881
	SWSecureMessaging     SW = 0x6882
	SWLastCommandExpected SW = 0x6883
	SWChainingUnsupported SW = 0x6884
	SWSecurityStatus      SW = 0x6982
	SWConditionsNotMet    SW = 0x6985
	SWCommandNotAllowed   SW = 0x6986
	SWWrongData           SW = 0x6A80
	SWAppletNotFound      SW = 0x6A82
	SWNotEnoughMemory     SW = 0x6A84
	SWWrongP1P2           SW = 0x6A86
	SWDataNotFound        SW = 0x6A88
	SWINSNotSupported     SW = 0x6D00
	SWCLANotSupported     SW = 0x6E00
	SWUnknown             SW = 0x6F00
)

var swText = map[SW]string{
	SWOK:                  "success",
	SWMemoryFailure:       "memory failure (persistent write failed)",
	SWWrongLength:         "wrong length",
	SWLogicalChannel:      "logical channel not supported",
	SWSecureMessaging:     "secure messaging not supported",
	SWLastCommandExpected: "last command of the chain expected",
	SWChainingUnsupported: "command chaining not supported",
	SWSecurityStatus:      "security status not satisfied (issuer key is not the pinned one)",
	SWConditionsNotMet:    "conditions of use not satisfied (wrong life-cycle state)",
	SWCommandNotAllowed:   "command not allowed (applet not selected)",
	SWWrongData:           "incorrect data",
	SWAppletNotFound:      "applet not found",
	SWNotEnoughMemory:     "not enough memory",
	SWWrongP1P2:           "incorrect P1-P2",
	SWDataNotFound:        "referenced data not found (the card has no attestation key)",
	SWINSNotSupported:     "instruction not supported",
	SWCLANotSupported:     "class not supported",
	SWUnknown:             "no precise diagnosis",
}

func (sw SW) String() string {
	if sw&0xFF00 == SWBytesRemaining {
		return fmt.Sprintf("%04X (%d bytes remaining)", uint16(sw), remaining(sw))
	}
	if t, ok := swText[sw]; ok {
		return fmt.Sprintf("%04X (%s)", uint16(sw), t)
	}
	return fmt.Sprintf("%04X", uint16(sw))
}

func remaining(sw SW) int {
	if n := int(sw & 0xFF); n != 0 {
		return n
	}
	return 256
}

// Error makes a non-9000 status word usable as an error.
func (sw SW) Error() string { return "card answered " + sw.String() }

// Command is a decoded short C-APDU.
type Command struct {
	CLA, INS, P1, P2 byte
	Data             []byte
	// Ne is the maximum number of response bytes expected: 0 when Le is
	// absent, 1..256 otherwise (Le = 00 means 256).
	Ne int
}

// ErrExtendedLength is returned for extended-length APDUs, which the card
// does not support.
var ErrExtendedLength = errors.New("extended length APDUs are not supported")

// ParseCommand decodes the four short APDU cases of ISO/IEC 7816-3 §12.1.
func ParseCommand(b []byte) (Command, error) {
	if len(b) < 4 {
		return Command{}, fmt.Errorf("APDU of %d bytes is shorter than its header", len(b))
	}
	c := Command{CLA: b[0], INS: b[1], P1: b[2], P2: b[3]}
	body := b[4:]
	switch {
	case len(body) == 0: // case 1
	case len(body) == 1: // case 2: Le only
		c.Ne = ne(body[0])
	case body[0] == 0:
		// A zero first length byte with more bytes after it opens an
		// extended length field.
		return Command{}, ErrExtendedLength
	default:
		lc := int(body[0])
		switch len(body) {
		case 1 + lc: // case 3
		case 2 + lc: // case 4
			c.Ne = ne(body[1+lc])
		default:
			return Command{}, fmt.Errorf("Lc is %d but %d bytes follow", lc, len(body)-1)
		}
		c.Data = body[1 : 1+lc]
	}
	return c, nil
}

func ne(le byte) int {
	if le == 0 {
		return 256
	}
	return int(le)
}

// Bytes encodes c as a short APDU. It fails if the data exceeds 255 bytes
// or Ne exceeds 256.
func (c Command) Bytes() ([]byte, error) {
	if len(c.Data) > 255 {
		return nil, fmt.Errorf("command data of %d bytes needs chaining", len(c.Data))
	}
	if c.Ne < 0 || c.Ne > 256 {
		return nil, fmt.Errorf("Ne of %d does not fit a short APDU", c.Ne)
	}
	b := append(make([]byte, 0, 6+len(c.Data)), c.CLA, c.INS, c.P1, c.P2)
	if len(c.Data) > 0 {
		b = append(b, byte(len(c.Data)))
		b = append(b, c.Data...)
	}
	if c.Ne > 0 {
		b = append(b, byte(c.Ne)) // 256 wraps to 00, as it should
	}
	return b, nil
}

// Chain splits a command with long data into a chain of short commands:
// every one but the last has the chaining bit in CLA; only the last carries
// Ne.
func Chain(c Command, chainingBit byte) []Command {
	if len(c.Data) <= 255 {
		return []Command{c}
	}
	var out []Command
	data := c.Data
	for len(data) > 255 {
		out = append(out, Command{CLA: c.CLA | chainingBit, INS: c.INS, P1: c.P1, P2: c.P2, Data: data[:255]})
		data = data[255:]
	}
	last := c
	last.Data = data
	return append(out, last)
}

// Response is a decoded R-APDU.
type Response struct {
	Data []byte
	SW   SW
}

// ParseResponse splits an R-APDU into data and status word.
func ParseResponse(b []byte) (Response, error) {
	if len(b) < 2 {
		return Response{}, fmt.Errorf("response of %d bytes has no status word", len(b))
	}
	n := len(b) - 2
	return Response{Data: b[:n], SW: SW(b[n])<<8 | SW(b[n+1])}, nil
}

// Bytes encodes r as an R-APDU.
func (r Response) Bytes() []byte {
	out := append(make([]byte, 0, len(r.Data)+2), r.Data...)
	return append(out, byte(r.SW>>8), byte(r.SW))
}

// Remaining reports whether sw is 61xx and how many bytes it announces.
func (sw SW) Remaining() (int, bool) {
	if sw&0xFF00 != SWBytesRemaining {
		return 0, false
	}
	return remaining(sw), true
}
