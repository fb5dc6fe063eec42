package vcard_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ebfe/scard"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/hsm/hsmtest"
	"blindperso/internal/pcscd"
	"blindperso/internal/vcard"
	"blindperso/internal/vpcd"
	"blindperso/perso"
	"blindperso/protocol"
)

var daemon *pcscd.Daemon

func TestMain(m *testing.M) {
	code := pcscd.RunTests(m, &daemon)
	hsmtest.Cleanup()
	os.Exit(code)
}

func need(t testing.TB) {
	t.Helper()
	if daemon == nil {
		t.Skip("needs a private pcscd (not with -short)")
	}
}

// insert puts a into slot and returns the function that removes it and
// waits until pcscd has seen the reader empty.
func insert(t testing.TB, slot int, a vpcd.Card) func() {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := vpcd.Dial(ctx, daemon.Addr(slot))
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- conn.Serve(sctx, a) }()
	var once sync.Once
	remove := func() {
		once.Do(func() {
			stop()
			if err := <-done; err != nil {
				t.Errorf("vpcd Serve: %v", err)
			}
			waitEmpty(t, daemon.ReaderName(slot))
		})
	}
	t.Cleanup(remove)
	return remove
}

func waitEmpty(t testing.TB, reader string) {
	sc, err := scard.EstablishContext()
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Release()
	rs := []scard.ReaderState{{Reader: reader, CurrentState: scard.StateUnaware}}
	deadline := time.Now().Add(10 * time.Second)
	for rs[0].EventState&scard.StateEmpty == 0 {
		if err := sc.GetStatusChange(rs, time.Until(deadline)); err != nil {
			t.Fatalf("wait for %q to be empty: %v", reader, err)
		}
		rs[0].CurrentState = rs[0].EventState &^ scard.StateChanged
	}
}

// connect waits for a card in reader and connects to it exclusively.
func connect(t testing.TB, sc *scard.Context, reader string) *scard.Card {
	t.Helper()
	rs := []scard.ReaderState{{Reader: reader, CurrentState: scard.StateUnaware}}
	deadline := time.Now().Add(10 * time.Second)
	for rs[0].EventState&scard.StatePresent == 0 {
		if err := sc.GetStatusChange(rs, time.Until(deadline)); err != nil {
			t.Fatalf("wait for a card in %q: %v", reader, err)
		}
		rs[0].CurrentState = rs[0].EventState &^ scard.StateChanged
	}
	h, err := sc.Connect(reader, scard.ShareExclusive, scard.ProtocolAny)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Disconnect(scard.UnpowerCard) })
	return h
}

