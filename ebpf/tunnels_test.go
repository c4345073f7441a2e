package ebpf

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/nldump"
	"github.com/btmm/btmm/controlplane/repair"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/btmm/btmm/xfrm"
)

const tunFOUPort = 6080

var (
	outer6A = netip.MustParseAddr("2001:db8::a")
	outer6B = netip.MustParseAddr("2001:db8::b")
)

// tunnelState is h's desired state towards p with p's tunnel endpoints:
// ipv6 and, for the IPv4 device, sit (fou false) or sit over GUE to p's
// FOU port (fou true); via is the path h sends on.
func (h *host) tunnelState(p *host, via controlplane.PathKind, fou bool) *controlplane.State {
	st := h.state(p, netip.AddrPortFrom(p.outer, p.port))
	st.Local.FOUPort = tunFOUPort
	p6 := outer6B
	if p.name == "a" {
		p6 = outer6A
	}
	v4 := controlplane.Tunnel{Kind: controlplane.PathSit, Remote: netip.AddrPortFrom(p.outer, 0)}
	if fou {
		v4 = controlplane.Tunnel{Kind: controlplane.PathFOU, Remote: netip.AddrPortFrom(p.outer, tunFOUPort)}
	}
	st.Peers[0].Tunnels = []controlplane.Tunnel{{Kind: controlplane.PathIPv6, Remote: netip.AddrPortFrom(p6, 0)}, v4}
	st.Peers[0].Via = via
	return st
}

// programStats are h's programs' counters for its one peer (map only).
func programStats(t testing.TB, h *host) controlplane.PeerStats {
	t.Helper()
	h.dp.mu.Lock()
	st, err := h.dp.programStats()
	h.dp.mu.Unlock()
	must(t, err)
	if len(st) != 1 {
		t.Fatalf("%s: program counters for %d peers, want 1", h.name, len(st))
	}
	return st[0]
}

// linkTx is the transmitted-packet counter of device name in h's namespace.
func linkTx(t testing.TB, h *host, name string) uint64 {
	t.Helper()
	l, err := h.ns.LinkByName(name)
	if err != nil {
		t.Fatalf("%s: %s: %v", h.name, name, err)
	}
	return l.Attrs().Statistics.TxPackets
}

// espStates lists h's SAs as "spi mode mark" and the outbound one's
// packet counter.
func espStates(t testing.TB, h *host, peer *host) ([]string, netlink.XfrmState) {
	t.Helper()
	ss, err := nldump.Retry(func() ([]netlink.XfrmState, error) { return h.ns.Handle.XfrmStateList(netlink.FAMILY_V6) })
	must(t, err)
	var out []string
	var o netlink.XfrmState
	for _, s := range ss {
		out = append(out, fmt.Sprintf("0x%x %s%s", s.Spi, modeName(s.Mode), markWhat(s.Mark)))
		if dst, _ := netip.AddrFromSlice(s.Dst); dst == peer.ula {
			o = s
		}
	}
	slices.Sort(out)
	return out, o
}

// adminTunnels renders h's tunnel devices and fou listeners that are not ours.
func adminTunnels(t testing.TB, h *host) string {
	t.Helper()
	var keep []string
	for _, cmd := range [][]string{{"ip", "-d", "link", "show", "type", "sit"}, {"ip", "-d", "link", "show", "type", "ip6tnl"}, {"ip", "fou", "show"}} {
		out := h.ns.MustRun(t, cmd[0], cmd[1:]...)
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "bt6-") || strings.Contains(line, "bts-") || strings.Contains(line, fmt.Sprintf("port %d", tunFOUPort)) {
				continue
			}
			keep = append(keep, line)
		}
	}
	return strings.Join(keep, "\n")
}

