// Package hsmtest makes real PKCS#11 tokens in temporary directories for
// tests and benchmarks: SoftHSM2 tokens, an NSS softokn database, and an
// opencryptoki soft token (with its own pkcsslotd, in a private mount
// namespace: see Run). The libraries keep process-wide state (SoftHSM2
// reads SOFTHSM2_CONF once, NSS softokn initializes once, opencryptoki
// has one daemon per namespace), so each test binary gets one SoftHSM2
// token directory, in which every call makes a new token, one NSS
// database and one opencryptoki token.
package hsmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// Module paths of the Debian packages softhsm2 and libnss3.
const (
	SoftHSMModule = "/usr/lib/softhsm/libsofthsm2.so"
	NSSModule     = "/usr/lib/x86_64-linux-gnu/libsoftokn3.so"
	// NSSTokenLabel is the softokn slot where token objects persist.
	NSSTokenLabel = "NSS Certificate DB"
)

// Token describes a token made for a test.
type Token struct {
	Module string // PKCS#11 module path
	Label  string // token label
	PIN    string // user PIN ("" for NSS: the DB has an empty password)
	SOPIN  string // security officer PIN (SoftHSM2 only)
	// PINFile holds PIN, for pin-source URIs.
	PINFile string
	// InitArgs is the C_Initialize pReserved string (NSS only).
	InitArgs string
	// URI names the token as an RFC 7512 PKCS#11 URI with module-path and
	// pin-source (and, for NSS, the x-nss-configdir extension).
	URI string
}

var (
	softOnce sync.Once
	softDir  string
	softErr  error
	softN    atomic.Int32

	nssOnce sync.Once
	nssTok  Token
	nssErr  error
)

// Dir is the parent of every directory this package makes; tests may
// remove it in TestMain. A test process that Run re-executed in its own
// namespace uses its parent's.
var Dir = dirName()

func dirName() string {
	if d := os.Getenv(envNamespace); d != "" {
		return d
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("blindperso-hsmtest-%d", os.Getpid()))
}

// Cleanup stops the opencryptoki daemon this process started, if any,
// and removes Dir. Call it at the end of TestMain (Run does).
func Cleanup() {
	stopSlotd()
	os.RemoveAll(Dir)
}

// SoftHSM makes a new, initialized SoftHSM2 token with its own label and
// PINs. The first call in a process sets SOFTHSM2_CONF, so it must come
// before the process loads libsofthsm2.
func SoftHSM(tb testing.TB) Token {
	tb.Helper()
	softOnce.Do(func() {
		softDir = filepath.Join(Dir, "softhsm")
		tokens := filepath.Join(softDir, "tokens")
		if softErr = os.MkdirAll(tokens, 0o700); softErr != nil {
			return
		}
		tmpl, err := os.ReadFile(filepath.Join(repoRoot(), "softhsm-config", "softhsm2.conf.in"))
		if err != nil {
			softErr = err
			return
		}
		conf := filepath.Join(softDir, "softhsm2.conf")
		softErr = os.WriteFile(conf, []byte(strings.ReplaceAll(string(tmpl), "@TOKENDIR@", tokens)), 0o600)
		if softErr == nil {
			softErr = os.Setenv("SOFTHSM2_CONF", conf)
		}
	})
	if softErr != nil {
		tb.Fatalf("hsmtest: SoftHSM2 setup: %v", softErr)
	}
	if _, err := os.Stat(SoftHSMModule); err != nil {
		tb.Fatalf("hsmtest: %v (install Debian's softhsm2: make deps)", err)
	}
	n := softN.Add(1)
	t := Token{Module: SoftHSMModule, Label: fmt.Sprintf("bp-test-%d", n), PIN: "1234-user", SOPIN: "5678-so"}
	out, err := exec.Command("softhsm2-util", "--init-token", "--free", "--label", t.Label, "--pin", t.PIN, "--so-pin", t.SOPIN).CombinedOutput()
	if err != nil {
		tb.Fatalf("hsmtest: softhsm2-util --init-token: %v\n%s", err, out)
	}
	t.PINFile = writePIN(tb, softDir, t.Label, t.PIN)
	t.URI = fmt.Sprintf("pkcs11:token=%s?module-path=%s&pin-source=file:%s", t.Label, t.Module, t.PINFile)
	return t
}

// NSS returns the process's NSS softokn database, made on first use with
// an empty password, as its "NSS Certificate DB" token.
func NSS(tb testing.TB) Token {
	tb.Helper()
	nssOnce.Do(func() {
		dir := filepath.Join(Dir, "nssdb")
		if nssErr = os.MkdirAll(dir, 0o700); nssErr != nil {
			return
		}
		out, err := exec.Command("certutil", "-N", "-d", "sql:"+dir, "--empty-password").CombinedOutput()
		if err != nil {
			nssErr = fmt.Errorf("certutil -N: %v\n%s (install Debian's libnss3-tools: make deps)", err, out)
			return
		}
		nssTok = Token{
			Module:   NSSModule,
			Label:    NSSTokenLabel,
			InitArgs: fmt.Sprintf("configdir='sql:%s' certPrefix='' keyPrefix='' secmod='secmod.db' flags= ", dir),
			PINFile:  writePIN(tb, dir, "nss", ""),
		}
		nssTok.URI = fmt.Sprintf("pkcs11:token=NSS%%20Certificate%%20DB?module-path=%s&pin-source=file:%s&x-nss-configdir=%s", NSSModule, nssTok.PINFile, dir)
	})
	if nssErr != nil {
		tb.Fatalf("hsmtest: NSS setup: %v", nssErr)
	}
	return nssTok
}

func writePIN(tb testing.TB, dir, name, pin string) string {
	p := filepath.Join(dir, name+".pin")
	if err := os.WriteFile(p, []byte(pin), 0o600); err != nil {
		tb.Fatalf("hsmtest: %v", err)
	}
	return p
}

// repoRoot finds the module root (where go.mod is) from the working
// directory, which go test sets to the package's directory.
func repoRoot() string {
	dir, _ := os.Getwd()
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			return dir
		}
	}
}
