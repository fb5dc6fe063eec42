package hsmtest

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// opencryptoki (Debian package opencryptoki) has its paths compiled in:
// the slot daemon pkcsslotd reads /etc/opencryptoki/opencryptoki.conf,
// keeps the soft token's objects under /var/lib/opencryptoki/swtok, its
// locks under /var/lock/opencryptoki, its socket and pid file in
// /var/run, a SysV shared memory segment keyed by ftok of its own binary,
// and the soft token a POSIX shared memory object in /dev/shm. Only one
// such daemon can run per mount and IPC namespace, and go test runs the
// test binaries of several packages at once.
//
// So a package that wants an opencryptoki token runs its tests in a
// private mount and IPC namespace: its TestMain calls Run, which
// re-executes the test binary (same arguments, same standard streams)
// with CLONE_NEWNS|CLONE_NEWIPC and waits for it. In that child the first
// OpenCryptoki call puts tmpfs on /run and /dev/shm (visible to this
// process and its children only), binds directories of Dir over
// /etc/opencryptoki, /var/lib/opencryptoki and /var/lock/opencryptoki,
// starts pkcsslotd -f, and initializes the token. Nothing outside the
// namespace changes; the daemon dies with the test process (Cleanup stops
// it, Pdeathsig is the backstop) and the namespace with them.

const (
	// OpenCryptokiModule is the PKCS#11 library of Debian's opencryptoki.
	OpenCryptokiModule = "/usr/lib/x86_64-linux-gnu/opencryptoki/libopencryptoki.so.0"
	// OpenCryptokiSlot is the slot the private configuration gives the
	// soft token (libpkcs11_sw.so), as Debian's default configuration does.
	OpenCryptokiSlot = 3
	// OpenCryptokiLabel is the label of the initialized token.
	OpenCryptokiLabel = "bp-ock-test"

	pkcsslotd = "/usr/sbin/pkcsslotd"
	// The soft token's SO PIN after C_InitToken; PINs are 4 to 8 bytes.
	ockDefaultSOPIN = "87654321"
	ockSOPIN        = "so-4321"
	ockUserPIN      = "user-123"

	// envNamespace marks a test process that Run started in its private
	// namespace; its value is the parent's Dir.
	envNamespace = "BLINDPERSO_HSMTEST_NS"
)

// An M is what Run runs: *testing.M, or a wrapper of it.
type M interface{ Run() int }

var (
	// inNamespace: this process is Run's child, in its own namespace.
	inNamespace = os.Getenv(envNamespace) != ""
	// ockUnavailable says why this process could not get a namespace
	// (set by Run in the parent when it runs the tests itself).
	ockUnavailable string

	ockOnce     sync.Once
	ockTok      Token
	ockErr      error
	ockSkip     bool // ockErr means "cannot run here", not a failure
	slotd       *exec.Cmd
	slotdExited <-chan error
	slotdMu     sync.Mutex
)

// Run is a TestMain body for packages whose tests may use OpenCryptoki:
// os.Exit(hsmtest.Run(m)). Where opencryptoki is installed and this
// process is root, it runs the tests in a re-executed copy of the test
// binary inside a private mount and IPC namespace and returns its exit
// code; otherwise (or in that copy) it runs m itself, and OpenCryptoki
// skips with the reason. It removes Dir at the end.
func Run(m M) int {
	defer Cleanup()
	if inNamespace {
		return m.Run()
	}
	if why := ockMissing(); why != "" {
		ockUnavailable = why
		return m.Run()
	}
	code, err := runInNamespace()
	if err != nil {
		ockUnavailable = fmt.Sprintf("cannot make a private mount and IPC namespace for pkcsslotd: %v", err)
		return m.Run()
	}
	return code
}

// ockMissing says why opencryptoki cannot run here, or "".
func ockMissing() string {
	for _, p := range []string{OpenCryptokiModule, pkcsslotd} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Sprintf("opencryptoki is not installed (%s: %v; Debian package opencryptoki: make deps)", p, errors.Unwrap(err))
		}
	}
	if _, err := user.LookupGroup("pkcs11"); err != nil {
		return fmt.Sprintf("opencryptoki needs the group pkcs11 (%v; reinstall the package opencryptoki: make deps)", err)
	}
	if os.Geteuid() != 0 {
		return "opencryptoki's paths are compiled in, so its test token runs in a private mount namespace, which needs root (run the tests as root, as CI does)"
	}
	return ""
}

