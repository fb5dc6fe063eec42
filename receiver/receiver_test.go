package receiver

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blindperso/export"
	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

func TestMain(m *testing.M) {
	code := m.Run()
	hsmtest.Cleanup()
	os.Exit(code)
}

type card struct{ id, ki []byte }

// TestImportAndVerify: the issuer (SoftHSM2 or NSS, through package hsm)
// exports 20 cards' K_I under the receiver's KTK; the receiver (another
// SoftHSM2 token, through this package) imports them and verifies every
// card's MAC over a fresh challenge in its token, refuses a forged one;
// a line whose wrapped key was changed is refused with its reason while
// the other 19 land, and the file is reported as not the one written; a
// re-run finds every key already there.
func TestImportAndVerify(t *testing.T) {
	ctx := context.Background()
	rtt := hsmtest.SoftHSM(t)
	senders := []hsmtest.Token{hsmtest.SoftHSM(t), hsmtest.NSS(t)}
	rtok, err := hsm.OpenURI(rtt.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer rtok.Close()
	for n, tt := range senders {
		t.Run(tt.Label, func(t *testing.T) {
			tok, err := hsm.OpenURI(tt.URI, 2)
			if err != nil {
				t.Fatal(err)
			}
			defer tok.Close()
			sfx := string(rune('a' + n))
			key, err := tok.GenerateIssuerKey(ctx, hsm.KindP256, "issuer-"+sfx)
			if err != nil {
				t.Fatal(err)
			}
			kek, err := tok.GenerateKEK(ctx, "kek-"+sfx, tt.SOPIN)
			if err != nil {
				t.Fatal(err)
			}
			ik, err := tok.GenerateKeyImportKey(ctx, "key-import-"+sfx)
			if err != nil {
				t.Fatal(err)
			}
			sent, err := MakeKTK(ctx, rtok, "ktk-"+sfx, ik.Public.RSA)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := MakeKTK(ctx, rtok, "ktk-"+sfx, ik.Public.RSA); err == nil {
				t.Error("a second KTK with the same label was made")
			}
			ktk, err := tok.ImportKTK(ctx, ik, "ktk-bank-"+sfx, sent.Wrapped, tt.SOPIN)
			if err != nil {
				t.Fatal(err)
			}
			if ktk.CheckValue != nil && sent.CheckValue != nil && !bytes.Equal(ktk.CheckValue, sent.CheckValue) {
				t.Fatalf("KTK check values differ: issuer %x, receiver %x", ktk.CheckValue, sent.CheckValue)
			}
			p := protocol.ECDHP256AES
			ck := &hsm.CardKeys{Token: tok, Key: key, KEK: kek}
			defer ck.Close(ctx)
			path := filepath.Join(t.TempDir(), "export.ndjson")
			w, err := export.Create(path, export.Manifest{KTK: export.KTK{Label: ktk.Label, CheckValue: ktk.CheckValue}, Issuer: tt.Label, Select: "test"})
			if err != nil {
				t.Fatal(err)
			}
			var cards []card
			for i := range 20 {
				s, c, err := protocol.Encapsulate(p, key.Public, rand.Reader)
				if err != nil {
					t.Fatal(err)
				}
				ki, err := protocol.DeriveKey(p, s, protocol.Binding(p, key.Public.SPKI))
				if err != nil {
					t.Fatal(err)
				}
				id := []byte{0xe0, byte(n), byte(i)}
				blob, err := ck.Import(ctx, p, c)
				if err != nil {
					t.Fatal(err)
				}
				var e hsm.Export
				err = tok.With(ctx, func(s hsm.Session) error {
					kh, err := kek.Handle(s)
					if err != nil {
						return err
					}
					th, err := ktk.Handle(s)
					if err != nil {
						return err
					}
					e, err = hsm.ExportCardKey(s, kh, th, blob)
					return err
				})
				if err != nil {
					t.Fatal(err)
				}
				if err := w.Add(export.Record{ID: id, Profile: p.Name, Wrapped: e.Wrapped, KCV: e.CheckValue}); err != nil {
					t.Fatal(err)
				}
				cards = append(cards, card{id, ki})
			}
			if _, err := w.Close(time.Now()); err != nil {
				t.Fatal(err)
			}
			// Line 5's wrapped key changed by one bit after the export.
			b, _ := os.ReadFile(path)
			lines := bytes.SplitAfter(b, []byte("\n"))
			r5, err := export.ParseRecord(bytes.TrimSuffix(lines[4], []byte("\n")))
			if err != nil {
				t.Fatal(err)
			}
			r5.Wrapped[10] ^= 1
			if lines[4], err = export.MarshalRecord(r5); err != nil {
				t.Fatal(err)
			}
			os.WriteFile(path, bytes.Join(lines, nil), 0o600)

			var results []Result
			_, imported, refused, err := Import(ctx, rtok, "ktk-"+sfx, export.ManifestPath(path), func(r Result) { results = append(results, r) })
			if !errors.Is(err, export.ErrNotAsWritten) {
				t.Fatalf("the tampered file was not reported: %v", err)
			}
			if imported != 19 || refused != 1 || results[4].Err == nil || !strings.Contains(results[4].Err.Error(), "refused the wrapped key") {
				t.Fatalf("imported %d, refused %d; line 5: %v", imported, refused, results[4].Err)
			}
			for i, c := range cards {
				challenge := make([]byte, protocol.ChallengeLen)
				rand.Read(challenge)
				mac, _ := protocol.AuthMAC(c.ki, c.id, challenge)
				ok, err := Verify(ctx, rtok, c.id, challenge, mac)
				if i == 4 {
					if err == nil {
						t.Errorf("card 5 (tampered line) has a key at the receiver")
					}
					continue
				}
				if err != nil || !ok {
					t.Fatalf("card %d: the receiver does not verify its MAC: %v %v", i, ok, err)
				}
				mac[0] ^= 1
				if ok, _ := Verify(ctx, rtok, c.id, challenge, mac); ok {
					t.Fatalf("card %d: a forged MAC verifies", i)
				}
			}
			// A re-run: every key is already there, the tampered line
			// still refused.
			_, imported, refused, _ = Import(ctx, rtok, "ktk-"+sfx, export.ManifestPath(path), func(r Result) {
				if r.Err == nil && !r.Exists {
					t.Errorf("line %d imported again", r.Line)
				}
			})
			if imported != 19 || refused != 1 {
				t.Fatalf("re-run: imported %d, refused %d", imported, refused)
			}
		})
	}
}
