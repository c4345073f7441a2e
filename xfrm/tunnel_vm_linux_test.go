package xfrm

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// tunnelLab (issue 15): a router r with, on its side,
//
//	a  eth0 10.0.1.2/24 2001:db8:1::2/64   public IPv4 and global IPv6
//	b  eth0 10.0.2.2/24 2001:db8:2::2/64   public IPv4 and global IPv6
//	n  wan  10.0.3.2/24                    an IPv4 NAT (nftables masquerade) with
//	c  eth0 192.168.3.2/24                 c behind it, IPv4 only; n forwards UDP
//	                                        4500 -> c:4500 and 16080 -> c:6080
//	                                        (what a PCP mapping would give)
//
// Every host runs a Dataplane with its GUE listener on 6080.
type tunnelLab struct {
	r, n    *netns.NS
	a, b, c *labHost
	keys    map[[2]string][]byte
	spis    map[[2]string]uint32
}

const (
	tlFOUPort    = 6080
	tlFOUMappedC = 16080 // c's FOU port as n maps it
)

func newTunnelLab(t testing.TB) *tunnelLab {
	t.Helper()
	l := &tunnelLab{r: netns.New(t, "r"), n: netns.New(t, "n"), keys: map[[2]string][]byte{}, spis: map[[2]string]uint32{}}
	must(t, l.r.Sysctl("net.ipv4.ip_forward", "1"))
	must(t, l.r.Sysctl("net.ipv6.conf.all.forwarding", "1"))
	host := func(name, ula string) *labHost {
		h := &labHost{name: name, ns: netns.New(t, name), ula: netip.MustParseAddr(ula)}
		return h
	}
	l.a, l.b, l.c = host("a", "fd00::a"), host("b", "fd00::b"), host("c", "fd00::c")
	for i, h := range []*labHost{l.a, l.b} {
		dev := fmt.Sprintf("r%d", i)
		netns.MustVeth(t, h.ns, "eth0", l.r, dev)
		l.r.MustAddr(t, dev, fmt.Sprintf("10.0.%d.1/24", i+1))
		l.r.MustAddr(t, dev, fmt.Sprintf("2001:db8:%d::1/64", i+1))
		h.outer = netip.AddrFrom4([4]byte{10, 0, byte(i + 1), 2})
		h.ns.MustAddr(t, "eth0", h.outer.String()+"/24")
		h.ns.MustAddr(t, "eth0", fmt.Sprintf("2001:db8:%d::2/64", i+1))
		h.ns.MustRoute(t, "default", fmt.Sprintf("10.0.%d.1", i+1), "")
		h.ns.MustRoute(t, "default", fmt.Sprintf("2001:db8:%d::1", i+1), "eth0")
	}
	netns.MustVeth(t, l.n, "wan", l.r, "r2")
	l.r.MustAddr(t, "r2", "10.0.3.1/24")
	l.n.MustAddr(t, "wan", "10.0.3.2/24")
	l.n.MustRoute(t, "default", "10.0.3.1", "")
	must(t, l.n.Sysctl("net.ipv4.ip_forward", "1"))
	netns.MustVeth(t, l.c.ns, "eth0", l.n, "lan")
	l.n.MustAddr(t, "lan", "192.168.3.1/24")
	l.c.outer = netip.MustParseAddr("192.168.3.2")
	l.c.ns.MustAddr(t, "eth0", "192.168.3.2/24")
	l.c.ns.MustRoute(t, "default", "192.168.3.1", "")
	l.n.MustRun(t, "nft", "add", "table", "ip", "nat")
	l.n.MustRun(t, "nft", "add chain ip nat pre { type nat hook prerouting priority -100 ; }")
	l.n.MustRun(t, "nft", "add chain ip nat post { type nat hook postrouting priority 100 ; }")
	l.n.MustRun(t, "nft", "add rule ip nat pre iifname wan udp dport 4500 dnat to 192.168.3.2:4500")
	l.n.MustRun(t, "nft", fmt.Sprintf("add rule ip nat pre iifname wan udp dport %d dnat to 192.168.3.2:%d", tlFOUMappedC, tlFOUPort))
	l.n.MustRun(t, "nft", "add rule ip nat post oifname wan masquerade")
	names := []string{"a", "b", "c"}
	for i, x := range names {
		for j, y := range names {
			if x != y {
				k := make([]byte, 20)
				rand.Read(k)
				l.keys[[2]string{x, y}] = k
				l.spis[[2]string{x, y}] = uint32(0x1000 + i<<8 + j)
			}
		}
	}
	return l
}

