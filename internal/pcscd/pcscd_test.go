package pcscd_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ebfe/scard"

	"blindperso/internal/pcscd"
	"blindperso/internal/vpcd"
)

// daemon is the private pcscd shared by all tests of this binary: libpcsclite
// reads PCSCLITE_CSOCK_NAME once per process, so every scard call here goes
// to the daemon TestMain started. It is nil with -short.
var daemon *pcscd.Daemon

func TestMain(m *testing.M) {
	os.Exit(pcscd.RunTests(m, &daemon))
}

func needDaemon(tb testing.TB) {
	tb.Helper()
	if daemon == nil {
		tb.Skip("no private pcscd (-short)")
	}
}

// testATR is a T=1 ATR: TS=3B, T0=8A (TD1 follows, 10 historical bytes),
// TD1=80 (TD2 follows), TD2=01 (T=1), "BLINDPERSO", TCK.
var testATR = withTCK([]byte{0x3B, 0x8A, 0x80, 0x01, 'B', 'L', 'I', 'N', 'D', 'P', 'E', 'R', 'S', 'O'})

func withTCK(atr []byte) []byte {
	var tck byte
	for _, b := range atr[1:] {
		tck ^= b
	}
	return append(atr, tck)
}

// echoCard answers 80 EC 00 00 Lc data [Le] with data 90 00, and every other
// command with 6D 00 (instruction not supported).
type echoCard struct {
	powerOns, powerOffs, resets, apdus atomic.Int32
}

func (c *echoCard) ATR() []byte { return testATR }
func (c *echoCard) PowerOn()    { c.powerOns.Add(1) }
func (c *echoCard) PowerOff()   { c.powerOffs.Add(1) }
func (c *echoCard) Reset()      { c.resets.Add(1) }
func (c *echoCard) Transmit(capdu []byte) []byte {
	c.apdus.Add(1)
	if len(capdu) > 5 && capdu[0] == 0x80 && capdu[1] == 0xEC {
		lc := int(capdu[4])
		if lc > 0 && len(capdu) >= 5+lc {
			return append(slices.Clone(capdu[5:5+lc]), 0x90, 0x00)
		}
	}
	return []byte{0x6D, 0x00}
}

var echoAPDU = []byte{0x80, 0xEC, 0x00, 0x00, 0x04, 0xCA, 0xFE, 0xBA, 0xBE, 0x00}
var echoAnswer = []byte{0xCA, 0xFE, 0xBA, 0xBE, 0x90, 0x00}

// insert puts card into slot of d and returns the function that pulls it out.
func insert(tb testing.TB, d *pcscd.Daemon, slot int, card vpcd.Card, quickAck bool) (remove func()) {
	tb.Helper()
	dialCtx, cancelDial := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancelDial()
	conn, err := vpcd.Dial(dialCtx, d.Addr(slot))
	if err != nil {
		tb.Fatal(err)
	}
	conn.SetQuickAck(quickAck)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- conn.Serve(ctx, card) }()
	var once sync.Once
	return func() {
		once.Do(func() {
			cancel()
			if err := <-served; err != nil {
				tb.Errorf("Serve: %v", err)
			}
		})
	}
}

func establish(tb testing.TB) *scard.Context {
	tb.Helper()
	ctx, err := scard.EstablishContext()
	if err != nil {
		tb.Fatalf("EstablishContext: %v", err)
	}
	tb.Cleanup(func() { ctx.Release() })
	return ctx
}

// waitCard waits until reader shows a card (present) or no card (!present)
// and returns the reader's ATR.
func waitCard(tb testing.TB, ctx *scard.Context, reader string, present bool) []byte {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	rs := []scard.ReaderState{{Reader: reader, CurrentState: scard.StateUnaware}}
	for {
		if err := ctx.GetStatusChange(rs, time.Until(deadline)); err != nil {
			tb.Fatalf("waiting for %q present=%v: %v (state %#x)", reader, present, err, rs[0].EventState)
		}
		state := rs[0].EventState &^ scard.StateChanged
		if (state&scard.StatePresent != 0) == present && state&scard.StateUnavailable == 0 {
			return rs[0].Atr
		}
		rs[0].CurrentState = state
	}
}

func TestListReaders(t *testing.T) {
	needDaemon(t)
	ctx := establish(t)
	readers, err := ctx.ListReaders()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{daemon.ReaderName(0), daemon.ReaderName(1)}
	if !slices.Equal(readers, want) {
		t.Errorf("readers = %q, want %q", readers, want)
	}
	if want[0] != "Virtual PCD 00 00" || want[1] != "Virtual PCD 00 01" {
		t.Errorf("ReaderName = %q", want)
	}
}