// TestTunnelPathsSecureVM: secure mode with tunnel devices (docs/tunnels.md,
// "The eBPF dataplane"). One TCP stream from a to b runs, byte-checked at
// the end, while single Sets move the peers between ESP-in-UDP (the
// programs), ipv6 (ip6tnl), sit and sit over GUE (fou), a and b choosing
// differently in one phase: each phase's own counters carry the stream (the
// device's, the transport-mode SA's, the programs' map counters stay still
// while a's route goes into a device), pings answer, and the SPIs never
// change (no rekey). An administrator's sit, ip6tnl and fou port are left
// alone; Close removes our devices and GUE listener.
func TestTunnelPathsSecureVM(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.Sit, testenv.IP6Tnl, testenv.FOU)
	a, b := topology(t)
	a.ns.MustRun(t, "ip", "-6", "addr", "add", outer6A.String()+"/64", "dev", a.dev, "nodad")
	b.ns.MustRun(t, "ip", "-6", "addr", "add", outer6B.String()+"/64", "dev", b.dev, "nodad")
	// The administrator's own tunnels on a, before btmm starts.
	a.ns.MustRun(t, "ip", "link", "add", "he-ipv6", "type", "sit", "remote", "192.0.2.1", "local", a.outer.String(), "ttl", "64")
	a.ns.MustRun(t, "ip", "link", "add", "ip6admin", "type", "ip6tnl", "mode", "ip6ip6", "remote", "2001:db8:9::1", "local", outer6A.String())
	a.ns.MustRun(t, "ip", "fou", "add", "port", "5555", "gue")
	adminBefore := adminTunnels(t, a)

	// No periodic audit on a: the device repairs below must come from
	// the link notifications.
	a.start(t, Config{Repair: repair.Config{Audit: -1}})
	b.start(t, Config{})
	esp, v6, sit, fou := controlplane.PathESPInUDP, controlplane.PathIPv6, controlplane.PathSit, controlplane.PathFOU
	a.set(t, a.tunnelState(b, esp, false))
	b.set(t, b.tunnelState(a, esp, false))
	spis, _ := espStates(t, a, b)
	t.Logf("a's SAs: %q", spis)
	if len(spis) != 3 { // out tunnel; in tunnel (marked) and transport
		t.Fatalf("a has %d SAs, want 3: %q", len(spis), spis)
	}
	spiSet := func(ss []string) []string {
		var out []string
		for _, s := range ss {
			out = append(out, strings.Fields(s)[0])
		}
		return slices.Compact(out)
	}
	wantSPIs := spiSet(spis)
	ping(t, a, b)

	s := openStream(t, a, b)
	pm := startPump(t, s)
	sent := int64(0)
	for _, ph := range []struct {
		name        string
		aVia, bVia  controlplane.PathKind
		fou         bool
		dev         string // a's device the stream goes into ("": the programs)
		bProgramsRx bool   // b's acknowledgements come through a's programs
	}{
		{"esp-udp", esp, esp, false, "", true},
		{"a ipv6, b esp-udp", v6, esp, false, controlplane.TunnelDevice(v6, b.ula), true},
		{"ipv6", v6, v6, false, controlplane.TunnelDevice(v6, b.ula), false},
		{"sit", sit, sit, false, controlplane.TunnelDevice(sit, b.ula), false},
		{"esp-udp again", esp, esp, false, "", true},
		{"fou", fou, fou, true, controlplane.TunnelDevice(fou, b.ula), false},
		{"esp-udp at last", esp, esp, true, "", true},
	} {
		t.Logf("phase %s", ph.name)
		ca := a.set(t, a.tunnelState(b, ph.aVia, ph.fou))
		cb := b.set(t, b.tunnelState(a, ph.bVia, ph.fou))
		t.Logf("a changes: %v\nb changes: %v", ca, cb)
		st0, all0 := programStats(t, a), peerStats(t, a)
		var tx0 uint64
		if ph.dev != "" {
			tx0 = linkTx(t, a, ph.dev)
		}
		sent += 256 << 10
		pm.waitSent(t, sent)
		ping(t, a, b)
		st1, all1 := programStats(t, a), peerStats(t, a)
		// Stats counts both ways whatever the path (health and btmmctl
		// ping read it).
		if all1.TxPackets <= all0.TxPackets || all1.RxPackets <= all0.RxPackets {
			t.Errorf("%s: a's Stats for b did not move: %+v -> %+v", ph.name, all0, all1)
		}
		ss, out := espStates(t, a, b)
		if got := spiSet(ss); !slices.Equal(got, wantSPIs) {
			t.Errorf("%s: a's SPIs %q, want %q (no rekey)", ph.name, got, wantSPIs)
		}
		wantMode := netlink.XFRM_MODE_TUNNEL
		if ph.dev != "" {
			wantMode = netlink.XFRM_MODE_TRANSPORT
		}
		if out.Mode != wantMode || out.Statistics.Packets == 0 {
			t.Errorf("%s: a's outbound SA %s with %d packets, want %s carrying the stream", ph.name, modeName(out.Mode), out.Statistics.Packets, modeName(wantMode))
		}
		if ph.dev == "" {
			if st1.TxPackets == st0.TxPackets {
				t.Errorf("%s: a's programs sent nothing to b", ph.name)
			}
		} else {
			if tx := linkTx(t, a, ph.dev); tx == tx0 {
				t.Errorf("%s: nothing went into %s", ph.name, ph.dev)
			}
			if st1.TxPackets != st0.TxPackets {
				t.Errorf("%s: a's programs sent %d packets to b, want none (the route goes into %s)", ph.name, st1.TxPackets-st0.TxPackets, ph.dev)
			}
		}
		if got := st1.RxPackets != st0.RxPackets; got != ph.bProgramsRx {
			t.Errorf("%s: b's packets through a's programs: %v, want %v", ph.name, got, ph.bProgramsRx)
		}
		if ph.fou {
			l, err := a.ns.LinkByName(controlplane.TunnelDevice(fou, b.ula))
			must(t, err)
			if x, ok := l.(*netlink.Sittun); !ok || x.EncapType != 2 || x.EncapDport != tunFOUPort {
				t.Errorf("%s: %s is not sit over GUE to port %d: %+v", ph.name, l.Attrs().Name, tunFOUPort, l)
			}
		}
	}
	pm.finish(t)
	t.Logf("stream: %d bytes, every one checked", s.sent.Load())
	d, _ := a.dp.Drops()
	t.Logf("a drops %v", d)

	// Someone else deletes the device a's traffic to b goes into (its route
	// goes with it), or sets down a device no route goes into (only the
	// link notification tells): the repair loop makes it again or brings
	// it up, with its link-local address and the route.
	a.set(t, a.tunnelState(b, v6, false))
	b.set(t, b.tunnelState(a, v6, false))
	for _, rc := range []struct {
		dev string
		cmd []string
	}{
		{controlplane.TunnelDevice(v6, b.ula), []string{"ip", "link", "del", controlplane.TunnelDevice(v6, b.ula)}},
		{controlplane.TunnelDevice(sit, b.ula), []string{"ip", "link", "set", controlplane.TunnelDevice(sit, b.ula), "down"}},
	} {
		n := a.dp.LastRepair().Count
		start := time.Now()
		a.ns.MustRun(t, rc.cmd[0], rc.cmd[1:]...)
		r := repairedAfter(a, n)
		if r.Count <= n {
			t.Fatalf("%q: no repair recorded in 30 s", rc.cmd)
		}
		t.Logf("%q: repaired after %v: %q", rc.cmd, r.At.Sub(start).Round(time.Millisecond), r.What)
		if out := a.ns.MustRun(t, "ip", "-6", "addr", "show", "dev", rc.dev, "up"); !strings.Contains(out, "fe80::") {
			t.Errorf("%q: %s not up with its link-local address after the repair:\n%s", rc.cmd, rc.dev, out)
		}
		if out := a.ns.MustRun(t, "ip", "-6", "route", "show", b.ula.String()); !strings.Contains(out, "dev "+controlplane.TunnelDevice(v6, b.ula)) {
			t.Errorf("%q: the route to b's ULA is not into %s after the repair:\n%s", rc.cmd, controlplane.TunnelDevice(v6, b.ula), out)
		}
		ping(t, a, b)
	}

	ours := func(h *host) string {
		return h.ns.MustRun(t, "ip", "link", "show", "group", fmt.Sprint(reqid)) + h.ns.MustRun(t, "ip", "fou", "show")
	}
	if o := ours(a); !strings.Contains(o, "bt6-") || !strings.Contains(o, "bts-") || !strings.Contains(o, fmt.Sprintf("port %d gue", tunFOUPort)) {
		t.Errorf("a's devices and GUE listener before Close:\n%s", o)
	}
	closeAndCheck(t, a, b)
	for _, h := range []*host{a, b} {
		if o := ours(h); strings.Contains(o, "bt6-") || strings.Contains(o, "bts-") || strings.Contains(o, fmt.Sprintf("port %d", tunFOUPort)) {
			t.Errorf("%s: left after Close:\n%s", h.name, o)
		}
	}
	if got := adminTunnels(t, a); got != adminBefore {
		t.Errorf("the administrator's tunnels changed:\nbefore:\n%s\nafter:\n%s", adminBefore, got)
	}
}