func (l *tunnelLab) sa(from, to string) controlplane.SA {
	return controlplane.SA{SPI: l.spis[[2]string{from, to}], Cipher: controlplane.CipherAESGCM, Key: l.keys[[2]string{from, to}]}
}

var (
	tlV6  = map[string]netip.AddrPort{"a": netip.MustParseAddrPort("[2001:db8:1::2]:0"), "b": netip.MustParseAddrPort("[2001:db8:2::2]:0")}
	tlPub = map[string]netip.Addr{"a": netip.MustParseAddr("10.0.1.2"), "b": netip.MustParseAddr("10.0.2.2"), "c": netip.MustParseAddr("10.0.3.2")}
)

// desired is host x's state: a reaches b by ESP-in-UDP, IPv6 or sit and c
// by ESP-in-UDP or FOU; via says which, per peer.
func (l *tunnelLab) desired(x string, via map[string]controlplane.PathKind) *controlplane.State {
	hosts := map[string]*labHost{"a": l.a, "b": l.b, "c": l.c}
	st := &controlplane.State{Local: controlplane.Local{ULA: hosts[x].ula, Port: 4500, FOUPort: tlFOUPort}}
	peerOf := func(y string) controlplane.Peer {
		p := controlplane.Peer{Name: y, ULA: hosts[y].ula, Outer: netip.AddrPortFrom(tlPub[y], 4500),
			Out: l.sa(x, y), In: l.sa(y, x), Via: via[y]}
		switch {
		case x == "c" || y == "c":
			port := uint16(tlFOUPort)
			if y == "c" {
				port = tlFOUMappedC
			}
			p.Tunnels = []controlplane.Tunnel{{Kind: controlplane.PathFOU, Remote: netip.AddrPortFrom(tlPub[y], port)}}
		default:
			p.Tunnels = []controlplane.Tunnel{{Kind: controlplane.PathIPv6, Remote: tlV6[y]},
				{Kind: controlplane.PathSit, Remote: netip.AddrPortFrom(tlPub[y], 0)}}
		}
		return p
	}
	switch x {
	case "a":
		st.Peers = []controlplane.Peer{peerOf("b"), peerOf("c")}
	default:
		st.Peers = []controlplane.Peer{peerOf("a")}
	}
	return st
}

// setVia puts a's path to peer (and the peer's to a) on kind k; it returns
// the changes, which must not touch an SA.
func (l *tunnelLab) setVia(t testing.TB, via map[string]controlplane.PathKind, peer string, k controlplane.PathKind) {
	t.Helper()
	l.setViaKeys(t, via, peer, k, false)
}

// setViaKeys is setVia; with newKeys the pair was keyed again, and SA
// changes are expected.
func (l *tunnelLab) setViaKeys(t testing.TB, via map[string]controlplane.PathKind, peer string, k controlplane.PathKind, newKeys bool) {
	t.Helper()
	via[peer] = k
	hosts := map[string]*labHost{"b": l.b, "c": l.c}
	for _, x := range []string{"a", peer} {
		h := l.a
		v := via
		if x != "a" {
			h, v = hosts[x], map[string]controlplane.PathKind{"a": k}
		}
		ch, err := h.dp.Set(t.Context(), l.desired(x, v))
		if err != nil {
			t.Fatalf("%s: Set via %v: %v", x, k, err)
		}
		for _, c := range ch {
			if c.Object == "state" && !newKeys {
				t.Errorf("%s: moving to %v touched an SA (a rekey or re-add): %v", x, k, c)
			}
		}
	}
}

