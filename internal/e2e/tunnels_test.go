package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/internal/lab"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// ipv6Internet gives the lab global IPv6 (2001:db8::/32) beside its IPv4:
// inet routes it, pub has 2001:db8:3::2, and gw1 routes 2001:db8:11::/64
// to host1 (dual-stack behind an IPv4 NAT, as most home networks are; the
// gateway's firewall lets IPv6 in). gw2 and host2 stay IPv4-only.
func ipv6Internet(t *testing.T, l *lab.Lab) {
	t.Helper()
	for _, s := range []struct {
		ns   *netns.NS
		args string
	}{
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
	} {
		f := strings.Fields(s.args)
		s.ns.MustRun(t, f[0], f[1:]...)
	}
	out, err := l.Host1.Run("ping", "-6", "-c", "1", "-W", "5", "2001:db8:3::2")
	if err != nil {
		t.Fatalf("lab IPv6: host1 cannot reach pub: %v\n%s", err, out)
	}
}

// wire captures on inet's side of pub's link while f runs and returns how
// many frames each tcpdump filter matches.
func wire(t *testing.T, l *lab.Lab, filters []string, f func()) []int {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pub.pcap")
	ctx, cancel := context.WithCancel(context.Background())
	cmd := l.Inet.Command(ctx, "tcpdump", "-n", "-U", "-s", "0", "-i", "pub", "-w", path)
	if err := l.Inet.StartCmd(cmd); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // tcpdump listening
	f()
	time.Sleep(500 * time.Millisecond)
	cancel()
	cmd.Wait()
	var n []int
	for _, flt := range filters {
		out, _ := l.Inet.Run("tcpdump", "-n", "-r", path, flt)
		c := 0
		for _, line := range strings.Split(out, "\n") {
			if strings.TrimSpace(line) != "" && !strings.HasPrefix(line, "reading from") {
				c++
			}
		}
		n = append(n, c)
	}
	return n
}

// TestTunnelPaths (issue 15) runs btmmd with tunnel paths on three hosts
// of the lab with IPv6: host1 (dual-stack behind gw1's IPv4 NAT), host2
// (IPv4 only behind gw2's NAT) and pub (public IPv4 and IPv6), miniupnpd on
// both gateways mapping the tunnel and the FOU port. The path checks
// choose ipv6 between host1 and pub and fou (GUE through the NATs) for the
// pairs with host2; ESP is on the wire and no ULA TCP in the clear; a TCP
// connection between host1 and pub stays open while the IPv6 route goes
// away (traffic moves to another kind) and comes back (back to ipv6), with
// no rekey; SIGTERM leaves no tunnel device or GUE listener.
func TestTunnelPaths(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface, testenv.Sit, testenv.IP6Tnl, testenv.FOU)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	testenv.RequireBinary(t, "tcpdump", "tcpdump")
	t.Parallel()
	s := newSystem(t)
	l, bins := s.l, s.bins
	say(t, "Lab with IPv6: host1 dual-stack behind gw1 (IPv4 NAT), host2 IPv4-only behind gw2, pub public IPv4 + IPv6")
	ipv6Internet(t, l)
	s.upnp(t, l.GW1, l.GW2)
	tun := "\n[paths]\nmode = \"auto\"\nrefresh = \"10s\"\n\n[tunnels]\nmode = \"auto\"\nfou_port = 4501\n"
	var hosts []*host
	for _, h := range []struct {
		name string
		ns   *netns.NS
	}{{"host1", l.Host1}, {"host2", l.Host2}, {"pub", l.Pub}} {
		say(t, "btmmd on %s (xfrm dataplane, paths and tunnels on)", h.name)
		hosts = append(hosts, s.startHost(t, h.name, h.ns, hostConf{dataplane: "xfrm", extra: tun}))
	}
	sts := s.keyed(t, hosts...)
	want := map[[2]string]controlplane.PathKind{
		{"host1", "pub"}: controlplane.PathIPv6, {"pub", "host1"}: controlplane.PathIPv6,
		{"host1", "host2"}: controlplane.PathFOU, {"host2", "host1"}: controlplane.PathFOU,
		{"host2", "pub"}: controlplane.PathFOU, {"pub", "host2"}: controlplane.PathFOU,
	}
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
	for _, h := range hosts {
		testenv.WaitFor(t, h.name+"'s peers on their tunnel paths", 120*time.Second, func() error {
			for k, w := range want {
				if k[0] != h.name {
					continue
				}
				if got, err := via(h, k[1]); err != nil || got != w {
					return fmt.Errorf("%s -> %s by %v (%v), want %v", k[0], k[1], got, err, w)
				}
			}
			return nil
		})
		out, _ := h.ns.Run(filepath.Join(bins, "btmmctl"), "-socket", h.sock, "peers")
		show(t, "btmmctl peers   # on "+h.name, out)
	}
	out, _ := l.Host1.Run("ip", "-d", "link", "show", "group", "25217")
	show(t, "ip -d link show group 25217   # on host1: btmm's tunnel devices", out)
	out, _ = l.Host2.Run("ip", "fou", "show")
	show(t, "ip fou show   # on host2", out)

	say(t, "TCP between the ULAs host1 -> pub (ipv6) and host2 -> pub (fou); the capture on pub's link shows ESP only")
	echo := startEcho(t, l.Pub, sts["pub"].ULA)
	c1 := dialEcho(t, l.Host1, echo)
	defer c1.Close()
	c2 := dialEcho(t, l.Host2, echo)
	defer c2.Close()
	n := wire(t, l, []string{"ip6 and ip6[6] == 41 and ip6[46] == 50", "udp port 4501", "tcp port 7", "ip6 and ip6[6] == 41 and ip6[46] == 6"}, func() {
		for range 20 {
			roundTrip(t, c1, "on ipv6")
			roundTrip(t, c2, "on fou")
		}
	})
	t.Logf("pub's link: %d IPv6|IPv6|ESP, %d GUE (udp 4501), %d outer TCP port 7, %d IPv6|IPv6|TCP", n[0], n[1], n[2], n[3])
	// At least one frame per round trip on each path. Not two: the
	// capture may start a frame or two late and segments can be
	// coalesced (CI saw 36 of 40 once).
	if n[0] < 20 || n[1] < 20 {
		t.Errorf("want the round trips' ESP on the wire: %d IPv6|IPv6|ESP (host1), %d GUE (host2), want >= 20 each (20 round trips)", n[0], n[1])
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
	h1.d.cmd.Process.Signal(syscall.SIGTERM)
	exited := make(chan error, 1)
	go func() { exited <- h1.d.cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("btmmd on host1 exited with %v", err)
		}
	case <-time.After(45 * time.Second): // the unit's TimeoutStopSec (TCG is slow)
		t.Fatal("btmmd on host1 did not stop within 45 s of SIGTERM")
	}
	for _, what := range [][]string{{"ip", "link", "show", "group", "25217"}, {"ip", "fou", "show"}, {"ip", "xfrm", "state"}} {
		if out, _ := l.Host1.Run(what[0], what[1:]...); strings.TrimSpace(out) != "" {
			t.Errorf("after btmmd stopped, `%s` on host1 shows:\n%s", strings.Join(what, " "), out)
		}
	}
}
