package cardtest

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/chipca"
	"blindperso/protocol"
)

// Card is an in-process card personalized under an issuer key, and the
// record a station wrote for it.
type Card struct {
	Rec batch.Record
	A   *card.Applet
}

// Cards manufactures cards with Ids B1‖id and personalizes each under
// the issuer key spki (a DER SubjectPublicKeyInfo).
func Cards(tb testing.TB, p protocol.Profile, spki []byte, ids ...byte) []Card {
	tb.Helper()
	return AttestedCards(tb, nil, p, spki, ids...)
}

// AttestedCards is Cards with cards that ca attested at manufacture
// (PROTOCOL.md §10): each record carries the card's attestation. A nil
// ca makes cards without one.
func AttestedCards(tb testing.TB, ca *chipca.CA, p protocol.Profile, spki []byte, ids ...byte) []Card {
	tb.Helper()
	key, err := protocol.ParseIssuerKey(spki)
	if err != nil {
		tb.Fatal(err)
	}
	var out []Card
	for _, id := range ids {
		o := card.Options{ID: []byte{0xB1, id}}
		if ca != nil {
			cc, err := ca.NewCard(o.ID, chipca.CertOptions{})
			if err != nil {
				tb.Fatal(err)
			}
			at := card.Attestation(cc)
			o.Attestation = &at
		}
		a, err := card.Manufacture(filepath.Join(tb.TempDir(), "card.json"), o)
		if err != nil {
			tb.Fatal(err)
		}
		rec, err := Personalize(a, p, key, "test")
		if err != nil {
			tb.Fatal(err)
		}
		out = append(out, Card{rec, a})
	}
	return out
}

// Authenticate is the card's AUTHENTICATE answer (its MAC) to challenge.
func Authenticate(tb testing.TB, a *card.Applet, challenge []byte) []byte {
	tb.Helper()
	c := &card.Client{T: a.Local()}
	if err := c.Select(); err != nil {
		tb.Fatal(err)
	}
	mac, err := c.Authenticate(challenge)
	if err != nil {
		tb.Fatal(err)
	}
	return mac
}

// Line is r as a batch line, newline included.
func Line(tb testing.TB, r batch.Record) string {
	tb.Helper()
	b, err := json.Marshal(r)
	if err != nil {
		tb.Fatal(err)
	}
	return string(b) + "\n"
}

// WriteBatch writes content as a batch file, with a manifest that
// matches it, for profile p under the issuer key whose fingerprint is
// fp; it returns the batch's path.
func WriteBatch(tb testing.TB, p protocol.Profile, fp []byte, content string) string {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "batch.ndjson")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		tb.Fatal(err)
	}
	s, err := batch.Summarize(strings.NewReader(content))
	if err != nil {
		tb.Fatal(err)
	}
	m := batch.Manifest{Format: batch.Format, Batch: filepath.Base(path), Count: s.Lines, Bytes: s.Bytes,
		SHA256: s.SHA256, Profile: p.Name, IssuerFingerprint: fp, Station: "test", Written: time.Unix(0, 0).UTC()}
	b, err := json.Marshal(m) // one line, so that a test can edit a member by its text
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(batch.ManifestPath(path), b, 0o644); err != nil {
		tb.Fatal(err)
	}
	return path
}

// BatchOf is WriteBatch of the cards' records.
func BatchOf(tb testing.TB, p protocol.Profile, fp []byte, cards ...Card) string {
	tb.Helper()
	var s strings.Builder
	for _, c := range cards {
		s.WriteString(Line(tb, c.Rec))
	}
	return WriteBatch(tb, p, fp, s.String())
}