// TestTunnelInteropXfrmVM: a on this dataplane, b on package xfrm's, both
// with tunnel endpoints: one TCP stream from a to b, byte-checked at the
// end, while single Sets on both move the pair from ESP-in-UDP to ipv6, sit,
// ipv6 with no IPv4 outer address on either side (IPv6-only: no map entry)
// and back; pings answer both ways in each phase and b's transport-mode SA
// from a counts the packets through the devices. The wire formats agree.
//
// Opt-in (BTMM_KERNEL_HANG=1): it hangs Debian 6.1's kernel in about one run
// in ten (a GRO cell's receive list that never ends; docs/tunnels.md,
// "Missing"), which would fail make test for a kernel bug, not ours.
func TestTunnelInteropXfrmVM(t *testing.T) {
	if os.Getenv("BTMM_KERNEL_HANG") != "1" {
		t.Skip("kernel hang: Debian 6.1 soft-locks in a tunnel device's GRO cell about once in ten runs (docs/tunnels.md); set BTMM_KERNEL_HANG=1 to run it")
	}
	testenv.Require(t, testenv.ESP, testenv.XfrmIface, testenv.Sit, testenv.IP6Tnl)
	a, b := topology(t)
	a.ns.MustRun(t, "ip", "-6", "addr", "add", outer6A.String()+"/64", "dev", a.dev, "nodad")
	b.ns.MustRun(t, "ip", "-6", "addr", "add", outer6B.String()+"/64", "dev", b.dev, "nodad")
	conn, err := xfrm.ListenAt(context.Background(), b.ns.NsHandle(), netip.AddrPortFrom(netip.IPv4Unspecified(), b.port))
	must(t, err)
	t.Cleanup(func() { conn.Close() })
	bdp, err := xfrm.New(b.ns.NsHandle(), xfrm.Config{})
	must(t, err)
	t.Cleanup(func() { bdp.Close() })
	a.start(t, Config{})
	bState := func(via controlplane.PathKind) *controlplane.State {
		st := b.tunnelState(a, via, false)
		st.Local.Device, st.Local.FOUPort = "", 0
		return st
	}
	v6only := false
	set := func(via controlplane.PathKind) {
		sa, sb := a.tunnelState(b, via, false), bState(via)
		if v6only {
			// IPv6-only: no IPv4 outer address, the ipv6 tunnel only.
			for _, st := range []*controlplane.State{sa, sb} {
				st.Peers[0].Outer, st.Peers[0].Tunnels = netip.AddrPort{}, st.Peers[0].Tunnels[:1]
			}
		}
		t.Logf("a changes: %v", a.set(t, sa))
		if _, err := bdp.Set(context.Background(), sb); err != nil {
			t.Fatalf("xfrm dataplane on b: %v", err)
		}
	}
	set(controlplane.PathESPInUDP)
	ping(t, a, b)
	s := openStream(t, a, b)
	pm := startPump(t, s)
	sent := int64(0)
	esp, v6, sit := controlplane.PathESPInUDP, controlplane.PathIPv6, controlplane.PathSit
	for i, via := range []controlplane.PathKind{v6, sit, v6, esp} {
		v6only = i == 2
		set(via)
		if v6only {
			// The peer has no map entry: only its device route.
			if peers, err := a.dp.readPeers(); err != nil || len(peers) != 0 {
				t.Errorf("IPv6-only peer: map entries %v, %v; want none", peers, err)
			}
		}
		before, err := a.dp.Stats(context.Background())
		must(t, err)
		sent += 256 << 10
		pm.waitSent(t, sent)
		ping(t, a, b)
		ping(t, b, a)
		after, err := a.dp.Stats(context.Background())
		must(t, err)
		if len(after) != 1 || len(before) != 1 || after[0].RxPackets <= before[0].RxPackets || after[0].TxPackets <= before[0].TxPackets {
			t.Errorf("%v: a's Stats %+v -> %+v, want b's counters moving both ways", via, before, after)
		}
		if via == controlplane.PathESPInUDP {
			continue
		}
		ss, err := nldump.Retry(func() ([]netlink.XfrmState, error) { return b.ns.Handle.XfrmStateList(netlink.FAMILY_V6) })
		must(t, err)
		n := uint64(0)
		for _, x := range ss {
			if src, _ := netip.AddrFromSlice(x.Src); src == a.ula && x.Mode == netlink.XFRM_MODE_TRANSPORT {
				n = x.Statistics.Packets
			}
		}
		tx := linkTx(t, a, controlplane.TunnelDevice(via, b.ula))
		t.Logf("%v: b's transport-mode SA from a: %d packets; a's %s sent %d", via, n, controlplane.TunnelDevice(via, b.ula), tx)
		if n == 0 || tx == 0 {
			t.Errorf("%v: nothing went through the devices (b's transport SA %d packets, a's device %d)", via, n, tx)
		}
	}
	pm.finish(t)
	t.Logf("stream: %d bytes, every one checked", s.sent.Load())
	closeAndCheck(t, a)
}