// frameLayers decodes a captured Ethernet frame down to ESP (or whatever
// stops it) and returns its layers, e.g. "ipv4|udp|gue|ipv6|esp", and the
// ESP SPI. It knows what btmm sends: IPv4/IPv6, protocol 41, UDP to 4500
// (ESP-in-UDP, keying, keepalives) and to the FOU ports (GUE, RFC draft
// GUE version 0: 4-byte header, protocol 41 inside).
func frameLayers(f []byte) (string, uint32) {
	var out []string
	if len(f) < 14 {
		return "short", 0
	}
	et, b := binary.BigEndian.Uint16(f[12:]), f[14:]
	var proto byte
	switch et {
	case 0x0806:
		return "arp", 0
	case 0x0800:
		goto ip4
	case 0x86dd:
		goto ip6
	default:
		return fmt.Sprintf("ethertype 0x%04x", et), 0
	}
ip4:
	if len(b) < 20 {
		return strings.Join(append(out, "ipv4(short)"), "|"), 0
	}
	out, proto, b = append(out, "ipv4"), b[9], b[int(b[0]&0xf)*4:]
	goto next
ip6:
	if len(b) < 40 {
		return strings.Join(append(out, "ipv6(short)"), "|"), 0
	}
	out, proto, b = append(out, "ipv6"), b[6], b[40:]
next:
	switch proto {
	case 41:
		goto ip6
	case 4:
		goto ip4
	case 50:
		if len(b) < 8 {
			return strings.Join(append(out, "esp(short)"), "|"), 0
		}
		return strings.Join(append(out, "esp"), "|"), binary.BigEndian.Uint32(b)
	case 6:
		return strings.Join(append(out, "tcp"), "|"), 0
	case 58: // with its type: icmpv6-133 is a router solicitation
		if len(b) < 1 {
			return strings.Join(append(out, "icmpv6(short)"), "|"), 0
		}
		return strings.Join(append(out, fmt.Sprintf("icmpv6-%d", b[0])), "|"), 0
	case 17:
		if len(b) < 8 {
			return strings.Join(append(out, "udp(short)"), "|"), 0
		}
		sport, dport, p := binary.BigEndian.Uint16(b), binary.BigEndian.Uint16(b[2:]), b[8:]
		out = append(out, "udp")
		switch {
		case dport == tlFOUPort || dport == tlFOUMappedC || sport == tlFOUPort:
			if len(p) < 4 || p[0]>>6 != 0 || p[0]&0x20 != 0 {
				return strings.Join(append(out, "not-gue"), "|"), 0
			}
			out, proto, b = append(out, "gue"), p[1], p[4+int(p[0]&0x1f)*4:]
			goto next
		case len(p) == 1 && p[0] == 0xff:
			return strings.Join(append(out, "keepalive"), "|"), 0
		case len(p) >= 4 && binary.BigEndian.Uint32(p) == 0:
			return strings.Join(append(out, "keying"), "|"), 0
		case len(p) >= 8:
			return strings.Join(append(out, "esp"), "|"), binary.BigEndian.Uint32(p)
		}
		return strings.Join(append(out, "udp-data"), "|"), 0
	}
	return strings.Join(append(out, fmt.Sprintf("proto-%d", proto)), "|"), 0
}

// tsharkProtocols returns tshark's frame.protocols for every frame.
func tsharkProtocols(t *testing.T, path string) []string {
	t.Helper()
	out, err := exec.Command("tshark", "-n", "-r", path, "-o", "udp.try_heuristic_first:FALSE", "-T", "fields", "-e", "frame.protocols").Output()
	if err != nil {
		t.Fatalf("tshark: %v", err)
	}
	return strings.Split(strings.TrimSpace(string(out)), "\n")
}

