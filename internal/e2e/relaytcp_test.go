package e2e

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/internal/lab"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// relayTLS writes a CA and the relay's certificate for name (signed by
// it) into dir: ca.pem (btmmd's [paths] ca_file), relay.crt, relay.key.
func relayTLS(t *testing.T, dir, name string) (ca, crt, key string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "btmm test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leafTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, caCert, &leafKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(leafKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, crt, key = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "relay.crt"), filepath.Join(dir, "relay.key")
	writeFile(t, ca, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})), 0o644)
	writeFile(t, crt, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER})), 0o644)
	writeFile(t, key, string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})), 0o600)
	return ca, crt, key
}

// blockUDP makes a gateway drop every UDP datagram it would forward,
// except DNS to port 53 (the rendezvous: registration and LLQ), as a
// hotel or corporate network that allows only TCP and its DNS does.
func blockUDP(t *testing.T, gw *netns.NS) {
	t.Helper()
	gw.MustRun(t, "sh", "-c", `nft -f - <<'EOF'
table inet udpblock {
	chain forward {
		type filter hook forward priority -10; policy accept;
		meta l4proto udp udp dport 53 accept
		meta l4proto udp udp sport 53 accept
		meta l4proto udp counter drop
	}
}
EOF`)
}

func unblockUDP(t *testing.T, gw *netns.NS) {
	t.Helper()
	gw.MustRun(t, "nft", "delete", "table", "inet", "udpblock")
	flushConntrack(t, gw)
}

