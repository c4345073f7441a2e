package ebpf

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"github.com/btmm/btmm/controlplane/nldump"
	"github.com/btmm/btmm/xfrm"
	"hash"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// host is one side of a two-namespace topology: an IPv4-only veth between
// the namespaces, each with its ULA on lo.
type host struct {
	name  string
	ns    *netns.NS
	dev   string
	ula   netip.Addr
	outer netip.Addr
	port  uint16
	root  string
	dp    *Dataplane
}

// mountBPFFS mounts a private bpffs for the test's pins (the test process
// stays in the root mount namespace; `ip netns exec` would hide /sys/fs/bpf).
func mountBPFFS(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

func topology(t testing.TB) (a, b *host) {
	t.Helper()
	testenv.RequireNetNS(t)
	fs := mountBPFFS(t)
	a = &host{name: "a", ns: netns.New(t, "ea"), dev: "va", ula: ulaA, outer: outerA, port: portA, root: filepath.Join(fs, "a")}
	b = &host{name: "b", ns: netns.New(t, "eb"), dev: "vb", ula: ulaB, outer: outerB, port: portB, root: filepath.Join(fs, "b")}
	netns.MustVeth(t, a.ns, a.dev, b.ns, b.dev)
	for _, h := range []*host{a, b} {
		h.ns.MustAddr(t, h.dev, h.outer.String()+"/24")
		h.ns.MustAddr(t, "lo", h.ula.String()+"/128")
		// No IPv6 address on the veth: IPv6 crosses it only inside the tunnel.
		must(t, h.ns.Sysctl("net.ipv6.conf."+h.dev+".addr_gen_mode", "1"))
		l, err := h.ns.LinkByName(h.dev)
		must(t, err)
		addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.ns.Handle.AddrList(l, netlink.FAMILY_V6) })
		must(t, err)
		for _, ad := range addrs {
			must(t, h.ns.Handle.AddrDel(l, &ad))
		}
	}
	return a, b
}

func (h *host) start(t testing.TB, cfg Config) {
	t.Helper()
	cfg.Device, cfg.NetNS, cfg.PinRoot = h.dev, "/run/netns/"+h.ns.Name, h.root
	dp, err := New(cfg)
	if err != nil {
		t.Fatalf("%s: %v", h.name, err)
	}
	h.dp = dp
	t.Cleanup(func() {
		if h.dp != nil {
			h.dp.Close()
		}
	})
}

func key(n int, seed byte) []byte {
	k := make([]byte, n)
	for i := range k {
		k[i] = seed + byte(i)
	}
	return k
}

// state is h's desired state with peer p reachable at outer.
func (h *host) state(p *host, outer netip.AddrPort) *controlplane.State {
	spi := func(from, to *host) uint32 {
		return 0x1000 + uint32(from.ula.As16()[15])<<4 + uint32(to.ula.As16()[15])
	}
	return &controlplane.State{
		Local: controlplane.Local{ULA: h.ula, Port: h.port, Device: h.dev},
		Peers: []controlplane.Peer{{
			Name: p.name, ULA: p.ula, Outer: outer,
			Out: controlplane.SA{SPI: spi(h, p), Cipher: controlplane.CipherAESGCM, Key: key(20, byte(spi(h, p)))},
			In:  controlplane.SA{SPI: spi(p, h), Cipher: controlplane.CipherAESGCM, Key: key(20, byte(spi(p, h)))},
		}},
	}
}

func (h *host) set(t testing.TB, st *controlplane.State) []controlplane.Change {
	t.Helper()
	ch, err := h.dp.Set(context.Background(), st)
	if err != nil {
		t.Fatalf("%s: set: %v", h.name, err)
	}
	return ch
}

func connect(t testing.TB, a, b *host, cfg Config) {
	t.Helper()
	a.start(t, cfg)
	b.start(t, cfg)
	a.set(t, a.state(b, netip.AddrPortFrom(b.outer, b.port)))
	b.set(t, b.state(a, netip.AddrPortFrom(a.outer, a.port)))
}