// tsharkDecryptTransport has tshark decrypt the transport-mode ESP between
// the ULAs with the SA keys and returns how many packets carry TCP segments
// of the given port. The keys go on tshark's command line only.
func (l *tunnelLab) tsharkDecryptTransport(t *testing.T, path, peer string, port int) int {
	t.Helper()
	hosts := map[string]*labHost{"a": l.a, "b": l.b, "c": l.c}
	args := []string{"-n", "-r", path, "-o", "esp.enable_encryption_decode:TRUE"}
	for _, d := range [][2]string{{"a", peer}, {peer, "a"}} {
		args = append(args, "-o", fmt.Sprintf(`uat:esp_sa:"IPv6","%s","%s","0x%08x","AES-GCM with 16 octet ICV [RFC4106]","0x%x","NULL",""`,
			hosts[d[0]].ula, hosts[d[1]].ula, l.spis[d], l.keys[d]))
	}
	args = append(args, "-Y", fmt.Sprintf("esp && tcp.port == %d", port), "-T", "fields", "-e", "frame.protocols")
	out, err := exec.Command("tshark", args...).Output()
	if err != nil {
		t.Fatalf("tshark: %v", err) // the error carries no arguments
	}
	s := strings.TrimSpace(string(out))
	if s == "" {
		return 0
	}
	lines := strings.Split(s, "\n")
	t.Logf("tshark decrypted %d TCP segments, e.g. %s", len(lines), lines[0])
	return len(lines)
}

