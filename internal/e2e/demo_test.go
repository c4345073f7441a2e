package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/controlplane/relay"
	"github.com/btmm/btmm/internal/lab"
	"github.com/btmm/btmm/internal/testenv"
)

// TestDemoPaths is make demo's second part (issues 14 and 15), and a test
// of its own in make test-vm so the demo cannot rot. The lab with IPv6
// (ipv6Internet) and a btmm-relay; gw1 and gw2 are symmetric NATs without
// PCP; btmmd (xfrm, Kerberos, paths and tunnels on) on host1 (dual-stack
// behind gw1), host2 (IPv4 behind gw2) and pub (public IPv4 and IPv6).
//
//	phase                          pair           path (both ways unless noted)
//	symmetric NATs, no PCP         host1 - pub    ipv6 (ip6tnl + ESP transport)
//	                               host1 - host2  relay-udp (kernel-forwarded ESP-in-UDP)
//	                               host2 - pub    direct (host2 ->), punched (pub ->): ESP-in-UDP v4
//	host2 moves to a public IPv4   host2 - pub    sit (protocol 41 + ESP transport)
//	                               host1 - host2  direct (host1 ->), punched (host2 ->)
//
// Every pair answers pings between the ULAs and carries a byte-checked TCP
// stream; the relay's kernel forwarder carried the relayed one; the
// capture on pub's link during the sit stream (issue 15: sit between two
// public hosts) shows IPv4|IPv6(41)|ESP for it, no TCP at any layer and no
// byte of the payload.
func TestDemoPaths(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface, testenv.Sit, testenv.IP6Tnl, testenv.FOU)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	testenv.RequireBinary(t, "tcpdump", "tcpdump")
	tshark := testenv.RequireBinary(t, "tshark", "tshark")
	t.Parallel()
	say(t, "Paths: IPv6 direct, sit, ESP-in-UDP, hole punching and a kernel-forwarded relay, chosen per peer by btmmd")
	s := newSystemWith(t, relayDNS(""), false)
	l, bins, dir := s.l, s.bins, s.dir
	say(t, "btmm-relay at %s (published by btmm-dnsd's SRV), its eBPF forwarder on eth0", relayAddr)
	_, relayStatus := startRelay(t, relayNS(t, l), bins, dir, "")
	say(t, "The lab gets IPv6 (2001:db8::/32): host1 dual-stack behind gw1, pub public IPv4 + IPv6, host2 IPv4 only")
	ipv6Internet(t, l)
	say(t, "gw1 and gw2 become symmetric NATs (masquerade random,fully-random) without PCP")
	setNAT(t, l.GW1, "192.168.1.0/24", true)
	setNAT(t, l.GW2, "192.168.2.0/24", true)
	hosts := s.startTunnelHosts(t, tunnelsConf("3s"), "xfrm")
	byName := map[string]*host{}
	for _, h := range hosts {
		byName[h.name] = h
	}

	say(t, "Waiting for the connectivity checks to choose each pair's path")
	sts := waitKinds(t, bins, hosts, map[[2]string]path.Kind{
		{"host1", "pub"}: path.KindIPv6, {"pub", "host1"}: path.KindIPv6,
		{"host1", "host2"}: path.KindRelayUDP, {"host2", "host1"}: path.KindRelayUDP,
		{"host2", "pub"}: path.KindDirect, {"pub", "host2"}: path.KindPunched,
	}, 240*time.Second)
	out, _ := l.Host1.Run("ip", "-d", "link", "show", "group", "25217")
	show(t, "ip -d link show group 25217   # on host1: btmm's tunnel devices to pub (ip6tnl in use; sit over GUE checked, not chosen)", out)
	out, _ = l.Pub.Run("sh", "-c", "ip xfrm state | grep -E '^src|proto esp|encap'")
	show(t, "ip xfrm state   # on pub (keys left out): ESP-in-UDP tunnel-mode SAs, transport-mode SAs between the ULAs", out)

	// Pings both ways, then one byte-checked TCP stream per pair: the
	// client's segments take its path, the echo's the server's.
	pings := func(pairs ...[2]string) {
		t.Helper()
		for _, p := range pairs {
			from, to := byName[p[0]], sts[p[1]].ULA
			res, err := from.ns.Run("ping", "-6", "-c", "2", "-i", "0.3", "-w", "10", to.String())
			show(t, "ping -6 -c 2 "+to.String()+"   # "+p[0]+" -> "+p[1], res)
			if err != nil || !strings.Contains(res, " 0% packet loss") {
				t.Fatalf("ping %s -> %s: %v\n%s", p[0], p[1], err, res)
			}
		}
	}
	pattern := bytes.Repeat([]byte("CLEARTEXT-MARKER "), 64)
	echoes := map[string]netip.AddrPort{}
	for _, h := range hosts {
		echoes[h.name] = startEcho(t, h.ns, sts[h.name].ULA)
	}
	stream := func(from, to, what string, n int) {
		t.Helper()
		c := dialEcho(t, byName[from].ns, echoes[to])
		defer c.Close()
		streamCheck(t, c, pattern, n)
		say(t, "%s -> %s: %d KiB through the echo on %s's ULA and back, every byte checked (%s)", from, to, n>>10, to, what)
	}
	pings([2]string{"host1", "pub"}, [2]string{"host1", "host2"}, [2]string{"host2", "pub"}, [2]string{"pub", "host2"})
	stream("host1", "pub", "ipv6", 256<<10)
	stream("host2", "pub", "direct / punched ESP-in-UDP", 256<<10)
	var rs struct {
		Stats relay.Stats `json:"stats"`
	}
	readRelay := func() relay.Stats {
		t.Helper()
		raw, err := os.ReadFile(relayStatus)
		if err != nil || json.Unmarshal(raw, &rs) != nil {
			t.Fatalf("relay status file: %v", err)
		}
		return rs.Stats
	}
	before := readRelay()
	stream("host1", "host2", "relay-udp", 256<<10)
	time.Sleep(2500 * time.Millisecond) // the status file is rewritten every 2 s
	after := readRelay()
	say(t, "btmm-relay: %d datagrams forwarded by its kernel program during that stream, %d ESP datagrams by its Go process",
		after.KernelForwarded-before.KernelForwarded, after.GoForwardedESP-before.GoForwardedESP)
	if after.KernelForwarded-before.KernelForwarded < (256<<10)/1500 {
		t.Errorf("the relayed stream: %d datagrams forwarded by the relay's kernel program, %d ESP by Go; want the stream in the kernel",
			after.KernelForwarded-before.KernelForwarded, after.GoForwardedESP-before.GoForwardedESP)
	}

	say(t, "host2 moves to a public IPv4 address (11.5.0.2, no NAT): host2 and pub move to sit, host1 -> host2 leaves the relay")
	if err := l.Move(l.Host2, lab.Public); err != nil {
		t.Fatal(err)
	}
	sts = waitKinds(t, bins, hosts, map[[2]string]path.Kind{
		{"host2", "pub"}: path.KindSit, {"pub", "host2"}: path.KindSit,
		{"host1", "host2"}: path.KindDirect, {"host2", "host1"}: path.KindPunched,
		{"host1", "pub"}: path.KindIPv6, {"pub", "host1"}: path.KindIPv6,
	}, 240*time.Second)
	out, _ = l.Pub.Run("ip", "-d", "link", "show", "group", "25217")
	show(t, "ip -d link show group 25217   # on pub: ip6tnl to host1, sit to host2", out)
	out, _ = l.Pub.Run("ip", "fou", "show")
	show(t, "ip fou show   # on pub: btmm's GUE listener (sit over FOU for NATed peers with a mapped port)", out)
	if !strings.Contains(out, "4501") {
		t.Errorf("ip fou show on pub: no GUE listener on 4501:\n%s", out)
	}
	pings([2]string{"host2", "pub"}, [2]string{"pub", "host2"}, [2]string{"host1", "host2"})
	stream("host1", "host2", "direct / punched ESP-in-UDP", 256<<10)

	h2 := "host " + l.Addr(l.Host2, lab.Public)
	say(t, "host2 -> pub over sit, captured on pub's link (IPv4|IPv6(41)|ESP; tcpdump and tshark count)")
	n, pcap := wire(t, l, []string{h2 + " and ip[9] == 41 and ip[26] == 50", h2 + " and ip[9] == 41 and ip[26] == 6", h2 + " and tcp"}, func() {
		stream("host2", "pub", "sit", 1<<20)
	})
	// Frames tshark's display filter matches (countNumbers: Run's output
	// has tshark's stderr too, "Running as user root ..." is no frame).
	tsh := func(filter string) int {
		out, err := l.Inet.Run(tshark, "-r", pcap, "-Y", filter, "-T", "fields", "-e", "frame.number")
		if err != nil {
			t.Fatalf("tshark -Y %q: %v\n%s", filter, err, out)
		}
		return countNumbers(out)
	}
	h2ip := "ip.addr == " + l.Addr(l.Host2, lab.Public)
	// The echo connection's TCP (port 7007) readable at any layer:
	// reassembled, inside sit or quoted in an ICMP error.
	sitESP, clearTCP := tsh(h2ip+" && ip.proto == 41 && esp"), tsh("tcp.port == 7007")
	t.Logf("pub's link during the sit stream: tcpdump %d IPv4|IPv6(41)|ESP, %d IPv4|IPv6(41)|TCP, %d outer TCP; tshark %d sit ESP, %d with TCP port 7007", n[0], n[1], n[2], sitESP, clearTCP)
	show(t, "capture on pub's link", fmt.Sprintf("%d frames IPv4|IPv6(41)|ESP (tshark: %d), %d with the TCP connection readable", n[0], sitESP, clearTCP+n[1]+n[2]))
	raw, err := os.ReadFile(pcap)
	if err != nil {
		t.Fatal(err)
	}
	// 1 MiB each way in segments of at most 1400 bytes: at least 750
	// frames each way; allow for a late capture start.
	if n[0] < 1000 || sitESP < 1000 || n[1]+n[2]+clearTCP != 0 || bytes.Contains(raw, []byte("CLEARTEXT-MARKER")) {
		t.Errorf("capture of the sit stream: %d/%d IPv4|IPv6(41)|ESP (tcpdump/tshark, want >= 1000), %d+%d+%d TCP (want 0), payload in clear: %v",
			n[0], sitESP, n[1], n[2], clearTCP, bytes.Contains(raw, []byte("CLEARTEXT-MARKER")))
	}
}
