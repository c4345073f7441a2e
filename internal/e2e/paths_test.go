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
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/internal/lab"
	"github.com/btmm/btmm/internal/miniupnpd"
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
// the other kind made earlier are flushed.
func setNAT(t *testing.T, gw *netns.NS, lanCIDR string, symmetric bool) {
	t.Helper()
	rule := `oifname "wan" ip saddr ` + lanCIDR + ` masquerade`
	if symmetric {
		rule += " random,fully-random"
	}
	gw.MustRun(t, "nft", "flush", "chain", "inet", "filter", "postrouting")
	gw.MustRun(t, "nft", "add", "rule", "inet", "filter", "postrouting", "jump", "postrouting_miniupnpd")
	gw.MustRun(t, "sh", "-c", "nft add rule inet filter postrouting "+rule)
	firewallWAN(t, gw)
	// A NAT of the new kind starts without mappings: the old ones would
	// otherwise live on as long as keepalives and probes refresh them.
	flushConntrack(t, gw)
}

// flushConntrack empties a namespace's conntrack table (lab.FlushConntrack).
func flushConntrack(t *testing.T, ns *netns.NS) {
	t.Helper()
	if err := lab.FlushConntrack(ns); err != nil {
		t.Fatal(err)
	}
}

type pathHost struct {
	host
	gw  *netns.NS
	lan string
}

// firewallWAN gives a gateway a home router's input filter: nothing from
// the WAN side opens a connection to the gateway itself. Without it a
// peer's hole-punching probe that arrives before our own went out is
// delivered locally, and the conntrack entry it leaves takes the very
// port our probe must be mapped to (the NAT then picks another one).
func firewallWAN(t *testing.T, gw *netns.NS) {
	t.Helper()
	gw.Run("nft", "delete", "table", "inet", "wanfw")
	gw.MustRun(t, "sh", "-c", `nft -f - <<'EOF'
table inet wanfw {
	chain input {
		type filter hook input priority 0; policy accept;
		iifname "wan" ct state new drop
	}
}
EOF`)
}

// carrierNAT makes inet a carrier-grade NAT for gw3's WAN network
// (11.6.0.0/24): traffic from it leaves as 11.7.0.1 (snat keeps ports
// where free: endpoint-independent mapping, as RFC 6888 REQ-1 wants of a
// CGN), and nothing from outside opens a connection to it. gw3 keeps its
// public-looking WAN address, so miniupnpd there serves PCP whose mapping
// (11.6.0.2:port) nobody outside can reach: a double NAT with PCP only at
// the inner one (RFC 6281 §4.4).
func carrierNAT(t *testing.T, l *lab.Lab) {
	t.Helper()
	l.Inet.MustRun(t, "ip", "addr", "add", "11.7.0.1/32", "dev", "lo")
	l.Inet.MustRun(t, "sh", "-c", `nft -f - <<'EOF'
table ip cgn {
	chain forward {
		type filter hook forward priority 0; policy accept;
		ct state established,related accept
		ip daddr 11.6.0.0/24 iifname != "gw3" drop
	}
	chain input {
		type filter hook input priority 0; policy accept;
		ip daddr 11.7.0.1 ct state new drop
	}
	chain postrouting {
		type nat hook postrouting priority 100; policy accept;
		ip saddr 11.6.0.0/24 oifname != "gw3" snat to 11.7.0.1
	}
}
EOF`)
}

// relayNS hangs a namespace for btmm-relay off the lab's inet, with
// relayAddr and relayAddr2 on its eth0.
func relayNS(t *testing.T, l *lab.Lab) *netns.NS {
	t.Helper()
	rl := netns.New(t, "relay")
	netns.MustVeth(t, l.Inet, "rly", rl, "eth0")
	l.Inet.MustAddr(t, "rly", "11.4.0.1/24")
	rl.MustAddr(t, "eth0", relayAddr+"/24")
	rl.MustAddr(t, "eth0", relayAddr2+"/24")
	rl.MustRoute(t, "default", "11.4.0.1", "eth0")
	return rl
}

// relayDNS is btmm-dnsd's [[relay]] section publishing the relay of
// relayNS, with extra TOML lines in it.
func relayDNS(extra string) string {
	return fmt.Sprintf(`
[[relay]]
name = "relay.%s"
port = 3478
addrs = [%q, %q]
`, zone, relayAddr, relayAddr2) + extra
}

