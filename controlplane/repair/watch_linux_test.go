package repair

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// seen collects parsed notifications.
type seen struct {
	mu   sync.Mutex
	msgs []Msg
	errs []error
}

func (s *seen) add(m Msg, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.errs = append(s.errs, err)
		return
	}
	s.msgs = append(s.msgs, m)
}

// wait returns the first message matching f, failing after 10 s.
func (s *seen) wait(t *testing.T, what string, f func(Msg) bool) Msg {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		s.mu.Lock()
		for _, m := range s.msgs {
			if f(m) {
				s.mu.Unlock()
				return m
			}
		}
		errs := s.errs
		s.mu.Unlock()
		if len(errs) > 0 {
			t.Fatalf("parse errors: %v", errs)
		}
	}
	t.Fatalf("no notification: %s", what)
	return Msg{}
}

// TestWatchRouteNetNS: the rtnetlink watcher sees, and ParseRoute decodes,
// the real kernel's notifications for what the dataplanes own: a proto 98
// route, a ULA on lo, a permanent neighbour, a clsact qdisc and filter,
// a link going down and away.
func TestWatchRouteNetNS(t *testing.T) {
	testenv.RequireNetNS(t)
	n := netns.New(t, "w")
	peer := netns.New(t, "wp")
	netns.MustVeth(t, n, "v0", peer, "v1")
	s := &seen{}
	w, err := Watch(n.Fd(), unix.NETLINK_ROUTE, []uint32{GroupLink, GroupNeigh, GroupTC, GroupIPv6Addr, GroupIPv6Route},
		func(typ uint16, b []byte) { s.add(ParseRoute(typ, b)) }, func(err error) { s.add(Msg{}, err) })
	must(t, err)
	defer w.Close()
	v0, err := n.LinkByName("v0")
	must(t, err)
	idx := v0.Attrs().Index
	must(t, n.Sysctl("net.ipv6.conf.v0.disable_ipv6", "0"))
	ula := netip.MustParseAddr("fd00::b")
	for _, c := range [][]string{
		{"ip", "addr", "add", "fd00::a/128", "dev", "lo"},
		{"ip", "-6", "route", "add", "fd00::b/128", "dev", "v0", "proto", "98"},
		{"ip", "-6", "route", "del", "fd00::b/128", "dev", "v0", "proto", "98"},
		{"ip", "addr", "del", "fd00::a/128", "dev", "lo"},
		{"ip", "-6", "neigh", "add", "fd00::b", "lladdr", "02:00:00:00:00:01", "dev", "v0", "nud", "permanent"},
		{"ip", "-6", "neigh", "del", "fd00::b", "dev", "v0"},
		{"tc", "qdisc", "add", "dev", "v0", "clsact"},
		{"tc", "filter", "add", "dev", "v0", "egress", "prio", "10", "bpf", "bytecode", "1,6 0 0 4294967295,"}, // cls_bpf with a classic BPF "accept"
		{"tc", "filter", "del", "dev", "v0", "egress", "prio", "10"},
		{"tc", "qdisc", "del", "dev", "v0", "clsact"},
		{"ip", "link", "set", "v0", "down"},
	} {
		n.MustRun(t, c[0], c[1:]...)
	}
	m := s.wait(t, "route deleted", func(m Msg) bool { return m.Type == RTMDelRoute && m.Protocol == 98 })
	if m.Family != afInet6 || m.Prefix != netip.PrefixFrom(ula, 128) || m.Ifindex != idx || m.Table != 254 || !m.Deleted() {
		t.Errorf("route deletion decoded as %+v", m)
	}
	m = s.wait(t, "address deleted", func(m Msg) bool { return m.Type == RTMDelAddr && m.Family == afInet6 })
	if m.Prefix != netip.MustParsePrefix("fd00::a/128") || m.Ifindex != 1 {
		t.Errorf("address deletion decoded as %+v", m)
	}
	m = s.wait(t, "neighbour deleted", func(m Msg) bool { return m.Type == RTMDelNeigh })
	if m.Addr != ula || m.Ifindex != idx || m.Family != afInet6 {
		t.Errorf("neighbour deletion decoded as %+v", m)
	}
	s.wait(t, "permanent neighbour added", func(m Msg) bool { return m.Type == RTMNewNeigh && m.Permanent() && m.Addr == ula })
	s.wait(t, "filter deleted", func(m Msg) bool { return m.Type == RTMDelTfilter && m.Ifindex == idx })
	s.wait(t, "qdisc deleted", func(m Msg) bool { return m.Type == RTMDelQdisc && m.Ifindex == idx })
	s.wait(t, "link down", func(m Msg) bool { return m.Type == RTMNewLink && m.Ifindex == idx && !m.Up() })
	n.MustRun(t, "ip", "link", "del", "v0")
	s.wait(t, "link deleted", func(m Msg) bool { return m.Type == RTMDelLink && m.Ifindex == idx && m.Deleted() })
	if err := w.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
}

