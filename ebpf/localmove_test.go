package ebpf

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/nldump"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// routedTopology: a and b behind router r, each on its own /24; a has a
// second uplink va2 (10.0.3.2) to r, unused until a moves to it. a's
// default route is via va (gw1, 10.0.1.1). No IPv6 on any veth.
func routedTopology(t *testing.T) (a, b *host, r *netns.NS) {
	t.Helper()
	testenv.RequireNetNS(t)
	fs := mountBPFFS(t)
	r = netns.New(t, "er")
	must(t, r.Sysctl("net.ipv4.ip_forward", "1"))
	a = &host{name: "a", ns: netns.New(t, "ea"), dev: "va", ula: ulaA, outer: netip.MustParseAddr("10.0.1.2"), port: portA, root: filepath.Join(fs, "a")}
	b = &host{name: "b", ns: netns.New(t, "eb"), dev: "vb", ula: ulaB, outer: netip.MustParseAddr("10.0.2.2"), port: portB, root: filepath.Join(fs, "b")}
	for _, n := range []*netns.NS{r, a.ns, b.ns} {
		must(t, n.Sysctl("net.ipv6.conf.default.disable_ipv6", "1"))
	}
	netns.MustVeth(t, a.ns, "va", r, "r0")
	netns.MustVeth(t, b.ns, "vb", r, "r1")
	netns.MustVeth(t, a.ns, "va2", r, "r2")
	r.MustAddr(t, "r0", "10.0.1.1/24")
	r.MustAddr(t, "r1", "10.0.2.1/24")
	r.MustAddr(t, "r2", "10.0.3.1/24")
	a.ns.MustAddr(t, "va", "10.0.1.2/24")
	a.ns.MustAddr(t, "va2", "10.0.3.2/24")
	b.ns.MustAddr(t, "vb", "10.0.2.2/24")
	a.ns.MustRoute(t, "default", "10.0.1.1", "va")
	b.ns.MustRoute(t, "default", "10.0.2.1", "vb")
	// IPv6 on the hosts' links (the routes to the ULAs go there) but no
	// addresses: IPv6 crosses them only inside the tunnel.
	for _, x := range []struct {
		h   *host
		dev string
	}{{a, "va"}, {a, "va2"}, {b, "vb"}, {a, "lo"}, {b, "lo"}} {
		must(t, x.h.ns.Sysctl("net.ipv6.conf."+x.dev+".addr_gen_mode", "1"))
		must(t, x.h.ns.Sysctl("net.ipv6.conf."+x.dev+".disable_ipv6", "0"))
	}
	for _, h := range []*host{a, b} {
		h.ns.MustAddr(t, "lo", h.ula.String()+"/128")
	}
	return a, b, r
}