// startRelay starts btmm-relay in rl (relayNS) with its kernel forwarder
// on eth0, authenticating allocations with the keys of the btmm-dnsd whose
// data directory is dir/dnsd (extra: more TOML lines); it returns the
// daemon and its status file.
func startRelay(t *testing.T, rl *netns.NS, bins, dir, extra string) (*daemon, string) {
	t.Helper()
	status := filepath.Join(dir, "relay.json")
	writeFile(t, filepath.Join(dir, "relay.toml"), fmt.Sprintf(`listen = ["%s:3478", "%s:3478"]
public = %q
ports = "40000-40099"
keys_dir = %q
zone = %q
device = "eth0"
status_file = %q
log_level = "debug"
`, relayAddr, relayAddr2, relayAddr, filepath.Join(dir, "dnsd", "keys"), zone, status)+extra, 0o644)
	return start(t, rl, "btmm-relay", filepath.Join(bins, "btmm-relay"), "-config", filepath.Join(dir, "relay.toml")), status
}

// pathsLab is the lab of the paths table: a btmm-relay namespace (kernel
// forwarder, two addresses) on inet, btmm-dnsd publishing it by SRV, and
// host1 (behind gw1), host2 (behind gw2) and pub, whose btmmd startHost
// starts ([paths] auto, refresh 3 s unless defaultRefresh, tunnel kinds off, PSK keying).
type pathsLab struct {
	l           *lab.Lab
	rl          *netns.NS
	relayd      *daemon
	relayStatus string
	dir, bins   string
	hostKey     func(string) string
	keys        map[string]string // host name: its key file
	psk         string
	hosts       []*pathHost
	ca          string // the CA of the relay's TLS stream port (relay-tcp, relaytcp_test.go)
	// defaultRefresh runs btmmd with its own [paths] refresh and recheck
	// (60 s, 15 s); else refresh is 3 s, so that a NAT change is measured
	// almost at once whatever else notices it.
	defaultRefresh bool
}

// newPathsLab builds it; cgn also makes inet a carrier NAT for gw3's
// network.
func newPathsLab(t *testing.T, dataplane string, cgn bool) *pathsLab {
	t.Helper()
	bins := binaries(t)
	dir := t.TempDir()
	l := lab.New(t)

	say(t, "btmm-relay in its own namespace at %s and %s, kernel forwarder on eth0", relayAddr, relayAddr2)
	rl := relayNS(t, l)
	if cgn {
		say(t, "inet is a carrier NAT for gw3's network (11.6.0.0/24 leaves as 11.7.0.1)")
		carrierNAT(t, l)
	}
	firewallWAN(t, l.GW3)

	// The relay's TLS stream port for the UDP-blocked row (relaytcp_test.go).
	ca, crt, key := relayTLS(t, dir, "relay."+strings.TrimSuffix(zone, "."))
	hostKey := rendezvousWith(t, l, bins, dir, relayDNS("tls_port = 443\n"))
	relayd, relayStatus := startRelay(t, rl, bins, dir, fmt.Sprintf("tls_listen = [\"%s:443\"]\ntls_cert = %q\ntls_key = %q\n", relayAddr, crt, key))

	psk := filepath.Join(dir, "psk")
	b := make([]byte, 48)
	rand.Read(b)
	writeFile(t, psk, fmt.Sprintf("%x\n", b), 0o600)
	hosts := []*pathHost{
		{host: host{name: "host1", ns: l.Host1, dataplane: dataplane}, gw: l.GW1, lan: "192.168.1.0/24"},
		{host: host{name: "host2", ns: l.Host2, dataplane: dataplane}, gw: l.GW2, lan: "192.168.2.0/24"},
		{host: host{name: "pub", ns: l.Pub, dataplane: dataplane}},
	}
	return &pathsLab{l: l, rl: rl, relayd: relayd, relayStatus: relayStatus, dir: dir, bins: bins, hostKey: hostKey, keys: map[string]string{}, psk: psk, hosts: hosts, ca: ca}
}

