package ebpf

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/nldump"
	"github.com/btmm/btmm/controlplane/relay"
	"github.com/btmm/btmm/internal/testenv"
)

// loBridge is a stand-in for btmmd's relay-tcp bridge inside a's
// namespace: a's dataplane sends b's datagrams to local (127.0.0.1:P),
// the bridge forwards them from wire (a's veth address, another port) to
// b's tunnel port and the answers back from local to a's tunnel port on
// lo; in cleartext mode it completes checksums and splits GSO segments as
// btmmd's bridge does (relay.CompleteCleartext), ESP it leaves alone. Only
// the kernel half is under test here; btmmd's bridge (package relay)
// carries the datagrams over TLS.
type loBridge struct {
	local, wire *net.UDPConn
	out, in     atomic.Int64 // datagrams a -> b, b -> a
}

func startLoBridge(t *testing.T, a, b *host, wirePort uint16, cleartext bool) *loBridge {
	t.Helper()
	br := &loBridge{}
	must(t, a.ns.Do(func() (err error) {
		if br.local, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			return err
		}
		br.wire, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a.outer, wirePort)))
		return err
	}))
	t.Cleanup(func() { br.local.Close(); br.wire.Close() })
	toB := netip.AddrPortFrom(b.outer, b.port)
	toTunnel := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), a.port)
	complete := func(d []byte) [][]byte {
		if !cleartext {
			return [][]byte{d}
		}
		return relay.CompleteCleartext(d, relay.MaxCleartextPacket)
	}
	pipe := func(from, to *net.UDPConn, dst netip.AddrPort, n *atomic.Int64) {
		buf := make([]byte, 65536)
		for {
			m, _, err := from.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			for _, d := range complete(buf[:m]) {
				n.Add(1)
				to.WriteToUDPAddrPort(d, dst)
			}
		}
	}
	go pipe(br.local, br.wire, toB, &br.out)
	go pipe(br.wire, br.local, toTunnel, &br.in)
	return br
}

// bridged starts a and b with cfg, a reaching b through a loBridge and b
// reaching a at the bridge's wire port; it returns the bridge and its
// local socket (b's outer address in a's dataplane).
func bridged(t *testing.T, cfg Config) (a, b *host, br *loBridge, local netip.AddrPort) {
	t.Helper()
	a, b = topology(t)
	a.start(t, cfg)
	b.start(t, cfg)
	const wirePort = 4600
	br = startLoBridge(t, a, b, wirePort, cfg.Cleartext)
	local = br.local.LocalAddr().(*net.UDPAddr).AddrPort()
	ch := a.set(t, a.state(b, local))
	if !slices.ContainsFunc(ch, func(c controlplane.Change) bool { return strings.Contains(c.What, "on lo") }) {
		t.Errorf("changes %v do not attach the ingress program on lo", ch)
	}
	b.set(t, b.state(a, netip.AddrPortFrom(a.outer, wirePort)))
	if got := attachedOn(t, a, "lo"); len(got) == 0 {
		t.Fatal("nothing attached on lo")
	} else {
		t.Logf("on lo: %v", got)
	}
	return a, b, br, local
}

// TestLoopbackOuterNetNS: a peer whose outer address is a loopback socket
// (the relay-tcp bridge) is reached through it in both directions: the
// egress program hands its datagrams to lo, the bridge socket receives
// them, and what the bridge writes to our tunnel port over lo is taken
// apart by the ingress program attached to lo for as long as such a peer
// exists. Pings and a byte-checked TCP stream pass; moving the peer back
// to a wire address detaches the program from lo; Close leaves nothing.
func TestLoopbackOuterNetNS(t *testing.T) {
	testenv.HostTier(t, "the VM's 6.1 has clsact only, which the clsact subtest covers here, and TestLoopbackOuterSecureVM runs the same path there")
	for _, force := range []bool{false, true} {
		t.Run(map[bool]string{false: "probe", true: "clsact"}[force], func(t *testing.T) {
			testLoopbackOuter(t, Config{Cleartext: true, ForceClsact: force})
		})
	}
}