// ping wants every echo answered. -w (a deadline) rather than -W: with -W
// ping gives up on a reply after twice the round trip it has seen, so a
// first echo delayed by neighbour resolution on a busy machine counted as
// lost.
func ping(t testing.TB, from, to *host) {
	t.Helper()
	out, err := from.ns.Run("ping", "-6", "-c", "3", "-i", "0.2", "-w", "10", to.ula.String())
	if err != nil {
		t.Fatalf("ping %s -> %s: %v", from.name, to.name, err)
	}
	if !strings.Contains(out, " 0% packet loss") {
		t.Fatalf("ping %s -> %s lost packets:\n%s", from.name, to.name, out)
	}
}

func peerStats(t testing.TB, h *host) controlplane.PeerStats {
	t.Helper()
	st, err := h.dp.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 1 {
		t.Fatalf("%s: stats for %d peers, want 1", h.name, len(st))
	}
	return st[0]
}

// stream is a TCP connection from a to b's ULA; the receiver hashes what arrives.
type stream struct {
	conn net.Conn
	sent atomic.Int64
	hash chan [2]any // sha256 sum, byte count
}

func openStream(t testing.TB, a, b *host) *stream {
	t.Helper()
	var ln net.Listener
	must(t, b.ns.Do(func() (err error) {
		ln, err = net.Listen("tcp6", net.JoinHostPort(b.ula.String(), "5001"))
		return err
	}))
	t.Cleanup(func() { ln.Close() })
	s := &stream{hash: make(chan [2]any, 1)}
	go func() {
		c, err := ln.Accept()
		if err != nil {
			s.hash <- [2]any{err, int64(0)}
			return
		}
		defer c.Close()
		h := sha256.New()
		n, err := io.Copy(h, c)
		if err != nil {
			s.hash <- [2]any{err, n}
			return
		}
		s.hash <- [2]any{h.Sum(nil), n}
	}()
	must(t, a.ns.Do(func() (err error) {
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: a.ula.AsSlice()}}
		s.conn, err = d.Dial("tcp6", net.JoinHostPort(b.ula.String(), "5001"))
		return err
	}))
	return s
}