// startHost starts h's btmmd.
func (pl *pathsLab) startHost(t *testing.T, h *pathHost) {
	t.Helper()
	h.sock = filepath.Join(pl.dir, h.name+".sock")
	key, ok := pl.keys[h.name]
	if !ok { // btmm-dnsd addhost once per host: a restart uses the same key
		key = pl.hostKey(h.name)
		pl.keys[h.name] = key
	}
	refresh := `refresh = "3s"`
	if pl.defaultRefresh {
		refresh = ""
	}
	// Tunnel kinds (issue 15) off: this table is about ESP-in-UDP paths.
	conf := writeHostConf(t, hostFiles{name: h.name, dir: pl.dir, sock: h.sock, dnsKey: key,
		keying: fmt.Sprintf("mode = \"psk\"\npsk_file = %q", pl.psk)},
		hostConf{dataplane: h.dataplane, extra: fmt.Sprintf("\n[paths]\nmode = \"auto\"\n%s\nca_file = %q\n\n[tunnels]\nmode = \"off\"\n", refresh, pl.ca)})
	h.d = start(t, h.ns, "btmmd "+h.name, filepath.Join(pl.bins, "btmmd"), "-config", conf)
}

// statuses is every running host's btmmctl status by name.
func (pl *pathsLab) statuses(t *testing.T) map[string]*agent.Status {
	sts := map[string]*agent.Status{}
	for _, h := range pl.hosts {
		if h.d == nil {
			continue
		}
		if st, err := h.status(t, pl.bins); err == nil {
			sts[h.name] = st
		}
	}
	return sts
}

// TestConnectivityEverywhere is the issue-14 table with ESP (xfrm) and a
// capture on the relay: the VM's run.
func TestConnectivityEverywhere(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	t.Parallel() // its own lab (newPathsLab); overlaps the other e2e labs (the VM tier runs them two at a time)
	connectivity(t, "xfrm")
}

// TestConnectivityEverywhereCleartext is the same table on the
// ebpf-cleartext dataplane (no ESP needed), the host kernel's run.
func TestConnectivityEverywhereCleartext(t *testing.T) {
	testenv.RequireNetNS(t)
	if testenv.InVM() {
		t.Skip("host tier: the paths table on ebpf-cleartext is the host kernel's run (a paths lab costs the VM minutes under TCG); runs under `make test-netns`")
	}
	connectivity(t, "ebpf-cleartext")
}