func vectors(t testing.TB) []protocol.Vector {
	t.Helper()
	vs, err := protocol.ReadVectors("../../testdata/vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	return vs
}

// The whole card command set through the real stack: scard → pcscd →
// vpcd driver → vpcd.Conn → applet. The card is fed each profile's vector
// randomness, so c and the MAC must be the vector's exactly.
func TestCardThroughPCSC(t *testing.T) {
	need(t)
	sc, err := scard.EstablishContext()
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Release()
	seen := map[string]bool{}
	for _, v := range vectors(t) {
		if seen[v.Profile] {
			continue // one per profile keeps the test short
		}
		seen[v.Profile] = true
		t.Run(v.Name, func(t *testing.T) {
			a, err := card.Manufacture(filepath.Join(t.TempDir(), "card.json"), card.Options{ID: v.CardID})
			if err != nil {
				t.Fatal(err)
			}
			a.SetRand(bytes.NewReader(v.CardRand))
			remove := insert(t, 0, a)
			h := connect(t, sc, daemon.ReaderName(0))
			if p := h.ActiveProtocol(); p != scard.ProtocolT1 {
				t.Errorf("active protocol %v, want T=1", p)
			}
			c := &card.Client{T: h}
			p, _ := protocol.ProfileByName(v.Profile)
			must(t, c.Select())
			id, err := c.ID()
			must(t, err)
			if !bytes.Equal(id, v.CardID) {
				t.Fatalf("GET ID = %x", id)
			}
			ct, err := c.Personalize(p, v.IssuerSPKI)
			must(t, err)
			if !bytes.Equal(ct, v.C) {
				t.Fatalf("PERSONALIZE answered %x, want the vector's c", ct)
			}
			back, err := c.ReadCiphertext()
			must(t, err)
			if !bytes.Equal(back, v.C) {
				t.Fatal("READ CIPHERTEXT differs from c")
			}
			must(t, c.Lock(ct))
			mac, err := c.Authenticate(v.Challenge)
			must(t, err)
			if !bytes.Equal(mac, v.MAC) {
				t.Fatalf("AUTHENTICATE answered %x, want %x", mac, v.MAC)
			}
			st, err := c.Status()
			must(t, err)
			if st.State != protocol.Locked || a.LifeCycle() != protocol.Locked {
				t.Fatalf("card is %v after LOCK", st.State)
			}
			h.Disconnect(scard.UnpowerCard)
			remove()
		})
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// An independent PC/SC client — OpenSC's opensc-tool — selects the applet
// and gets the FCI of docs/PROTOCOL.md §6.3, then reads the Id.
func TestOpenscToolSelects(t *testing.T) {
	need(t)
	tool, err := exec.LookPath("opensc-tool")
	if err != nil {
		t.Fatal("opensc-tool not found: install Debian's opensc (make deps)")
	}
	a, err := card.Manufacture(filepath.Join(t.TempDir(), "card.json"), card.Options{ID: []byte{0xB1, 0, 0, 0, 0, 0, 0, 0x2A}})
	if err != nil {
		t.Fatal(err)
	}
	insert(t, 1, a)
	sc, err := scard.EstablishContext()
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Release()
	connect(t, sc, daemon.ReaderName(1)).Disconnect(scard.LeaveCard)

	aid := strings.ToUpper(hex.EncodeToString(protocol.AID))
	sel := "00A404000C" + aid + "00"
	cmd := exec.Command(tool, "-r", daemon.ReaderName(1), "-s", sel, "-s", "8010000000")
	cmd.Env = append(os.Environ(), daemon.Env())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("opensc-tool: %v\n%s", err, out)
	}
	text := string(out)
	fci := spaced("6F0E840C" + aid)
	if !strings.Contains(text, "Received (SW1=0x90, SW2=0x00)") || !strings.Contains(text, fci) {
		t.Fatalf("opensc-tool did not get the FCI %s with 9000:\n%s", fci, text)
	}
	if !strings.Contains(text, "B1 00 00 00 00 00 00 2A") {
		t.Fatalf("opensc-tool did not read the card Id:\n%s", text)
	}
}

// spaced writes hex as opensc-tool prints it: "6F 0E 84 …".
func spaced(h string) string {
	var parts []string
	for i := 0; i < len(h); i += 2 {
		parts = append(parts, h[i:i+2])
	}
	return strings.Join(parts, " ")
}

// The feeder and a station reader together, as in make demo: three cards
// inserted one after another end up locked, one record each, and the
// records' c are what the cards answer.
func TestFeederWithStation(t *testing.T) {
	need(t)
	v := vectors(t)[9] // ecdh-p256-aes
	key, err := protocol.ParseIssuerKey(v.IssuerSPKI)
	must(t, err)
	job, err := perso.NewJob(protocol.ECDHP256AES, key, v.Fingerprint)
	must(t, err)
	dir := t.TempDir()
	var paths []string
	for i := range 3 {
		p := filepath.Join(dir, string(rune('a'+i))+".json")
		_, err := card.Manufacture(p, card.Options{ID: []byte{0xB1, byte(i)}})
		must(t, err)
		paths = append(paths, p)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	fed := make(chan error, 1)
	go func() {
		fed <- (&vcard.Feeder{Addr: daemon.Addr(0), Cards: paths}).Run(ctx)
	}()
	fp := key.Fingerprint()
	batchPath := filepath.Join(dir, "batch.ndjson")
	j, err := perso.OpenJournal(batchPath, protocol.ECDHP256AES.Name, fp[:], nil)
	must(t, err)
	st := &perso.Station{Job: job, Ledger: j, Count: 3}
	err = st.Run(ctx, perso.PCSC{Select: perso.Selector{Names: []string{daemon.ReaderName(0)}}})
	must(t, err)
	must(t, <-fed)
	_, err = perso.WriteManifest(j, "test")
	must(t, err)
	must(t, j.Close())
	_, recs, err := readBatch(batchPath)
	must(t, err)
	if n := st.Done(); n != 3 || len(recs) != 3 {
		t.Fatalf("%d cards locked, %d records; want 3", n, len(recs))
	}
	for i, p := range paths {
		a, err := card.Open(p)
		must(t, err)
		if a.LifeCycle() != protocol.Locked {
			t.Errorf("card %d is %v", i, a.LifeCycle())
		}
		if !bytes.Equal(recs[i].ID, a.ID()) {
			t.Errorf("record %d is for card %x, want %x", i, recs[i].ID, a.ID())
		}
		if err := protocol.ValidCiphertext(protocol.ECDHP256AES, key, recs[i].C); err != nil {
			t.Error(err)
		}
	}
}

// readBatch checks the batchPath at path against its manifest (batch.Verify)
// and returns its records.
func readBatch(path string) (batch.Manifest, []batch.Record, error) {
	var recs []batch.Record
	m, err := batch.Verify(path, func(_ int, r batch.Record) error { recs = append(recs, r); return nil })
	return m, recs, err
}