// follow starts h's dataplane without a device: it follows the default route.
func (h *host) follow(t *testing.T, cfg Config) {
	t.Helper()
	cfg.NetNS, cfg.PinRoot = "/run/netns/"+h.ns.Name, h.root
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

// TestLocalMoveNetNS: host a moves from behind gw1 (va) to gw2 (va2): its
// default route and address change, its old link goes down. One Set with
// the same desired state (Local.Outer and Device zero: the kernel's choice)
// moves the programs to va2, the maps' local source to 10.0.3.2 and the
// routes to va2, and detaches from va; a TCP stream opened before the move
// delivers every byte. Cleartext on this kernel, TCX and forced clsact.
func TestLocalMoveNetNS(t *testing.T) {
	for _, force := range []bool{false, true} {
		t.Run(map[bool]string{false: "probe", true: "clsact"}[force], func(t *testing.T) {
			testLocalMove(t, Config{Cleartext: true, ForceClsact: force})
		})
	}
}

// TestLocalMoveSecureVM is TestLocalMoveNetNS in secure mode on 6.1
// (clsact): the ESP SAs between the ULAs are not touched (same SPIs, same
// add time, counters carried on).
func TestLocalMoveSecureVM(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	testLocalMove(t, Config{})
}

func testLocalMove(t *testing.T, cfg Config) {
	// Set alone must follow the move (the repair loop would follow it too,
	// when the kernel drops our route with the old link: TestRepair*).
	cfg.Repair.Off = true
	a, b, _ := routedTopology(t)
	a.follow(t, cfg)
	b.start(t, cfg)
	ast := a.state(b, netip.AddrPortFrom(b.outer, b.port))
	ast.Local.Device = ""
	a.set(t, ast)
	b.set(t, b.state(a, netip.AddrPortFrom(a.outer, a.port)))
	if got := a.dp.attach.name(); got != "va" {
		t.Fatalf("a's programs on %q, want va (the default route's device)", got)
	}
	ping(t, a, b)
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

	p := startPump(t, openStream(t, a, b))
	p.waitSent(t, 256<<10)

	// Two moves. 1: to gw2's network on va2 (new default route, the old
	// address goes, va stays up: its route and neighbour entry are ours to
	// move and remove). 2: back to va with a new address (10.0.1.3) while
	// va2 goes down (the kernel drops our route with it).
	for _, m := range []struct {
		name, from, to string
		outer          netip.Addr
		cmds           [][]string
		wantRoute      string
	}{
		{"to gw2", "va", "va2", netip.MustParseAddr("10.0.3.2"), [][]string{
			{"ip", "route", "replace", "default", "via", "10.0.3.1", "dev", "va2"},
			{"ip", "addr", "del", "10.0.1.2/24", "dev", "va"},
		}, "update route"},
		{"back to gw1 with a new address", "va2", "va", netip.MustParseAddr("10.0.1.3"), [][]string{
			{"ip", "addr", "add", "10.0.1.3/24", "dev", "va"},
			{"ip", "route", "replace", "default", "via", "10.0.1.1", "dev", "va"},
			{"ip", "link", "set", "va2", "down"},
		}, "add route"},
	} {
		sent := p.s.sent.Load()
		old := a.outer
		for _, c := range m.cmds {
			a.ns.MustRun(t, c[0], c[1:]...)
		}
		a.outer = m.outer
		chA := a.set(t, ast) // the same desired state: "we moved"
		chB := b.set(t, b.state(a, netip.AddrPortFrom(a.outer, a.port)))
		t.Logf("%s: a: %q", m.name, changeStrings(chA))
		t.Logf("%s: b: %q", m.name, changeStrings(chB))
		want := []string{
			fmt.Sprintf("move attach programs %s -> %s via %s", m.from, m.to, a.dp.attach.kind()),
			fmt.Sprintf("update map peer b %v local source %v -> %v", b.ula, old, a.outer),
			fmt.Sprintf("%s %v/128 dev %s", m.wantRoute, b.ula, m.to),
			"delete attach programs on " + m.from,
		}
		text := strings.Join(changeStrings(chA), "\n")
		for _, w := range want {
			if !strings.Contains(text, w) {
				t.Errorf("%s: a's changes lack %q:\n%s", m.name, w, text)
			}
		}
		for _, c := range chA {
			if c.Object == "state" || c.Object == "policy" {
				t.Errorf("%s: a local move touched XFRM: %v", m.name, c)
			}
		}
		if again := a.set(t, ast); len(again) != 0 {
			t.Errorf("%s: second identical Set after the move changed %q", m.name, changeStrings(again))
		}
		p.waitSent(t, sent+512<<10)
		var v btmmPeer
		must(t, a.dp.objs.PeerByUla.Lookup(ulaKey(b.ula), &v))
		if got := netip.AddrFrom4(v.LocalAddr); got != a.outer {
			t.Errorf("%s: peer_by_ula local_addr %v, want %v", m.name, got, a.outer)
		}
		a.dev = m.from
		if got := attached(t, a); len(got) != 0 {
			t.Errorf("%s: still attached to %s after the move: %q", m.name, m.from, got)
		}
		a.dev = m.to
		if got := attached(t, a); len(got) < 2 {
			t.Errorf("%s: attached to %s: %q, want both programs", m.name, m.to, got)
		}
		rs, err := nldump.Retry(func() ([]netlink.Route, error) {
			return nldump.Retry(func() ([]netlink.Route, error) {
				return a.ns.Handle.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Protocol: routeProtocol}, netlink.RT_FILTER_PROTOCOL)
			})
		})
		must(t, err)
		to, err := a.ns.LinkByName(m.to)
		must(t, err)
		if len(rs) != 1 || rs[0].LinkIndex != to.Attrs().Index {
			t.Errorf("%s: routes after the move: %v, want one via %s", m.name, rs, m.to)
		}
		if ns, _ := nldump.Retry(func() ([]netlink.Neigh, error) { return a.ns.Handle.NeighList(0, netlink.FAMILY_V6) }); len(ns) != 1 || ns[0].LinkIndex != to.Attrs().Index {
			t.Errorf("%s: neighbour entries %v, want one on %s", m.name, ns, m.to)
		}
	}
	p.finish(t)
	t.Logf("%d bytes intact across both moves", p.s.sent.Load())
	ping(t, b, a)
	if !cfg.Cleartext {
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
		t.Logf("SPIs %v kept, no rekey", mapsKeys(after))
	}
	closeAndCheck(t, b)
	if err := a.dp.Close(); err != nil {
		t.Error(err)
	}
	a.dp = nil
	for _, dev := range []string{"va", "va2"} {
		a.dev = dev
		if l := leftovers(t, a); len(l) > 0 {
			t.Errorf("a (%s) left behind after Close: %q", dev, l)
		}
	}
}

func mapsKeys[V any](m map[int]V) []string {
	var s []string
	for k := range m {
		s = append(s, fmt.Sprintf("0x%x", k))
	}
	return s
}

func changeStrings(ch []controlplane.Change) []string {
	var s []string
	for _, c := range ch {
		s = append(s, c.String())
	}
	return s
}
