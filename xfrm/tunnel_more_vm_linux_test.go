package xfrm

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/repair"
	"github.com/btmm/btmm/internal/benchrun"
	"github.com/btmm/btmm/internal/tcpbench"
	"github.com/btmm/btmm/internal/testenv"
)

// ourTunnelCounts counts h's tunnel devices (bt6-/bts- in our link group),
// GUE listeners on our FOU port and xfrm states with our reqid.
func ourTunnelCounts(t *testing.T, h *labHost) (links, fou, states int) {
	t.Helper()
	out, err := h.ns.Run("ip", "-o", "link", "show", "group", fmt.Sprint(DefaultTag))
	must(t, err)
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, " bt6-") || strings.Contains(line, " bts-") {
			links++
		}
	}
	out, err = h.ns.Run("ip", "fou", "show")
	must(t, err)
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, fmt.Sprintf("port %d", tlFOUPort)) {
			fou++
		}
	}
	ss, err := h.dp.states()
	must(t, err)
	return links, fou, len(ss)
}

// TestVMTunnelRestart (issue 15): a dataplane that dies without Close (a
// kill -9 of btmmd) leaves its tunnel devices, GUE listener and states; the
// next one removes them at New, and after its first Set (new keys, as
// btmmd's restart rekeys) there is exactly one set of our objects, the
// administrator's tunnels are untouched, and the ULAs answer on every path.
func TestVMTunnelRestart(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface, testenv.Sit, testenv.IP6Tnl, testenv.FOU)
	testenv.RequireBinary(t, "nft", "nftables")
	l := newTunnelLab(t)
	l.a.ns.MustRun(t, "ip", "link", "add", "he-ipv6", "type", "sit", "remote", "192.0.2.1", "local", "10.0.1.2", "ttl", "64")
	l.a.ns.MustRun(t, "ip", "fou", "add", "port", "5555", "gue")
	adminBefore := adminObjects(t, l.a)
	// a's first dataplane: no repair loop, so that once abandoned it does
	// not fight its successor (a killed btmmd runs nothing).
	l.startWith(t, func(name string, c *Config) {
		if name == "a" {
			c.Repair = repair.Config{Off: true}
		}
	})
	via := map[string]controlplane.PathKind{}
	l.setVia(t, via, "b", controlplane.PathIPv6)
	l.setVia(t, via, "c", controlplane.PathFOU)
	links0, fou0, states0 := ourTunnelCounts(t, l.a)
	if links0 != 3 || fou0 != 1 {
		t.Fatalf("before the kill: %d tunnel devices (want 3: bt6-/bts- for b, bts- for c), %d GUE listeners (want 1)", links0, fou0)
	}

	// kill -9: the first dataplane's kernel objects stay; its socket goes.
	l.a.conn.Close()
	c, err := ListenAt(t.Context(), l.a.ns.NsHandle(), netip.MustParseAddrPort("0.0.0.0:4500"))
	must(t, err)
	l.a.conn = c
	t.Cleanup(func() { c.Close() })
	d2, err := New(l.a.ns.NsHandle(), Config{Logger: testLogger(t).With("host", "a2")})
	must(t, err)
	l.a.dp = d2
	t.Cleanup(func() { d2.Close() })
	// The GUE listener carries no tag: the one on our port is taken over
	// at Set (docs/tunnels.md), not removed.
	if links, _, states := ourTunnelCounts(t, l.a); links != 0 || states != 0 {
		t.Errorf("after New: leftovers not removed: %d devices, %d states", links, states)
	}
	// The restarted btmmd keys again: new SPIs and keys for a's pairs.
	for k := range l.spis {
		if k[0] == "a" || k[1] == "a" {
			l.spis[k] += 0x10000
			key := make([]byte, 20)
			copy(key, l.keys[k])
			key[0] ^= 0xff
			l.keys[k] = key
		}
	}
	l.setViaKeys(t, via, "b", controlplane.PathIPv6, true)
	l.setViaKeys(t, via, "c", controlplane.PathFOU, true)
	if links, fou, states := ourTunnelCounts(t, l.a); links != links0 || fou != 1 || states != states0 {
		t.Errorf("after restart: %d tunnel devices, %d GUE listeners, %d states; before the kill %d, %d, %d: want exactly one set",
			links, fou, states, links0, fou0, states0)
	}
	for _, peer := range []*labHost{l.b, l.c} {
		if out, err := l.a.ns.Run("ping", "-6", "-c", "3", "-i", "0.3", "-W", "5", peer.ula.String()); err != nil {
			t.Errorf("a -> %s (%v) after restart: %v\n%s", peer.name, via[peer.name], err, out)
		}
	}
	must(t, l.a.dp.Close())
	if got := ourTunnelObjects(t, l.a); got != "" {
		t.Errorf("a after Close: %s", got)
	}
	if got := adminObjects(t, l.a); got != adminBefore {
		t.Errorf("the administrator's tunnels changed:\nbefore:\n%s\nafter:\n%s", adminBefore, got)
	}
}

