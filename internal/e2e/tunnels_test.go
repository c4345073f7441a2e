package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/internal/lab"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// nsCmd is a command line (split at spaces) to run in a namespace.
type nsCmd struct {
	ns   *netns.NS
	args string
}

func mustRunAll(t *testing.T, cmds []nsCmd) {
	t.Helper()
	for _, c := range cmds {
		f := strings.Fields(c.args)
		c.ns.MustRun(t, f[0], f[1:]...)
	}
}

// ipv6Internet gives the lab global IPv6 (2001:db8::/32) beside its IPv4:
// inet routes it, pub has 2001:db8:3::2, and gw1 routes 2001:db8:11::/64
// to host1 (dual-stack behind an IPv4 NAT, as most home networks are; the
// gateway's firewall lets IPv6 in). gw2 and host2 stay IPv4-only.
func ipv6Internet(t *testing.T, l *lab.Lab) {
	t.Helper()
	mustRunAll(t, []nsCmd{
		{l.Inet, "sysctl -qw net.ipv6.conf.all.forwarding=1"},
		{l.Inet, "ip -6 addr add 2001:db8:1::1/64 dev gw1 nodad"},
		{l.Inet, "ip -6 addr add 2001:db8:3::1/64 dev pub nodad"},
		{l.Inet, "ip -6 route add 2001:db8:11::/64 via 2001:db8:1::2"},
		{l.GW1, "sysctl -qw net.ipv6.conf.all.forwarding=1"},
		{l.GW1, "ip -6 addr add 2001:db8:1::2/64 dev wan nodad"},
		{l.GW1, "ip -6 addr add 2001:db8:11::1/64 dev lan nodad"},
		{l.GW1, "ip -6 route add default via 2001:db8:1::1"},
		{l.GW1, "nft insert rule inet filter forward meta nfproto ipv6 accept"},
		{l.Host1, "ip -6 addr add 2001:db8:11::2/64 dev eth0 nodad"},
		{l.Host1, "ip -6 route add default via 2001:db8:11::1"},
		{l.Pub, "ip -6 addr add 2001:db8:3::2/64 dev eth0 nodad"},
		{l.Pub, "ip -6 route add default via 2001:db8:3::1"},
	})
	out, err := l.Host1.Run("ping", "-6", "-c", "1", "-W", "5", "2001:db8:3::2")
	if err != nil {
		t.Fatalf("lab IPv6: host1 cannot reach pub: %v\n%s", err, out)
	}
}

// wire captures on inet's side of pub's link while f runs and returns how
// many frames each tcpdump filter matches, and the capture file.
func wire(t *testing.T, l *lab.Lab, filters []string, f func()) ([]int, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pub.pcap")
	ctx, cancel := context.WithCancel(context.Background())
	cmd := l.Inet.Command(ctx, "tcpdump", "-n", "-U", "-s", "0", "-i", "pub", "-w", path)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Inet.StartCmd(cmd); err != nil {
		t.Fatal(err)
	}
	// f runs once tcpdump says it captures ("listening on pub"), not after
	// a fixed second: under load (two VMs on two cores, two labs in each)
	// tcpdump took longer to start, and its capture missed the first round
	// trips (19 GUE frames for 20) or all of f (every count 0).
	var said testenv.SyncBuffer
	listening := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		closed := false
		for sc.Scan() {
			said.Write([]byte(sc.Text() + "\n"))
			if !closed && strings.Contains(sc.Text(), "listening on") {
				close(listening)
				closed = true
			}
		}
	}()
	select {
	case <-listening:
	case <-time.After(90 * time.Second):
		// Where it is stuck (one run under two busy loops said nothing
		// within 30 s).
		proc, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", cmd.Process.Pid))
		wchan, _ := os.ReadFile(fmt.Sprintf("/proc/%d/wchan", cmd.Process.Pid))
		cancel()
		cmd.Wait()
		t.Fatalf("tcpdump on inet's pub link not listening after 90 s (stat %q, wchan %q); it said: %q", proc, wchan, said.String())
	}
	f()
	time.Sleep(500 * time.Millisecond)
	// SIGTERM: tcpdump ends its file cleanly (SIGKILL may leave a partial
	// last record); SIGKILL (ctx) if it does not stop.
	cmd.Process.Signal(syscall.SIGTERM)
	stopped := make(chan struct{})
	go func() { cmd.Wait(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		cancel()
		<-stopped
	}
	cancel()
	var n []int
	for _, flt := range filters {
		out, err := l.Inet.Run("tcpdump", "-n", "-r", path, flt)
		c := 0
		for _, line := range strings.Split(out, "\n") {
			if strings.TrimSpace(line) != "" && !strings.HasPrefix(line, "reading from") && !strings.HasPrefix(line, "tcpdump: ") {
				c++
			}
		}
		if err != nil {
			// Say why: a count of 0 from a capture that cannot be read
			// would pass the "nothing in clear" checks for nothing.
			fi, _ := os.Stat(path)
			t.Errorf("tcpdump -r %s %q (%d bytes): %v", path, flt, size(fi), err)
		}
		n = append(n, c)
	}
	return n, path
}

