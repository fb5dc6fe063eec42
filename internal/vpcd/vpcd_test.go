package vpcd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

var testATR = []byte{0x3B, 0x80, 0x80, 0x01, 0x01}

// recCard records what the driver asked of it and echoes C-APDUs with 90 00
// appended. A C-APDU starting with 0xEE gets an empty answer (a card bug).
type recCard struct {
	mu     sync.Mutex
	events []string
}

func (c *recCard) log(s string) {
	c.mu.Lock()
	c.events = append(c.events, s)
	c.mu.Unlock()
}

func (c *recCard) Events() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.events...)
}

func (c *recCard) ATR() []byte { c.log("atr"); return testATR }
func (c *recCard) PowerOn()    { c.log("on") }
func (c *recCard) PowerOff()   { c.log("off") }
func (c *recCard) Reset()      { c.log("reset") }
func (c *recCard) Transmit(capdu []byte) []byte {
	c.log(fmt.Sprintf("apdu %X", capdu))
	if capdu[0] == 0xEE {
		return nil
	}
	return append(append([]byte(nil), capdu...), 0x90, 0x00)
}

func frame(payload ...byte) []byte { return appendFrame(nil, payload) }

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// fakeDriver listens like the vpcd driver and returns the listener's address
// and a channel delivering the accepted connection.
func fakeDriver(t *testing.T) (string, <-chan net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(ch)
			return
		}
		t.Cleanup(func() { c.Close() })
		ch <- c
	}()
	return ln.Addr().String(), ch
}