// BenchmarkVMTunnelThroughput (issue 15): TCP from a in the tunnel lab
// (tunnelLab), alternated over benchrun.Rounds() rounds in one VM run: to b
// over ESP-in-UDP v4 (the baseline), ipv6 (ip6tnl + ESP transport), sit
// (protocol 41 + ESP transport), kernel WireGuard and the plain veth (IPv4,
// no encryption); to c through its NAT over FOU (sit over GUE + ESP
// transport), whose ratio is to ESP-in-UDP v4 through the same NAT. Each
// case first moves the pair's path with one Set (no rekey). Under qemu TCG
// only ratios within the run mean something; with BTMM_VM_CPU=max the guest
// emulates AES-NI and PCLMUL.
//
//	BTMM_VM_CPU=max go test -exec "$PWD/hack/vmexec" -run '^$' -bench VMTunnelThroughput -benchtime 1x ./xfrm/
func BenchmarkVMTunnelThroughput(b *testing.B) {
	testenv.Require(b, testenv.ESP, testenv.XfrmIface, testenv.Sit, testenv.IP6Tnl, testenv.FOU, testenv.Wireguard)
	testenv.RequireBinary(b, "wg", "wireguard-tools")
	testenv.RequireBinary(b, "nft", "nftables")
	l := newTunnelLab(b)
	l.startWith(b, func(_ string, c *Config) { c.Logger = slog.New(slog.DiscardHandler) })
	setupWireguard(b, &lab{hosts: []*labHost{l.a, l.b}})
	model := "unknown"
	if m := regexp.MustCompile(`(?m)^model name\s*: (.+)$`).FindSubmatch(must2(os.ReadFile("/proc/cpuinfo"))); m != nil {
		model = string(m[1])
	}
	via := map[string]controlplane.PathKind{}
	run := func(peer *labHost, k controlplane.PathKind, dst netip.Addr) func(testing.TB) []benchrun.Metric {
		return func(testing.TB) []benchrun.Metric {
			if k != noPath {
				l.setVia(b, via, peer.name, k)
			}
			r, err := tcpbench.Run(b.Context(), l.a.ns, peer.ns, dst, 3*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			return []benchrun.Metric{{Value: r.Mbps(), Unit: "Mbit/s"}}
		}
	}
	benchrun.Alternate(b, fmt.Sprintf("TCP (3 s a round) from host a of the tunnel lab in one VM (Debian %s under qemu TCG, CPU %q, "+
		"rfc4106(gcm(aes))): to b over ESP-in-UDP v4, ipv6 (ip6tnl), sit, WireGuard and the plain veth; to c behind an IPv4 NAT "+
		"over FOU (GUE) vs ESP-in-UDP v4", kernelRelease(), model), "esp-in-udp",
		benchrun.Case{Name: "esp-in-udp", Run: run(l.b, controlplane.PathESPInUDP, l.b.ula)},
		benchrun.Case{Name: "ipv6", Run: run(l.b, controlplane.PathIPv6, l.b.ula)},
		benchrun.Case{Name: "sit", Run: run(l.b, controlplane.PathSit, l.b.ula)},
		benchrun.Case{Name: "wireguard", Run: run(l.b, noPath, netip.MustParseAddr("fd01::b"))},
		benchrun.Case{Name: "plain-veth", Run: run(l.b, noPath, l.b.outer)},
		benchrun.Case{Name: "esp-in-udp-nat", Run: run(l.c, controlplane.PathESPInUDP, l.c.ula), NoRatio: true},
		benchrun.Case{Name: "fou-nat", Run: run(l.c, controlplane.PathFOU, l.c.ula), Baseline: "esp-in-udp-nat"},
	)
}

// noPath: a benchmark case that does not move a path.
const noPath = controlplane.PathKind(255)
