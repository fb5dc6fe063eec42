package hsmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Fault is a token seen through p11fault (p11fault/p11fault.c), the
// project's fault-injecting PKCS#11 module: every call goes to the real
// library, except those the control file's rules fail, delay, or answer
// as if the token had vanished (docs/HSM.md, "Fault injection for tests").
//
// Set replaces the rules; Fail, FailAfter, Delay and Vanish add one;
// Clear removes them all. The module applies a change at its next call,
// and every change starts the rules' counters (after=, count=) at zero.
type Fault struct {
	// Token is the token as seen through the fault module: Module and
	// the URI's module-path name this Fault's copy of libp11fault.so.
	Token Token
	// Ctl is the control file, Real the copy of the token's library the
	// module forwards to.
	Ctl, Real string

	tb    testing.TB
	mu    sync.Mutex
	rules []string
	n     int // versions written
}

var faultLib = sync.OnceValues(buildFaultLib)

// Faulty puts tok behind a fresh fault module with no rules: a copy of
// libp11fault.so in a new directory, forwarding to a copy of tok's
// library there. glibc loads a file once per process whatever its path,
// and package hsm keeps one library per module path, so every Faulty
// token is a library instance of its own, with its own C_Initialize and
// C_Finalize, beside the original and other Faulty ones. Use it with
// SoftHSM2 tokens (NSS softokn finds its helper libraries next to
// itself). SoftHSM2 reads its token directory at C_Initialize: make every
// token before opening any.
func Faulty(tb testing.TB, tok Token) *Fault {
	tb.Helper()
	lib, err := faultLib()
	if err != nil {
		tb.Fatalf("hsmtest: p11fault: %v", err)
	}
	if err := os.MkdirAll(Dir, 0o700); err != nil {
		tb.Fatalf("hsmtest: %v", err)
	}
	dir, err := os.MkdirTemp(Dir, "p11fault-")
	if err != nil {
		tb.Fatalf("hsmtest: %v", err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	f := &Fault{tb: tb, Token: tok, Real: filepath.Join(dir, filepath.Base(tok.Module))}
	f.Token.Module = filepath.Join(dir, "libp11fault.so")
	f.Ctl = f.Token.Module + ".ctl"
	for _, c := range [][2]string{{lib, f.Token.Module}, {tok.Module, f.Real}} {
		if err := copyFile(c[0], c[1]); err != nil {
			tb.Fatalf("hsmtest: %v", err)
		}
	}
	old := "module-path=" + tok.Module
	if !strings.Contains(tok.URI, old) {
		tb.Fatalf("hsmtest: Faulty: URI %q has no %s", tok.URI, old)
	}
	f.Token.URI = strings.Replace(tok.URI, old, "module-path="+f.Token.Module, 1)
	f.write()
	return f
}

// Set replaces the rules by these lines of the control file's grammar:
// "fail FUNC RV [after=N] [count=M]", "delay FUNC MS [after=N] [count=M]",
// "vanish".
func (f *Fault) Set(rules ...string) {
	f.tb.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules = append([]string(nil), rules...)
	f.write()
}

// Clear removes every rule: calls go through again.
func (f *Fault) Clear() { f.tb.Helper(); f.Set() }

// Fail makes every call of fn (a PKCS#11 function name, or "*") answer rv.
func (f *Fault) Fail(fn string, rv uint) {
	f.tb.Helper()
	f.add(fmt.Sprintf("fail %s 0x%X", fn, rv))
}

// FailAfter lets after calls of fn through, then makes count calls answer
// rv (count 0: all the following ones).
func (f *Fault) FailAfter(fn string, rv uint, after, count int) {
	f.tb.Helper()
	f.add(fmt.Sprintf("fail %s 0x%X%s", fn, rv, window(after, count)))
}

// Delay makes every call of fn wait d (whole milliseconds, rounded up)
// before it goes to the real library.
func (f *Fault) Delay(fn string, d time.Duration) {
	f.tb.Helper()
	f.add(fmt.Sprintf("delay %s %d", fn, (d+time.Millisecond-1)/time.Millisecond))
}

// Vanish makes the token disappear, as a device pulled out: the slot
// lists no token, slot calls answer CKR_TOKEN_NOT_PRESENT, session calls
// CKR_DEVICE_REMOVED, and the sessions open until then are closed in the
// real library (at the module's next call). Clear brings the token back.
func (f *Fault) Vanish() { f.tb.Helper(); f.add("vanish") }

func window(after, count int) string {
	var s string
	if after > 0 {
		s += fmt.Sprintf(" after=%d", after)
	}
	if count > 0 {
		s += fmt.Sprintf(" count=%d", count)
	}
	return s
}

func (f *Fault) add(rule string) {
	f.tb.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules = append(f.rules, rule)
	f.write()
}

// write replaces the control file atomically, as the module expects:
// each version is a new file, linked in place by rename. The versions are
// kept (ctl.N), so that no inode number is freed and given to a later
// version: the module tells versions apart by inode, size and mtime, and
// two quick writes of one size can share an mtime. f.mu is held (or f is
// not shared yet).
func (f *Fault) write() {
	f.tb.Helper()
	f.n++
	body := "real " + f.Real + "\n" + strings.Join(f.rules, "\n") + "\n"
	version := fmt.Sprintf("%s.%d", f.Ctl, f.n)
	tmp := f.Ctl + ".new"
	os.Remove(tmp)
	if err := os.WriteFile(version, []byte(body), 0o600); err != nil {
		f.tb.Fatalf("hsmtest: p11fault control file: %v", err)
	}
	if err := os.Link(version, tmp); err != nil {
		f.tb.Fatalf("hsmtest: p11fault control file: %v", err)
	}
	if err := os.Rename(tmp, f.Ctl); err != nil {
		f.tb.Fatalf("hsmtest: p11fault control file: %v", err)
	}
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, b, 0o755)
}

// buildFaultLib finds bin/libp11fault.so (make build) if it is newer than
// its source, and compiles the source into Dir otherwise, so that go test
// works without make.
func buildFaultLib() (string, error) {
	root := repoRoot()
	src := filepath.Join(root, "p11fault", "p11fault.c")
	ss, err := os.Stat(src)
	if err != nil {
		return "", err
	}
	bin := filepath.Join(root, "bin", "libp11fault.so")
	if bs, err := os.Stat(bin); err == nil && bs.ModTime().After(ss.ModTime()) {
		return bin, nil
	}
	dir := filepath.Join(Dir, "p11fault-build")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	out := filepath.Join(dir, "libp11fault.so")
	cflags := []string{"-I/usr/include/p11-kit-1"}
	if b, err := exec.Command("pkg-config", "--cflags", "p11-kit-1").Output(); err == nil {
		cflags = strings.Fields(string(b))
	}
	args := append([]string{"-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-fvisibility=hidden"}, cflags...)
	args = append(args, "-o", out, src, "-ldl", "-lpthread")
	if b, err := exec.Command("cc", args...).CombinedOutput(); err != nil {
		return "", fmt.Errorf("cc %s: %v\n%s(the types come from p11-kit's pkcs11.h: Debian package libp11-kit-dev, make deps)", strings.Join(args, " "), err, b)
	}
	return out, nil
}