// TestRelayTCPCleartext (issue 14 item 5, host kernel, ebpf-cleartext):
// gw1 drops all UDP but DNS. host1 finds no STUN answer (NAT "blocked"),
// reaches the relay's TLS stream port (published by btmm-dnsd as SRV
// _btmm-relay._tcp, its certificate verified by name against the test CA)
// and reaches host2 and pub through it: relay-tcp on host1's side (a
// loopback bridge socket as the peer's outer address, Go carrying the
// data), relay-udp on theirs. host2 and pub, whose UDP works, never start a
// bridge. Pings pass both ways and a byte-checked TCP stream crosses.
// Then gw1 lets UDP through again: host1 stops the bridge and moves to UDP
// paths, the TCP connection still carrying data.
func TestRelayTCPCleartext(t *testing.T) {
	testenv.RequireNetNS(t)
	if testenv.InVM() {
		t.Skip("host tier: the relay-tcp lab on ebpf-cleartext is the host kernel's run (a paths lab costs the VM minutes under TCG); runs under `make test-netns`")
	}
	testenv.RequireBinary(t, "ping", "iputils-ping")
	bins := binaries(t)
	dir := t.TempDir()
	l := lab.New(t)
	const dataplane = "ebpf-cleartext"
	relayName := "relay." + strings.TrimSuffix(zone, ".")

	say(t, "btmm-relay at %s and %s, its TLS stream port on %s:443 (certificate for %s)", relayAddr, relayAddr2, relayAddr, relayName)
	rl := netns.New(t, "relay")
	netns.MustVeth(t, l.Inet, "rly", rl, "eth0")
	l.Inet.MustAddr(t, "rly", "11.4.0.1/24")
	rl.MustAddr(t, "eth0", relayAddr+"/24")
	rl.MustAddr(t, "eth0", relayAddr2+"/24")
	rl.MustRoute(t, "default", "11.4.0.1", "eth0")
	ca, crt, key := relayTLS(t, dir, relayName)

	hostKey := rendezvousWith(t, l, bins, dir, fmt.Sprintf(`
[[relay]]
name = "%s."
port = 3478
addrs = [%q, %q]
tls_port = 443
`, relayName, relayAddr, relayAddr2))
	relayStatus := filepath.Join(dir, "relay.json")
	writeFile(t, filepath.Join(dir, "relay.toml"), fmt.Sprintf(`listen = ["%s:3478", "%s:3478"]
public = %q
ports = "40000-40099"
keys_dir = %q
zone = %q
device = "eth0"
status_file = %q
log_level = "debug"
tls_listen = ["%s:443"]
tls_cert = %q
tls_key = %q
`, relayAddr, relayAddr2, relayAddr, filepath.Join(dir, "dnsd", "keys"), zone, relayStatus, relayAddr, crt, key), 0o644)
	start(t, rl, "btmm-relay", filepath.Join(bins, "btmm-relay"), "-config", filepath.Join(dir, "relay.toml"))

	psk := filepath.Join(dir, "psk")
	b := make([]byte, 48)
	rand.Read(b)
	writeFile(t, psk, fmt.Sprintf("%x\n", b), 0o600)
	hosts := []*pathHost{
		{host: host{name: "host1", ns: l.Host1, dataplane: dataplane}, gw: l.GW1, lan: "192.168.1.0/24"},
		{host: host{name: "host2", ns: l.Host2, dataplane: dataplane}, gw: l.GW2, lan: "192.168.2.0/24"},
		{host: host{name: "pub", ns: l.Pub, dataplane: dataplane}},
	}
	say(t, "gw1 and gw2: endpoint-independent NATs without PCP; gw1 drops all UDP but DNS")
	setNAT(t, l.GW1, hosts[0].lan, false)
	setNAT(t, l.GW2, hosts[1].lan, false)
	blockUDP(t, l.GW1)
	for _, h := range hosts {
		h.sock = filepath.Join(dir, h.name+".sock")
		conf := writeHostConf(t, hostFiles{name: h.name, dir: dir, sock: h.sock, dnsKey: hostKey(h.name),
			keying: fmt.Sprintf("mode = \"psk\"\npsk_file = %q", psk)},
			hostConf{dataplane: h.dataplane, extra: fmt.Sprintf("\n[paths]\nmode = \"auto\"\nrefresh = \"3s\"\nca_file = %q\n\n[tunnels]\nmode = \"off\"\n", ca)})
		h.d = start(t, h.ns, "btmmd "+h.name, filepath.Join(bins, "btmmd"), "-config", conf)
	}
	sts := waitRelayTCPPaths(t, bins, hosts, "UDP blocked at gw1", map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindRelayTCP, {"host2", "host1"}: path.KindRelayUDP,
		{"host1", "pub"}: path.KindRelayTCP, {"pub", "host1"}: path.KindRelayUDP,
		{"host2", "pub"}: path.KindDirect, {"pub", "host2"}: path.KindPunched,
	})
	if p := sts["host1"].Paths; p == nil || p.NAT != "blocked" || p.RelayTCP == nil || p.RelayTCP.Carrier != "go" ||
		p.RelayTCP.Server.Name != relayName || !p.RelayTCP.Bridge.Up {
		t.Errorf("host1's paths status: %+v", p)
	}
	for _, n := range []string{"host2", "pub"} {
		if p := sts[n].Paths; p == nil || p.RelayTCP != nil || p.NAT == "blocked" {
			t.Errorf("%s (UDP works) shows %+v: it must never use relay-tcp", n, p)
		}
	}
	out, _ := l.Host1.Run(filepath.Join(bins, "btmmctl"), "-socket", hosts[0].sock, "status")
	show(t, "btmmctl status   # on host1 (UDP blocked)", out)
	for _, w := range []string{"UDP blocked", "relay-tcp", "btmmd carries the data", "ESP in TCP (RFC 8229)"} {
		if !strings.Contains(out, w) {
			t.Errorf("btmmctl status on host1 lacks %q", w)
		}
	}
	pingPairs(t, hosts, sts)

	say(t, "A byte-checked TCP stream host1 -> host2 through the bridge, the TLS stream and the relay")
	echo := startEcho(t, l.Host2, sts["host2"].ULA)
	conn := dialEcho(t, l.Host1, echo)
	defer conn.Close()
	marker := bytes.Repeat([]byte("RELAY-TCP "), 100)
	const bulk = 2 << 20
	sent := streamCheck(t, conn, marker, bulk)
	time.Sleep(2500 * time.Millisecond) // status_file is rewritten every 2 s
	var rs struct {
		Stats struct {
			Streams      int    `json:"streams"`
			StreamFrames uint64 `json:"stream_frames"`
		} `json:"stats"`
	}
	if raw, err := os.ReadFile(relayStatus); err != nil || json.Unmarshal(raw, &rs) != nil {
		t.Fatalf("relay status file: %v", err)
	}
	st1, err := hosts[0].status(t, bins)
	if err != nil {
		t.Fatal(err)
	}
	br := st1.Paths.RelayTCP.Bridge
	// Frames in are fewer than frames out: in the lab host2's GSO
	// super-packets cross the veths whole and reach the relay's socket as
	// one datagram each (a card would have segmented them); bytes count.
	t.Logf("%d bytes echoed; host1's bridge: %d frames (%d bytes) out, %d (%d bytes) in, %d dropped; relay: %d streams, %d frames onto streams",
		sent, br.FramesOut, br.BytesOut, br.FramesIn, br.BytesIn, br.Dropped, rs.Stats.Streams, rs.Stats.StreamFrames)
	if br.BytesOut < bulk || br.BytesIn < bulk || br.FramesOut < bulk/1500 || rs.Stats.Streams != 1 || rs.Stats.StreamFrames < br.FramesIn/2 {
		t.Errorf("the transfer did not go through the bridge and the relay's stream port")
	}

	say(t, "gw1 lets UDP through again: host1 leaves relay-tcp, the TCP connection stays")
	unblockUDP(t, l.GW1)
	sts = waitRelayTCPPaths(t, bins, hosts, "UDP back at gw1", map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindPunched, {"host2", "host1"}: path.KindPunched,
		{"host1", "pub"}: path.KindDirect, {"pub", "host1"}: path.KindPunched,
	})
	if p := sts["host1"].Paths; p == nil || p.RelayTCP != nil || p.NAT == "blocked" {
		t.Errorf("host1 after UDP came back: %+v", p)
	}
	roundTrip(t, conn, "after leaving relay-tcp")
	streamCheck(t, conn, marker, 256<<10)
	pingPairs(t, hosts, sts)
}

