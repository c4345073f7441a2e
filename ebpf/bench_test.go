package ebpf

import (
	"context"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/internal/benchrun"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/tcpbench"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/btmm/btmm/xfrm"
)

// Benchmarks are reported, never asserted (docs/benchmarks.md): each
// alternates the dataplane with its baseline over benchrun.Rounds() rounds
// in one run (hack/bench/list runs them).

// mbps is one round: TCP from..to dst for 3 s, as the receiver saw it.
func mbps(b *testing.B, from, to *host, dst netip.Addr) []benchrun.Metric {
	r, err := tcpbench.Run(b.Context(), from.ns, to.ns, dst, 3*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	return []benchrun.Metric{{Value: r.Mbps(), Unit: "Mbit/s"}}
}

// routeMTU is the MTU of h's route to dst (0: the device's).
func routeMTU(b *testing.B, h *host, dst netip.Addr) int {
	out, err := h.ns.Run("ip", "-6", "route", "get", dst.String())
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(out)
	for i := range f[:len(f)-1] {
		if f[i] == "mtu" {
			n, _ := strconv.Atoi(f[i+1])
			return n
		}
	}
	return 0
}

// BenchmarkThroughput: TCP between the ULAs through the eBPF path
// (cleartext mode: IPv6 in IPv4/UDP) against a plain veth pair between the
// same namespaces carrying IPv6 TCP at the tunnel's inner MTU, so both
// carry the same TCP/IPv6 segments (this kernel).
//
//	go test -run '^$' -bench Throughput -benchtime 1x ./ebpf/
func BenchmarkThroughput(b *testing.B) {
	a, c := topology(b)
	connect(b, a, c, Config{Cleartext: true})
	ping(b, a, c)
	// The baseline: a second veth pair, IPv6 only, no program attached.
	rawA, rawC := netip.MustParseAddr("fd99::a"), netip.MustParseAddr("fd99::c")
	netnsVeth(b, a, c, "ra", "rc", rawA, rawC, routeMTU(b, a, c.ula))
	benchrun.Alternate(b, "IPv6 TCP (3 s a round) between two network namespaces: through btmm's eBPF "+
		"dataplane in cleartext mode (IPv6 in IPv4/UDP, TC programs) vs a plain veth pair with IPv6 at the tunnel's inner MTU",
		"veth-ipv6",
		benchrun.Case{Name: "veth-ipv6", Run: func(testing.TB) []benchrun.Metric { return mbps(b, a, c, rawC) }},
		benchrun.Case{Name: "ebpf-cleartext", Run: func(testing.TB) []benchrun.Metric { return mbps(b, a, c, c.ula) }},
	)
}

// netnsVeth joins a and c with another veth pair (da in a, dc in c) carrying
// only the IPv6 addresses given, at mtu (0: the default).
func netnsVeth(b *testing.B, a, c *host, da, dc string, ipa, ipc netip.Addr, mtu int) {
	b.Helper()
	netns.MustVeth(b, a.ns, da, c.ns, dc)
	for _, x := range []struct {
		h   *host
		dev string
		ip  netip.Addr
	}{{a, da, ipa}, {c, dc, ipc}} {
		cmds := [][]string{{"ip", "-6", "addr", "add", x.ip.String() + "/64", "dev", x.dev, "nodad"}}
		if mtu > 0 {
			cmds = append(cmds, []string{"ip", "link", "set", x.dev, "mtu", strconv.Itoa(mtu)})
		}
		for _, cmd := range cmds {
			if out, err := x.h.ns.Run(cmd[0], cmd[1:]...); err != nil {
				b.Fatalf("%s: %v %s", strings.Join(cmd, " "), err, out)
			}
		}
	}
}

// BenchmarkSecureVM: TCP between the ULAs on this dataplane in secure mode
// (XFRM ESP between the ULAs + the TC header swap) against btmm's xfrm
// dataplane (package xfrm: ESP-in-UDP tunnel mode), two pairs of hosts side
// by side in one VM, measured alternately. Under TCG only the ratio means
// something.
//
//	BTMM_VM_CPU=max go test -exec "$PWD/hack/vmexec" -run '^$' -bench SecureVM -benchtime 1x ./ebpf/
func BenchmarkSecureVM(b *testing.B) {
	testenv.Require(b, testenv.ESP)
	ea, ec := topology(b)
	connect(b, ea, ec, Config{})
	ping(b, ea, ec)
	xa, xc := topology(b)
	st := xa.state(xc, netip.AddrPortFrom(xc.outer, xc.port))
	xfrmDataplane(b, xa, xc, st.Peers[0].Out, st.Peers[0].In)
	xfrmDataplane(b, xc, xa, st.Peers[0].In, st.Peers[0].Out)
	ping(b, xa, xc)
	benchrun.Alternate(b, "IPv6 TCP (3 s a round) between two ULAs over ESP (AES-GCM) in one VM: btmm's eBPF dataplane "+
		"in secure mode vs btmm's xfrm dataplane (package xfrm, ESP-in-UDP); Debian 6.1 under qemu TCG, -cpu max (AES-NI emulated)",
		"xfrm-dataplane",
		benchrun.Case{Name: "xfrm-dataplane", Run: func(testing.TB) []benchrun.Metric { return mbps(b, xa, xc, xc.ula) }},
		benchrun.Case{Name: "ebpf-secure", Run: func(testing.TB) []benchrun.Metric { return mbps(b, ea, ec, ec.ula) }},
	)
}

// xfrmDataplane runs package xfrm's dataplane (with its ESP-in-UDP socket)
// on h for its one peer.
func xfrmDataplane(b *testing.B, h, peer *host, out, in controlplane.SA) {
	b.Helper()
	conn, err := xfrm.ListenAt(context.Background(), h.ns.NsHandle(), netip.AddrPortFrom(netip.IPv4Unspecified(), h.port))
	must(b, err)
	b.Cleanup(func() { conn.Close() })
	dp, err := xfrm.New(h.ns.NsHandle(), xfrm.Config{})
	must(b, err)
	b.Cleanup(func() { dp.Close() })
	st := &controlplane.State{
		Local: controlplane.Local{ULA: h.ula, Port: h.port},
		Peers: []controlplane.Peer{{Name: peer.name, ULA: peer.ula, Outer: netip.AddrPortFrom(peer.outer, peer.port), Out: out, In: in}},
	}
	if _, err := dp.Set(context.Background(), st); err != nil {
		b.Fatalf("xfrm dataplane on %s: %v", h.name, err)
	}
}