func TestServe(t *testing.T) {
	apdu := []byte{0x00, 0xA4, 0x04, 0x00, 0x02, 0x3F, 0x00}
	tests := []struct {
		name      string
		writes    [][]byte // raw bytes written by the driver, one Write each
		chunk     int      // if > 0, split every write into chunks of this size
		wantReply []byte   // raw bytes the card must send back
		wantEvent []string
		wantErr   error  // errors.Is target
		wantText  string // substring of the error
	}{
		{
			name:      "power off",
			writes:    [][]byte{frame(CtrlPowerOff)},
			wantEvent: []string{"off"},
			wantErr:   ErrDriverClosed,
		},
		{
			name:      "power on",
			writes:    [][]byte{frame(CtrlPowerOn)},
			wantEvent: []string{"on"},
			wantErr:   ErrDriverClosed,
		},
		{
			name:      "reset",
			writes:    [][]byte{frame(CtrlReset)},
			wantEvent: []string{"reset"},
			wantErr:   ErrDriverClosed,
		},
		{
			name:      "get ATR",
			writes:    [][]byte{frame(CtrlATR)},
			wantReply: frame(testATR...),
			wantEvent: []string{"atr"},
			wantErr:   ErrDriverClosed,
		},
		{
			name:      "APDU",
			writes:    [][]byte{frame(apdu...)},
			wantReply: frame(append(append([]byte(nil), apdu...), 0x90, 0x00)...),
			wantEvent: []string{"apdu 00A40400023F00"},
			wantErr:   ErrDriverClosed,
		},
		{
			name:      "two-byte payload is an APDU",
			writes:    [][]byte{frame(0x01, 0x02)},
			wantReply: frame(0x01, 0x02, 0x90, 0x00),
			wantEvent: []string{"apdu 0102"},
			wantErr:   ErrDriverClosed,
		},
		{
			name: "several frames in one write",
			writes: [][]byte{cat(frame(CtrlATR), frame(CtrlPowerOff), frame(CtrlPowerOn),
				frame(CtrlATR), frame(apdu...), frame(CtrlReset), frame(0x80, 0xCA, 0x9F, 0x7F, 0x00))},
			wantReply: cat(frame(testATR...), frame(testATR...),
				frame(append(append([]byte(nil), apdu...), 0x90, 0x00)...),
				frame(0x80, 0xCA, 0x9F, 0x7F, 0x00, 0x90, 0x00)),
			wantEvent: []string{"atr", "off", "on", "atr", "apdu 00A40400023F00", "reset", "apdu 80CA9F7F00"},
			wantErr:   ErrDriverClosed,
		},
		{
			name:      "partial writes, one byte at a time",
			writes:    [][]byte{cat(frame(CtrlATR), frame(apdu...), frame(CtrlPowerOff))},
			chunk:     1,
			wantReply: cat(frame(testATR...), frame(append(append([]byte(nil), apdu...), 0x90, 0x00)...)),
			wantEvent: []string{"atr", "apdu 00A40400023F00", "off"},
			wantErr:   ErrDriverClosed,
		},
		{
			name:      "header split from payload",
			writes:    [][]byte{{0x00}, {0x07, 0x00, 0xA4}, {0x04, 0x00, 0x02, 0x3F}, {0x00}},
			wantReply: frame(append(append([]byte(nil), apdu...), 0x90, 0x00)...),
			wantEvent: []string{"apdu 00A40400023F00"},
			wantErr:   ErrDriverClosed,
		},
		{
			name: "large APDU",
			writes: [][]byte{frame(append([]byte{0x00, 0xDA, 0x01, 0x02, 0x00, 0x10, 0x00},
				bytes.Repeat([]byte{0x5A}, 0x1000)...)...)},
			chunk: 1000,
			wantReply: frame(append(append([]byte{0x00, 0xDA, 0x01, 0x02, 0x00, 0x10, 0x00},
				bytes.Repeat([]byte{0x5A}, 0x1000)...), 0x90, 0x00)...),
			wantEvent: []string{"apdu 00DA0102001000" + strings.Repeat("5A", 0x1000)},
			wantErr:   ErrDriverClosed,
		},
		{
			name:     "zero-length frame",
			writes:   [][]byte{{0x00, 0x00}},
			wantErr:  ErrProtocol,
			wantText: "empty frame",
		},
		{
			name:      "unknown control code",
			writes:    [][]byte{cat(frame(CtrlATR), frame(0x03))},
			wantReply: frame(testATR...),
			wantEvent: []string{"atr"},
			wantErr:   ErrProtocol,
			wantText:  "unknown control code 3",
		},
		{
			name:      "unknown control code 0xFF",
			writes:    [][]byte{frame(0xFF)},
			wantErr:   ErrProtocol,
			wantText:  "unknown control code 255",
			wantEvent: nil,
		},
		{
			name:      "card answers nothing",
			writes:    [][]byte{frame(0xEE, 0x00, 0x00, 0x00)},
			wantEvent: []string{"apdu EE000000"},
			wantErr:   ErrProtocol,
			wantText:  "empty R-APDU",
		},
		{
			name:     "driver closes mid-header",
			writes:   [][]byte{{0x00}},
			wantErr:  ErrDriverClosed,
			wantText: "middle of a frame header",
		},
		{
			name:     "driver closes mid-payload",
			writes:   [][]byte{{0x00, 0x05, 0x00, 0xA4}},
			wantErr:  ErrDriverClosed,
			wantText: "middle of a 5-byte frame",
		},
		{
			name:    "driver closes at once",
			wantErr: ErrDriverClosed,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			addr, accepted := fakeDriver(t)
			conn, err := Dial(ctx, addr)
			if err != nil {
				t.Fatal(err)
			}
			card := &recCard{}
			served := make(chan error, 1)
			go func() { served <- conn.Serve(ctx, card) }()
			drv := <-accepted
			if drv == nil {
				t.Fatal("fake driver did not accept")
			}

			for _, w := range tc.writes {
				chunk := tc.chunk
				if chunk <= 0 {
					chunk = len(w)
				}
				for len(w) > 0 {
					n := min(chunk, len(w))
					if _, err := drv.Write(w[:n]); err != nil {
						t.Fatalf("driver write: %v", err)
					}
					w = w[n:]
					if tc.chunk > 0 {
						time.Sleep(time.Millisecond)
					}
				}
			}
			got := make([]byte, len(tc.wantReply))
			drv.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(drv, got); err != nil {
				t.Fatalf("driver read reply: %v (got %X)", err, got)
			}
			if !bytes.Equal(got, tc.wantReply) {
				t.Errorf("reply = %X, want %X", got, tc.wantReply)
			}
			if tc.wantErr == ErrDriverClosed {
				// Let the card process everything before hanging up.
				drv.(*net.TCPConn).CloseWrite()
			}

			select {
			case err = <-served:
			case <-time.After(5 * time.Second):
				t.Fatal("Serve did not return")
			}
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("Serve() = %v, want %v", err, tc.wantErr)
			}
			if err != nil && !strings.Contains(err.Error(), tc.wantText) {
				t.Errorf("Serve() = %q, want it to contain %q", err, tc.wantText)
			}
			if ev := card.Events(); !slices.Equal(ev, tc.wantEvent) {
				t.Errorf("card events = %q, want %q", ev, tc.wantEvent)
			}
			// Whatever the outcome, the card must be gone: EOF, no stray bytes.
			rest, err := io.ReadAll(drv)
			if err != nil || len(rest) != 0 {
				t.Errorf("after Serve the driver read %X, %v; want EOF", rest, err)
			}
		})
	}
}