// runInNamespace re-executes this test binary in new mount and IPC
// namespaces and returns its exit code. Signals that end a test run are
// passed on to it, so that it reports and cleans up itself.
func runInNamespace() (int, error) {
	exe, err := os.Executable()
	if err != nil {
		return 0, err
	}
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Args[0] = os.Args[0]
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), envNamespace+"="+Dir)
	// Unshareflags with CLONE_NEWNS also makes every mount private in the
	// child (the runtime remounts / MS_REC|MS_PRIVATE): nothing it mounts
	// propagates back.
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Unshareflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWIPC,
		Pdeathsig:    syscall.SIGKILL,
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT, syscall.SIGHUP)
	defer signal.Stop(sigs)
	exited, err := startLocked(cmd)
	if err != nil {
		return 0, err
	}
	done := make(chan struct{})
	go func() {
		for {
			select {
			case s := <-sigs:
				cmd.Process.Signal(s)
			case <-done:
				return
			}
		}
	}()
	err = <-exited
	close(done)
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			fmt.Fprintf(os.Stderr, "hsmtest: the test process (in its namespace) died of %v\n", ws.Signal())
			return 128 + int(ws.Signal()), nil
		}
		return ee.ExitCode(), nil
	}
	if err != nil {
		return 1, nil
	}
	return 0, nil
}

// startLocked starts cmd and waits for it on an OS thread of its own
// that lives as long as cmd: Pdeathsig fires when the thread that forked
// the child exits, not the process. The channel gets cmd.Wait's result.
func startLocked(cmd *exec.Cmd) (<-chan error, error) {
	started := make(chan error)
	exited := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		err := cmd.Start()
		started <- err
		if err == nil {
			exited <- cmd.Wait()
		}
	}()
	return exited, <-started
}

// OpenCryptoki returns the process's opencryptoki soft token (slot 3),
// made on first use: a private pkcsslotd in this test process's
// namespace (see Run), the token initialized with its default SO PIN,
// then the SO PIN changed and the user PIN set. It skips the test where
// opencryptoki is not installed or no namespace can be made, and fails
// it if a package calls it without Run in its TestMain.
func OpenCryptoki(tb testing.TB) Token {
	tb.Helper()
	tok, skip, err := LookupOpenCryptoki()
	switch {
	case skip != "":
		tb.Skipf("hsmtest: no opencryptoki token: %s", skip)
	case err != nil:
		tb.Fatalf("hsmtest: opencryptoki setup: %v", err)
	}
	return tok
}

// LookupOpenCryptoki is OpenCryptoki for a caller that decides itself
// what to do (a testscript condition): skip says why there can be no
// token here (not installed, no namespace), err that setting one up
// failed where it should have worked.
func LookupOpenCryptoki() (tok Token, skip string, err error) {
	ockOnce.Do(setupOpenCryptoki)
	switch {
	case ockErr != nil && ockSkip:
		return Token{}, ockErr.Error(), nil
	case ockErr != nil:
		return Token{}, "", ockErr
	}
	return ockTok, "", nil
}

func setupOpenCryptoki() {
	if !inNamespace {
		ockSkip = true
		switch {
		case ockUnavailable != "":
			ockErr = errors.New(ockUnavailable)
		case ockMissing() != "":
			ockErr = errors.New(ockMissing())
		default:
			ockSkip = false
			ockErr = errors.New("this test process is not in a private namespace: its TestMain must be os.Exit(hsmtest.Run(m))")
		}
		return
	}
	dir := filepath.Join(Dir, "ock")
	if ockErr = ockMounts(dir); ockErr != nil {
		return
	}
	if ockErr = startSlotd(dir); ockErr != nil {
		return
	}
	ockTok = Token{Module: OpenCryptokiModule, Label: OpenCryptokiLabel, PIN: ockUserPIN, SOPIN: ockSOPIN}
	if ockErr = initOCKToken(); ockErr != nil {
		return
	}
	p := filepath.Join(dir, "user.pin")
	if ockErr = os.WriteFile(p, []byte(ockUserPIN), 0o600); ockErr != nil {
		return
	}
	ockTok.PINFile = p
	ockTok.URI = fmt.Sprintf("pkcs11:token=%s?module-path=%s&pin-source=file:%s", ockTok.Label, ockTok.Module, p)
}

