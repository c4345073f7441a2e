package lab

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

func TestLabReachabilityAndNAT(t *testing.T) {
	testenv.RequireNetNS(t)
	testenv.RequireBinary(t, "nft", "nftables")
	testenv.RequireBinary(t, "ping", "iputils-ping")
	l := New(t)

	ping := func(n runner, to string) error {
		out, err := n.Run("ping", "-c", "1", "-W", "2", to)
		if err == nil && !strings.Contains(out, " 0% packet loss") {
			err = errSt(out)
		}
		return err
	}
	for _, c := range []struct {
		name string
		from runner
		to   string
	}{
		{"host1->inet", l.Host1, InetAddr},
		{"host2->inet", l.Host2, InetAddr},
		{"host1->pub", l.Host1, PubAddr},
		{"host1->gw2 wan", l.Host1, GW2WAN},
		{"pub->inet", l.Pub, InetAddr},
	} {
		if err := ping(c.from, c.to); err != nil {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	// No way in from outside without a mapping.
	if err := ping(l.Pub, Host1Addr); err == nil {
		t.Error("pub reached host1's private address directly")
	}

	// host1's traffic leaves masqueraded as gw1's WAN address.
	var got string
	var pc net.PacketConn
	if err := l.Pub.Do(func() (err error) { pc, err = net.ListenPacket("udp4", ":9999"); return }); err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if err := l.Host1.Do(func() error {
		c, err := net.Dial("udp4", PubAddr+":9999")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("hi"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	pc.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 16)
	_, from, err := pc.ReadFrom(buf)
	if err != nil {
		t.Fatal(err)
	}
	got = from.(*net.UDPAddr).IP.String()
	if got != GW1WAN {
		t.Fatalf("pub saw host1 as %s, want the NAT's %s", got, GW1WAN)
	}
}

type runner interface {
	Run(string, ...string) (string, error)
}

type errSt string

func (e errSt) Error() string { return string(e) }

// seenFrom sends UDP datagrams from host to pub (one every 200 ms: the
// first may meet an unresolved neighbour right after a move) and returns the
// source address pub saw (the NAT's public address, or the host's own).
func seenFrom(t *testing.T, l *Lab, host runnerDo) string {
	t.Helper()
	var pc net.PacketConn
	if err := l.Pub.Do(func() (err error) { pc, err = net.ListenPacket("udp4", ":9998"); return }); err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	var c net.Conn
	if err := host.Do(func() (err error) { c, err = net.Dial("udp4", PubAddr+":9998"); return }); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 16)
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); {
		c.Write([]byte("hi"))
		pc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, from, err := pc.ReadFrom(buf); err == nil {
			return from.(*net.UDPAddr).IP.String()
		}
	}
	t.Fatalf("nothing reached pub in 15 s\n%s", l.Dump())
	return ""
}

type runnerDo interface {
	Do(func() error) error
	Run(string, ...string) (string, error)
}

// TestLabMoves: host1 roams gw1 -> gw2 -> public -> offline -> online ->
// gw1, reaching the internet after each step through the right NAT; host2
// stays reachable behind gw2 throughout (the bridge keeps both on gw2's LAN).
func TestLabMoves(t *testing.T) {
	testenv.RequireNetNS(t)
	testenv.RequireBinary(t, "nft", "nftables")
	testenv.RequireBinary(t, "ping", "iputils-ping")
	l := New(t)
	for _, step := range []struct {
		to   Place
		seen string
		addr string
	}{
		{BehindGW2, GW2WAN, "192.168.2.3"},
		{BehindGW3, GW3WAN, "192.168.3.3"},
		{Public, "11.4.0.2", "11.4.0.2"},
		{BehindGW1, GW1WAN, Host1Addr},
	} {
		if err := l.Move(l.Host1, step.to); err != nil {
			t.Fatal(err)
		}
		if l.Where(l.Host1) != step.to {
			t.Fatalf("Where = %v, want %v", l.Where(l.Host1), step.to)
		}
		if got := l.Addr(l.Host1, step.to); got != step.addr {
			t.Fatalf("Addr(%v) = %v, want %v", step.to, got, step.addr)
		}
		if out, _ := l.Host1.Run("ip", "-4", "-br", "addr", "show", "dev", "eth0"); !strings.Contains(out, step.addr+"/24") {
			t.Fatalf("after moving to %v host1 has %s", step.to, out)
		}
		if got := seenFrom(t, l, l.Host1); got != step.seen {
			t.Fatalf("behind %v pub sees host1 as %s, want %s", step.to, got, step.seen)
		}
		if got := seenFrom(t, l, l.Host2); got != GW2WAN {
			t.Fatalf("host1 at %v: pub sees host2 as %s, want %s", step.to, got, GW2WAN)
		}
		if step.to == BehindGW2 {
			// Both on gw2's bridge: they reach each other directly.
			if out, err := l.Host1.Run("ping", "-c", "1", "-i", "0.2", "-w", "10", Host2Addr); err != nil {
				t.Fatalf("host1 -> host2 on gw2's LAN: %v\n%s", err, out)
			}
		}
		if step.to == Public {
			if err := l.Offline(l.Host1); err != nil {
				t.Fatal(err)
			}
			if out, err := l.Host1.Run("ping", "-c", "1", "-W", "1", InetAddr); err == nil {
				t.Fatalf("offline host1 reached inet:\n%s", out)
			}
			if err := l.Online(l.Host1); err != nil {
				t.Fatal(err)
			}
			if got := seenFrom(t, l, l.Host1); got != "11.4.0.2" {
				t.Fatalf("back online: pub sees host1 as %s", got)
			}
		}
	}
	if err := l.Move(l.Pub, Public); err == nil {
		t.Fatal("pub moved")
	}
	// host1 (back behind gw1) has entries for gw1's old address; the
	// renumbering drops them all.
	seenFrom(t, l, l.Host1)
	if n := conntrackWith(t, l.GW1, GW1WAN); n == 0 {
		t.Fatalf("no conntrack entry with %s on gw1 before renumbering", GW1WAN)
	}
	if err := l.SetWAN(l.GW1, "11.1.0.3"); err != nil {
		t.Fatal(err)
	}
	if n := conntrackWith(t, l.GW1, GW1WAN); n != 0 {
		t.Fatalf("%d conntrack entries with the old address %s left on gw1 after SetWAN", n, GW1WAN)
	}
	if got := seenFrom(t, l, l.Host1); got != "11.1.0.3" {
		t.Fatalf("after renumbering gw1's WAN pub sees host1 as %s", got)
	}
	if err := l.SetUDPTimeout(l.GW1, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if out, _ := l.GW1.Run("sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout_stream"); strings.TrimSpace(out) != "30" {
		t.Fatalf("udp stream timeout on gw1: %q", out)
	}
}

// conntrackFlows lists ns's IPv4 conntrack entries.
func conntrackFlows(t *testing.T, ns *netns.NS) []*netlink.ConntrackFlow {
	t.Helper()
	flows, err := ns.Handle.ConntrackTableList(netlink.ConntrackTable, netlink.FAMILY_V4)
	if err != nil {
		t.Fatalf("list %s's conntrack table: %v", ns.Name, err)
	}
	return flows
}

// conntrackWith counts ns's IPv4 conntrack entries with addr in either
// direction's tuple.
func conntrackWith(t *testing.T, ns *netns.NS, addr string) int {
	t.Helper()
	ip := net.ParseIP(addr)
	n := 0
	for _, f := range conntrackFlows(t, ns) {
		for _, a := range []net.IP{f.Forward.SrcIP, f.Forward.DstIP, f.Reverse.SrcIP, f.Reverse.DstIP} {
			if a.Equal(ip) {
				n++
				break
			}
		}
	}
	return n
}

// TestFlushConntrack: a NAT gateway's conntrack table with masquerade
// (UDP) and ICMP entries is empty after FlushConntrack, on the host's
// kernel and on the VM's 6.1 (where a whole-table flush is refused).
func TestFlushConntrack(t *testing.T) {
	testenv.RequireNetNS(t)
	testenv.RequireBinary(t, "nft", "nftables")
	testenv.RequireBinary(t, "ping", "iputils-ping")
	l := New(t)
	if got := seenFrom(t, l, l.Host1); got != GW1WAN {
		t.Fatalf("pub sees host1 as %s, want %s", got, GW1WAN)
	}
	if out, err := l.Host1.Run("ping", "-c", "1", "-W", "2", InetAddr); err != nil {
		t.Fatalf("host1 -> inet: %v\n%s", err, out)
	}
	before := conntrackFlows(t, l.GW1)
	protos := map[uint8]bool{}
	for _, f := range before {
		protos[f.Forward.Protocol] = true
	}
	if !protos[17] || !protos[1] {
		t.Fatalf("gw1 has no UDP and ICMP entries to flush: %d entries, protocols %v", len(before), protos)
	}
	if err := FlushConntrack(l.GW1); err != nil {
		t.Fatal(err)
	}
	if after := conntrackFlows(t, l.GW1); len(after) != 0 {
		var b strings.Builder
		for _, f := range after {
			fmt.Fprintln(&b, f)
		}
		t.Fatalf("%d of %d entries left after the flush:\n%s", len(after), len(before), &b)
	}
	// The NAT still works: a new flow makes a new entry.
	if got := seenFrom(t, l, l.Host1); got != GW1WAN || len(conntrackFlows(t, l.GW1)) == 0 {
		t.Fatalf("after the flush pub sees host1 as %s with %d entries on gw1", got, len(conntrackFlows(t, l.GW1)))
	}
}
