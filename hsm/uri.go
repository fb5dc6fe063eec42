package hsm

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"

	pkcs11uri "github.com/stefanberger/go-pkcs11uri"
)

// Config says which token to open and how.
type Config struct {
	// Module is the absolute path of the PKCS#11 module (shared library).
	Module string
	// InitArgs is passed to C_Initialize as pReserved; NSS softokn needs
	// its database parameters there. Empty for every other module.
	InitArgs string
	// TokenLabel and Serial select the token; at least one is set. When
	// both are, both must match.
	TokenLabel string
	Serial     string
	// PIN is the user PIN (empty for an NSS database without password).
	// It comes from a file or the environment, never from argv, and is
	// never logged or put in an error.
	PIN string
	// Sessions is the size of the session pool; 0 means GOMAXPROCS.
	Sessions int
	// Table names the token's mechanism table (Mechanisms.Key; the URI's
	// x-blindperso-table). Empty: the table the token's CK_TOKEN_INFO
	// manufacturerID and model select (MechanismsFor).
	Table string
}

// NSSInitArgs is the C_Initialize pReserved string that opens the NSS
// softokn database in dir (made by `certutil -N -d sql:DIR`).
func NSSInitArgs(dir string) string {
	return fmt.Sprintf("configdir='sql:%s' certPrefix='' keyPrefix='' secmod='secmod.db' flags= ", dir)
}

// Path and query attributes ParseURI understands. Anything else is
// refused, so that a typo ("tokn=") is an error, not a silently ignored
// filter that opens the wrong token.
var (
	uriPath  = map[string]bool{"token": true, "serial": true}
	uriQuery = map[string]bool{"module-path": true, "pin-source": true, "x-nss-configdir": true, "x-blindperso-table": true}
)

// ParseURI reads an RFC 7512 PKCS#11 URI naming a token, and the PIN from
// its pin-source:
//
//	pkcs11:token=LABEL;serial=SERIAL?module-path=/abs/lib.so&pin-source=file:/abs/pin
//
// pin-source is file:PATH (RFC 7512; a trailing newline in the file is
// dropped) or env:VAR (an extension of this project). pin-value is
// refused: a PIN in a URI ends up in argv, shell history and logs. The
// vendor extension x-nss-configdir=DIR opens NSS softokn's database in
// DIR (see NSSInitArgs). x-blindperso-table=KEY (this project's extension)
// names the token's mechanism table when its CK_TOKEN_INFO fields do not
// select it (TableNames lists the keys): it wins over those fields.
func ParseURI(uri string) (Config, error) {
	var cfg Config
	// The URI library's own words for a relative module path name an
	// attribute ("module-name") the URI does not have: say it here.
	if _, q, ok := strings.Cut(uri, "?"); ok {
		if v, err := url.ParseQuery(strings.ReplaceAll(q, ";", "%3B")); err == nil {
			if m := v.Get("module-path"); m != "" && !filepath.IsAbs(m) {
				return cfg, fmt.Errorf("token URI: module-path %q must be an absolute path (for example /usr/lib/softhsm/libsofthsm2.so)", m)
			}
		}
	}
	u := pkcs11uri.New()
	if err := u.Parse(uri); err != nil {
		return cfg, fmt.Errorf("token URI: %w", err)
	}
	if _, ok := u.GetQueryAttribute("pin-value", false); ok {
		return cfg, errors.New("token URI: pin-value is refused: PINs never go in argv or URIs; use pin-source=file:/path (or pin-source=env:VAR)")
	}
	if err := unknownAttrs(uri); err != nil {
		return cfg, err
	}
	cfg.TokenLabel, _ = u.GetPathAttribute("token", false)
	cfg.Serial, _ = u.GetPathAttribute("serial", false)
	if cfg.TokenLabel == "" && cfg.Serial == "" {
		return cfg, errors.New("token URI: name the token with token=LABEL or serial=SERIAL")
	}
	cfg.Module, _ = u.GetQueryAttribute("module-path", false)
	if cfg.Module == "" {
		return cfg, errors.New("token URI: module-path=/abs/path/of/module.so is required")
	}
	if dir, ok := u.GetQueryAttribute("x-nss-configdir", false); ok {
		if !filepath.IsAbs(dir) {
			return cfg, fmt.Errorf("token URI: x-nss-configdir %q must be an absolute path", dir)
		}
		if strings.ContainsAny(dir, "'\"") {
			return cfg, fmt.Errorf("token URI: x-nss-configdir %q must not contain quotes", dir)
		}
		cfg.InitArgs = NSSInitArgs(dir)
	}
	if name, ok := u.GetQueryAttribute("x-blindperso-table", false); ok {
		if _, err := TableByName(name); err != nil {
			return cfg, fmt.Errorf("token URI: x-blindperso-table: %w", err)
		}
		cfg.Table = name
	}
	if src, ok := u.GetQueryAttribute("pin-source", false); ok {
		pin, err := readPIN(src)
		if err != nil {
			return cfg, fmt.Errorf("token URI: %w", err)
		}
		cfg.PIN = pin
	}
	return cfg, nil
}

// unknownAttrs refuses attributes ParseURI does not act on. (The library
// keeps its maps private, so the names are read from the URI itself.)
func unknownAttrs(uri string) error {
	rest := strings.TrimPrefix(uri, "pkcs11:")
	path, query, _ := strings.Cut(rest, "?")
	var bad []string
	check := func(part, sep string, known map[string]bool) {
		if part == "" {
			return
		}
		for _, kv := range strings.Split(part, sep) {
			k, _, _ := strings.Cut(kv, "=")
			if !known[k] {
				bad = append(bad, k)
			}
		}
	}
	check(path, ";", uriPath)
	check(query, "&", uriQuery)
	if len(bad) > 0 {
		sort.Strings(bad)
		return fmt.Errorf("token URI: unsupported attribute(s) %s (known: token, serial; module-path, pin-source, x-nss-configdir, x-blindperso-table)", strings.Join(bad, ", "))
	}
	return nil
}

// readPIN reads a PIN from a pin-source value: file:/abs/path, /abs/path,
// or env:VAR. The error never contains the PIN.
func readPIN(src string) (string, error) {
	if name, ok := strings.CutPrefix(src, "env:"); ok {
		pin, set := os.LookupEnv(name)
		if !set {
			return "", fmt.Errorf("pin-source env:%s: variable not set", name)
		}
		return pin, nil
	}
	path := src
	if strings.HasPrefix(src, "file:") {
		u, err := url.Parse(src)
		if err != nil {
			return "", fmt.Errorf("pin-source %q: %w", src, err)
		}
		path = u.Path
		if path == "" {
			path = u.Opaque
		}
	}
	if !filepath.IsAbs(path) {
		return "", fmt.Errorf("pin-source %q: want file:/absolute/path or env:VAR", src)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("pin-source: %w", err)
	}
	pin := strings.TrimSuffix(string(b), "\n")
	return strings.TrimSuffix(pin, "\r"), nil
}