func size(fi os.FileInfo) int64 {
	if fi == nil {
		return -1
	}
	return fi.Size()
}

// tunnelsConf turns path selection (candidates refreshed every refresh) and
// tunnel paths on, with the GUE port 4501.
func tunnelsConf(refresh string) string {
	return fmt.Sprintf("\n[paths]\nmode = \"auto\"\nrefresh = %q\n\n[tunnels]\nmode = \"auto\"\nfou_port = 4501\n", refresh)
}

// startTunnelHosts starts btmmd (xfrm, pub on pubDataplane, Kerberos, the
// TOML extra: paths and tunnels on) on host1, host2 and pub, in that order.
func (s *system) startTunnelHosts(t *testing.T, extra, pubDataplane string) []*host {
	t.Helper()
	var hosts []*host
	for _, h := range []struct {
		name string
		ns   *netns.NS
	}{{"host1", s.l.Host1}, {"host2", s.l.Host2}, {"pub", s.l.Pub}} {
		dp := "xfrm"
		if h.name == "pub" {
			dp = pubDataplane
		}
		say(t, "btmmd on %s (%s dataplane, paths and tunnels on)", h.name, dp)
		hosts = append(hosts, s.startHost(t, h.name, h.ns, hostConf{dataplane: dp, extra: extra}))
	}
	return hosts
}

// waitKinds waits until, for every pair {from, to} of want, from has to
// keyed, in its kernel and on the wanted path kind (the selector's choice
// and, for a tunnel kind, the dataplane's Via), then shows `btmmctl peers`
// on every host and checks that it names each wanted kind.
func waitKinds(t *testing.T, bins string, hosts []*host, want map[[2]string]path.Kind, d time.Duration) map[string]*agent.Status {
	t.Helper()
	sts := map[string]*agent.Status{}
	t0 := time.Now()
	testenv.WaitFor(t, "every pair on its expected path", d, func() error {
		for _, h := range hosts {
			st, err := h.status(t, bins)
			if err != nil {
				return err
			}
			sts[h.name] = st
		}
		for pair, kind := range want {
			var p *agent.PeerStatus
			for i, q := range sts[pair[0]].Peers {
				if q.Name == pair[1] {
					p = &sts[pair[0]].Peers[i]
				}
			}
			if p == nil || !p.Keyed || !p.InKernel || p.Path.Kind != kind || kind.Tunnel() && p.Via != kind.PathKind() {
				return fmt.Errorf("%s -> %s: want %v keyed in kernel, have %+v", pair[0], pair[1], kind, p)
			}
		}
		return nil
	})
	t.Logf("every pair on its expected path after %v", time.Since(t0).Round(time.Millisecond))
	for _, h := range hosts {
		out, _ := h.ns.Run(filepath.Join(bins, "btmmctl"), "-socket", h.sock, "peers")
		show(t, "btmmctl peers   # on "+h.name, out)
		for pair, kind := range want {
			if pair[0] == h.name && !strings.Contains(out, kind.String()) {
				t.Errorf("btmmctl peers on %s does not show %v", h.name, kind)
			}
		}
	}
	return sts
}

