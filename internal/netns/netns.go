// Package netns makes throwaway Linux network namespaces for btmm's tests, the
// lab (hack/lab) and benchmarks: named namespaces (so `ip netns exec` and
// daemons such as miniupnpd, named and krb5kdc can run in them), veth links,
// addresses and routes, and functions run inside a namespace on a locked OS
// thread. Everything made is removed by Close, also after a failure; tests use
// New, which registers that with t.Cleanup (which also runs after a panic).
//
// Names carry the creating process id ("btmm<pid>-<name>"), so Sweep can
// remove namespaces left by a process that was killed.
package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/btmm/btmm/controlplane/nsthread"
)

const runDir = "/run/netns"

// NS is a named network namespace with a netlink handle bound to it.
type NS struct {
	Name   string // full name under /run/netns
	Handle *netlink.Handle

	ns    netns.NsHandle
	mu    sync.Mutex
	procs []*exec.Cmd
}

var seq struct {
	sync.Mutex
	n int
}

var sweepOnce sync.Once

// Create makes a fresh named namespace "btmm<pid>-<short>" with lo up. The
// first call in a process first sweeps namespaces left by killed test
// processes (Sweep).
func Create(short string) (*NS, error) {
	sweepOnce.Do(func() { Sweep() })
	seq.Lock()
	seq.n++
	n := seq.n
	seq.Unlock()
	name := fmt.Sprintf("btmm%d-%s%d", os.Getpid(), short, n)
	if len(name) > 60 {
		return nil, fmt.Errorf("netns name %q too long", name)
	}
	return CreateNamed(name)
}

// CreateNamed makes a namespace with exactly this name (the lab uses stable
// names a person can type). It fails if the name exists.
func CreateNamed(name string) (*NS, error) {
	if _, err := os.Stat(filepath.Join(runDir, name)); err == nil {
		return nil, fmt.Errorf("netns %s already exists", name)
	}
	var h netns.NsHandle
	err := nsthread.Do(func() (err error) {
		if h, err = netns.NewNamed(name); err != nil { // enters it; nsthread returns
			return fmt.Errorf("create netns %s: %w", name, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		h.Close()
		netns.DeleteNamed(name)
		return nil, fmt.Errorf("netlink handle in %s: %w", name, err)
	}
	n := &NS{Name: name, Handle: nl, ns: h}
	lo, err := nl.LinkByName("lo")
	if err == nil {
		err = nl.LinkSetUp(lo)
	}
	if err != nil {
		n.Close()
		return nil, fmt.Errorf("lo up in %s: %w", name, err)
	}
	return n, nil
}

// New is Create for tests: the namespace is closed by t.Cleanup.
func New(t testing.TB, short string) *NS {
	t.Helper()
	n, err := Create(short)
	if err != nil {
		t.Fatalf("netns: %v", err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("netns cleanup: %v", err)
		}
	})
	return n
}

// Open attaches to an existing named namespace (e.g. one of the lab's).
// Close on the result removes it.
func Open(name string) (*NS, error) {
	h, err := netns.GetFromName(name)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", name, err)
	}
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		h.Close()
		return nil, err
	}
	return &NS{Name: name, Handle: nl, ns: h}, nil
}

// Fd is the namespace's file descriptor (for setns or netlink.NewHandleAt).
func (n *NS) Fd() int { return int(n.ns) }

// NsHandle is the namespace handle for libraries that take one.
func (n *NS) NsHandle() netns.NsHandle { return n.ns }

// Close stops the processes started with Start, then deletes the namespace.
func (n *NS) Close() error {
	n.mu.Lock()
	procs := n.procs
	n.procs = nil
	n.mu.Unlock()
	for _, c := range procs {
		stop(c)
	}
	// Processes started by other means (ip netns exec ... &) keep the
	// namespace alive; kill whatever still lives in it.
	killPIDsIn(n.Name)
	if n.Handle != nil {
		n.Handle.Close()
	}
	n.ns.Close()
	if err := netns.DeleteNamed(n.Name); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete netns %s: %w", n.Name, err)
	}
	return nil
}

// Do runs f inside the namespace on a locked OS thread (controlplane/nsthread:
// a thread that cannot return to its original namespace is not reused).
func (n *NS) Do(f func() error) error {
	var ferr error
	if err := nsthread.In(n.ns, func() error { ferr = f(); return nil }); err != nil {
		return fmt.Errorf("netns %s: %w", n.Name, errors.Join(err, ferr))
	}
	return ferr
}

// Command returns an exec.Cmd that runs name in the namespace through
// `ip netns exec`.
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Run runs a command in the namespace and returns its combined output; the
// error includes the output.
func (n *NS) Run(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := n.Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), n.Name, err, out)
	}
	return string(out), nil
}