// TestLoopbackOuterSecureVM is TestLoopbackOuterNetNS in secure mode (ESP
// transport between the ULAs, the eBPF programs adding and removing the
// outer IPv4/UDP to and from the loopback bridge socket): the VM tier
// (esp6; 6.1: clsact).
func TestLoopbackOuterSecureVM(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	testLoopbackOuter(t, Config{})
}

func testLoopbackOuter(t *testing.T, cfg Config) {
	testenv.RequireBinary(t, "ping", "iputils-ping")
	a, b, br, local := bridged(t, cfg)
	ping(t, a, b)
	ping(t, b, a)
	sendChecked(t, a, b, 4<<20)
	if sa := peerStats(t, a); sa.TxBytes < 4<<20 || sa.RxPackets == 0 {
		t.Errorf("a's counters do not show the transfer through lo: %+v", sa)
	}
	if br.out.Load() < (4<<20)/1500 || br.in.Load() == 0 {
		t.Errorf("the bridge carried %d datagrams a -> b and %d b -> a", br.out.Load(), br.in.Load())
	}
	t.Logf("the bridge carried %d datagrams a -> b and %d b -> a", br.out.Load(), br.in.Load())
	if !cfg.Cleartext {
		// ESP carried it: a's outbound SA counted the bytes.
		ss, err := nldump.Retry(func() ([]netlink.XfrmState, error) { return a.ns.Handle.XfrmStateList(netlink.FAMILY_V6) })
		must(t, err)
		for _, s := range ss {
			t.Logf("a: state spi 0x%x %s->%s packets %d bytes %d", s.Spi, s.Src, s.Dst, s.Statistics.Packets, s.Statistics.Bytes)
			if net.IP(s.Dst).Equal(b.ula.AsSlice()) && s.Statistics.Bytes < 4<<20 {
				t.Errorf("a's SA towards b carried only %d bytes", s.Statistics.Bytes)
			}
		}
	}

	// Back on the wire: lo is left alone again.
	ch := a.set(t, a.state(b, netip.AddrPortFrom(b.outer, b.port)))
	b.set(t, b.state(a, netip.AddrPortFrom(a.outer, a.port)))
	if got := attachedOn(t, a, "lo"); len(got) > 0 {
		t.Errorf("still on lo after the peer left the bridge: %v (changes %v)", got, ch)
	}
	ping(t, a, b)

	// And once more through the bridge, then Close removes it.
	a.set(t, a.state(b, local))
	b.set(t, b.state(a, netip.AddrPortFrom(a.outer, 4600)))
	ping(t, b, a)
	closeAndCheck(t, a, b)
	if got := attachedOn(t, a, "lo"); len(got) > 0 {
		t.Errorf("left on lo after Close: %v", got)
	}
	loSysctlsBack(t, a)
}

// loSysctlsBack checks that a's lo sysctls are as before the dataplane
// (0 in a fresh namespace).
func loSysctlsBack(t *testing.T, a *host) {
	t.Helper()
	must(t, a.ns.Do(func() error {
		for _, k := range loSysctls {
			if v, err := os.ReadFile("/proc/sys/" + k); err != nil || strings.TrimSpace(string(v)) != "0" {
				t.Errorf("%s = %q (%v) after Close, want 0 as before", k, v, err)
			}
		}
		return nil
	}))
}

