// Package pcscd starts a private pcscd with the vsmartcard vpcd driver, for
// tests, benchmarks and demos that must not touch (or need) the system pcscd.
//
// pcscd always creates its socket as /run/pcscd/pcscd.comm, so each private
// instance runs in its own mount namespace (unshare -m; unshare -Urm when not
// root) with a private directory bind-mounted on /run/pcscd. Clients reach it
// through PCSCLITE_CSOCK_NAME (see Daemon.Env). libpcsclite reads that
// variable once per process, at the first PC/SC call: a process can talk to
// one pcscd only, and must set the variable before its first scard call.
//
// The vpcd driver serves two reader slots, listening on TCP ports BasePort and
// BasePort+1 on all interfaces; the virtual card connects to them (see
// package vpcd). Several daemons may run at once if their ports differ.
package pcscd

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	// DriverPath is the vpcd IFD handler shipped by Debian's vsmartcard-vpcd.
	DriverPath = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"
	// FriendlyName is the reader name prefix written to reader.conf.
	FriendlyName = "Virtual PCD"
	// Slots is the number of reader slots one vpcd driver instance offers.
	Slots = 2

	// DebugEnv, when set to a non-empty value, makes Start run pcscd with
	// --debug --apdu (the log then grows by a line per 400 ms poll).
	DebugEnv = "BLINDPERSO_PCSCD_DEBUG"

	defaultStartTimeout = 20 * time.Second
	stopTimeout         = 5 * time.Second
	maxSockPath         = 107 // sizeof(sun_path) - 1
)

// Daemon is a running private pcscd.
type Daemon struct {
	Dir      string // private directory, bind-mounted on /run/pcscd for pcscd
	Socket   string // Dir/pcscd.comm, the value for PCSCLITE_CSOCK_NAME
	BasePort int    // TCP port of vpcd slot 0; slot i listens on BasePort+i
	LogFile  string // pcscd's stdout and stderr

	confDir string
	cmd     *exec.Cmd
	logf    *os.File
	done    chan struct{} // closed when cmd.Wait returned
	waitErr error         // valid once done is closed

	stopOnce sync.Once
	stopErr  error
}

// errPortTaken means pcscd came up without owning its vpcd ports.
var errPortTaken = errors.New("vpcd ports are not held by the new pcscd")

// startupScript runs inside the new mount namespace:
// $1 = directory to bind on /run/pcscd, then the pcscd command line.
// /run/pcscd is created if missing; where that is not allowed (user
// namespace, non-root), a tmpfs is put on /run first.
const startupScript = `set -e
dir=$1; shift
if [ ! -d /run/pcscd ]; then
	mkdir /run/pcscd 2>/dev/null || { mount -t tmpfs -o mode=0755 pcscd-run /run; mkdir /run/pcscd; }
fi
mount --bind "$dir" /run/pcscd
exec "$@"
`

// Start writes a private reader.conf.d (vpcd on BasePort and BasePort+1)
// under dir, starts pcscd -f in its own mount namespace with dir bound on
// /run/pcscd, and waits until the socket answers and the vpcd ports listen.
// basePort 0 picks two consecutive free ports. If ctx has no deadline, Start
// gives up after 20 s. Call Stop to end the daemon; if the calling process
// dies, pcscd gets SIGKILL.
func Start(ctx context.Context, dir string, basePort int) (*Daemon, error) {
	if basePort < 0 || basePort+Slots-1 > 65535 {
		return nil, fmt.Errorf("pcscd: base port %d out of range", basePort)
	}
	tools, err := findTools()
	if err != nil {
		return nil, err
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return nil, fmt.Errorf("pcscd: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("pcscd: %w", err)
	}
	sock := filepath.Join(dir, "pcscd.comm")
	if len(sock) > maxSockPath {
		return nil, fmt.Errorf("pcscd: socket path %s is longer than %d bytes; use a shorter dir", sock, maxSockPath)
	}
	if c, err := net.Dial("unix", sock); err == nil {
		c.Close()
		return nil, fmt.Errorf("pcscd: a pcscd already answers on %s", sock)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultStartTimeout)
		defer cancel()
	}

	for attempt := 1; ; attempt++ {
		port := basePort
		if port == 0 {
			if port, err = pickPorts(); err != nil {
				return nil, err
			}
		} else if err := checkPortsFree(port); err != nil {
			return nil, err
		}
		d, err := start(ctx, tools, dir, sock, port)
		if errors.Is(err, errPortTaken) && basePort == 0 && attempt < 5 && ctx.Err() == nil {
			continue // lost a race for the ports with another process
		}
		return d, err
	}
}

type tools struct{ unshare, sh, pcscd string }