// finish closes the sending side and checks that every byte arrived intact.
func (s *stream) finish(t testing.TB, sum []byte) {
	t.Helper()
	s.conn.(*net.TCPConn).CloseWrite()
	select {
	case r := <-s.hash:
		if err, ok := r[0].(error); ok {
			t.Fatalf("receiver: %v", err)
		}
		if r[1].(int64) != s.sent.Load() || !bytes.Equal(r[0].([]byte), sum) {
			t.Fatalf("received %d bytes (sha256 %x), sent %d (sha256 %x)", r[1], r[0], s.sent.Load(), sum)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("receiver did not finish")
	}
	s.conn.Close()
}

// pump writes random bytes on a stream, a little at a time, until finish.
type pump struct {
	s    *stream
	h    hash.Hash
	stop chan struct{}
	done chan error
}

func startPump(t testing.TB, s *stream) *pump {
	p := &pump{s: s, h: sha256.New(), stop: make(chan struct{}), done: make(chan error, 1)}
	go func() {
		buf := make([]byte, 16<<10)
		for {
			select {
			case <-p.stop:
				p.done <- nil
				return
			default:
			}
			rand.Read(buf)
			s.conn.SetWriteDeadline(time.Now().Add(30 * time.Second))
			n, err := s.conn.Write(buf)
			p.h.Write(buf[:n])
			s.sent.Add(int64(n))
			if err != nil {
				p.done <- err
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	return p
}

// waitSent waits until n bytes went out (30 s at most).
func (p *pump) waitSent(t testing.TB, n int64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for p.s.sent.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("stream stalled at %d bytes", p.s.sent.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// finish stops writing and checks that every byte arrived intact.
func (p *pump) finish(t testing.TB) {
	t.Helper()
	close(p.stop)
	if err := <-p.done; err != nil {
		t.Fatal(err)
	}
	p.s.finish(t, p.h.Sum(nil))
}

// sendChecked sends n random bytes from a to b over one TCP connection
// between the ULAs and checks that all arrive intact.
func sendChecked(t testing.TB, a, b *host, n int) {
	t.Helper()
	data := randomBytes(t, n)
	s := openStream(t, a, b)
	w, err := s.conn.Write(data)
	s.sent.Add(int64(w))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	s.finish(t, sum[:])
}

func randomBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// attached lists programs attached to h's device in its namespace, by
// TCX query and by clsact filter listing.
func attached(t testing.TB, h *host) []string {
	t.Helper()
	return attachedOn(t, h, h.dev)
}

// attachedOn is attached for another device of h's namespace (lo).
func attachedOn(t testing.TB, h *host, dev string) []string {
	t.Helper()
	var names []string
	must(t, h.ns.Do(func() error {
		l, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		if testenv.Probe(testenv.TCX) != nil {
			return nil // no TCX here (6.1): nothing can be attached that way
		}
		for _, at := range []ebpf.AttachType{ebpf.AttachTCXEgress, ebpf.AttachTCXIngress} {
			r, err := link.QueryPrograms(link.QueryOptions{Target: l.Index, Attach: at})
			if errors.Is(err, ebpf.ErrNotSupported) {
				continue
			}
			if err != nil {
				return err
			}
			for _, p := range r.Programs {
				names = append(names, fmt.Sprintf("tcx %v prog %d", at, p.ID))
			}
		}
		return nil
	}))
	l, err := h.ns.LinkByName(dev)
	if err != nil {
		t.Fatal(err)
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_EGRESS, netlink.HANDLE_MIN_INGRESS} {
		fs, _ := nldump.Retry(func() ([]netlink.Filter, error) { return h.ns.Handle.FilterList(l, parent) })
		for _, f := range fs {
			names = append(names, fmt.Sprintf("filter %s", f.Type()))
		}
	}
	qs, _ := h.ns.Handle.QdiscList(l)
	for _, q := range qs {
		if q.Type() == "clsact" {
			names = append(names, "qdisc clsact")
		}
	}
	return names
}

// leftovers lists what a closed dataplane must not leave behind.
func leftovers(t testing.TB, h *host) []string {
	t.Helper()
	got := attached(t, h)
	if _, err := os.Stat(h.root); !errors.Is(err, os.ErrNotExist) {
		names, _ := Pinned(h.root)
		got = append(got, fmt.Sprintf("pin root %s: %v %v", h.root, err, names))
	}
	rs, _ := nldump.Retry(func() ([]netlink.Route, error) {
		return h.ns.Handle.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Protocol: routeProtocol}, netlink.RT_FILTER_PROTOCOL)
	})
	for _, r := range rs {
		got = append(got, "route "+r.String())
	}
	ns, _ := nldump.Retry(func() ([]netlink.Neigh, error) { return h.ns.Handle.NeighList(0, netlink.FAMILY_V6) })
	for _, n := range ns {
		if n.State&netlink.NUD_PERMANENT != 0 {
			got = append(got, "neigh "+n.String())
		}
	}
	ss, _ := nldump.Retry(func() ([]netlink.XfrmState, error) { return h.ns.Handle.XfrmStateList(netlink.FAMILY_ALL) })
	for _, s := range ss {
		got = append(got, fmt.Sprintf("xfrm state spi 0x%x", s.Spi))
	}
	ps, _ := nldump.Retry(func() ([]netlink.XfrmPolicy, error) { return h.ns.Handle.XfrmPolicyList(netlink.FAMILY_ALL) })
	for range ps {
		got = append(got, "xfrm policy")
	}
	return got
}

func closeAndCheck(t testing.TB, hs ...*host) {
	t.Helper()
	for _, h := range hs {
		if err := h.dp.Close(); err != nil {
			t.Errorf("%s: close: %v", h.name, err)
		}
		h.dp = nil
		if l := leftovers(t, h); len(l) > 0 {
			t.Errorf("%s: left behind after Close: %q", h.name, l)
		}
	}
}

// TestCleartextNetNS: ping -6 and a multi-MB TCP transfer (GSO on the veth)
// between ULAs across an IPv4-only veth, on this kernel, TCX or clsact.
func TestCleartextNetNS(t *testing.T) {
	for _, force := range []bool{false, true} {
		t.Run(map[bool]string{false: "probe", true: "clsact"}[force], func(t *testing.T) {
			a, b := topology(t)
			connect(t, a, b, Config{Cleartext: true, ForceClsact: force})
			if force && a.dp.attach.kind() != "clsact+cls_bpf" {
				t.Fatalf("attach %s, want clsact", a.dp.attach.kind())
			}
			if !strings.Contains(a.dp.Status(), "NOT ENCRYPTED") {
				t.Errorf("status does not shout cleartext: %q", a.dp.Status())
			}
			t.Logf("a: %s", a.dp.Status())
			ping(t, a, b)
			ping(t, b, a)
			sendChecked(t, a, b, 8<<20)

			sa, sb := peerStats(t, a), peerStats(t, b)
			t.Logf("a->b %+v", sa)
			t.Logf("b<-a %+v", sb)
			if sa.TxBytes < 8<<20 || sb.RxBytes < 8<<20 {
				t.Errorf("counters do not show the transfer: a tx %d bytes, b rx %d bytes", sa.TxBytes, sb.RxBytes)
			}
			// Counters count skbs: a mean above the MTU means GSO
			// super-packets went through the programs whole.
			if mean := sa.TxBytes / max(sa.TxPackets, 1); mean <= 1500 {
				t.Errorf("mean egress skb %d bytes: GSO not exercised", mean)
			}
			t.Run("bpftool", func(t *testing.T) {
				bpftool := testenv.RequireBinary(t, "bpftool", "bpftool")
				out, err := exec.Command(bpftool, "map", "dump", "pinned", filepath.Join(a.root, "peer_by_ula")).CombinedOutput()
				if err != nil {
					t.Fatalf("bpftool: %v: %s", err, out)
				}
				t.Logf("bpftool map dump pinned %s/peer_by_ula:\n%s", a.root, out)
				for _, w := range []string{"outer_addr", "outer_port", "local_addr", "addr"} {
					if !strings.Contains(string(out), w) {
						t.Errorf("dump lacks %q", w)
					}
				}
			})
			closeAndCheck(t, a, b)
		})
	}
}

// TestPartialSetNetNS: a peer whose outer address has no route is
// reported and left out; the other peer is programmed; nothing else moves.
func TestPartialSetNetNS(t *testing.T) {
	a, b := topology(t)
	a.start(t, Config{Cleartext: true})
	b.start(t, Config{Cleartext: true})
	b.set(t, b.state(a, netip.AddrPortFrom(a.outer, a.port)))
	st := a.state(b, netip.AddrPortFrom(b.outer, b.port))
	c := controlplane.Peer{Name: "c", ULA: netip.MustParseAddr("fd00::c"), Outer: netip.MustParseAddrPort("192.0.2.1:4500"),
		Out: controlplane.SA{SPI: 0x5001, Cipher: controlplane.CipherAESGCM, Key: key(20, 1)},
		In:  controlplane.SA{SPI: 0x5002, Cipher: controlplane.CipherAESGCM, Key: key(20, 2)}}
	st.Peers = append(st.Peers, c)
	ch, err := a.dp.Set(context.Background(), st)
	if err == nil || !strings.Contains(err.Error(), `peer "c"`) {
		t.Fatalf("err %v, want one naming peer c", err)
	}
	for _, x := range ch {
		if strings.Contains(x.What, "fd00::c") {
			t.Errorf("unroutable peer was programmed: %v", x)
		}
	}
	if len(ch) == 0 {
		t.Errorf("no changes reported for peer b")
	}
	ping(t, a, b)
	closeAndCheck(t, a, b)
}

// TestIncompatiblePinNetNS: a map pinned by another build under the same
// name is replaced, not fatal.
func TestIncompatiblePinNetNS(t *testing.T) {
	a, b := topology(t)
	must(t, os.MkdirAll(a.root, 0o700))
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 16, ValueSize: 4, MaxEntries: 8})
	must(t, err)
	must(t, m.Pin(filepath.Join(a.root, "peer_by_ula")))
	m.Close()
	connect(t, a, b, Config{Cleartext: true})
	ping(t, a, b)
	closeAndCheck(t, a, b)
}

// TestMoveNetNS: b's outer address changes while a TCP stream runs; the
// dataplanes rewrite map entries only, and every byte arrives.
func TestMoveNetNS(t *testing.T) {
	a, b := topology(t)
	connect(t, a, b, Config{Cleartext: true})
	testMove(t, a, b)
	closeAndCheck(t, a, b)
}

// TestMoveSecureVM is TestMoveNetNS in secure mode: the ESP SAs between the
// ULAs are the same objects before and after the move (same add time,
// counters carried on).
func TestMoveSecureVM(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	a, b := topology(t)
	connect(t, a, b, Config{})
	sas := func() map[int]netlink.XfrmState {
		ss, err := nldump.Retry(func() ([]netlink.XfrmState, error) { return a.ns.Handle.XfrmStateList(netlink.FAMILY_V6) })
		must(t, err)
		m := map[int]netlink.XfrmState{}
		for _, s := range ss {
			m[s.Spi] = s
		}
		return m
	}
	before := sas()
	testMove(t, a, b)
	after := sas()
	if len(before) != 2 || len(after) != 2 {
		t.Fatalf("SAs before %d after %d, want 2", len(before), len(after))
	}
	for spi, x := range before {
		y, ok := after[spi]
		if !ok || y.Statistics.AddTime != x.Statistics.AddTime || y.Statistics.Packets <= x.Statistics.Packets {
			t.Errorf("SA spi 0x%x was replaced or stalled across the move: before %+v after %+v", spi, x.Statistics, y.Statistics)
		}
	}
	closeAndCheck(t, a, b)
}

func testMove(t *testing.T, a, b *host) {
	t.Helper()
	p := startPump(t, openStream(t, a, b))
	p.waitSent(t, 256<<10)
	rxBefore := peerStats(t, a).RxPackets

	// b gets a new address and leaves from it; a learns it.
	moved := netip.MustParseAddr("10.0.0.3")
	b.ns.MustAddr(t, b.dev, moved.String()+"/24")
	bst := b.state(a, netip.AddrPortFrom(a.outer, a.port))
	bst.Local.Outer = moved
	chB := b.set(t, bst)
	chA := a.set(t, a.state(b, netip.AddrPortFrom(moved, b.port)))
	for _, c := range append(chA, chB...) {
		if c.Object != "map" || c.Op != "move" && c.Op != "update" {
			t.Errorf("a move changed more than a map entry: %v", c)
		}
	}
	if len(chA) != 1 || len(chB) != 1 {
		t.Errorf("changes a=%v b=%v, want one map move each", chA, chB)
	}
	t.Logf("a: %v", chA)
	t.Logf("b: %v", chB)
	if again := a.set(t, a.state(b, netip.AddrPortFrom(moved, b.port))); len(again) != 0 {
		t.Errorf("second identical Set changed %v", again)
	}
	p.waitSent(t, p.s.sent.Load()+512<<10)
	p.finish(t)

	st := peerStats(t, a)
	if st.RxPackets <= rxBefore || st.LastOuterChange.IsZero() {
		t.Errorf("after the move: rx packets %d (before %d), last outer change %v", st.RxPackets, rxBefore, st.LastOuterChange)
	}
	var v btmmUla
	if err := a.dp.objs.PeerByOuter.Lookup(outerKey(netip.AddrPortFrom(moved, b.port)), &v); err != nil {
		t.Errorf("peer_by_outer has no entry for the new address: %v", err)
	}
	if err := a.dp.objs.PeerByOuter.Lookup(outerKey(netip.AddrPortFrom(b.outer, b.port)), &v); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Errorf("old outer address still mapped: %v", err)
	}
}

// abandon drops the dataplane's file descriptors without cleaning up, as a
// crashed agent would.
func (d *Dataplane) abandon() {
	// The repair loop is part of the agent: it dies with it (and would
	// otherwise read the links closed here).
	d.mu.Lock()
	d.closed = true
	stop := d.stopRep
	d.mu.Unlock()
	if stop != nil {
		stop()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, l := range d.attach.tcx {
		l.Close()
	}
	d.objs.Close()
	d.nl.Close()
	d.ns.Close()
}

// TestRestartNetNS: an agent that dies and starts again reuses the pinned
// maps and links: its first Set changes nothing and traffic never stops
// being tunnelled. Bad input is refused without touching anything.
func TestRestartNetNS(t *testing.T) {
	for _, force := range []bool{false, true} {
		t.Run(map[bool]string{false: "probe", true: "clsact"}[force], func(t *testing.T) {
			a, b := topology(t)
			connect(t, a, b, Config{Cleartext: true, ForceClsact: force})
			ping(t, a, b)
			a.dp.abandon()
			a.dp = nil
			ping(t, a, b) // still attached and programmed with no agent at all

			a.start(t, Config{Cleartext: true, ForceClsact: force})
			if ch := a.set(t, a.state(b, netip.AddrPortFrom(b.outer, b.port))); len(ch) != 0 {
				t.Errorf("first Set after restart changed %v, want nothing", ch)
			}
			want := 2 // one TCX link per direction
			if a.dp.attach.clsact {
				want = 3 // two filters and the clsact qdisc
			}
			if got := attached(t, a); len(got) != want {
				t.Errorf("attached after restart: %q, want one program per direction", got)
			}
			ping(t, a, b)

			bad := a.state(b, netip.AddrPortFrom(b.outer, b.port))
			bad.Peers[0].Outer = netip.MustParseAddrPort("[2001:db8::1]:4500")
			if ch, err := a.dp.Set(context.Background(), bad); err == nil || len(ch) != 0 {
				t.Errorf("bad state: changes %v, err %v; want an error and no change", ch, err)
			}
			ping(t, a, b)
			closeAndCheck(t, a, b)
		})
	}
}

// TestSecureVM: secure mode, ESP between the ULAs, outer IPv4/UDP swapped
// in TC. Needs esp6 and GCM: the VM tier (6.1, no TCX: clsact path).
func TestSecureVM(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	a, b := topology(t)
	connect(t, a, b, Config{})
	t.Logf("a: %s", a.dp.Status())
	if strings.Contains(a.dp.Status(), "NOT ENCRYPTED") {
		t.Fatalf("secure status says cleartext: %s", a.dp.Status())
	}
	ping(t, a, b)
	ping(t, b, a)
	data := randomBytes(t, 2<<20)
	s := openStream(t, a, b)
	n, err := s.conn.Write(data)
	s.sent.Add(int64(n))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	s.finish(t, sum[:])

	// ESP really carried it: the SAs counted the bytes.
	for _, h := range []*host{a, b} {
		ss, err := nldump.Retry(func() ([]netlink.XfrmState, error) { return h.ns.Handle.XfrmStateList(netlink.FAMILY_V6) })
		if err != nil {
			t.Fatal(err)
		}
		if len(ss) != 2 {
			t.Fatalf("%s: %d xfrm states, want 2", h.name, len(ss))
		}
		for _, s := range ss {
			t.Logf("%s: state spi 0x%x %s->%s packets %d bytes %d", h.name, s.Spi, s.Src, s.Dst, s.Statistics.Packets, s.Statistics.Bytes)
			if s.Statistics.Bytes < 2<<20 && net.IP(s.Dst).Equal(b.ula.AsSlice()) {
				t.Errorf("%s: SA towards b carried only %d bytes", h.name, s.Statistics.Bytes)
			}
		}
	}
	t.Logf("a stats %+v; b stats %+v", peerStats(t, a), peerStats(t, b))
	d, _ := a.dp.Drops()
	t.Logf("a drops %v", d)

	// A restarted agent adopts the SAs, policies, maps and filters as they are.
	a.dp.abandon()
	a.dp = nil
	ping(t, a, b)
	a.start(t, Config{})
	if ch := a.set(t, a.state(b, netip.AddrPortFrom(b.outer, b.port))); len(ch) != 0 {
		t.Errorf("first Set after restart changed %v, want nothing", ch)
	}
	ping(t, b, a)
	closeAndCheck(t, a, b)
}

// xfrmHost programs h as a host on the plain XFRM dataplane towards peer:
// ESP-in-UDP states (RFC 3948, espinudp) with outer IPv4 and the ULAs as
// selectors, written here by hand (out: h -> peer, in: peer -> h), plus the
// UDP encapsulation socket the kernel needs to receive them.
func xfrmHost(t testing.TB, h, peer *host, out, in controlplane.SA) {
	t.Helper()
	sa := func(src, dst *host, s controlplane.SA) *netlink.XfrmState {
		return &netlink.XfrmState{Src: src.outer.AsSlice(), Dst: dst.outer.AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
			Mode: netlink.XFRM_MODE_TUNNEL, Spi: int(s.SPI), Reqid: 7,
			Aead:     &netlink.XfrmStateAlgo{Name: string(s.Cipher), Key: s.Key, ICVLen: 128},
			Encap:    &netlink.XfrmStateEncap{Type: netlink.XFRM_ENCAP_ESPINUDP, SrcPort: int(src.port), DstPort: int(dst.port), OriginalAddress: net.IPv4zero},
			Selector: &netlink.XfrmPolicy{Src: hostNet(src.ula), Dst: hostNet(dst.ula)}}
	}
	must(t, h.ns.Handle.XfrmStateAdd(sa(h, peer, out)))
	must(t, h.ns.Handle.XfrmStateAdd(sa(peer, h, in)))
	pol := func(dir netlink.Dir, src, dst *host) *netlink.XfrmPolicy {
		return &netlink.XfrmPolicy{Src: hostNet(src.ula), Dst: hostNet(dst.ula), Dir: dir,
			Tmpls: []netlink.XfrmPolicyTmpl{{Src: src.outer.AsSlice(), Dst: dst.outer.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: 7}}}
	}
	must(t, h.ns.Handle.XfrmPolicyAdd(pol(netlink.XFRM_DIR_OUT, h, peer)))
	must(t, h.ns.Handle.XfrmPolicyAdd(pol(netlink.XFRM_DIR_IN, peer, h)))
	l, err := h.ns.LinkByName(h.dev)
	must(t, err)
	// MTU as the xfrm dataplane would pick it: device MTU - IPv4 - UDP - ESP/GCM overhead.
	must(t, h.ns.Handle.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: hostNet(peer.ula), Src: h.ula.AsSlice(), MTU: 1400}))
	var fd int
	must(t, h.ns.Do(func() (err error) {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err != nil {
			return err
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_UDP, unix.UDP_ENCAP, unix.UDP_ENCAP_ESPINUDP); err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrInet4{Port: int(h.port)})
	}))
	t.Cleanup(func() { unix.Close(fd) })
}