// waitRelayTCPPaths waits until every listed pair is keyed, in the kernel,
// on the expected kind, with the dataplane's outer address the path's
// remote (a relay-tcp peer: a loopback bridge socket), and btmmctl peers
// shows it.
func waitRelayTCPPaths(t *testing.T, bins string, hosts []*pathHost, row string, want map[[2]string]path.Kind) map[string]*agent.Status {
	t.Helper()
	var sts map[string]*agent.Status
	t0 := time.Now()
	testenv.WaitFor(t, row+": every pair on its expected path", 240*time.Second, func() error {
		sts = map[string]*agent.Status{}
		for _, h := range hosts {
			if st, err := h.status(t, bins); err == nil {
				sts[h.name] = st
			}
		}
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
			if p == nil || !p.Keyed || !p.InKernel || p.Path.Kind != kind {
				return fmt.Errorf("%s -> %s: want %v keyed in kernel, have %+v", pair[0], pair[1], kind, p)
			}
			if kind == path.KindRelayTCP && !p.Outer.Addr().IsLoopback() || kind != path.KindRelayTCP && p.Outer != p.Path.Remote {
				return fmt.Errorf("%s -> %s: %v with outer %v (path remote %v)", pair[0], pair[1], kind, p.Outer, p.Path.Remote)
			}
		}
		return nil
	})
	t.Logf("%s: every pair on its expected path after %v", row, time.Since(t0).Round(time.Millisecond))
	for _, h := range hosts {
		out, _ := h.ns.Run(filepath.Join(bins, "btmmctl"), "-socket", h.sock, "peers")
		show(t, "btmmctl peers   # on "+h.name, out)
		for pair, kind := range want {
			if pair[0] != h.name {
				continue
			}
			w := kind.String()
			if kind == path.KindRelayTCP {
				w += " (btmmd carries it)"
			}
			if !strings.Contains(out, w) {
				t.Errorf("%s: btmmctl peers on %s does not show %q", row, h.name, w)
			}
		}
	}
	return sts
}