// connectivity: host1 and host2 behind the lab's NATs, pub with a public
// address, a btmm-relay with the kernel forwarder, btmm-dnsd publishing it.
// Row by row (one lab; host2 moves, gateways change), each host reaches
// each peer over the expected path, btmmctl shows it, ULAs answer pings and
// one TCP connection opened in the first row carries byte-checked data in
// every row without being closed:
//
//	row                                   host1 -> host2   host2 -> host1
//	symmetric NATs, no PCP                relay-udp        relay-udp      (bulk: kernel-forwarded, ESP only on the relay)
//	endpoint-independent NATs, no PCP     punched          punched
//	one NAT without hairpinning           lan              lan
//	EIM (gw1) vs symmetric (gw2)          relay-udp        relay-udp
//	gw2 replaced by a PCP NAT             direct           punched        (relay -> direct, the TCP connection stays)
//	double NAT: PCP at gw3, CGN outside   punched          punched        (the PCP mapping is unreachable)
//	UDP blocked at gw1 (DNS passes)       relay-tcp        relay-udp      (btmmd's bridge, relaytcp_test.go; ESP only on the relay)
//	UDP back at gw1                       punched          punched
//
// and pub (public) reaches the NATed hosts punched (peer-reflexive), they
// reach it direct.
func connectivity(t *testing.T, dataplane string) {
	testenv.RequireBinary(t, "ping", "iputils-ping")
	esp := dataplane != "ebpf-cleartext"
	var tshark, tcpdump string
	if esp {
		tshark = testenv.RequireBinary(t, "tshark", "tshark")
		tcpdump = testenv.RequireBinary(t, "tcpdump", "tcpdump")
	}
	pl := newPathsLab(t, dataplane, true)
	// btmmd's own refresh (60 s) and recheck (15 s): a NAT that changes
	// under a host (rows 2, 5, 7) is noticed by the recheck and by its
	// peers' PONGs, not by a frequent full measurement.
	pl.defaultRefresh = true
	l, rl, relayd, relayStatus, dir, bins, hosts := pl.l, pl.rl, pl.relayd, pl.relayStatus, pl.dir, pl.bins, pl.hosts
	startHost := func(h *pathHost) { pl.startHost(t, h) }
	// converged: each row's time from its change to every pair on its
	// expected path (logged at the end: a slow row is a finding).
	var converged []string
	defer func() { t.Logf("convergence per row: %s", strings.Join(converged, "; ")) }()
	waitPaths := func(row string, want map[[2]string]path.Kind) map[string]*agent.Status {
		t.Helper()
		sts, took := pl.waitPaths(t, row, want)
		converged = append(converged, fmt.Sprintf("%s %v", row, took))
		return sts
	}
	pingAll := func(sts map[string]*agent.Status) { t.Helper(); pl.pingAll(t, sts) }
	wantNAT := func(row string, sts map[string]*agent.Status, name, nat string) {
		t.Helper()
		if n := sts[name].Paths; n == nil || n.NAT != nat {
			t.Errorf("%s: %s measured NAT %+v, want %s", row, name, n, nat)
		}
	}

	row := "symmetric NATs without PCP"
	say(t, "Row 1, %s: gw1 and gw2 masquerade random,fully-random, no miniupnpd", row)
	setNAT(t, l.GW1, hosts[0].lan, true)
	setNAT(t, l.GW2, hosts[1].lan, true)
	for _, h := range hosts {
		startHost(h)
	}
	sts := waitPaths(row, map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindRelayUDP, {"host2", "host1"}: path.KindRelayUDP,
		{"host1", "pub"}: path.KindDirect, {"pub", "host1"}: path.KindPunched,
		{"host2", "pub"}: path.KindDirect, {"pub", "host2"}: path.KindPunched,
	})
	wantNAT(row, sts, "host1", "symmetric")
	wantNAT(row, sts, "host2", "symmetric")
	wantNAT(row, sts, "pub", "none")
	pingAll(sts)

	say(t, "A byte-checked TCP stream host1 -> host2 through the relay, captured on the relay")
	echo := startEcho(t, l.Host2, sts["host2"].ULA)
	conn := dialEcho(t, l.Host1, echo)
	defer conn.Close()
	pcap := filepath.Join(dir, "relay.pcap")
	var capture *exec.Cmd
	if esp {
		capture = rl.Command(t.Context(), tcpdump, "-q", "-n", "-i", "eth0", "-s", "0", "-U", "-w", pcap, "udp")
		if err := rl.StartCmd(capture); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second) // tcpdump starting
	}
	cpu0 := procCPU(t, relayd.cmd.Process.Pid)
	marker := bytes.Repeat([]byte("CLEARTEXT-MARKER "), 64)
	const bulk = 8 << 20
	sent := streamCheck(t, conn, marker, bulk)
	cpu1 := procCPU(t, relayd.cmd.Process.Pid)
	roundTrip(t, conn, "after the bulk transfer through the relay")
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
	t.Logf("relay: %d bytes through, %d datagrams forwarded by the kernel, %d tunnel datagrams by Go (%d non-ESP: keying/probes), relay process CPU %v during the transfer",
		sent, rs.Stats.KernelForwarded, rs.Stats.GoForwardedESP, rs.Stats.GoForwarded-rs.Stats.GoForwardedESP, relayCPU)
	if rs.Stats.GoForwardedESP != 0 || rs.Stats.KernelForwarded < bulk/9000 {
		t.Errorf("the relay's Go process forwarded %d tunnel datagrams, the kernel %d: want 0 and the whole transfer", rs.Stats.GoForwardedESP, rs.Stats.KernelForwarded)
	}
	if esp {
		capture.Process.Signal(os.Interrupt)
		capture.Wait()
		raw, err := os.ReadFile(pcap)
		if err != nil || len(raw) < bulk {
			t.Fatalf("capture on the relay: %d bytes, %v", len(raw), err)
		}
		if bytes.Contains(raw, []byte("CLEARTEXT-MARKER")) {
			t.Fatal("the relay saw the TCP payload in clear")
		}
		// Every UDP port in the capture but the relay's control port is
		// ESP-in-UDP (RFC 3948): decode them all so. Only the relay's
		// ports would leave a symmetric NAT's random port to tshark's
		// own port table, which tries the lower port first: a port of
		// VXLAN, GTP, Teredo... decodes ciphertext as an inner packet
		// (one such frame of 28,395 showed "IPv6/TCP" in a VM run).
		ports, _ := rl.Run(tshark, "-r", pcap, "-T", "fields", "-e", "udp.srcport", "-e", "udp.dstport")
		decode := []string{"-r", pcap}
		seen := map[string]bool{"3478": true, "": true}
		for _, p := range strings.Fields(ports) { // and tshark's warnings on stderr
			if _, err := strconv.Atoi(p); err == nil && !seen[p] {
				seen[p] = true
				decode = append(decode, "-d", "udp.port=="+p+",udpencap")
			}
		}
		espOut, _ := rl.Run(tshark, append(decode, "-Y", "esp", "-T", "fields", "-e", "frame.number")...)
		clear, _ := rl.Run(tshark, append(decode, "-Y", "ipv6 || tcp", "-T", "fields", "-e", "frame.number")...)
		nESP, nClear := countNumbers(espOut), countNumbers(clear)
		t.Logf("tshark on the relay: %d ESP frames, %d frames with IPv6 or TCP visible (%d UDP ports decoded as ESP-in-UDP)", nESP, nClear, len(seen)-2)
		if nESP < bulk/1500 || nClear != 0 {
			shown, _ := rl.Run(tshark, append(decode, "-Y", "ipv6 || tcp", "-V")...)
			shown = shown[:min(len(shown), 6000)]
			t.Errorf("tshark on the relay: %d ESP, %d IPv6/TCP frames; want the transfer as ESP and nothing else; the first of them:\n%s", nESP, nClear, shown)
		}
	}

	row = "endpoint-independent NATs without PCP"
	say(t, "Row 2, %s: host1 <-> host2 move from the relay to a hole-punched path, the TCP connection stays", row)
	setNAT(t, l.GW1, hosts[0].lan, false)
	changed1 := time.Now() // gw1 is of the new kind, without mappings
	setNAT(t, l.GW2, hosts[1].lan, false)
	changed := time.Now() // and gw2 (setNAT takes seconds under TCG)
	sts = waitPaths(row, map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindPunched, {"host2", "host1"}: path.KindPunched,
		{"host1", "pub"}: path.KindDirect, {"pub", "host1"}: path.KindPunched,
	})
	upgradeTimes(t, row, changed, changed, hosts[0], hosts[1])
	upgradeTimes(t, row, changed1, changed, hosts[1], hosts[0])
	roundTrip(t, conn, row)
	// Baseline for the relay's CPU figure: the same transfer not through
	// the relay (what the VM charges to an idle process meanwhile).
	cpu2 := procCPU(t, relayd.cmd.Process.Pid)
	streamCheck(t, conn, marker, bulk)
	cpu3 := procCPU(t, relayd.cmd.Process.Pid)
	t.Logf("relay process CPU: %v during the 8 MiB transfer through it, %v during the same transfer on the punched path (baseline)", relayCPU, cpu3-cpu2)
	pingAll(sts)
	wantNAT(row, sts, "host1", "eim")
	wantNAT(row, sts, "host2", "eim")

	row = "two hosts behind one NAT without hairpinning"
	say(t, "Row 3, %s: host2 moves behind gw1 (Linux masquerade, no hairpin rules)", row)
	if err := l.Move(l.Host2, lab.BehindGW1); err != nil {
		t.Fatal(err)
	}
	sts = waitPaths(row, map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindLAN, {"host2", "host1"}: path.KindLAN,
		{"host2", "pub"}: path.KindDirect, {"pub", "host2"}: path.KindPunched,
	})
	roundTrip(t, conn, row)
	pingAll(sts)

	row = "endpoint-independent NAT vs symmetric NAT"
	say(t, "Row 4, %s: gw2 symmetric again, host2 moves back behind it", row)
	setNAT(t, l.GW2, hosts[1].lan, true)
	if err := l.Move(l.Host2, lab.BehindGW2); err != nil {
		t.Fatal(err)
	}
	sts = waitPaths(row, map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindRelayUDP, {"host2", "host1"}: path.KindRelayUDP,
		{"host2", "pub"}: path.KindDirect, {"pub", "host2"}: path.KindPunched,
	})
	roundTrip(t, conn, row)
	pingAll(sts)
	wantNAT(row, sts, "host2", "symmetric")

	row = "a gateway gains PCP"
	say(t, "Row 5, %s: gw2's symmetric NAT is replaced by a PCP one (Linux masquerade and miniupnpd): host1 <-> host2 leave the relay, the TCP connection stays", row)
	setNAT(t, l.GW2, hosts[1].lan, false)
	changed = time.Now()
	miniupnpd.StartT(t, l.GW2, miniupnpd.Options{WAN: "wan", LAN: "lan", LANNet: netip.MustParsePrefix(hosts[1].lan), KeepRuleset: true})
	sts = waitPaths(row, map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindDirect, {"host2", "host1"}: path.KindPunched,
		{"host2", "pub"}: path.KindDirect, {"pub", "host2"}: path.KindDirect,
	})
	upgradeTimes(t, row, changed, changed, hosts[0], hosts[1])
	if ext := sts["host2"].NAT.External; ext != netip.AddrPortFrom(netip.MustParseAddr(lab.GW2WAN), 4500) {
		t.Errorf("%s: host2's NAT mapping is %v (%s), want %s:4500 by PCP", row, ext, sts["host2"].NAT.Status, lab.GW2WAN)
	}
	roundTrip(t, conn, row)
	pingAll(sts)
	wantNAT(row, sts, "host2", "eim")

	row = "double NAT (PCP inside, a carrier NAT outside)"
	say(t, "Row 6, %s: host2 moves behind gw3 (miniupnpd), which is behind inet's carrier NAT", row)
	miniupnpd.StartT(t, l.GW3, miniupnpd.Options{WAN: "wan", LAN: "lan", LANNet: netip.MustParsePrefix("192.168.3.0/24"), KeepRuleset: true})
	if err := l.Move(l.Host2, lab.BehindGW3); err != nil {
		t.Fatal(err)
	}
	sts = waitPaths(row, map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindPunched, {"host2", "host1"}: path.KindPunched,
		{"host2", "pub"}: path.KindDirect, {"pub", "host2"}: path.KindPunched,
	})
	roundTrip(t, conn, row)
	streamCheck(t, conn, marker, 1<<20)
	pingAll(sts)
	wantNAT(row, sts, "host2", "eim")
	out, _ := l.Host2.Run(filepath.Join(bins, "btmmctl"), "-socket", hosts[1].sock, "status")
	show(t, "btmmctl status   # on host2 behind the double NAT", out)

	udpBlockedRow(t, pl, conn, marker, waitPaths, pingAll, wantNAT, tcpdump)
}