// TestVMTunnelPaths (issue 15): every path kind carries a byte-checked TCP
// stream between ULAs, and the capture on a's link shows its encapsulation
// and never an inner TCP segment in the clear: IPv4|UDP|ESP (ESP-in-UDP),
// IPv6|IPv6|ESP (ipv6: ip6tnl), IPv4|IPv6|ESP (sit, protocol 41),
// IPv4|UDP|GUE|IPv6|ESP (fou, through c's NAT). tshark's own dissectors
// agree where it has them (it has none for GUE) and decrypt the
// transport-mode ESP with the keys. A host's tunnel link-local answers
// through each device. An administrator's sit and ip6tnl devices and fou
// listener on a stay through everything; Close leaves only them.
func TestVMTunnelPaths(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface, testenv.Sit, testenv.IP6Tnl, testenv.FOU)
	for _, b := range []string{"tcpdump", "tshark", "nft"} {
		testenv.RequireBinary(t, b, b)
	}
	l := newTunnelLab(t)
	// The administrator's own tunnels on a, before btmm starts.
	l.a.ns.MustRun(t, "ip", "link", "add", "he-ipv6", "type", "sit", "remote", "192.0.2.1", "local", "10.0.1.2", "ttl", "64")
	l.a.ns.MustRun(t, "ip", "link", "add", "ip6admin", "type", "ip6tnl", "mode", "ip6ip6", "remote", "2001:db8:9::1", "local", "2001:db8:1::2")
	l.a.ns.MustRun(t, "ip", "fou", "add", "port", "5555", "gue")
	adminBefore := adminObjects(t, l.a)

	via := map[string]controlplane.PathKind{}
	// Our tunnel devices come up with router discovery off: no router
	// solicitation (ICMPv6 133) goes through a tunnel. The kernel sends
	// the first within rtr_solicit_delay (1 s) of the device coming up.
	setup := startCaptureSnap(t, l.r, "r0", 0, func() {
		if l.a.conn == nil { // before start: anything across r0
			l.a.ns.Run("ping", "-c", "1", "-W", "1", tlPub["b"].String())
			return
		}
		l.a.conn.SendKeepalive(netip.AddrPortFrom(tlPub["b"], 4500)) // what stop waits for
	})
	l.start(t)
	time.Sleep(3 * time.Second)
	inner := 0
	for _, f := range setup.stop(t) {
		lay, _ := frameLayers(f)
		if strings.HasSuffix(lay, "icmpv6-133") && strings.Count(lay, "ipv") > 1 {
			t.Errorf("a router solicitation through a tunnel on a's link: %s", lay)
		}
		if strings.Count(lay, "ipv") > 1 {
			inner++
		}
	}
	for _, dev := range []controlplane.PathKind{controlplane.PathIPv6, controlplane.PathSit} {
		name := controlplane.TunnelDevice(dev, l.b.ula)
		for _, k := range []string{"accept_ra", "router_solicitations"} {
			if v, err := l.a.ns.Run("cat", "/proc/sys/net/ipv6/conf/"+name+"/"+k); err != nil || strings.TrimSpace(v) != "0" {
				t.Errorf("%s of %s on a: %q %v, want 0", k, name, v, err)
			}
		}
	}
	t.Logf("setup capture: %d tunnelled frame(s) in the 3 s after start", inner)
	// Link-local through each device: what path checks will use.
	for _, dev := range []controlplane.PathKind{controlplane.PathIPv6, controlplane.PathSit} {
		name := controlplane.TunnelDevice(dev, l.b.ula)
		to := controlplane.TunnelLinkLocal(l.b.ula).String() + "%" + name
		if out, err := l.a.ns.Run("ping", "-6", "-c", "2", "-i", "0.3", "-w", "10", to); err != nil {
			t.Errorf("a -> b's link-local through %s: %v\n%s", name, err, out)
		}
	}

	port := 5100
	for _, tc := range []struct {
		peer   *labHost
		kind   controlplane.PathKind
		layers string // on a's link, both directions
		tshark string // tshark's frame.protocols for them ("" : it has no dissector)
	}{
		{l.b, controlplane.PathESPInUDP, "ipv4|udp|esp", "eth:ethertype:ip:udp:udpencap:esp"},
		{l.b, controlplane.PathIPv6, "ipv6|ipv6|esp", "eth:ethertype:ipv6:ipv6:esp"},
		{l.b, controlplane.PathSit, "ipv4|ipv6|esp", "eth:ethertype:ip:ipv6:esp"},
		{l.c, controlplane.PathFOU, "ipv4|udp|gue|ipv6|esp", ""},
		{l.c, controlplane.PathESPInUDP, "ipv4|udp|esp", "eth:ethertype:ip:udp:udpencap:esp"},
	} {
		t.Run(fmt.Sprintf("a-%s %v", tc.peer.name, tc.kind), func(t *testing.T) {
			port++
			l.setVia(t, via, tc.peer.name, tc.kind)
			pcap := startCaptureSnap(t, l.r, "r0", 0, func() { l.a.conn.SendKeepalive(netip.AddrPortFrom(tlPub["b"], 4500)) })
			s := startByteStreamPort(t, l.a, tc.peer, port)
			s.waitFor(t, 256<<10)
			s.finish(t)
			frames := pcap.stop(t)
			spis := map[uint32]bool{l.spis[[2]string{"a", tc.peer.name}]: true, l.spis[[2]string{tc.peer.name, "a"}]: true}
			count := map[string]int{}
			for _, f := range frames {
				lay, spi := frameLayers(f)
				count[lay]++
				switch {
				case strings.Contains(lay, "tcp"):
					t.Errorf("a TCP segment in the clear on a's link: %s", lay)
				case strings.HasSuffix(lay, "esp") && lay != tc.layers:
					// ESP of the other path may still arrive for a moment
					// (the peer's Set runs after ours): counted, not an error.
				case lay == tc.layers && !spis[spi]:
					t.Errorf("%s with SPI 0x%x: not this pair's", lay, spi)
				}
			}
			if count[tc.layers] < 50 {
				t.Errorf("%d frames of %s on a's link, want the stream's (>= 50); all: %v", count[tc.layers], tc.layers, count)
			}
			t.Logf("a's link: %v", count)
			if tc.tshark != "" {
				n := 0
				for _, p := range tsharkProtocols(t, pcap.path) {
					if p == tc.tshark {
						n++
					}
				}
				if n < count[tc.layers] {
					t.Errorf("tshark sees %d frames as %s, our decoder %d as %s", n, tc.tshark, count[tc.layers], tc.layers)
				}
			}
			if tc.kind == controlplane.PathIPv6 || tc.kind == controlplane.PathSit {
				if n := l.tsharkDecryptTransport(t, pcap.path, tc.peer.name, port); n < count[tc.layers]/2 {
					t.Errorf("tshark decrypted %d TCP segments of port %d, want most of the %d ESP packets", n, port, count[tc.layers])
				}
			}
		})
	}
	// Someone else deletes the tunnel device traffic to b is on, or sets
	// it down: the repair loop (link watch) makes it again or brings it
	// up, with its route, and b's ULA answers through it.
	for _, tc := range []struct {
		kind controlplane.PathKind
		brk  func(dev string) []string
	}{
		{controlplane.PathIPv6, func(dev string) []string { return []string{"ip", "link", "del", dev} }},
		{controlplane.PathSit, func(dev string) []string { return []string{"ip", "link", "set", dev, "down"} }},
	} {
		l.setVia(t, via, "b", tc.kind)
		dev := controlplane.TunnelDevice(tc.kind, l.b.ula)
		n := l.a.dp.LastRepair().Count
		start := time.Now()
		cmd := tc.brk(dev)
		l.a.ns.MustRun(t, cmd[0], cmd[1:]...)
		waitFor(t, 30*time.Second, func() bool { return l.a.dp.LastRepair().Count > n })
		r := l.a.dp.LastRepair()
		t.Logf("%q: repaired after %v: %q", tc.brk(dev), r.At.Sub(start).Round(time.Millisecond), r.What)
		if out, err := l.a.ns.Run("ip", "link", "show", "dev", dev, "up"); err != nil || !strings.Contains(out, dev) {
			t.Errorf("%q: %s not up after the repair: %v\n%s", tc.brk(dev), dev, err, out)
		}
		if out, err := l.a.ns.Run("ip", "-6", "route", "show", l.b.ula.String()); err != nil || !strings.Contains(out, "dev "+dev) {
			t.Errorf("%q: the route to b's ULA is not on %s after the repair: %v\n%s", tc.brk(dev), dev, err, out)
		}
		if out, err := l.a.ns.Run("ping", "-6", "-c", "3", "-i", "0.3", "-w", "10", l.b.ula.String()); err != nil {
			t.Errorf("%q: a -> b's ULA on %v after the repair: %v\n%s", tc.brk(dev), tc.kind, err, out)
		}
	}
	for _, h := range []*labHost{l.a, l.b, l.c} {
		must(t, h.dp.Close())
		if got := ourTunnelObjects(t, h); got != "" {
			t.Errorf("%s after Close: %s", h.name, got)
		}
	}
	if got := adminObjects(t, l.a); got != adminBefore {
		t.Errorf("the administrator's tunnels changed:\nbefore:\n%s\nafter:\n%s", adminBefore, got)
	}
}