// TestInteropXfrmVM: a on this dataplane, b on XFRM ESP-in-UDP — built by
// hand, and by btmm's own xfrm dataplane (package xfrm, with its ESP-in-UDP
// socket). Ping and TCP both ways prove the bytes on the wire are the same
// (RFC 6281 Figure 2).
func TestInteropXfrmVM(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	for _, tc := range []struct {
		name string
		// peer makes b an XFRM host for a's state st and returns a check
		// that b's SAs carried traffic both ways.
		peer func(t *testing.T, a, b *host, st *controlplane.State) func(t *testing.T)
	}{
		{"hand-built", func(t *testing.T, a, b *host, st *controlplane.State) func(t *testing.T) {
			xfrmHost(t, b, a, st.Peers[0].In, st.Peers[0].Out)
			return func(t *testing.T) {
				ss, err := nldump.Retry(func() ([]netlink.XfrmState, error) { return b.ns.Handle.XfrmStateList(netlink.FAMILY_V4) })
				must(t, err)
				for _, x := range ss {
					t.Logf("xfrm host b: state spi 0x%x %s->%s packets %d bytes %d", x.Spi, x.Src, x.Dst, x.Statistics.Packets, x.Statistics.Bytes)
					if x.Statistics.Packets == 0 {
						t.Errorf("xfrm host's SA spi 0x%x carried nothing", x.Spi)
					}
				}
			}
		}},
		{"package xfrm", func(t *testing.T, a, b *host, st *controlplane.State) func(t *testing.T) {
			conn, err := xfrm.ListenAt(context.Background(), b.ns.NsHandle(), netip.AddrPortFrom(netip.IPv4Unspecified(), b.port))
			must(t, err)
			t.Cleanup(func() { conn.Close() })
			bdp, err := xfrm.New(b.ns.NsHandle(), xfrm.Config{})
			must(t, err)
			t.Cleanup(func() { must(t, bdp.Close()) })
			bst := &controlplane.State{
				Local: controlplane.Local{ULA: b.ula, Port: b.port},
				Peers: []controlplane.Peer{{Name: a.name, ULA: a.ula, Outer: netip.AddrPortFrom(a.outer, a.port),
					Out: st.Peers[0].In, In: st.Peers[0].Out}},
			}
			if _, err := bdp.Set(context.Background(), bst); err != nil {
				t.Fatalf("xfrm dataplane on b: %v", err)
			}
			return func(t *testing.T) {
				stats, err := bdp.Stats(context.Background())
				must(t, err)
				if len(stats) != 1 || stats[0].RxPackets == 0 || stats[0].TxPackets == 0 {
					t.Errorf("xfrm dataplane on b counted %+v, want traffic both ways", stats)
				}
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := topology(t)
			a.start(t, Config{})
			st := a.state(b, netip.AddrPortFrom(b.outer, b.port))
			a.set(t, st)
			checkPeer := tc.peer(t, a, b, st)
			ping(t, a, b)
			ping(t, b, a)
			data := randomBytes(t, 1<<20)
			s := openStream(t, a, b)
			n, err := s.conn.Write(data)
			s.sent.Add(int64(n))
			must(t, err)
			sum := sha256.Sum256(data)
			s.finish(t, sum[:])
			checkPeer(t)
			if d, _ := a.dp.Drops(); d[DropUnknownPeer]+d[DropMalformed] != 0 {
				t.Errorf("a dropped packets from the xfrm host: %v", d)
			}
			if err := a.dp.Close(); err != nil {
				t.Error(err)
			}
			a.dp = nil
			if l := leftovers(t, a); len(l) > 0 {
				t.Errorf("left behind: %q", l)
			}
		})
	}
}

// TestDefaultDeviceNetNS: with no device named, the programs go on the
// IPv4 default route's device (controlplane.Local.Device's "empty").
func TestDefaultDeviceNetNS(t *testing.T) {
	a, b := topology(t)
	a.ns.MustRoute(t, "default", b.outer.String(), a.dev)
	dp, err := New(Config{NetNS: "/run/netns/" + a.ns.Name, PinRoot: a.root, Cleartext: true})
	if err != nil {
		t.Fatal(err)
	}
	a.dp = dp
	if got := dp.attach.name(); got != a.dev {
		t.Errorf("device %q, want %q", got, a.dev)
	}
	st := a.state(b, netip.AddrPortFrom(b.outer, b.port))
	st.Local.Device = ""
	a.set(t, st)
	closeAndCheck(t, a)
}

// TestPinRootNotBPFFSNetNS: a pin root outside a bpffs is refused up front.
func TestPinRootNotBPFFSNetNS(t *testing.T) {
	a, _ := topology(t)
	_, err := New(Config{Device: a.dev, NetNS: "/run/netns/" + a.ns.Name, PinRoot: filepath.Join(t.TempDir(), "btmm"), Cleartext: true})
	if err == nil || !strings.Contains(err.Error(), "not on a bpffs") {
		t.Fatalf("err %v, want a bpffs complaint", err)
	}
	if got := attached(t, a); len(got) != 0 {
		t.Errorf("attached anyway: %q", got)
	}
}
