// Package cardtest reads what tests need from a virtual card's state
// file: its K_I, which the card keeps by design and nothing else may
// hold, and the forms a leak of it could take. Tests use both to check
// that no station, issuer or log output ever contains a card's K_I.
package cardtest

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"os"
	"strings"
	"testing"

	"blindperso/protocol"
)

// KI returns the K_I in the card state file at path (empty for a card
// that was never personalized).
func KI(tb testing.TB, path string) []byte {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	var st struct {
		KI protocol.Hex `json:"k_i"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		tb.Fatalf("card state %s: %v", path, err)
	}
	return st.KI
}

// Encodings are the seven forms in which a K_I could leak into a file,
// by name: raw, hex in either case, and base64 (standard and URL
// alphabets, padded and raw).
func Encodings(ki []byte) map[string][]byte {
	h := hex.EncodeToString(ki)
	return map[string][]byte{
		"raw": ki, "hex": []byte(h), "HEX": []byte(strings.ToUpper(h)),
		"base64":        []byte(base64.StdEncoding.EncodeToString(ki)),
		"base64 raw":    []byte(base64.RawStdEncoding.EncodeToString(ki)),
		"base64url":     []byte(base64.URLEncoding.EncodeToString(ki)),
		"base64url raw": []byte(base64.RawURLEncoding.EncodeToString(ki)),
	}
}