// start opens every host's tunnel socket and Dataplane and sets the
// initial state (everything by ESP-in-UDP, every tunnel device made).
func (l *tunnelLab) start(t testing.TB) { l.startWith(t, nil) }

// startWith is start with each host's Config changed by mod (nil: none).
func (l *tunnelLab) startWith(t testing.TB, mod func(name string, c *Config)) {
	t.Helper()
	for _, h := range []*labHost{l.a, l.b, l.c} {
		c, err := ListenAt(t.Context(), h.ns.NsHandle(), netip.MustParseAddrPort("0.0.0.0:4500"))
		must(t, err)
		h.conn = c
		t.Cleanup(func() { c.Close() })
		cfg := Config{Logger: testLogger(t).With("host", h.name)}
		if mod != nil {
			mod(h.name, &cfg)
		}
		d, err := New(h.ns.NsHandle(), cfg)
		must(t, err)
		h.dp = d
		t.Cleanup(func() { d.Close() })
	}
	for _, x := range []string{"a", "b", "c"} {
		h := map[string]*labHost{"a": l.a, "b": l.b, "c": l.c}[x]
		if _, err := h.dp.Set(t.Context(), l.desired(x, map[string]controlplane.PathKind{})); err != nil {
			t.Fatalf("%s: Set: %v", x, err)
		}
	}
}

// adminObjects renders a's tunnel devices and fou listeners that are not btmm's.
func adminObjects(t *testing.T, h *labHost) string {
	t.Helper()
	out, err := h.ns.Run("ip", "-d", "link", "show", "type", "sit")
	must(t, err)
	o2, err := h.ns.Run("ip", "-d", "link", "show", "type", "ip6tnl")
	must(t, err)
	o3, err := h.ns.Run("ip", "fou", "show")
	must(t, err)
	var keep []string
	for _, line := range strings.Split(out+o2+o3, "\n") {
		if strings.Contains(line, "bt6-") || strings.Contains(line, "bts-") || strings.Contains(line, "port 6080") {
			continue
		}
		keep = append(keep, line)
	}
	return strings.Join(keep, "\n")
}