// TestRemovalOnCancel checks that cancelling Serve's context removes the card
// (the driver reads EOF) and that Serve then returns nil.
func TestRemovalOnCancel(t *testing.T) {
	for _, tc := range []struct {
		name     string
		quickAck bool
		pipe     bool
	}{
		{"tcp", true, false},
		{"tcp without quickack", false, false},
		{"net.Pipe", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var conn *Conn
			var drv net.Conn
			if tc.pipe {
				a, b := net.Pipe()
				conn, drv = NewConn(a), b
			} else {
				addr, accepted := fakeDriver(t)
				var err error
				if conn, err = Dial(ctx, addr); err != nil {
					t.Fatal(err)
				}
				drv = <-accepted
			}
			conn.SetQuickAck(tc.quickAck)
			served := make(chan error, 1)
			go func() { served <- conn.Serve(ctx, &recCard{}) }()

			// The card works ...
			if _, err := drv.Write(frame(CtrlATR)); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 2+len(testATR))
			if _, err := io.ReadFull(drv, got); err != nil || !bytes.Equal(got, frame(testATR...)) {
				t.Fatalf("ATR reply %X, %v", got, err)
			}
			// ... until it is pulled out.
			cancel()
			select {
			case err := <-served:
				if err != nil {
					t.Errorf("Serve() after cancel = %v, want nil", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Serve did not return after cancel")
			}
			drv.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := drv.Read(got); err != io.EOF {
				t.Errorf("driver read after removal = %d, %v; want EOF", n, err)
			}
			if err := conn.Close(); err != nil {
				t.Errorf("second Close = %v", err)
			}
		})
	}
}

// TestDialRetries checks that Dial waits for a driver that is not listening
// yet, and gives up when its context ends.
func TestDialRetries(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	t.Run("gives up", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		start := time.Now()
		c, err := Dial(ctx, addr)
		if err == nil {
			c.Close()
			t.Fatal("Dial succeeded without a listener")
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Dial error = %v, want DeadlineExceeded", err)
		}
		if d := time.Since(start); d < 90*time.Millisecond {
			t.Errorf("Dial gave up after %v, before its context ended", d)
		}
	})

	t.Run("waits for the listener", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		go func() {
			time.Sleep(150 * time.Millisecond)
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				t.Errorf("re-listen: %v", err)
				return
			}
			t.Cleanup(func() { ln.Close() })
			if c, err := ln.Accept(); err == nil {
				t.Cleanup(func() { c.Close() })
			}
		}()
		c, err := Dial(ctx, addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	})
}
