package card

import (
	"path/filepath"
	"strconv"
	"testing"

	"blindperso/protocol"
)

// BenchmarkGetStatus is the applet's own time for one APDU, the baseline
// for the PC/SC round trip measured in internal/pcscd.
func BenchmarkGetStatus(b *testing.B) {
	a, err := Manufacture(filepath.Join(b.TempDir(), "c.json"), Options{ID: []byte{1}})
	if err != nil {
		b.Fatal(err)
	}
	c := &Client{T: a.Local()}
	if err := c.Select(); err != nil {
		b.Fatal(err)
	}
	apdu := []byte{0x80, 0x12, 0, 0, 0}
	for b.Loop() {
		a.Transmit(apdu)
	}
}

// BenchmarkPersonalize is the card's whole job per profile, in process:
// PERSONALIZE (with its atomic state write) and LOCK.
func BenchmarkPersonalize(b *testing.B) {
	vs, err := protocol.ReadVectors(vectorsFile)
	if err != nil {
		b.Fatal(err)
	}
	seen := map[string]bool{}
	for _, v := range vs {
		if seen[v.Profile] {
			continue
		}
		seen[v.Profile] = true
		p, _ := protocol.ProfileByName(v.Profile)
		b.Run(v.Profile, func(b *testing.B) {
			dir := b.TempDir()
			i := 0
			for b.Loop() {
				i++
				a, err := Manufacture(filepath.Join(dir, strconv.Itoa(i)+".json"), Options{ID: []byte{1}})
				if err != nil {
					b.Fatal(err)
				}
				cl := &Client{T: a.Local()}
				if err := cl.Select(); err != nil {
					b.Fatal(err)
				}
				ct, err := cl.Personalize(p, v.IssuerSPKI)
				if err != nil {
					b.Fatal(err)
				}
				if err := cl.Lock(ct); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