func TestConnectTransmit(t *testing.T) {
	needDaemon(t)
	ctx := establish(t)
	reader := daemon.ReaderName(0)
	card := &echoCard{}
	remove := insert(t, daemon, 0, card, true)
	defer func() {
		remove()
		waitCard(t, ctx, reader, false)
	}()

	if atr := waitCard(t, ctx, reader, true); !bytes.Equal(atr, testATR) {
		t.Errorf("reader ATR = % X, want % X", atr, testATR)
	}
	c, err := ctx.Connect(reader, scard.ShareExclusive, scard.ProtocolAny)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	defer c.Disconnect(scard.LeaveCard)
	if p := c.ActiveProtocol(); p != scard.ProtocolT1 {
		t.Errorf("active protocol = %v, want T=1 (%v)", p, scard.ProtocolT1)
	}
	st, err := c.Status()
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if st.Reader != reader || !bytes.Equal(st.Atr, testATR) {
		t.Errorf("Status = %q % X", st.Reader, st.Atr)
	}
	for i := range 3 {
		rsp, err := c.Transmit(echoAPDU)
		if err != nil {
			t.Fatalf("Transmit #%d: %v", i, err)
		}
		if !bytes.Equal(rsp, echoAnswer) {
			t.Errorf("Transmit #%d = % X, want % X", i, rsp, echoAnswer)
		}
	}
	rsp, err := c.Transmit([]byte{0x00, 0xB0, 0x00, 0x00, 0x00})
	if err != nil || !bytes.Equal(rsp, []byte{0x6D, 0x00}) {
		t.Errorf("Transmit(READ BINARY) = % X, %v; want 6D 00", rsp, err)
	}
	if card.powerOns.Load() == 0 {
		t.Error("card was never powered on")
	}
	if n := card.apdus.Load(); n != 4 {
		t.Errorf("card saw %d APDUs, want 4", n)
	}
}

func TestRemovalAndReinsertion(t *testing.T) {
	needDaemon(t)
	ctx := establish(t)
	reader := daemon.ReaderName(0)
	for round := range 2 {
		remove := insert(t, daemon, 0, &echoCard{}, true)
		waitCard(t, ctx, reader, true)
		c, err := ctx.Connect(reader, scard.ShareExclusive, scard.ProtocolAny)
		if err != nil {
			t.Fatalf("round %d: Connect: %v", round, err)
		}
		if rsp, err := c.Transmit(echoAPDU); err != nil || !bytes.Equal(rsp, echoAnswer) {
			t.Errorf("round %d: Transmit = % X, %v", round, rsp, err)
		}
		remove()
		waitCard(t, ctx, reader, false)
		if _, err := c.Transmit(echoAPDU); err == nil {
			t.Errorf("round %d: Transmit after removal succeeded", round)
		}
		c.Disconnect(scard.LeaveCard)
	}
	// The other slot was never touched.
	rs := []scard.ReaderState{{Reader: daemon.ReaderName(1), CurrentState: scard.StateUnaware}}
	if err := ctx.GetStatusChange(rs, 0); err != nil {
		t.Fatal(err)
	}
	if rs[0].EventState&scard.StateEmpty == 0 {
		t.Errorf("slot 1 state = %#x, want empty", rs[0].EventState)
	}
}