// MustRun is Run that fails the test on error.
func (n *NS) MustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := n.Run(name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Start starts a long-running process in the namespace; Close stops it
// (SIGTERM, then SIGKILL after 2 s). Output goes to the given writers
// (set c.Stdout/c.Stderr before calling by using StartCmd instead).
func (n *NS) Start(name string, args ...string) (*exec.Cmd, error) {
	c := n.Command(context.Background(), name, args...)
	return c, n.StartCmd(c)
}

// StartCmd starts c (made with Command) and registers it for Close.
func (n *NS) StartCmd(c *exec.Cmd) error {
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := c.Start(); err != nil {
		return fmt.Errorf("start %s in %s: %w", c.Path, n.Name, err)
	}
	n.mu.Lock()
	n.procs = append(n.procs, c)
	n.mu.Unlock()
	return nil
}

func stop(c *exec.Cmd) {
	if c.Process == nil || c.ProcessState != nil {
		return
	}
	syscall.Kill(-c.Process.Pid, syscall.SIGTERM)
	done := make(chan struct{})
	go func() { c.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
		<-done
	}
}

func killPIDsIn(name string) {
	out, err := exec.Command("ip", "netns", "pids", name).Output()
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// Sweep deletes namespaces named by this package for processes that no
// longer run (left by a killed test). It returns the names removed.
func Sweep() []string {
	ents, _ := os.ReadDir(runDir)
	var removed []string
	for _, e := range ents {
		name := e.Name()
		if !strings.HasPrefix(name, "btmm") {
			continue
		}
		rest := strings.TrimPrefix(name, "btmm")
		i := strings.IndexByte(rest, '-')
		if i <= 0 {
			continue
		}
		pid, err := strconv.Atoi(rest[:i])
		if err != nil || !errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) {
			continue // not ours, or its process still runs
		}
		killPIDsIn(name)
		if netns.DeleteNamed(name) == nil {
			removed = append(removed, name)
		}
	}
	return removed
}

// LinkByName looks a link up in the namespace.
func (n *NS) LinkByName(name string) (netlink.Link, error) {
	l, err := n.Handle.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("link %s in %s: %w", name, n.Name, err)
	}
	return l, nil
}

// Veth joins a (link aName) and b (link bName) with a veth pair, both up.
func Veth(a *NS, aName string, b *NS, bName string) error {
	la := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: aName, Namespace: netlink.NsFd(a.Fd())}, PeerName: bName,
		PeerNamespace: netlink.NsFd(b.Fd())}
	if err := a.Handle.LinkAdd(la); err != nil {
		return fmt.Errorf("veth %s/%s <-> %s/%s: %w", a.Name, aName, b.Name, bName, err)
	}
	for _, side := range []struct {
		ns   *NS
		name string
	}{{a, aName}, {b, bName}} {
		l, err := side.ns.LinkByName(side.name)
		if err != nil {
			return err
		}
		if err := side.ns.Handle.LinkSetUp(l); err != nil {
			return fmt.Errorf("up %s in %s: %w", side.name, side.ns.Name, err)
		}
	}
	return nil
}

// MustVeth is Veth that fails the test on error.
func MustVeth(t testing.TB, a *NS, aName string, b *NS, bName string) {
	t.Helper()
	if err := Veth(a, aName, b, bName); err != nil {
		t.Fatal(err)
	}
}

// AddAddr adds cidr (e.g. "10.0.0.1/24" or "fd00::1/128") to link dev.
// IPv6 addresses are added with nodad so they are usable at once.
func (n *NS) AddAddr(dev, cidr string) error {
	l, err := n.LinkByName(dev)
	if err != nil {
		return err
	}
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		return fmt.Errorf("address %q: %w", cidr, err)
	}
	if a.IP.To4() == nil {
		a.Flags |= syscall.IFA_F_NODAD
	}
	if err := n.Handle.AddrAdd(l, a); err != nil {
		return fmt.Errorf("add %s to %s in %s: %w", cidr, dev, n.Name, err)
	}
	return nil
}

// MustAddr is AddAddr that fails the test on error.
func (n *NS) MustAddr(t testing.TB, dev, cidr string) {
	t.Helper()
	if err := n.AddAddr(dev, cidr); err != nil {
		t.Fatal(err)
	}
}

// AddRoute adds a route to dst ("default" or a CIDR) via gw (may be "") on dev (may be "").
func (n *NS) AddRoute(dst, gw, dev string) error {
	r := &netlink.Route{}
	if dst != "default" {
		_, ipn, err := net.ParseCIDR(dst)
		if err != nil {
			return fmt.Errorf("route dst %q: %w", dst, err)
		}
		r.Dst = ipn
	}
	if gw != "" {
		r.Gw = net.ParseIP(gw)
		if r.Gw == nil {
			return fmt.Errorf("route gw %q: not an IP", gw)
		}
	}
	if dev != "" {
		l, err := n.LinkByName(dev)
		if err != nil {
			return err
		}
		r.LinkIndex = l.Attrs().Index
	}
	if r.Dst == nil && r.Gw != nil && r.Gw.To4() == nil {
		r.Family = netlink.FAMILY_V6
	}
	if err := n.Handle.RouteAdd(r); err != nil {
		return fmt.Errorf("route %s via %q dev %q in %s: %w", dst, gw, dev, n.Name, err)
	}
	return nil
}

// MustRoute is AddRoute that fails the test on error.
func (n *NS) MustRoute(t testing.TB, dst, gw, dev string) {
	t.Helper()
	if err := n.AddRoute(dst, gw, dev); err != nil {
		t.Fatal(err)
	}
}

// Sysctl writes a sysctl (e.g. "net.ipv4.ip_forward", "1") inside the namespace.
func (n *NS) Sysctl(key, value string) error {
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	return n.Do(func() error {
		// /proc/sys/net reflects the namespace of the thread that opens it.
		return os.WriteFile(path, []byte(value), 0o644)
	})
}