// TestRepairLoopbackNetNS (beside TestRepairNetNS): while a peer is reached
// through the relay-tcp bridge, someone detaches the ingress program from
// lo (bpftool link detach of the TCX link, twice; or tc filter del and tc
// qdisc del clsact on lo): the repair loop attaches it again by itself and
// echoes through the bridge flow again (time logged, generous bound
// asserted); Close still puts lo's sysctls back as they were.
func TestRepairLoopbackNetNS(t *testing.T) {
	testenv.HostTier(t, "the VM's 6.1 has clsact only, which the clsact subtest covers here")
	for _, force := range []bool{false, true} {
		t.Run(map[bool]string{false: "probe", true: "clsact"}[force], func(t *testing.T) {
			testenv.RequireBinary(t, "ping", "iputils-ping")
			testenv.RequireBinary(t, "tc", "iproute2")
			a, b, _, _ := bridged(t, Config{Cleartext: true, ForceClsact: force})
			pr := echo(t, a, b)
			if now := time.Now(); !func() bool { _, ok := pr.Outage(now, now, 30*time.Second); return ok }() {
				t.Fatal("no echoes through the bridge")
			}
			a.dp.mu.Lock()
			clsact := a.dp.lo.clsact
			a.dp.mu.Unlock()
			breaks := [][]string{{"tc", "filter", "del", "dev", "lo", "ingress", "prio", fmt.Sprint(filterPrio)}, {"tc", "qdisc", "del", "dev", "lo", "clsact"}}
			if !clsact {
				testenv.RequireBinary(t, "bpftool", "bpftool")
				breaks = [][]string{nil, nil} // the TCX link's id, found at each round
			}
			for _, brk := range breaks {
				if brk == nil {
					a.dp.mu.Lock()
					info, err := a.dp.lo.tcx.Info()
					a.dp.mu.Unlock()
					must(t, err)
					brk = []string{"bpftool", "link", "detach", "id", fmt.Sprint(info.ID)}
				}
				n := a.dp.LastRepair().Count
				start, d := outage(t, a, pr, brk)
				r := repairedAfter(a, n)
				t.Logf("%q: repaired %v after the command returned; echoes stopped for %v; repair %d: %q", brk, r.At.Sub(start).Round(time.Millisecond), d.Round(time.Millisecond), r.Count, r.What)
				if r.Count <= n || !strings.Contains(strings.Join(r.What, "; "), "on lo") {
					t.Errorf("%q: no repair of lo recorded: %+v", brk, r)
				}
				if d > 10*time.Second {
					t.Errorf("%q: echoes stopped for %v", brk, d)
				}
				if got := attachedOn(t, a, "lo"); len(got) == 0 {
					t.Errorf("%q: nothing on lo after the repair", brk)
				}
				ping(t, b, a)
			}
			closeAndCheck(t, a, b)
			if got := attachedOn(t, a, "lo"); len(got) > 0 {
				t.Errorf("left on lo after Close: %v", got)
			}
			loSysctlsBack(t, a)
		})
	}
}

// TestEgressLoopbackOuter (Program.Run): a peer whose outer address is a
// loopback bridge socket gets the same IPv4/UDP header as any peer, with
// zero Ethernet addresses (lo's own), and the verdict is a redirect (to
// lo's ingress), in both modes; the counters count it.
func TestEgressLoopbackOuter(t *testing.T) {
	for _, mode := range []uint8{modeSecure, modeCleartext} {
		e := newProgEnv(t, mode)
		bridge := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 45678)
		lo := netip.MustParseAddr("127.0.0.1")
		must(t, e.objs.PeerByUla.Put(ulaKey(ulaB), btmmPeer{OuterAddr: bridge.Addr().As4(), LocalAddr: lo.As4(), OuterPort: bridge.Port()}))
		var inner, payload []byte
		if mode == modeSecure {
			payload = esp(0x1001, 64)
			inner = eth(0x86dd, ipv6(ulaA, ulaB, 50, payload))
		} else {
			payload = ipv6(ulaA, ulaB, 6, make([]byte, 32))
			inner = eth(0x86dd, payload)
		}
		ret, out := e.run(t, e.objs.BtmmEgress, inner)
		if ret != actRedirect {
			t.Fatalf("mode %d: verdict %d, want TC_ACT_REDIRECT", mode, ret)
		}
		ip := ipv4(lo, bridge.Addr(), 17, 0x4000, udp(portA, bridge.Port(), payload))
		binary.BigEndian.PutUint16(ip[10:], 0)
		binary.BigEndian.PutUint16(ip[10:], ipsum(ip[:20]))
		want := eth(0x0800, ip)
		clear(want[:12]) // Ethernet addresses zero: lo's own
		if diff := cmp.Diff(want, out); diff != "" {
			t.Errorf("mode %d: egress frame (-want +got):\n%s", mode, diff)
		}
		if s := e.stats(t); s.TxPackets != 1 {
			t.Errorf("mode %d: stats %+v, want 1 tx packet", mode, s)
		}
	}
}
