package card

import (
	"crypto/sha256"
	"errors"
	"fmt"

	"blindperso/internal/iso7816"
	"blindperso/protocol"
)

// Transmitter sends one C-APDU and returns the R-APDU. *scard.Card has this
// method; so does the value Applet.Local returns.
type Transmitter interface {
	Transmit(capdu []byte) ([]byte, error)
}

// TransmitFunc adapts a function to Transmitter.
type TransmitFunc func([]byte) ([]byte, error)

// Transmit calls f.
func (f TransmitFunc) Transmit(b []byte) ([]byte, error) { return f(b) }

// Local returns a Transmitter that calls the applet directly, in process:
// the same bytes a reader would carry, without PC/SC.
func (a *Applet) Local() Transmitter {
	return TransmitFunc(func(b []byte) ([]byte, error) { return a.Transmit(b), nil })
}

// Client speaks the blindperso command set to a card through any
// Transmitter: it chains long commands and collects long responses with
// GET RESPONSE. A card's refusal comes back as an error wrapping the
// iso7816.SW, so callers can tell one status word from another.
type Client struct {
	T Transmitter
}

// maxGetResponse bounds the GET RESPONSE loop against a card that never
// stops announcing more bytes.
const maxGetResponse = 64

// Exchange sends cmd and returns the whole response data.
func (c *Client) Exchange(cmd iso7816.Command) ([]byte, error) {
	var data []byte
	var sw iso7816.SW
	for _, link := range iso7816.Chain(cmd, protocol.CLAChaining) {
		var err error
		if data, sw, err = c.transmit(link); err != nil {
			return nil, err
		}
		if link.CLA&protocol.CLAChaining != 0 && sw != iso7816.SWOK {
			return nil, sw
		}
	}
	for range maxGetResponse {
		n, more := sw.Remaining()
		if !more {
			if sw != iso7816.SWOK {
				return nil, sw
			}
			return data, nil
		}
		next, sw2, err := c.transmit(iso7816.Command{CLA: protocol.CLAISO, INS: protocol.INSGetResponse, Ne: n})
		if err != nil {
			return nil, err
		}
		data, sw = append(data, next...), sw2
	}
	return nil, errors.New("card keeps announcing more response bytes")
}

func (c *Client) transmit(cmd iso7816.Command) ([]byte, iso7816.SW, error) {
	b, err := cmd.Bytes()
	if err != nil {
		return nil, 0, err
	}
	rb, err := c.T.Transmit(b)
	if err != nil {
		return nil, 0, err
	}
	r, err := iso7816.ParseResponse(rb)
	if err != nil {
		return nil, 0, err
	}
	return r.Data, r.SW, nil
}

func (c *Client) run(name string, cmd iso7816.Command) ([]byte, error) {
	data, err := c.Exchange(cmd)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return data, nil
}

func proprietary(ins, p1 byte, data []byte, ne int) iso7816.Command {
	return iso7816.Command{CLA: protocol.CLAProprietary, INS: ins, P1: p1, Data: data, Ne: ne}
}

// Select selects the blindperso applet without asking for its FCI.
func (c *Client) Select() error {
	_, err := c.run("SELECT", iso7816.Command{CLA: protocol.CLAISO, INS: protocol.INSSelect, P1: 0x04, P2: 0x0C, Data: protocol.AID})
	return err
}

// ID reads the card's identifier.
func (c *Client) ID() ([]byte, error) {
	id, err := c.run("GET ID", proprietary(protocol.INSGetID, 0, nil, 256))
	if err == nil && (len(id) == 0 || len(id) > protocol.MaxIDLen) {
		err = fmt.Errorf("GET ID: card id of %d bytes, want 1 to %d", len(id), protocol.MaxIDLen)
	}
	return id, err
}

// Status reads the card's life cycle and what it was personalized for.
func (c *Client) Status() (protocol.Status, error) {
	b, err := c.run("GET STATUS", proprietary(protocol.INSGetStatus, 0, nil, 256))
	if err != nil {
		return protocol.Status{}, err
	}
	return protocol.ParseStatus(b)
}

// Personalize sends the profile and the issuer key and returns c.
func (c *Client) Personalize(p protocol.Profile, spki []byte) ([]byte, error) {
	return c.run("PERSONALIZE", proprietary(protocol.INSPersonalize, p.ID, spki, 256))
}

// ReadCiphertext reads c back from a personalized, unlocked card.
func (c *Client) ReadCiphertext() ([]byte, error) {
	return c.run("READ CIPHERTEXT", proprietary(protocol.INSReadCiphertext, 0, nil, 256))
}

// Lock confirms that c is stored and closes personalization.
func (c *Client) Lock(ciphertext []byte) error {
	h := sha256.Sum256(ciphertext)
	_, err := c.run("LOCK", proprietary(protocol.INSLock, 0, h[:], 0))
	return err
}

// Authenticate returns the card's MAC over a challenge.
func (c *Client) Authenticate(challenge []byte) ([]byte, error) {
	mac, err := c.run("AUTHENTICATE", proprietary(protocol.INSAuthenticate, 0, challenge, 256))
	if err == nil && len(mac) != protocol.MACLen {
		err = fmt.Errorf("AUTHENTICATE: MAC of %d bytes, want %d", len(mac), protocol.MACLen)
	}
	return mac, err
}

// AttestationChain reads the card's certificate chain (card certificate
// first, DER each; PROTOCOL.md §10.3). A card without an attestation key
// answers 6A88.
func (c *Client) AttestationChain() ([][]byte, error) {
	b, err := c.run("GET ATTESTATION CHAIN", proprietary(protocol.INSGetAttestationChain, 0, nil, 256))
	if err != nil {
		return nil, err
	}
	return protocol.SplitChain(b)
}

// ReadAttestation reads the card's signature over its statement A
// (PROTOCOL.md §10.2), in the personalized state only.
func (c *Client) ReadAttestation() ([]byte, error) {
	return c.run("READ ATTESTATION", proprietary(protocol.INSReadAttestation, 0, nil, 256))
}