// v6onlyAddr is the IPv6-only host's address (2001:db8:4::/64 off inet).
const v6onlyAddr = "2001:db8:4::2"

// ipv6OnlyHost adds to the lab with IPv6 (ipv6Internet) a namespace with
// nothing but v6onlyAddr and an IPv6 default route via inet: no IPv4
// address, no IPv4 route, no NAT.
func ipv6OnlyHost(t *testing.T, l *lab.Lab) *netns.NS {
	t.Helper()
	v6 := netns.New(t, "v6only")
	netns.MustVeth(t, l.Inet, "v6o", v6, "eth0")
	mustRunAll(t, []nsCmd{
		{l.Inet, "ip -6 addr add 2001:db8:4::1/64 dev v6o nodad"},
		{v6, "ip link set lo up"},
		{v6, "ip -6 addr add " + v6onlyAddr + "/64 dev eth0 nodad"},
		{v6, "ip -6 route add default via 2001:db8:4::1"},
	})
	if out, _ := v6.Run("sh", "-c", "ip -4 addr show scope global; ip -4 route"); strings.TrimSpace(out) != "" {
		t.Fatalf("the IPv6-only host has IPv4:\n%s", out)
	}
	if out, err := v6.Run("ping", "-6", "-c", "1", "-W", "5", "2001:db8:3::2"); err != nil {
		t.Fatalf("lab IPv6: v6only cannot reach pub: %v\n%s", err, out)
	}
	return v6
}