// ourTunnelObjects lists what of ours is left: devices, the GUE listener,
// transport-mode states.
func ourTunnelObjects(t *testing.T, h *labHost) string {
	t.Helper()
	var left []string
	for _, cmd := range [][]string{{"ip", "link", "show", "group", fmt.Sprint(DefaultTag)}, {"ip", "fou", "show"}, {"ip", "xfrm", "state"}} {
		out, err := h.ns.Run(cmd[0], cmd[1:]...)
		must(t, err)
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "bt6-") || strings.Contains(line, "bts-") || strings.Contains(line, "port 6080") || strings.Contains(line, "0x6281") {
				left = append(left, line)
			}
		}
	}
	return strings.Join(left, "; ")
}

// TestVMTunnelSwitch (issue 15): one TCP connection from a to b and one
// from a to c keep going, every byte checked, while their paths move
// ESP-in-UDP -> ipv6 -> sit -> ESP-in-UDP (b) and ESP-in-UDP -> fou ->
// ESP-in-UDP (c) on both ends, each move one Set that touches no SA; in
// each phase the path's own counter carries the traffic (the device's tx
// packets, or the ESP-in-UDP SA's), and the SPIs never change.
func TestVMTunnelSwitch(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface, testenv.Sit, testenv.IP6Tnl, testenv.FOU)
	testenv.RequireBinary(t, "nft", "nftables")
	l := newTunnelLab(t)
	l.start(t)
	via := map[string]controlplane.PathKind{}
	sb := startByteStreamPort(t, l.a, l.b, 5201)
	sc := startByteStreamPort(t, l.a, l.c, 5202)
	sb.waitFor(t, 64<<10)
	sc.waitFor(t, 64<<10)
	spisBefore := ourSPIs(t, l.a)
	// counter is what path k to peer has carried so far from a.
	counter := func(peer *labHost, k controlplane.PathKind) uint64 {
		if k == controlplane.PathESPInUDP {
			ss, err := l.a.dp.states()
			must(t, err)
			for _, s := range ss {
				if uint32(s.Spi) == l.spis[[2]string{"a", peer.name}] && s.Mode == 1 { // XFRM_MODE_TUNNEL
					return s.Statistics.Packets
				}
			}
			t.Fatalf("no ESP-in-UDP SA a -> %s", peer.name)
		}
		link, err := l.a.ns.LinkByName(controlplane.TunnelDevice(k, peer.ula))
		must(t, err)
		return link.Attrs().Statistics.TxPackets
	}
	for _, step := range []struct {
		peer *labHost
		s    *byteStream
		kind controlplane.PathKind
	}{
		{l.b, sb, controlplane.PathIPv6}, {l.c, sc, controlplane.PathFOU},
		{l.b, sb, controlplane.PathSit}, {l.b, sb, controlplane.PathESPInUDP},
		{l.c, sc, controlplane.PathESPInUDP}, {l.b, sb, controlplane.PathIPv6}, {l.b, sb, controlplane.PathESPInUDP},
	} {
		l.setVia(t, via, step.peer.name, step.kind)
		// Let packets sent on the old path drain, then count.
		at := step.s.received.Load()
		step.s.waitFor(t, at+32<<10)
		c0, b0 := counter(step.peer, step.kind), step.s.received.Load()
		step.s.waitFor(t, b0+128<<10)
		if c1 := counter(step.peer, step.kind); c1-c0 < 20 {
			t.Errorf("a -> %s by %v: its counter went %d -> %d while %d bytes passed", step.peer.name, step.kind, c0, c1, step.s.received.Load()-b0)
		}
		t.Logf("a -> %s by %v: %d bytes so far", step.peer.name, step.kind, step.s.received.Load())
	}
	sb.finish(t)
	sc.finish(t)
	if got := ourSPIs(t, l.a); got != spisBefore {
		t.Errorf("a's SPIs changed (a rekey): before %s, after %s", spisBefore, got)
	}
}

// ourSPIs lists the SPIs of h's ESP-in-UDP SAs, sorted.
func ourSPIs(t *testing.T, h *labHost) string {
	t.Helper()
	ss, err := h.dp.states()
	must(t, err)
	var spis []string
	for _, s := range ss {
		if s.Mode == 1 {
			spis = append(spis, fmt.Sprintf("0x%x", uint32(s.Spi)))
		}
	}
	slices.Sort(spis)
	return strings.Join(spis, " ")
}