// pingPairs pings every host's ULA from every other host.
func pingPairs(t *testing.T, hosts []*pathHost, sts map[string]*agent.Status) {
	t.Helper()
	for _, h := range hosts {
		for _, o := range hosts {
			if o == h {
				continue
			}
			testenv.WaitFor(t, "ping "+h.name+" -> "+o.name, 60*time.Second, func() error {
				res, err := h.ns.Run("ping", "-6", "-c", "2", "-i", "0.3", "-W", "3", sts[o.name].ULA.String())
				if err != nil || !strings.Contains(res, " 0% packet loss") {
					return fmt.Errorf("%v\n%s", err, res)
				}
				return nil
			})
		}
	}
}

// pathOuterOK: the dataplane sends to the path's remote endpoint, or, on
// relay-tcp, to a loopback bridge socket.
func pathOuterOK(p *agent.PeerStatus) bool {
	if p.Path.Kind == path.KindRelayTCP {
		return p.Outer.Addr().IsLoopback()
	}
	return p.Outer == p.Path.Remote
}

// udpBlockedRow is the e2e table's "UDP blocked" row (after the double-NAT
// row: host1 behind gw1's EIM NAT, host2 behind gw3 and the carrier NAT):
// gw1 drops all UDP but DNS, host1 goes relay-tcp to both peers (they reach
// it relay-udp) and the TCP connection opened in row 1 carries on; then UDP
// comes back and host1 returns to its UDP paths.
func udpBlockedRow(t *testing.T, pl *pathsLab, conn net.Conn, marker []byte,
	waitPaths func(string, map[[2]string]path.Kind) map[string]*agent.Status,
	pingAll func(map[string]*agent.Status), wantNAT func(string, map[string]*agent.Status, string, string)) {
	t.Helper()
	l := pl.l
	row := "UDP blocked (TCP only)"
	say(t, "Row 7, %s: gw1 drops all UDP but DNS; host1 reaches its peers over the relay's TLS stream", row)
	blockUDP(t, l.GW1)
	sts := waitPaths(row, map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindRelayTCP, {"host2", "host1"}: path.KindRelayUDP,
		{"host1", "pub"}: path.KindRelayTCP, {"pub", "host1"}: path.KindRelayUDP,
		{"host2", "pub"}: path.KindDirect, {"pub", "host2"}: path.KindPunched,
	})
	wantNAT(row, sts, "host1", "blocked")
	for _, n := range []string{"host2", "pub"} {
		if sts[n].Paths.RelayTCP != nil {
			t.Errorf("%s: %s (UDP works) runs a relay-tcp bridge", row, n)
		}
	}
	roundTrip(t, conn, row)
	streamCheck(t, conn, marker, 1<<20)
	pingAll(sts)

	row = "UDP back"
	say(t, "Row 7b, %s: gw1 forwards UDP again; host1 leaves relay-tcp", row)
	unblockUDP(t, l.GW1)
	sts = waitPaths(row, map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindPunched, {"host2", "host1"}: path.KindPunched,
		{"host1", "pub"}: path.KindDirect, {"pub", "host1"}: path.KindPunched,
	})
	// The bridge stops at the measurement that finds UDP working (the
	// first UDP path that answers makes btmmd recheck at once).
	testenv.WaitFor(t, row+": host1 stops the relay-tcp bridge", 30*time.Second, func() error {
		if st := pl.statuses(t)["host1"]; st == nil || st.Paths.RelayTCP != nil {
			return fmt.Errorf("host1 still runs the relay-tcp bridge")
		}
		return nil
	})
	roundTrip(t, conn, row)
	pingAll(sts)
}
