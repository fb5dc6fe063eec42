// Package vpcd implements the virtual-card side of the vsmartcard "vpcd"
// reader driver protocol.
//
// The vpcd driver (libifdvpcd.so, loaded by pcscd) listens on a TCP port per
// reader slot. A virtual card is inserted by connecting to that port and
// removed by closing the connection. Both directions carry frames made of a
// 2-byte big-endian length followed by that many payload bytes. A 1-byte
// payload from the driver is a control code (see the Ctrl constants); any
// longer payload is a C-APDU that the card answers with an R-APDU frame.
// Only the get-ATR control code is answered (with the ATR as a frame).
//
// A Conn is one insertion: once Serve returns the connection is closed and
// the card is gone from the reader; Dial again to re-insert it.
package vpcd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"
)

// Card is the ICC behind a vpcd reader slot. Implementations are called from
// one goroutine.
//
// pcscd (1.9.9) powers the card on at each SCardConnect and off about 0.5 s
// after the last SCardDisconnect, and sends Reset for SCARD_RESET_CARD, so
// PowerOff/PowerOn/Reset should drop volatile state (selected application,
// secure channel) like a real card does.
type Card interface {
	// ATR returns the Answer To Reset. It is asked for every time pcscd
	// polls the slot (every 400 ms) and must not be empty.
	ATR() []byte
	PowerOn()
	PowerOff()
	Reset()
	// Transmit answers one C-APDU. capdu is owned by the card. The answer
	// must hold at least the status word and at most 65535 bytes.
	Transmit(capdu []byte) (rapdu []byte)
}

// Control codes sent by the driver as 1-byte frames.
const (
	CtrlPowerOff byte = 0
	CtrlPowerOn  byte = 1
	CtrlReset    byte = 2
	CtrlATR      byte = 4
)

// MaxFrame is the largest payload a frame can carry.
const MaxFrame = 0xFFFF

// ErrProtocol is wrapped by the errors Serve returns when the driver or the
// card breaks the protocol.
var ErrProtocol = errors.New("vpcd: protocol error")

// ErrDriverClosed is wrapped by the error Serve returns when the driver
// closed the connection (pcscd stopped, or the slot was torn down).
var ErrDriverClosed = errors.New("vpcd: connection closed by driver")

// Conn is a connection to one vpcd reader slot, i.e. one card insertion.
type Conn struct {
	nc       net.Conn
	raw      syscall.RawConn // nil unless nc is a socket
	quickAck bool

	closeOnce sync.Once
	closeErr  error
}

// dialRetry is the pause between connection attempts in Dial.
const dialRetry = 25 * time.Millisecond

// Dial connects to the vpcd driver slot listening at addr (e.g.
// "127.0.0.1:35963"), retrying until the driver listens or ctx ends. The
// connection has TCP_NODELAY set and TCP_QUICKACK re-armed around every read.
//
// Note that the driver accepts a new connection only when it polls the slot
// (every 400 ms) and that, with its listen backlog of 0, one further
// connection is accepted by the kernel while a card is already inserted: that
// card sits in the queue until the first one is removed.
func Dial(ctx context.Context, addr string) (*Conn, error) {
	var d net.Dialer
	for {
		nc, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			return NewConn(nc), nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("vpcd: dial %s: %w (last error: %v)", addr, ctx.Err(), err)
		}
		t := time.NewTimer(dialRetry)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("vpcd: dial %s: %w (last error: %v)", addr, ctx.Err(), err)
		case <-t.C:
		}
	}
}

// NewConn wraps an established connection to a vpcd driver slot. For a TCP
// connection it sets TCP_NODELAY and enables TCP_QUICKACK re-arming.
func NewConn(nc net.Conn) *Conn {
	c := &Conn{nc: nc, quickAck: true}
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
		if raw, err := tc.SyscallConn(); err == nil {
			c.raw = raw
		}
	}
	return c
}

// SetQuickAck switches the TCP_QUICKACK re-arming on (the default) or off.
// Without it every APDU costs ~40 ms of delayed-ACK/Nagle interplay with the
// driver; the switch exists to measure that baseline. Call it before Serve.
func (c *Conn) SetQuickAck(on bool) { c.quickAck = on }

// Close closes the connection, which the driver sees as card removal.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() { c.closeErr = c.nc.Close() })
	return c.closeErr
}

func (c *Conn) armQuickAck() {
	if c.quickAck && c.raw != nil {
		setQuickAck(c.raw)
	}
}

// Serve answers the driver's requests with card until ctx is cancelled, the
// driver closes the connection or a protocol error occurs. It always closes
// the connection before returning (card removal). It returns nil when ctx was
// cancelled, an error wrapping ErrDriverClosed when the driver hung up, and an
// error wrapping ErrProtocol on a protocol violation. To remove the card,
// cancel ctx rather than calling Close (which makes Serve return an error).
func (c *Conn) Serve(ctx context.Context, card Card) (err error) {
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer func() {
		stop()
		c.Close()
		if ctx.Err() != nil {
			err = nil
		}
	}()

	r := bufio.NewReaderSize(c.nc, 4096)
	var hdr [2]byte
	var out []byte
	for {
		c.armQuickAck()
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return c.readErr(err, "frame header")
		}
		c.armQuickAck()
		n := int(binary.BigEndian.Uint16(hdr[:]))
		if n == 0 {
			return fmt.Errorf("%w: empty frame from driver", ErrProtocol)
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(r, payload); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return c.readErr(err, fmt.Sprintf("%d-byte frame", n))
		}

		var answer []byte
		if n == 1 {
			switch code := payload[0]; code {
			case CtrlPowerOff:
				card.PowerOff()
				continue
			case CtrlPowerOn:
				card.PowerOn()
				continue
			case CtrlReset:
				card.Reset()
				continue
			case CtrlATR:
				answer = card.ATR()
				if len(answer) == 0 {
					return fmt.Errorf("%w: card returned an empty ATR", ErrProtocol)
				}
			default:
				return fmt.Errorf("%w: unknown control code %d", ErrProtocol, code)
			}
		} else {
			answer = card.Transmit(payload)
			if len(answer) == 0 {
				// The driver would read a 0-length frame as card removal.
				return fmt.Errorf("%w: card returned an empty R-APDU", ErrProtocol)
			}
		}
		if len(answer) > MaxFrame {
			return fmt.Errorf("%w: card answer of %d bytes exceeds %d", ErrProtocol, len(answer), MaxFrame)
		}
		out = appendFrame(out[:0], answer)
		if _, err := c.nc.Write(out); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("vpcd: write answer: %w", err)
		}
	}
}

func (c *Conn) readErr(err error, what string) error {
	switch {
	case errors.Is(err, io.EOF):
		return fmt.Errorf("%w (reading %s)", ErrDriverClosed, what)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w in the middle of a %s", ErrDriverClosed, what)
	}
	return fmt.Errorf("vpcd: read %s: %w", what, err)
}

// appendFrame appends payload, prefixed by its 2-byte big-endian length, to
// dst. len(payload) must not exceed MaxFrame.
func appendFrame(dst, payload []byte) []byte {
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(payload)))
	return append(dst, payload...)
}