// upgradeTimes logs, from the moment h2's NAT had changed (nothing changed
// on h2 itself), when h2 noticed it (what triggered its recheck: its own
// timer or a peer's PONG; when a measurement found its reflexive endpoint
// moved) and got a PCP mapping, and, from the moment both sides' NATs had
// changed (both: the same moment where only h2's changed), when h1 left
// the relay for h2 (and for which kind) and reached it direct. A finding,
// not an assertion.
func upgradeTimes(t *testing.T, row string, changed, both time.Time, h1, h2 *pathHost) {
	t.Helper()
	l1, l2 := h1.d.log.String(), h2.d.log.String()
	at := func(since time.Time, log string, subs ...string) string {
		if ts := logTime(log, since, subs...); !ts.IsZero() {
			return ts.Sub(since).Round(time.Millisecond).String()
		}
		return "never"
	}
	left := "never"
	if ts := logTime(l1, both, `msg=path `, `peer=`+h2.name+` `, `from="relay-udp `); !ts.IsZero() {
		left = ts.Sub(both).Round(time.Millisecond).String()
		for _, k := range []path.Kind{path.KindLAN, path.KindDirect, path.KindPunched} {
			if logTime(l1, both, `msg=path `, `peer=`+h2.name+` `, `from="relay-udp `, `to="`+k.String()+` `) == ts {
				left += " (to " + k.String() + ")"
			}
		}
	}
	t.Logf("%s: time to upgrade: after its NAT changed, %s heard from a peer's PONG that it is seen elsewhere at %s, its recheck (timer or PONG) decided to measure at %s, the measurement found its NAT moved at %s, PCP mapping at %s; after the NAT change(s), %s left the relay for %s at %s, direct at %s",
		row, h2.name, at(changed, l2, `msg="paths: a peer sees us from another source`), at(changed, l2, `msg="paths: NAT recheck: measuring again"`),
		at(changed, l2, `msg="paths: our NAT maps us elsewhere now`), at(changed, l2, `msg=nat `, `status="mapped via PCP`),
		h1.name, h2.name, left, at(both, l1, `msg=path `, `peer=`+h2.name+` `, `to="direct `))
}

// countNumbers counts the lines of tshark -T fields -e frame.number
// output that are frame numbers (not its warnings).
func countNumbers(out string) int {
	n := 0
	for _, l := range strings.Split(out, "\n") {
		if _, err := strconv.Atoi(strings.TrimSpace(l)); err == nil {
			n++
		}
	}
	return n
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
