package xfrm

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/testenv"
)

// TestVMBehindNAT: host b sits behind a NAT (the router masquerades b's
// UDP 4500 to 10.0.1.1:40000-40010). A keying message from b reaches a
// through the tunnel socket and reveals b's NAT mapping; a, which first
// guessed port 4500, gets XFRM_MSG_MAPPING for that same address:port once
// b's ESP arrives, follows it with Set, and ping -6 works both ways through
// the one NAT mapping that keying and ESP share (RFC 3948, RFC 6281 §4).
func TestVMBehindNAT(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface)
	testenv.RequireBinary(t, "nft", "nftables")
	testenv.RequireBinary(t, "ping", "iputils-ping")
	l := newLab(t, 2)
	a, b := l.hosts[0], l.hosts[1]
	l.r.MustRun(t, "nft", "add", "table", "ip", "nat")
	l.r.MustRun(t, "nft", "add chain ip nat post { type nat hook postrouting priority 100 ; }")
	l.r.MustRun(t, "nft", "add rule ip nat post oifname r0 ip saddr 10.0.2.0/24 udp sport 4500 masquerade to :40000-40010")
	for i := range l.hosts {
		l.start(t, i, Config{})
	}
	l.set(t, 1)
	// a knows b's public address but not yet its NAT port.
	public := netip.MustParseAddr("10.0.1.1")
	st := l.desired(0)
	st.Peers[0].Outer = netip.AddrPortFrom(public, 4500)
	_, err := a.dp.Set(t.Context(), st)
	must(t, err)

	// Keying first: b -> a through the NAT, on the tunnel socket.
	must(t, b.conn.WriteKeying([]byte("hello from b"), netip.AddrPortFrom(a.outer, 4500)))
	a.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 1500)
	n, mapped, err := a.conn.ReadKeying(buf)
	must(t, err)
	if string(buf[:n]) != "hello from b" || mapped.Addr() != public || mapped.Port() < 40000 || mapped.Port() > 40010 {
		t.Fatalf("keying at a: %q from %v; want b's message from %v:40000-40010", buf[:n], mapped, public)
	}
	t.Logf("b's NAT mapping as keying sees it: %v", mapped)

	// b's ESP arrives from the mapped port; the kernel tells a.
	b.ns.Run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", a.ula.String()) // replies go to the guessed port and are lost
	var ev Event
	deadline := time.After(10 * time.Second)
	for ev.Kind != Mapping {
		select {
		case ev = <-a.dp.Events():
			t.Logf("event: %v", ev)
		case <-deadline:
			t.Fatal("no mapping event at a")
		}
	}
	if ev.Peer != b.ula || ev.New != mapped {
		t.Fatalf("mapping event %v: want peer %v new %v (the keying mapping: one NAT mapping for both)", ev, b.ula, mapped)
	}
	st.Peers[0].Outer = ev.New
	ch, err := a.dp.Set(t.Context(), st)
	must(t, err)
	t.Logf("followed: %q", changeStrings(ch))
	for _, pair := range [][2]*labHost{{b, a}, {a, b}} {
		out, err := pair[0].ns.Run("ping", "-6", "-c", "4", "-i", "0.2", "-w", "10", pair[1].ula.String())
		if err != nil || !strings.Contains(out, " 0% packet loss") {
			t.Fatalf("%s -> %s through the NAT: %v\n%s", pair[0].name, pair[1].name, err, out)
		}
	}
	// And keying back from a to b's mapping reaches b.
	must(t, a.conn.WriteKeying([]byte("hello from a"), mapped))
	b.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, from, err := b.conn.ReadKeying(buf)
	must(t, err)
	if string(buf[:n]) != "hello from a" || from != netip.AddrPortFrom(a.outer, 4500) {
		t.Fatalf("keying at b: %q from %v", buf[:n], from)
	}
}
