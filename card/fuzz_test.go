package card

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"blindperso/internal/atomicfile"
	"blindperso/protocol"
)

// FuzzTransmit feeds the applet arbitrary sequences of APDUs (separated by
// a length byte) on a selected card. Whatever the input, it must answer
// every APDU with a status word, never panic, and leave a state file that
// loads and validates.
func FuzzTransmit(f *testing.F) {
	spki := readSPKI(f, "../testdata/keys/p256.pem")
	sel := append([]byte{0x00, 0xA4, 0x04, 0x00, byte(len(protocol.AID))}, protocol.AID...)
	perso := append([]byte{0x80, 0x20, protocol.ECDHP256AES.ID, 0x00, byte(len(spki))}, spki...)
	perso = append(perso, 0x00)
	seq := func(apdus ...[]byte) []byte {
		var b []byte
		for _, a := range apdus {
			b = append(b, byte(len(a)))
			b = append(b, a...)
		}
		return b
	}
	f.Add(seq(sel))
	f.Add(seq(perso, apdu("80 22 00 00 00"), apdu("00 C0 00 00 00")))
	f.Add(seq(apdu("80 12 00 00 05"), apdu("00 C0 00 00 00"), apdu("80 10 00 00")))
	f.Add(seq(apdu("90 20 05 00 03 010203"), apdu("80 20 05 00 01 04")))
	f.Add(seq(perso, apdu("80 24 00 00 20"+hex.EncodeToString(make([]byte, 32))), apdu("80 30 00 00 10"+hex.EncodeToString(make([]byte, 16))+"00")))
	// Durability is not what this target tests: skip fsync, and reuse one
	// directory, so each input costs microseconds.
	writeState = func(path string, b []byte) error { return os.WriteFile(path, b, 0o600) }
	syncState = func(string) error { return nil }
	defer func() { writeState, syncState = atomicfile.Write, atomicfile.Sync }()
	dir := f.TempDir()
	var n atomic.Int64
	f.Fuzz(func(t *testing.T, in []byte) {
		path := filepath.Join(dir, fmt.Sprintf("card-%d.json", n.Add(1)))
		defer os.Remove(path)
		a, err := Manufacture(path, Options{ID: []byte{1, 2, 3, 4}})
		if err != nil {
			t.Fatal(err)
		}
		a.Transmit(sel)
		for len(in) > 0 {
			n := int(in[0])
			in = in[1:]
			if n > len(in) {
				n = len(in)
			}
			r := a.Transmit(in[:n])
			in = in[n:]
			if len(r) < 2 {
				t.Fatalf("response %x has no status word", r)
			}
		}
		b, err := Open(path)
		if err != nil {
			t.Fatalf("state file no longer loads: %v", err)
		}
		if b.LifeCycle() != a.LifeCycle() || !bytes.Equal(b.ID(), a.ID()) {
			t.Fatal("state file and card disagree")
		}
	})
}