// TestWatchXfrm: the XFRM watcher sees policies added, deleted, flushed.
func TestWatchXfrm(t *testing.T) {
	testenv.RequireNetNS(t)
	n := netns.New(t, "wx")
	s := &seen{}
	w, err := Watch(n.Fd(), unix.NETLINK_XFRM, []uint32{GroupXfrmSA, GroupXfrmPolicy},
		func(typ uint16, b []byte) { s.add(ParseXfrm(typ, b)) }, nil)
	must(t, err)
	defer w.Close()
	n.MustRun(t, "ip", "xfrm", "policy", "add", "src", "fd00::a/128", "dst", "fd00::b/128", "dir", "out",
		"tmpl", "src", "10.0.0.1", "dst", "10.0.0.2", "proto", "esp", "reqid", "25217", "mode", "tunnel")
	n.MustRun(t, "ip", "xfrm", "policy", "del", "src", "fd00::a/128", "dst", "fd00::b/128", "dir", "out")
	n.MustRun(t, "ip", "xfrm", "policy", "add", "src", "fd00::a/128", "dst", "fd00::c/128", "dir", "out")
	n.MustRun(t, "ip", "xfrm", "policy", "flush") // an empty table's flush notifies nothing
	m := s.wait(t, "policy added", func(m Msg) bool { return m.Type == XfrmNewPolicy })
	if len(m.Reqids) != 1 || m.Reqids[0] != 25217 || m.Deleted() {
		t.Errorf("policy addition decoded as %+v", m)
	}
	m = s.wait(t, "policy deleted", func(m Msg) bool { return m.Type == XfrmDelPolicy })
	if len(m.Reqids) != 1 || m.Reqids[0] != 25217 || !m.Deleted() {
		t.Errorf("policy deletion decoded as %+v", m)
	}
	s.wait(t, "policies flushed", func(m Msg) bool { return m.Type == XfrmFlushPolicy && m.Deleted() })
}

// TestWatchXfrmStatesVM: XFRM states (ESP: the VM tier) added, deleted
// with their replay counters, flushed.
func TestWatchXfrmStatesVM(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	n := netns.New(t, "wx")
	s := &seen{}
	w, err := Watch(n.Fd(), unix.NETLINK_XFRM, []uint32{GroupXfrmSA, GroupXfrmPolicy},
		func(typ uint16, b []byte) { s.add(ParseXfrm(typ, b)) }, nil)
	must(t, err)
	defer w.Close()
	state := []string{"ip", "xfrm", "state", "add", "src", "10.0.0.1", "dst", "10.0.0.2", "proto", "esp", "spi", "0x1001",
		"reqid", "25217", "mode", "tunnel", "aead", "rfc4106(gcm(aes))", "0x0102030405060708090a0b0c0d0e0f1011121314", "128"}
	n.MustRun(t, state[0], state[1:]...)
	n.MustRun(t, "ip", "xfrm", "state", "del", "src", "10.0.0.1", "dst", "10.0.0.2", "proto", "esp", "spi", "0x1001")
	n.MustRun(t, state[0], state[1:]...)
	n.MustRun(t, "ip", "xfrm", "state", "flush")
	dst := netip.MustParseAddr("10.0.0.2")
	m := s.wait(t, "state added", func(m Msg) bool { return m.Type == XfrmNewSA })
	if m.SPI != 0x1001 || m.Addr != dst || len(m.Reqids) != 1 || m.Reqids[0] != 25217 {
		t.Errorf("state addition decoded as %+v", m)
	}
	m = s.wait(t, "state deleted", func(m Msg) bool { return m.Type == XfrmDelSA })
	if m.SPI != 0x1001 || m.Addr != dst || len(m.Reqids) != 1 || m.Reqids[0] != 25217 || m.Replay == nil || !m.Deleted() {
		t.Errorf("state deletion decoded as %+v", m)
	}
	s.wait(t, "states flushed", func(m Msg) bool { return m.Type == XfrmFlushSA && m.Deleted() })
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