// ockMounts makes the private directories under dir and mounts them, in
// this process's own mount namespace.
func ockMounts(dir string) error {
	conf := "version opencryptoki-3.1\nslot " + strconv.Itoa(OpenCryptokiSlot) + "\n{\nstdll = libpkcs11_sw.so\n}\n"
	for _, d := range []string{"etc", "lib/swtok/TOK_OBJ", "lock/swtok"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o770); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "etc", "opencryptoki.conf"), []byte(conf), 0o640); err != nil {
		return err
	}
	g, err := user.LookupGroup("pkcs11")
	if err != nil {
		return err
	}
	gid, _ := strconv.Atoi(g.Gid)
	// The daemon and the library check group pkcs11 and its access.
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := os.Lchown(p, -1, gid); err != nil {
			return err
		}
		if d.IsDir() {
			return os.Chmod(p, 0o770)
		}
		return os.Chmod(p, 0o660)
	})
	if err != nil {
		return err
	}
	mount := func(src, dst, fstype string, flags uintptr, data string) error {
		if err := syscall.Mount(src, dst, fstype, flags, data); err != nil {
			return fmt.Errorf("mount %s on %s: %w", src, dst, err)
		}
		return nil
	}
	// /var/run (→ /run on Debian) holds the daemon's socket and pid file;
	// /var/lock is /run/lock there, so it is made again on the new tmpfs.
	run, err := filepath.EvalSymlinks("/var/run")
	if err != nil {
		return err
	}
	if err := mount("hsmtest-run", run, "tmpfs", 0, "mode=0755"); err != nil {
		return err
	}
	if _, err := os.Lstat("/run/lock"); errors.Is(err, fs.ErrNotExist) {
		if err := os.Mkdir("/run/lock", 0o755); err != nil {
			return err
		}
		if err := os.Chmod("/run/lock", 0o1777); err != nil {
			return err
		}
	}
	if err := mount("hsmtest-shm", "/dev/shm", "tmpfs", 0, "mode=1777"); err != nil {
		return err
	}
	for _, b := range [][2]string{{"etc", "/etc/opencryptoki"}, {"lib", "/var/lib/opencryptoki"}, {"lock", "/var/lock/opencryptoki"}} {
		if err := os.MkdirAll(b[1], 0o770); err != nil {
			return err
		}
		if err := mount(filepath.Join(dir, b[0]), b[1], "", syscall.MS_BIND, ""); err != nil {
			return err
		}
	}
	return nil
}

// startSlotd starts pkcsslotd in the foreground and waits for its socket.
func startSlotd(dir string) error {
	logPath := filepath.Join(dir, "pkcsslotd.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return err
	}
	cmd := exec.Command(pkcsslotd, "-f")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	exited, err := startLocked(cmd)
	logf.Close()
	if err != nil {
		return fmt.Errorf("start %s: %w", pkcsslotd, err)
	}
	slotdMu.Lock()
	slotd, slotdExited = cmd, exited
	slotdMu.Unlock()
	sock := "/var/run/pkcsslotd.socket"
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return nil
		}
		select {
		case err := <-exited:
			slotdMu.Lock()
			slotd = nil
			slotdMu.Unlock()
			log, _ := os.ReadFile(logPath)
			return fmt.Errorf("pkcsslotd exited at start (%v):\n%s", err, log)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logPath)
			return fmt.Errorf("pkcsslotd made no socket %s in 15 s:\n%s", sock, log)
		}
	}
}

// stopSlotd ends the daemon this process started, if any: SIGTERM, and
// SIGKILL after 5 s.
func stopSlotd() {
	slotdMu.Lock()
	cmd, exited := slotd, slotdExited
	slotd = nil
	slotdMu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		<-exited
	}
}

// initOCKToken initializes the soft token as its manual says: C_InitToken
// with the default SO PIN, C_SetPIN of the SO PIN, C_InitPIN of the user
// PIN. The library is finalized again; the token layer initializes it
// for itself.
func initOCKToken() error {
	p := pkcs11.New(OpenCryptokiModule)
	if p == nil {
		return fmt.Errorf("load %s: not a PKCS#11 library", OpenCryptokiModule)
	}
	if err := p.Initialize(); err != nil {
		return fmt.Errorf("C_Initialize: %w", err)
	}
	defer p.Finalize()
	const slot = OpenCryptokiSlot
	step := func(what string, err error) error {
		if err != nil {
			return fmt.Errorf("opencryptoki slot %d: %s: %w", slot, what, err)
		}
		return nil
	}
	if err := step("C_InitToken", p.InitToken(slot, ockDefaultSOPIN, OpenCryptokiLabel)); err != nil {
		return err
	}
	s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err := step("C_OpenSession", err); err != nil {
		return err
	}
	defer p.CloseSession(s)
	if err := step("C_Login(SO, default PIN)", p.Login(s, pkcs11.CKU_SO, ockDefaultSOPIN)); err != nil {
		return err
	}
	if err := step("C_SetPIN(SO)", p.SetPIN(s, ockDefaultSOPIN, ockSOPIN)); err != nil {
		return err
	}
	if err := step("C_InitPIN", p.InitPIN(s, ockUserPIN)); err != nil {
		return err
	}
	return step("C_Logout", p.Logout(s))
}