func findTools() (tools, error) {
	var t tools
	var missing []string
	look := func(name, pkg string, extra ...string) string {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
		for _, p := range extra {
			if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
				return p
			}
		}
		missing = append(missing, fmt.Sprintf("%s (Debian package %s)", name, pkg))
		return ""
	}
	t.pcscd = look("pcscd", "pcscd", "/usr/sbin/pcscd", "/sbin/pcscd")
	t.unshare = look("unshare", "util-linux", "/usr/bin/unshare")
	t.sh = look("sh", "dash", "/bin/sh")
	look("mount", "mount", "/usr/bin/mount", "/bin/mount")
	if _, err := os.Stat(DriverPath); err != nil {
		missing = append(missing, fmt.Sprintf("%s (Debian package vsmartcard-vpcd)", DriverPath))
	}
	if len(missing) > 0 {
		return t, fmt.Errorf("pcscd: missing %s; install with: apt-get install pcscd vsmartcard-vpcd util-linux mount",
			strings.Join(missing, ", "))
	}
	return t, nil
}

// readerConf is the reader.conf entry for the vpcd driver. The port after
// "/dev/null:" is parsed by the driver with strtoul(s, NULL, 0): decimal,
// 0x-prefixed hex, and (pitfall) octal with a leading 0. The driver listens
// on that port for slot 0 and on port+1 for slot 1; CHANNELID is only used
// when DEVICENAME is absent.
func readerConf(port int) string {
	return fmt.Sprintf("FRIENDLYNAME %q\nDEVICENAME   /dev/null:%d\nLIBPATH      %s\nCHANNELID    %d\n",
		FriendlyName, port, DriverPath, port)
}

func start(ctx context.Context, t tools, dir, sock string, port int) (*Daemon, error) {
	d := &Daemon{
		Dir:      dir,
		Socket:   sock,
		BasePort: port,
		LogFile:  filepath.Join(dir, "pcscd.log"),
		confDir:  filepath.Join(dir, "reader.conf.d"),
		done:     make(chan struct{}),
	}
	if err := os.RemoveAll(d.confDir); err != nil {
		return nil, fmt.Errorf("pcscd: %w", err)
	}
	if err := os.Mkdir(d.confDir, 0o755); err != nil {
		return nil, fmt.Errorf("pcscd: %w", err)
	}
	if err := os.WriteFile(filepath.Join(d.confDir, "vpcd"), []byte(readerConf(port)), 0o644); err != nil {
		return nil, fmt.Errorf("pcscd: %w", err)
	}
	// Leftovers of a killed instance; a live one was ruled out by Start.
	os.Remove(sock)
	os.Remove(filepath.Join(dir, "pcscd.pid"))

	logf, err := os.OpenFile(d.LogFile, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("pcscd: %w", err)
	}
	d.logf = logf

	args := []string{"--mount", "--propagation", "private"}
	if os.Geteuid() != 0 {
		args = append([]string{"--user", "--map-root-user"}, args...)
	}
	args = append(args, "--", t.sh, "-c", startupScript, "pcscd-start", dir, t.pcscd, "--foreground", "--config", d.confDir)
	if os.Getenv(DebugEnv) != "" {
		args = append(args, "--debug", "--apdu")
	}
	cmd := exec.Command(t.unshare, args...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	// unshare execs sh, which execs pcscd: the child we start is pcscd
	// itself, so Pdeathsig (kept across these execs, and across entering a
	// user namespace, as measured) kills pcscd if this process dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("pcscd: start %s: %w", t.unshare, err)
	}
	d.cmd = cmd
	go func() {
		d.waitErr = cmd.Wait()
		close(d.done)
	}()

	if err := d.waitReady(ctx); err != nil {
		d.Stop()
		if errors.Is(err, errPortTaken) {
			return nil, err
		}
		hint := ""
		if os.Geteuid() != 0 {
			hint = " (not root: this needs unprivileged user namespaces, see sysctl user.max_user_namespaces and kernel.apparmor_restrict_unprivileged_userns; or run as root)"
		}
		return nil, fmt.Errorf("pcscd: %w%s; log %s:\n%s", err, hint, d.LogFile, tail(d.LogFile, 20))
	}
	return d, nil
}

// waitReady waits until pcscd answers on its socket and holds both vpcd
// listening sockets.
func (d *Daemon) waitReady(ctx context.Context) error {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-d.done:
			return fmt.Errorf("pcscd exited during startup: %v", d.waitErr)
		case <-ctx.Done():
			return fmt.Errorf("pcscd did not come up: %w", ctx.Err())
		case <-tick.C:
		}
		c, err := net.Dial("unix", d.Socket)
		if err != nil {
			continue
		}
		c.Close()
		// pcscd opens its socket after loading the readers, so the ports
		// are final by now.
		ok, err := ownsListeners(d.cmd.Process.Pid, d.BasePort, d.BasePort+1)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("%w (ports %d-%d)", errPortTaken, d.BasePort, d.BasePort+1)
		}
		return nil
	}
}

// Addr is the address the virtual card dials (vpcd.Dial) for slot 0 or 1.
func (d *Daemon) Addr(slot int) string {
	checkSlot(slot)
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(d.BasePort+slot))
}

