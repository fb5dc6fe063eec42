package server

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"

	"blindperso/api"
)

// TokenEntry is one line of a tokens file: a role and the SHA-256 of a
// bearer token (the token itself is stored nowhere on the server).
type TokenEntry struct {
	Role string
	Hash [sha256.Size]byte
}

// HashToken is the hex SHA-256 of a bearer token, as a tokens file holds
// it (surrounding white space, e.g. a newline, is not part of a token).
func HashToken(token string) string {
	h := sha256.Sum256([]byte(strings.TrimSpace(token)))
	return hex.EncodeToString(h[:])
}

// ParseTokens reads a tokens file: lines "ROLE SHA256HEX"; blank lines and
// lines starting with # are ignored.
func ParseTokens(r io.Reader) ([]TokenEntry, error) {
	var out []TokenEntry
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return nil, fmt.Errorf("tokens line %d: want \"ROLE SHA256HEX\", got %d fields", n, len(f))
		}
		if !api.KnownRole(f[0]) {
			return nil, fmt.Errorf("tokens line %d: unknown role %q (roles: %s)", n, f[0], strings.Join(api.Roles, ", "))
		}
		b, err := hex.DecodeString(f[1])
		if err != nil || len(b) != sha256.Size {
			return nil, fmt.Errorf("tokens line %d: the second field must be the hex SHA-256 of the token (64 hex digits; issuer serve token-hash prints it)", n)
		}
		e := TokenEntry{Role: f[0]}
		copy(e.Hash[:], b)
		out = append(out, e)
	}
	return out, sc.Err()
}

// LoadTokens reads a tokens file (see ParseTokens).
func LoadTokens(path string) ([]TokenEntry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	t, err := ParseTokens(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}