// opensc runs opensc-tool against the daemon d (its own process, so its own
// PCSCLITE_CSOCK_NAME) and returns the output.
func opensc(t *testing.T, d *pcscd.Daemon, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath("opensc-tool"); err != nil {
		t.Skip("opensc-tool missing (Debian package opensc)")
	}
	cmd := exec.Command("opensc-tool", args...)
	cmd.Env = append(os.Environ(), d.Env()) // the last PCSCLITE_CSOCK_NAME wins
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("opensc-tool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// echoHex is the opensc-tool -s argument for echoAPDU.
var echoHex = strings.ToUpper(hex.EncodeToString(echoAPDU))

func checkOpenscAnswer(t *testing.T, out string) {
	t.Helper()
	// opensc-tool -s prints "Sending: 80 EC ...", then
	// "Received (SW1=0x90, SW2=0x00):" and a hex dump of the data.
	if !strings.Contains(out, "Received (SW1=0x90, SW2=0x00)") || !strings.Contains(out, "CA FE BA BE") {
		t.Errorf("opensc-tool did not get the card's answer:\n%s", out)
	}
}

func TestOpenscTool(t *testing.T) {
	needDaemon(t)
	ctx := establish(t)
	remove := insert(t, daemon, 0, &echoCard{}, true)
	defer func() {
		remove()
		waitCard(t, ctx, daemon.ReaderName(0), false)
	}()
	waitCard(t, ctx, daemon.ReaderName(0), true)

	out := opensc(t, daemon, "-r", "0", "-s", echoHex)
	t.Logf("opensc-tool -r 0 -s %s:\n%s", echoHex, out)
	checkOpenscAnswer(t, out)
}

// TestSecondDaemon starts another private pcscd next to the shared one and
// checks that the two are isolated (a card in one is not seen by the other).
func TestSecondDaemon(t *testing.T) {
	needDaemon(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d2, err := pcscd.Start(ctx, t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := d2.Stop(); err != nil {
			t.Error(err)
		}
		// Stop leaves no pcscd behind: the ports are free again.
		for p := d2.BasePort; p < d2.BasePort+pcscd.Slots; p++ {
			if _, err := vpcd.Dial(canceled(), fmt.Sprintf("127.0.0.1:%d", p)); err == nil {
				t.Errorf("port %d still listens after Stop", p)
			}
		}
	}()
	if d2.BasePort == daemon.BasePort || d2.Socket == daemon.Socket {
		t.Fatalf("second daemon shares port/socket: %+v vs %+v", d2, daemon)
	}

	remove := insert(t, d2, 1, &echoCard{}, true)
	defer remove()
	// Insertion is seen at pcscd's next 400 ms poll: retry until then.
	var out string
	for deadline := time.Now().Add(5 * time.Second); ; {
		out = opensc(t, d2, "-l")
		if strings.Contains(out, "Yes") || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("opensc-tool -l on the second daemon:\n%s", out)
	if !strings.Contains(out, d2.ReaderName(1)) {
		t.Errorf("second daemon does not list %q", d2.ReaderName(1))
	}
	checkOpenscAnswer(t, opensc(t, d2, "-r", d2.ReaderName(1), "-s", echoHex))

	if out := opensc(t, daemon, "-l"); strings.Contains(out, "Yes") {
		t.Errorf("the shared daemon sees the second daemon's card:\n%s", out)
	}
}

func canceled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

// BenchmarkAPDURoundTrip measures one short APDU through
// scard -> pcscd -> vpcd driver -> vpcd.Conn -> card and back, with the
// TCP_QUICKACK re-arming on (slot 0) and off (slot 1, the baseline).
func BenchmarkAPDURoundTrip(b *testing.B) {
	for _, mode := range []struct {
		name     string
		slot     int
		quickAck bool
	}{
		{"quickack", 0, true},
		{"no-quickack", 1, false},
	} {
		b.Run(mode.name, func(b *testing.B) {
			needDaemon(b)
			ctx := establish(b)
			reader := daemon.ReaderName(mode.slot)
			remove := insert(b, daemon, mode.slot, &echoCard{}, mode.quickAck)
			defer func() {
				remove()
				waitCard(b, ctx, reader, false)
			}()
			waitCard(b, ctx, reader, true)
			c, err := ctx.Connect(reader, scard.ShareExclusive, scard.ProtocolAny)
			if err != nil {
				b.Fatalf("Connect: %v", err)
			}
			defer c.Disconnect(scard.LeaveCard)

			var rtts []time.Duration
			for b.Loop() {
				t0 := time.Now()
				rsp, err := c.Transmit(echoAPDU)
				rtts = append(rtts, time.Since(t0))
				if err != nil || !bytes.Equal(rsp, echoAnswer) {
					b.Fatalf("Transmit = % X, %v", rsp, err)
				}
			}
			slices.Sort(rtts)
			median := rtts[len(rtts)/2]
			b.ReportMetric(float64(median.Nanoseconds())/1e3, "median-µs/apdu")
			b.ReportMetric(float64(rtts[len(rtts)*99/100].Nanoseconds())/1e3, "p99-µs/apdu")
		})
	}
}

func TestStartPortBusy(t *testing.T) {
	needDaemon(t)
	d, err := pcscd.Start(context.Background(), t.TempDir(), daemon.BasePort+1)
	if err == nil {
		d.Stop()
		t.Fatal("Start on the shared daemon's port succeeded")
	}
	if want := fmt.Sprintf("vpcd port %d is not free", daemon.BasePort+1); !strings.Contains(err.Error(), want) {
		t.Errorf("Start error = %q, want it to contain %q", err, want)
	}
}
