package iso7816

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestParseCommand(t *testing.T) {
	data := bytes.Repeat([]byte{0xAB}, 255)
	for _, tc := range []struct {
		name string
		in   []byte
		want Command
		err  string
	}{
		{"case 1", []byte{0x00, 0xA4, 0x04, 0x00}, Command{CLA: 0, INS: 0xA4, P1: 4}, ""},
		{"case 2", []byte{0x80, 0xCA, 0, 0, 0x10}, Command{CLA: 0x80, INS: 0xCA, Ne: 16}, ""},
		{"case 2, Le 00 is 256", []byte{0x80, 0xCA, 0, 0, 0x00}, Command{CLA: 0x80, INS: 0xCA, Ne: 256}, ""},
		{"case 3", []byte{0, 0xA4, 4, 0, 2, 0xF0, 0x01}, Command{INS: 0xA4, P1: 4, Data: []byte{0xF0, 1}}, ""},
		{"case 4", []byte{0, 0xA4, 4, 0, 1, 0xF0, 0x00}, Command{INS: 0xA4, P1: 4, Data: []byte{0xF0}, Ne: 256}, ""},
		{"case 3, 255 bytes", append([]byte{0, 0x10, 0, 0, 0xFF}, data...), Command{INS: 0x10, Data: data}, ""},
		{"short header", []byte{0, 0xA4, 4}, Command{}, "shorter than its header"},
		{"empty", nil, Command{}, "shorter than its header"},
		{"Lc too long", []byte{0, 0xA4, 4, 0, 3, 1, 2}, Command{}, "Lc is 3 but 2 bytes follow"},
		{"Lc too short", []byte{0, 0xA4, 4, 0, 1, 1, 2, 3}, Command{}, "Lc is 1 but 3 bytes follow"},
		{"extended length", []byte{0, 0xA4, 4, 0, 0, 0, 1, 0xF0}, Command{}, ErrExtendedLength.Error()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseCommand(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.CLA != tc.want.CLA || got.INS != tc.want.INS || got.P1 != tc.want.P1 || got.P2 != tc.want.P2 ||
				got.Ne != tc.want.Ne || !bytes.Equal(got.Data, tc.want.Data) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
			// Bytes gives back what was parsed.
			b, err := got.Bytes()
			if err != nil || !bytes.Equal(b, tc.in) {
				t.Fatalf("Bytes() = %x, %v, want %x", b, err, tc.in)
			}
		})
	}
	if _, err := ParseCommand([]byte{0, 1, 2, 3, 0, 0, 1, 9}); !errors.Is(err, ErrExtendedLength) {
		t.Errorf("extended length: %v, want ErrExtendedLength", err)
	}
}

func TestCommandBytesErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		c    Command
		err  string
	}{
		{"data over 255", Command{Data: make([]byte, 256)}, "needs chaining"},
		{"Ne over 256", Command{Ne: 257}, "does not fit"},
		{"Ne negative", Command{Ne: -1}, "does not fit"},
	} {
		if _, err := tc.c.Bytes(); err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.err)
		}
	}
}

func TestChain(t *testing.T) {
	for _, tc := range []struct {
		n     int
		parts []int
	}{
		{0, []int{0}}, {255, []int{255}}, {256, []int{255, 1}}, {510, []int{255, 255}}, {600, []int{255, 255, 90}},
	} {
		data := make([]byte, tc.n)
		for i := range data {
			data[i] = byte(i)
		}
		cs := Chain(Command{CLA: 0x80, INS: 0x50, P1: 1, P2: 2, Data: data, Ne: 256}, 0x10)
		if len(cs) != len(tc.parts) {
			t.Fatalf("%d bytes: %d commands, want %d", tc.n, len(cs), len(tc.parts))
		}
		var joined []byte
		for i, c := range cs {
			last := i == len(cs)-1
			if len(c.Data) != tc.parts[i] || c.INS != 0x50 || c.P1 != 1 || c.P2 != 2 {
				t.Errorf("%d bytes, part %d: %+v", tc.n, i, c)
			}
			if (c.CLA&0x10 != 0) == last || c.CLA&^0x10 != 0x80 {
				t.Errorf("%d bytes, part %d: CLA %02X (chaining bit on all but the last)", tc.n, i, c.CLA)
			}
			if (c.Ne != 0) != last {
				t.Errorf("%d bytes, part %d: Ne %d (only the last carries it)", tc.n, i, c.Ne)
			}
			joined = append(joined, c.Data...)
		}
		if !bytes.Equal(joined, data) {
			t.Errorf("%d bytes: the chain does not carry the data", tc.n)
		}
	}
}

func TestResponse(t *testing.T) {
	for _, tc := range []struct {
		in   []byte
		data []byte
		sw   SW
		err  bool
	}{
		{[]byte{0x90, 0x00}, []byte{}, SWOK, false},
		{[]byte{1, 2, 3, 0x61, 0x10}, []byte{1, 2, 3}, 0x6110, false},
		{[]byte{0x6A}, nil, 0, true},
		{nil, nil, 0, true},
	} {
		r, err := ParseResponse(tc.in)
		if tc.err {
			if err == nil {
				t.Errorf("%x: no error", tc.in)
			}
			continue
		}
		if err != nil || r.SW != tc.sw || !bytes.Equal(r.Data, tc.data) {
			t.Errorf("%x: %+v %v", tc.in, r, err)
		}
		if !bytes.Equal(r.Bytes(), tc.in) {
			t.Errorf("%x: Bytes() = %x", tc.in, r.Bytes())
		}
	}
}

func TestSW(t *testing.T) {
	for _, tc := range []struct {
		sw        SW
		text      string
		remaining int
		more      bool
	}{
		{SWOK, "9000 (success)", 0, false},
		{0x6110, "6110 (16 bytes remaining)", 16, true},
		{0x6100, "6100 (256 bytes remaining)", 256, true},
		{SWWrongData, "6A80 (incorrect data)", 0, false},
		{0x6C10, "6C10", 0, false},
	} {
		if got := tc.sw.String(); got != tc.text {
			t.Errorf("%04X: String() = %q, want %q", uint16(tc.sw), got, tc.text)
		}
		if got := tc.sw.Error(); got != "card answered "+tc.text {
			t.Errorf("%04X: Error() = %q", uint16(tc.sw), got)
		}
		if n, ok := tc.sw.Remaining(); n != tc.remaining || ok != tc.more {
			t.Errorf("%04X: Remaining() = %d, %v", uint16(tc.sw), n, ok)
		}
	}
}