// TestTunnelPaths (issue 15) runs btmmd with tunnel paths on four hosts
// of the lab with IPv6: host1 (dual-stack behind gw1's IPv4 NAT), host2
// (IPv4 only behind gw2's NAT), pub (public IPv4 and IPv6; the ebpf
// dataplane in secure mode, the others xfrm) and v6only (IPv6
// only: no IPv4 address or route; btmm-dnsd and krb5kdc reached at
// inetAddr6, no NAT-PMP/PCP gateway), miniupnpd on both gateways mapping
// the tunnel and the FOU port. The path checks choose ipv6 between host1
// and pub and fou (GUE through the NATs) for the pairs with host2; v6only
// publishes no SRV/A (only c-v6), is keyed over IPv6 and reaches pub and
// host1 by ipv6; v6only and host2 share no address family: neither keys the
// other and btmmctl peers says why. ESP is on the wire and no ULA TCP in
// the clear (v6only's byte-checked stream to pub: IPv6|IPv6|ESP only); a
// TCP connection between host1 and pub stays open while the IPv6 route
// goes away (traffic moves to another kind) and comes back (back to ipv6),
// with no rekey; SIGTERM on host1 and on pub leaves nothing of ours
// (noneLeft), no tunnel device and no GUE listener.
func TestTunnelPaths(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface, testenv.Sit, testenv.IP6Tnl, testenv.FOU)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	testenv.RequireBinary(t, "tcpdump", "tcpdump")
	t.Parallel()
	s := newSystemWith(t, "", true) // btmm-dnsd and krb5kdc at inetAddr6 too, for the IPv6-only host
	l, bins := s.l, s.bins
	say(t, "Lab with IPv6: host1 dual-stack behind gw1 (IPv4 NAT), host2 IPv4-only behind gw2, pub public IPv4 + IPv6, v6only IPv6 only (%s)", v6onlyAddr)
	ipv6Internet(t, l)
	var v6cost time.Duration // VM time the IPv6-only host adds (what is not overlapped)
	t0 := time.Now()
	v6 := ipv6OnlyHost(t, l)
	v6cost += time.Since(t0)
	s.upnp(t, l.GW1, l.GW2)
	tun := tunnelsConf("10s")
	hosts := s.startTunnelHosts(t, tun, "ebpf")
	say(t, "btmmd on v6only (IPv6 only; dns.server, dns.resolver and the KDC given as [%s])", inetAddr6)
	t0 = time.Now()
	h6 := s.startHost(t, "v6only", v6, hostConf{dataplane: "xfrm", extra: tun, services6: true})
	v6cost += time.Since(t0)
	sts := waitKinds(t, bins, hosts, map[[2]string]path.Kind{
		{"host1", "pub"}: path.KindIPv6, {"pub", "host1"}: path.KindIPv6,
		{"host1", "host2"}: path.KindFOU, {"host2", "host1"}: path.KindFOU,
		{"host2", "pub"}: path.KindFOU, {"pub", "host2"}: path.KindFOU,
	}, 180*time.Second)
	t0 = time.Now()
	waitKinds(t, bins, []*host{h6, hosts[0], hosts[2]}, map[[2]string]path.Kind{
		{"v6only", "pub"}: path.KindIPv6, {"pub", "v6only"}: path.KindIPv6,
		{"v6only", "host1"}: path.KindIPv6, {"host1", "v6only"}: path.KindIPv6,
	}, 180*time.Second)
	v6cost += time.Since(t0)
	t0 = time.Now()

	say(t, "host2 (IPv4 only) and v6only (IPv6 only) share no address family: neither keys the other, btmmctl peers says why")
	for _, pr := range [][2]*host{{hosts[1], h6}, {h6, hosts[1]}} {
		st, err := pr[0].status(t, bins)
		if err != nil {
			t.Fatal(err)
		}
		p := peer(t, st, pr[1].name)
		if p.Keyed || p.Health.State != agent.HealthUnreachable || !strings.Contains(p.Health.Reason, "no common address family") || p.KeyingError != "" {
			t.Errorf("%s -> %s: want unreachable (no common address family), never keyed, no keying error; have keyed %v, health %+v, keying error %q",
				pr[0].name, pr[1].name, p.Keyed, p.Health, p.KeyingError)
		}
		t.Logf("%s -> %s: %s: %s", pr[0].name, pr[1].name, p.Health.State, p.Health.Reason)
	}
	st6, err := h6.status(t, bins)
	if err != nil {
		t.Fatal(err)
	}
	out, _ := v6.Run(filepath.Join(bins, "btmmctl"), "-socket", h6.sock, "status")
	show(t, "btmmctl status   # on v6only", out)
	if !strings.HasPrefix(st6.NAT.Status, "no IPv4 default route") || st6.NAT.External.IsValid() {
		t.Errorf("v6only's NAT status %q, external %v: want no IPv4 default route, no external address", st6.NAT.Status, st6.NAT.External)
	}
	if st6.Register.LastError != "" {
		t.Errorf("v6only's registration: %s", st6.Register.LastError)
	}
	if out, err := v6.Run("ping", "-6", "-c", "3", "-i", "0.2", "-w", "10", peer(t, st6, "host1").ULA.String()); err != nil {
		t.Errorf("v6only cannot ping host1's ULA (dual-stack behind gw1): %v\n%s", err, out)
	}
	v6cost += time.Since(t0)
	via := func(h *host, peerName string) (controlplane.PathKind, error) {
		st, err := h.status(t, bins)
		if err != nil {
			return 0, err
		}
		for _, p := range st.Peers {
			if p.Name == peerName {
				return p.Via, nil
			}
		}
		return 0, fmt.Errorf("%s does not list %s", h.name, peerName)
	}
	out, _ = l.Host1.Run("ip", "-d", "link", "show", "group", "25217")
	show(t, "ip -d link show group 25217   # on host1: btmm's tunnel devices", out)
	out, _ = l.Host2.Run("ip", "fou", "show")
	show(t, "ip fou show   # on host2", out)

	say(t, "TCP between the ULAs host1 -> pub (ipv6), host2 -> pub (fou) and v6only -> pub (ipv6, 256 KiB byte-checked); the capture on pub's link shows ESP only")
	echo := startEcho(t, l.Pub, sts["pub"].ULA)
	c1 := dialEcho(t, l.Host1, echo)
	defer c1.Close()
	c2 := dialEcho(t, l.Host2, echo)
	defer c2.Close()
	c6 := dialEcho(t, v6, echo)
	defer c6.Close()
	marker := []byte("CLEARTEXT-MARKER v6only ")
	v6h := "ip6 host " + v6onlyAddr
	// Inside the ip6tnl: ICMPv6 (58) or hop-by-hop (0: MLD) to a
	// multicast (ff..) or link-local (fe80) destination (inner header at
	// 40, its destination at 64): the device's own neighbour discovery
	// and multicast listener reports, never ULA traffic.
	devCtl := "(ip6[6] == 41 and (ip6[46] == 58 or ip6[46] == 0) and (ip6[64] == 0xff or ip6[64] == 0xfe))"
	n, pcap := wire(t, l, []string{"ip6 and ip6[6] == 41 and ip6[46] == 50", "udp port 4501", "tcp port 7", "ip6 and ip6[6] == 41 and ip6[46] == 6",
		v6h + " and ip6[6] == 41 and ip6[46] == 50", // v6only's ESP in ip6tnl
		v6h + " and ip6[6] == 41 and ip6[46] == 17", // path checks through the device (link-local, authenticated)
		v6h + " and udp port 4500",                  // keying over IPv6
		v6h + " and " + devCtl,                      // the device's own link-local/multicast ICMPv6 and MLD (ND, MLD reports)
		v6h + " and not (ip6[6] == 41 and (ip6[46] == 50 or ip6[46] == 17)) and not udp port 4500 and not " + devCtl, // anything else
		"ip6 host 2001:db8:11::2 and ip6[6] == 41 and ip6[46] == 50",                                                 // host1's ESP in ip6tnl (n[0] counts v6only's too)
	}, func() {
		for range 20 {
			roundTrip(t, c1, "on ipv6")
			roundTrip(t, c2, "on fou")
		}
		t0 := time.Now()
		streamCheck(t, c6, bytes.Repeat(marker, 64), 256<<10)
		v6cost += time.Since(t0)
	})
	t.Logf("pub's link: %d IPv6|IPv6|ESP (%d of them host1's), %d GUE (udp 4501), %d outer TCP port 7, %d IPv6|IPv6|TCP", n[0], n[9], n[1], n[2], n[3])
	t.Logf("v6only on pub's link: %d IPv6|IPv6|ESP, %d IPv6|IPv6|UDP (path checks), %d keying over IPv6, %d device ND/MLD, %d other", n[4], n[5], n[6], n[7], n[8])
	if n[7]+n[8] > 0 {
		out, _ := l.Inet.Run("tcpdump", "-n", "-v", "-r", pcap, v6h+" and not (ip6[6] == 41 and (ip6[46] == 50 or ip6[46] == 17)) and not udp port 4500")
		t.Logf("v6only's frames that are not ESP, checks or keying:\n%s", out)
	}
	// 256 KiB each way is hundreds of frames; 20 leaves room for
	// segmentation offloads the capture may see whole.
	if n[4] < 20 || n[8] != 0 {
		t.Errorf("v6only's 256 KiB each way to pub: want at least 20 IPv6|IPv6|ESP frames and nothing but ESP, checks, keying and the device's ND/MLD; have %d ESP, %d other",
			n[4], n[8])
	}
	if raw, err := os.ReadFile(pcap); err != nil || bytes.Contains(raw, marker) {
		t.Errorf("the capture on pub's link holds v6only's payload in clear (or is unreadable: %v)", err)
	}
	say(t, "v6only -> pub: 256 KiB through pub's echo and back over ipv6, every byte checked; no byte of it readable on the wire")
	t.Logf("the IPv6-only host's phases took %v of this test (namespace, its btmmd's start, its pairs' convergence after the others', the checks, the stream)", v6cost.Round(100*time.Millisecond))
	// At least one frame per round trip on each path. Not two: the
	// capture may start a frame or two late and segments can be
	// coalesced (CI saw 36 of 40 once).
	if n[9] < 20 || n[1] < 20 {
		t.Errorf("want the round trips' ESP on the wire: %d IPv6|IPv6|ESP (host1), %d GUE (host2), want >= 20 each (20 round trips)", n[9], n[1])
	}
	if n[2] != 0 || n[3] != 0 {
		t.Errorf("ULA TCP in the clear on pub's link: %d outer, %d inside ip6tnl", n[2], n[3])
	}

	say(t, "The IPv6 route to host1 goes away: host1 <-> pub move to another kind, the TCP connection stays, no rekey")
	before := peer(t, sts["host1"], "pub")
	l.Inet.MustRun(t, "ip", "-6", "route", "del", "2001:db8:11::/64")
	testenv.WaitFor(t, "host1 leaves ipv6 for pub", 60*time.Second, func() error {
		roundTripWithin(t, c1, "while the IPv6 route is gone", 30*time.Second)
		if k, err := via(hosts[0], "pub"); err != nil || k == controlplane.PathIPv6 {
			return fmt.Errorf("host1 -> pub by %v (%v)", k, err)
		}
		return nil
	})
	k, _ := via(hosts[0], "pub")
	say(t, "host1 -> pub now by %v", k)
	roundTripWithin(t, c1, "after leaving ipv6", 30*time.Second)
	l.Inet.MustRun(t, "ip", "-6", "route", "add", "2001:db8:11::/64", "via", "2001:db8:1::2")
	testenv.WaitFor(t, "host1 back on ipv6 to pub", 120*time.Second, func() error {
		roundTripWithin(t, c1, "while the IPv6 route is back", 30*time.Second)
		if k, err := via(hosts[0], "pub"); err != nil || k != controlplane.PathIPv6 {
			return fmt.Errorf("host1 -> pub by %v (%v)", k, err)
		}
		return nil
	})
	roundTrip(t, c1, "back on ipv6")
	st1, err := hosts[0].status(t, bins)
	if err != nil {
		t.Fatal(err)
	}
	if after := peer(t, st1, "pub"); after.OutSPI != before.OutSPI || after.InSPI != before.InSPI {
		t.Errorf("the path changes rekeyed: out %#x -> %#x, in %#x -> %#x", before.OutSPI, after.OutSPI, before.InSPI, after.InSPI)
	}

	say(t, "SIGTERM btmmd on host1: no tunnel device, GUE listener or transport state of ours stays")
	c1.Close()
	h1 := hosts[0]
	stopWithin(t, h1, 45*time.Second) // the unit's TimeoutStopSec (TCG is slow)
	noneLeft(t, h1)
	for _, what := range [][]string{{"ip", "link", "show", "group", "25217"}, {"ip", "fou", "show"}} {
		if out, _ := l.Host1.Run(what[0], what[1:]...); strings.TrimSpace(out) != "" {
			t.Errorf("after btmmd stopped, `%s` on host1 shows:\n%s", strings.Join(what, " "), out)
		}
	}
	say(t, "SIGTERM btmmd on pub (ebpf): the same, its devices carry the ebpf tag (group 753167)")
	stopWithin(t, hosts[2], 45*time.Second)
	noneLeft(t, hosts[2])
	for _, what := range [][]string{{"ip", "link", "show", "group", "753167"}, {"ip", "fou", "show"}} {
		if out, _ := l.Pub.Run(what[0], what[1:]...); strings.TrimSpace(out) != "" {
			t.Errorf("after btmmd stopped, `%s` on pub shows:\n%s", strings.Join(what, " "), out)
		}
	}
}
