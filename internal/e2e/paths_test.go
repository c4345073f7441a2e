package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/internal/lab"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// Relay namespace hung off the lab's inet (two addresses: STUN mapping
// behaviour is judged from two responder IPs).
const (
	relayAddr  = "11.4.0.2"
	relayAddr2 = "11.4.0.3"
)

// setNAT makes a lab gateway's NAT endpoint-independent (Linux masquerade,
// ports kept where free) or symmetric (masquerade random,fully-random: a new
// port per connection), without PCP (no miniupnpd). Conntrack entries of
// the other kind made earlier stay until they time out.
func setNAT(t *testing.T, gw *netns.NS, lanCIDR string, symmetric bool) {
	t.Helper()
	rule := `oifname "wan" ip saddr ` + lanCIDR + ` masquerade`
	if symmetric {
		rule += " random,fully-random"
	}
	gw.MustRun(t, "nft", "flush", "chain", "inet", "filter", "postrouting")
	gw.MustRun(t, "nft", "add", "rule", "inet", "filter", "postrouting", "jump", "postrouting_miniupnpd")
	gw.MustRun(t, "sh", "-c", "nft add rule inet filter postrouting "+rule)
}

type pathHost struct {
	host
	gw  *netns.NS
	lan string
}

// TestConnectivityEverywhere: host1 and host2 behind NATs without PCP and
// pub with a public address, a btmm-relay with the kernel forwarder. Phase
// by phase (one topology): the path each host chooses for each peer is the
// expected one and shown by btmmctl, ULAs answer pings, TCP carries a
// byte-checked stream, the relay forwards ESP in the kernel only and sees no
// cleartext, and a relayed pair moves to a hole-punched path when the NATs
// turn endpoint-independent, without closing a TCP connection.
func TestConnectivityEverywhere(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	tshark := testenv.RequireBinary(t, "tshark", "tshark")
	tcpdump := testenv.RequireBinary(t, "tcpdump", "tcpdump")
	bins := binaries(t)
	dir := t.TempDir()
	l := lab.New(t)

	say(t, "btmm-relay in its own namespace at %s and %s, kernel forwarder on eth0", relayAddr, relayAddr2)
	rl := netns.New(t, "relay")
	netns.MustVeth(t, l.Inet, "rly", rl, "eth0")
	l.Inet.MustAddr(t, "rly", "11.4.0.1/24")
	rl.MustAddr(t, "eth0", relayAddr+"/24")
	rl.MustAddr(t, "eth0", relayAddr2+"/24")
	rl.MustRoute(t, "default", "11.4.0.1", "eth0")

	hostKey := rendezvousWith(t, l, bins, dir, fmt.Sprintf(`
[[relay]]
name = "relay.%s"
port = 3478
addrs = [%q, %q]
`, zone, relayAddr, relayAddr2))
	relayStatus := filepath.Join(dir, "relay.json")
	writeFile(t, filepath.Join(dir, "relay.toml"), fmt.Sprintf(`listen = ["%s:3478", "%s:3478"]
public = %q
ports = "40000-40099"
keys_dir = %q
zone = %q
device = "eth0"
status_file = %q
log_level = "debug"
`, relayAddr, relayAddr2, relayAddr, filepath.Join(dir, "dnsd", "keys"), zone, relayStatus), 0o644)
	relayd := start(t, rl, "btmm-relay", filepath.Join(bins, "btmm-relay"), "-config", filepath.Join(dir, "relay.toml"))

	psk := filepath.Join(dir, "psk")
	b := make([]byte, 48)
	rand.Read(b)
	writeFile(t, psk, fmt.Sprintf("%x\n", b), 0o600)
	hosts := []*pathHost{
		{host: host{name: "host1", ns: l.Host1, dataplane: "xfrm"}, gw: l.GW1, lan: "192.168.1.0/24"},
		{host: host{name: "host2", ns: l.Host2, dataplane: "xfrm"}, gw: l.GW2, lan: "192.168.2.0/24"},
		{host: host{name: "pub", ns: l.Pub, dataplane: "xfrm"}},
	}
	startHost := func(h *pathHost) {
		h.sock = filepath.Join(dir, h.name+".sock")
		conf := filepath.Join(dir, h.name+".toml")
		writeFile(t, conf, fmt.Sprintf(`host = %q
domain = %q
state_file = %q
control_socket = %q
log_level = "debug"

[tunnel]
dataplane = %q

[dns]
key_file = %q
server = "%s:53"
resolver = "%s:53"

[keying]
mode = "psk"
psk_file = %q

[paths]
mode = "auto"
refresh = "3s"
`, h.name, domain, filepath.Join(dir, h.name+".identity.json"), h.sock, h.dataplane, hostKey(h.name), lab.InetAddr, lab.InetAddr, psk), 0o644)
		h.d = start(t, h.ns, "btmmd "+h.name, filepath.Join(bins, "btmmd"), "-config", conf)
	}
	statuses := func() map[string]*agent.Status {
		sts := map[string]*agent.Status{}
		for _, h := range hosts {
			if st, err := h.status(t, bins); err == nil {
				sts[h.name] = st
			}
		}
		return sts
	}
	// waitPaths waits until every host has every peer keyed, in the kernel
	// and on the expected path kind.
	waitPaths := func(want map[[2]string]path.Kind) map[string]*agent.Status {
		t.Helper()
		var sts map[string]*agent.Status
		waitFor(t, "every pair on its expected path", 120*time.Second, func() error {
			sts = statuses()
			for pair, kind := range want {
				st := sts[pair[0]]
				if st == nil {
					return fmt.Errorf("%s: no status", pair[0])
				}
				var p *agent.PeerStatus
				for i := range st.Peers {
					if st.Peers[i].Name == pair[1] {
						p = &st.Peers[i]
					}
				}
				if p == nil || !p.Keyed || !p.InKernel || p.Path.Kind != kind || p.Outer != p.Path.Remote {
					return fmt.Errorf("%s -> %s: want %v keyed in kernel, have %+v", pair[0], pair[1], kind, p)
				}
			}
			return nil
		})
		for _, h := range hosts {
			out, _ := h.ns.Run(filepath.Join(bins, "btmmctl"), "-socket", h.sock, "status")
			show(t, "btmmctl status   # on "+h.name, out)
			for pair, kind := range want {
				if pair[0] == h.name && !strings.Contains(out, kind.String()) {
					t.Errorf("btmmctl status on %s does not show %v", h.name, kind)
				}
			}
		}
		return sts
	}
	pingAll := func(sts map[string]*agent.Status) {
		t.Helper()
		for _, h := range hosts {
			for _, o := range hosts {
				if o == h {
					continue
				}
				res, err := h.ns.Run("ping", "-6", "-c", "2", "-i", "0.3", "-W", "3", sts[o.name].ULA.String())
				if err != nil || !strings.Contains(res, " 0% packet loss") {
					t.Fatalf("ping %s -> %s ULA: %v\n%s", h.name, o.name, err, res)
				}
			}
		}
	}

	say(t, "Phase 1: gw1 and gw2 are symmetric NATs (masquerade random,fully-random) without PCP")
	setNAT(t, l.GW1, hosts[0].lan, true)
	setNAT(t, l.GW2, hosts[1].lan, true)
	for _, h := range hosts {
		startHost(h)
	}
	sts := waitPaths(map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindRelayUDP, {"host2", "host1"}: path.KindRelayUDP,
		{"host1", "pub"}: path.KindDirect, {"pub", "host1"}: path.KindPunched,
		{"host2", "pub"}: path.KindDirect, {"pub", "host2"}: path.KindPunched,
	})
	for _, h := range hosts[:2] {
		if n := sts[h.name].Paths; n == nil || n.NAT != "symmetric" {
			t.Errorf("%s measured NAT %+v, want symmetric", h.name, n)
		}
	}
	if n := sts["pub"].Paths; n == nil || n.NAT != "none" {
		t.Errorf("pub measured NAT %+v, want none", n)
	}
	pingAll(sts)

	say(t, "A byte-checked TCP stream host1 -> host2 through the relay, captured on the relay")
	echo := startEcho(t, l.Host2, sts["host2"].ULA)
	conn := dialEcho(t, l.Host1, echo)
	defer conn.Close()
	pcap := filepath.Join(dir, "relay.pcap")
	capture := rl.Command(t.Context(), tcpdump, "-q", "-n", "-i", "eth0", "-s", "0", "-U", "-w", pcap, "udp")
	if err := rl.StartCmd(capture); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second) // tshark starting
	cpu0 := procCPU(t, relayd.cmd.Process.Pid)
	marker := bytes.Repeat([]byte("CLEARTEXT-MARKER "), 64)
	const bulk = 8 << 20
	sent := streamCheck(t, conn, marker, bulk)
	cpu1 := procCPU(t, relayd.cmd.Process.Pid)
	roundTrip(t, conn, "after the bulk transfer through the relay")
	time.Sleep(time.Second)
	capture.Process.Signal(os.Interrupt)
	capture.Wait()
	var rs struct {
		Stats struct {
			GoForwarded     uint64 `json:"go_forwarded"`
			GoForwardedESP  uint64 `json:"go_forwarded_esp"`
			KernelForwarded uint64 `json:"kernel_forwarded"`
			Dropped         uint64 `json:"dropped"`
		} `json:"stats"`
	}
	time.Sleep(2500 * time.Millisecond) // status_file is rewritten every 2 s
	if raw, err := os.ReadFile(relayStatus); err != nil || json.Unmarshal(raw, &rs) != nil {
		t.Fatalf("relay status file: %v", err)
	}
	relayCPU := cpu1 - cpu0
	t.Logf("relay: %d bytes through, %d datagrams forwarded by the kernel, %d ESP datagrams by Go (%d non-ESP: keying/probes), relay process CPU %v during the transfer",
		sent, rs.Stats.KernelForwarded, rs.Stats.GoForwardedESP, rs.Stats.GoForwarded-rs.Stats.GoForwardedESP, relayCPU)
	if rs.Stats.GoForwardedESP != 0 || rs.Stats.KernelForwarded < bulk/1500 {
		t.Errorf("the relay's Go process forwarded %d ESP datagrams, the kernel %d: want 0 and the whole transfer", rs.Stats.GoForwardedESP, rs.Stats.KernelForwarded)
	}
	raw, err := os.ReadFile(pcap)
	if err != nil || len(raw) < bulk {
		t.Fatalf("capture on the relay: %d bytes, %v", len(raw), err)
	}
	if bytes.Contains(raw, []byte("CLEARTEXT-MARKER")) {
		t.Fatal("the relay saw the TCP payload in clear")
	}
	decode := []string{"-r", pcap}
	for p := 40000; p < 40010; p++ {
		decode = append(decode, "-d", "udp.port=="+strconv.Itoa(p)+",udpencap")
	}
	esp, _ := rl.Run(tshark, append(decode, "-Y", "esp", "-T", "fields", "-e", "frame.number")...)
	clear, _ := rl.Run(tshark, append(decode, "-Y", "ipv6 || tcp", "-T", "fields", "-e", "frame.number")...)
	nESP, nClear := strings.Count(esp, "\n"), strings.Count(clear, "\n")
	t.Logf("tshark on the relay: %d ESP frames, %d frames with IPv6 or TCP visible", nESP, nClear)
	if nESP < bulk/1500 || nClear != 0 {
		t.Errorf("tshark on the relay: %d ESP, %d IPv6/TCP frames; want the transfer as ESP and nothing else", nESP, nClear)
	}

	say(t, "Phase 2: the NATs become endpoint-independent: host1 <-> host2 move from the relay to a hole-punched path, the TCP connection stays")
	setNAT(t, l.GW1, hosts[0].lan, false)
	setNAT(t, l.GW2, hosts[1].lan, false)
	sts = waitPaths(map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindPunched, {"host2", "host1"}: path.KindPunched,
		{"host1", "pub"}: path.KindDirect, {"pub", "host1"}: path.KindPunched,
	})
	roundTrip(t, conn, "after relay -> punched")
	// Baseline for the relay's CPU figure: the same transfer not through
	// the relay (what the VM charges to an idle process meanwhile).
	cpu2 := procCPU(t, relayd.cmd.Process.Pid)
	streamCheck(t, conn, marker, bulk)
	cpu3 := procCPU(t, relayd.cmd.Process.Pid)
	t.Logf("relay process CPU: %v during the 8 MiB transfer through it, %v during the same transfer on the punched path (baseline)", relayCPU, cpu3-cpu2)
	pingAll(sts)
	for _, h := range hosts[:2] {
		if n := sts[h.name].Paths; n == nil || n.NAT != "eim" {
			t.Errorf("%s measured NAT %+v, want eim", h.name, n)
		}
	}
}

// streamCheck writes n bytes of a pattern through the echo server and
// checks every byte that comes back.
func streamCheck(t *testing.T, c net.Conn, pattern []byte, n int) int {
	t.Helper()
	c.SetDeadline(time.Now().Add(120 * time.Second))
	errc := make(chan error, 1)
	go func() {
		var err error
		for sent := 0; sent < n && err == nil; sent += len(pattern) {
			_, err = c.Write(pattern[:min(len(pattern), n-sent)])
		}
		errc <- err
	}()
	got := make([]byte, n)
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("TCP stream: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("TCP stream write: %v", err)
	}
	for i := 0; i < n; i += len(pattern) {
		if !bytes.Equal(got[i:min(i+len(pattern), n)], pattern[:min(len(pattern), n-i)]) {
			t.Fatalf("TCP stream corrupted at byte %d", i)
		}
	}
	c.SetDeadline(time.Time{})
	return n
}

// procCPU is a process's user+system CPU time (/proc/PID/stat, clock ticks of 10 ms).
func procCPU(t *testing.T, pid int) time.Duration {
	t.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(raw[bytes.LastIndexByte(raw, ')')+2:]))
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return time.Duration(ut+st) * 10 * time.Millisecond
}

var _ = netip.Addr{}