// ReaderName is the PC/SC reader name of slot 0 or 1: "Virtual PCD 00 00"
// and "Virtual PCD 00 01".
func (d *Daemon) ReaderName(slot int) string {
	checkSlot(slot)
	return fmt.Sprintf("%s 00 %02X", FriendlyName, slot)
}

// Env is the environment entry pointing PC/SC clients (libpcsclite, e.g.
// opensc-tool or a child process) at this daemon.
func (d *Daemon) Env() string { return "PCSCLITE_CSOCK_NAME=" + d.Socket }

func checkSlot(slot int) {
	if slot < 0 || slot >= Slots {
		panic(fmt.Sprintf("pcscd: slot %d out of range [0,%d)", slot, Slots))
	}
}

// Stop terminates pcscd (SIGTERM to its process group, SIGKILL after 5 s),
// waits for it, and removes the reader.conf.d it wrote. The log file stays.
// It returns an error if pcscd had died on its own or had to be killed.
func (d *Daemon) Stop() error {
	d.stopOnce.Do(func() { d.stopErr = d.stop() })
	return d.stopErr
}

func (d *Daemon) stop() error {
	var errs []error
	pgid := d.cmd.Process.Pid
	select {
	case <-d.done:
		errs = append(errs, fmt.Errorf("pcscd had exited before Stop: %v", d.waitErr))
	default:
		syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-d.done:
			if d.waitErr != nil && !killedBy(d.waitErr, syscall.SIGTERM) {
				errs = append(errs, fmt.Errorf("pcscd exit: %v", d.waitErr))
			}
		case <-time.After(stopTimeout):
			syscall.Kill(-pgid, syscall.SIGKILL)
			<-d.done
			errs = append(errs, fmt.Errorf("pcscd ignored SIGTERM for %v and was killed", stopTimeout))
		}
	}
	// Anything else left in the group (there should be nothing).
	deadline := time.Now().Add(stopTimeout)
	for syscall.Kill(-pgid, 0) == nil {
		if time.Now().After(deadline) {
			syscall.Kill(-pgid, syscall.SIGKILL)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	d.logf.Close()
	os.RemoveAll(d.confDir)
	os.Remove(d.Socket)
	os.Remove(filepath.Join(d.Dir, "pcscd.pid"))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("pcscd: %w; log %s", err, d.LogFile)
	}
	return nil
}

func killedBy(err error, sig syscall.Signal) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == sig
}

// pickPorts returns p such that p and p+1 are free, chosen below the usual
// ephemeral range so that outgoing connections do not grab them meanwhile.
func pickPorts() (int, error) {
	for range 200 {
		p := 20000 + rand.IntN(12000)
		if checkPortsFree(p) == nil {
			return p, nil
		}
	}
	return 0, errors.New("pcscd: found no two consecutive free TCP ports")
}

// checkPortsFree checks that the vpcd driver can listen on port and port+1
// (it binds INADDR_ANY).
func checkPortsFree(port int) error {
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	for p := port; p < port+Slots; p++ {
		ln, err := net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", p))
		if err != nil {
			return fmt.Errorf("pcscd: vpcd port %d is not free: %w", p, err)
		}
		lns = append(lns, ln)
	}
	return nil
}

// ownsListeners reports whether process pid holds TCP sockets listening on
// all the given ports. If pid's descriptors cannot be read, it only checks
// that something listens there.
func ownsListeners(pid int, ports ...int) (bool, error) {
	inodes, fdErr := socketInodes(pid)
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		return false, fmt.Errorf("check vpcd ports: %w", err)
	}
	defer f.Close()
	found := map[int]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
		fs := strings.Fields(sc.Text())
		if len(fs) < 10 || fs[3] != "0A" { // 0A = LISTEN
			continue
		}
		_, hexPort, ok := strings.Cut(fs[1], ":")
		if !ok {
			continue
		}
		p, err := strconv.ParseUint(hexPort, 16, 16)
		if err != nil {
			continue
		}
		if fdErr == nil && !inodes[fs[9]] {
			continue
		}
		found[int(p)] = true
	}
	if err := sc.Err(); err != nil {
		return false, fmt.Errorf("check vpcd ports: %w", err)
	}
	for _, p := range ports {
		if !found[p] {
			return false, nil
		}
	}
	return true, nil
}

func socketInodes(pid int) (map[string]bool, error) {
	fdDir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(fdDir)
	if err != nil {
		return nil, err
	}
	inodes := map[string]bool{}
	for _, e := range ents {
		l, err := os.Readlink(filepath.Join(fdDir, e.Name()))
		if err != nil {
			continue
		}
		if ino, ok := strings.CutPrefix(l, "socket:["); ok {
			inodes[strings.TrimSuffix(ino, "]")] = true
		}
	}
	return inodes, nil
}

// tail returns the last n lines of file, for error messages.
func tail(file string, n int) string {
	b, err := os.ReadFile(file)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}
