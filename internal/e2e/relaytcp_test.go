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
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/path"
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
// paths, the TCP connection still carrying data. (With ESP, xfrm, the same
// path is the UDP-blocked row of TestConnectivityEverywhere in the VM.)
func TestRelayTCPCleartext(t *testing.T) {
	testenv.RequireNetNS(t)
	if testenv.InVM() {
		t.Skip("host tier: the relay-tcp lab on ebpf-cleartext is the host kernel's run (a paths lab costs the VM minutes under TCG); runs under `make test-netns`")
	}
	testenv.RequireBinary(t, "ping", "iputils-ping")
	pl := newPathsLab(t, "ebpf-cleartext", false)
	l, hosts := pl.l, pl.hosts
	relayName := "relay." + strings.TrimSuffix(zone, ".")

	say(t, "gw1 and gw2: endpoint-independent NATs without PCP; gw1 drops all UDP but DNS")
	setNAT(t, l.GW1, hosts[0].lan, false)
	setNAT(t, l.GW2, hosts[1].lan, false)
	blockUDP(t, l.GW1)
	t0 := time.Now()
	for _, h := range hosts {
		pl.startHost(t, h)
	}
	sts, _ := pl.waitPaths(t, "UDP blocked at gw1", map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindRelayTCP, {"host2", "host1"}: path.KindRelayUDP,
		{"host1", "pub"}: path.KindRelayTCP, {"pub", "host1"}: path.KindRelayUDP,
		{"host2", "pub"}: path.KindDirect, {"pub", "host2"}: path.KindPunched,
	})
	t.Logf("from btmmd's start to every pair on its path: %v", time.Since(t0).Round(time.Millisecond))
	if p := sts["host1"].Paths; p == nil || p.NAT != "blocked" || p.RelayTCP == nil || p.RelayTCP.Carrier != "go" ||
		p.RelayTCP.Server.Name != relayName || !p.RelayTCP.Bridge.Up {
		t.Errorf("host1's paths status: %+v", p)
	}
	for _, n := range []string{"host2", "pub"} {
		if p := sts[n].Paths; p == nil || p.RelayTCP != nil || p.NAT == "blocked" {
			t.Errorf("%s (UDP works) shows %+v: it must never use relay-tcp", n, p)
		}
	}
	out, _ := l.Host1.Run(filepath.Join(pl.bins, "btmmctl"), "-socket", hosts[0].sock, "status")
	show(t, "btmmctl status   # on host1 (UDP blocked)", out)
	for _, w := range []string{"UDP blocked", "relay-tcp", "btmmd carries the data", "ESP in TCP (RFC 8229)"} {
		if !strings.Contains(out, w) {
			t.Errorf("btmmctl status on host1 lacks %q", w)
		}
	}
	pl.pingAll(t, sts)

	say(t, "A byte-checked TCP stream host1 -> host2 through the bridge, the TLS stream and the relay")
	echo := startEcho(t, l.Host2, sts["host2"].ULA)
	conn := dialEcho(t, l.Host1, echo)
	defer conn.Close()
	marker := bytes.Repeat([]byte("RELAY-TCP "), 100)
	const bulk = 2 << 20
	sent := streamCheck(t, conn, marker, bulk)
	checkBridgeCarried(t, pl, sent, bulk)

	say(t, "gw1 lets UDP through again: host1 leaves relay-tcp, the TCP connection stays")
	unblockUDP(t, l.GW1)
	sts, _ = pl.waitPaths(t, "UDP back at gw1", map[[2]string]path.Kind{
		{"host1", "host2"}: path.KindPunched, {"host2", "host1"}: path.KindPunched,
		{"host1", "pub"}: path.KindDirect, {"pub", "host1"}: path.KindPunched,
	})
	if p := sts["host1"].Paths; p == nil || p.RelayTCP != nil || p.NAT == "blocked" {
		t.Errorf("host1 after UDP came back: %+v", p)
	}
	roundTrip(t, conn, "after leaving relay-tcp")
	streamCheck(t, conn, marker, 256<<10)
	pl.pingAll(t, sts)
}

// checkBridgeCarried checks that a transfer of bulk bytes from host1 went
// through host1's bridge (both ways: the echo) and the relay's stream port.
func checkBridgeCarried(t *testing.T, pl *pathsLab, sent, bulk int) {
	t.Helper()
	time.Sleep(2500 * time.Millisecond) // status_file is rewritten every 2 s
	var rs struct {
		Stats struct {
			Streams      int    `json:"streams"`
			StreamFrames uint64 `json:"stream_frames"`
		} `json:"stats"`
	}
	if raw, err := os.ReadFile(pl.relayStatus); err != nil || json.Unmarshal(raw, &rs) != nil {
		t.Fatalf("relay status file: %v", err)
	}
	st1, err := pl.hosts[0].status(t, pl.bins)
	if err != nil {
		t.Fatal(err)
	}
	if st1.Paths == nil || st1.Paths.RelayTCP == nil {
		t.Fatalf("host1 runs no bridge: %+v", st1.Paths)
	}
	br := st1.Paths.RelayTCP.Bridge
	// Frames in are fewer than frames out: in the lab host2's GSO
	// super-packets cross the veths whole and reach the relay's socket as
	// one datagram each (a card would have segmented them); bytes count.
	t.Logf("%d bytes echoed; host1's bridge: %d frames (%d bytes) out, %d (%d bytes) in, %d dropped; relay: %d streams, %d frames onto streams",
		sent, br.FramesOut, br.BytesOut, br.FramesIn, br.BytesIn, br.Dropped, rs.Stats.Streams, rs.Stats.StreamFrames)
	if br.BytesOut < uint64(bulk) || br.BytesIn < uint64(bulk) || br.FramesOut < uint64(bulk/1500) || rs.Stats.Streams != 1 || rs.Stats.StreamFrames < br.FramesIn/2 {
		t.Errorf("the transfer did not go through the bridge and the relay's stream port")
	}
}

// waitPaths waits until every listed pair is keyed, in the kernel, on the
// expected kind, with the dataplane's outer address the path's remote (a
// relay-tcp peer: a loopback bridge socket), and btmmctl peers shows it
// (relay-tcp: "(btmmd carries it)"), without a break for pathsHold. It
// returns the statuses and how long it took until the paths held.
func (pl *pathsLab) waitPaths(t *testing.T, row string, want map[[2]string]path.Kind) (map[string]*agent.Status, time.Duration) {
	t.Helper()
	var sts map[string]*agent.Status
	var outs map[string]string
	t0 := time.Now()
	var okSince time.Time
	testenv.WaitFor(t, row+": every pair on its expected path", 240*time.Second, func() error {
		err := pl.onPaths(t, want, &sts, &outs)
		switch {
		case err != nil:
			okSince = time.Time{}
			return err
		case okSince.IsZero():
			okSince = time.Now()
		}
		// Held for pathsHold: right after a move the statuses may still
		// show the previous row's paths for a moment (the host has not
		// noticed yet), which happen to be this row's.
		if held := time.Since(okSince); held < pathsHold {
			return fmt.Errorf("on the expected paths for %v, want %v", held.Round(time.Millisecond), pathsHold)
		}
		return nil
	})
	took := okSince.Sub(t0).Round(time.Millisecond)
	t.Logf("%s: every pair on its expected path after %v (and still %v later)", row, took, pathsHold)
	for _, h := range pl.hosts {
		if out, ok := outs[h.name]; ok {
			show(t, "btmmctl peers   # on "+h.name, out)
		}
	}
	return sts, took
}

// pathsHold is how long waitPaths wants every pair on its expected path.
const pathsHold = 3 * time.Second

// onPaths checks that every listed pair is keyed, in the kernel, on the
// expected kind with the dataplane's outer address the path's remote, and
// that btmmctl peers on each host shows it; it leaves the statuses and the
// btmmctl outputs in *sts and *outs.
func (pl *pathsLab) onPaths(t *testing.T, want map[[2]string]path.Kind, sts *map[string]*agent.Status, outs *map[string]string) error {
	*sts = pl.statuses(t)
	for pair, kind := range want {
		st := (*sts)[pair[0]]
		if st == nil {
			return fmt.Errorf("%s: no status", pair[0])
		}
		var p *agent.PeerStatus
		for i := range st.Peers {
			if st.Peers[i].Name == pair[1] {
				p = &st.Peers[i]
			}
		}
		if p == nil || !p.Keyed || !p.InKernel || p.Path.Kind != kind || !pathOuterOK(p) {
			return fmt.Errorf("%s -> %s: want %v keyed in kernel, have %+v", pair[0], pair[1], kind, p)
		}
	}
	*outs = map[string]string{}
	for _, h := range pl.hosts {
		if h.d == nil {
			continue
		}
		out, _ := h.ns.Run(filepath.Join(pl.bins, "btmmctl"), "-socket", h.sock, "peers")
		(*outs)[h.name] = out
		for pair, kind := range want {
			if pair[0] != h.name {
				continue
			}
			w := kind.String()
			if kind == path.KindRelayTCP {
				w += " (btmmd carries it)"
			}
			if !strings.Contains(out, w) {
				return fmt.Errorf("btmmctl peers on %s does not show %q:\n%s", h.name, w, out)
			}
		}
	}
	return nil
}

// pingAll pings every running host's ULA from every other one. A path that
// just changed on one side may take a probe round on the other: a generous
// deadline, then no loss.
func (pl *pathsLab) pingAll(t *testing.T, sts map[string]*agent.Status) {
	t.Helper()
	for _, h := range pl.hosts {
		for _, o := range pl.hosts {
			if o == h || h.d == nil || o.d == nil {
				continue
			}
			testenv.WaitFor(t, "ping "+h.name+" -> "+o.name, 60*time.Second, func() error {
				res, err := h.ns.Run("ping", "-6", "-c", "2", "-i", "0.3", "-w", "10", sts[o.name].ULA.String())
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
// it relay-udp) and the TCP connection opened in row 1 carries on (1 MiB
// through the bridge, checked to have gone through it); with tcpdump set
// (ESP) a capture on the relay during that transfer holds no byte of it in
// clear. Then UDP comes back and host1 returns to its UDP paths.
func udpBlockedRow(t *testing.T, pl *pathsLab, conn net.Conn, marker []byte,
	waitPaths func(string, map[[2]string]path.Kind) map[string]*agent.Status,
	pingAll func(map[string]*agent.Status), wantNAT func(string, map[string]*agent.Status, string, string), tcpdump string) {
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
	var capture *exec.Cmd
	pcap := filepath.Join(pl.dir, "relay-tcp.pcap")
	if tcpdump != "" {
		// Both legs: host1's TLS stream (443) and host2's ESP-in-UDP.
		capture = pl.rl.Command(t.Context(), tcpdump, "-q", "-n", "-i", "eth0", "-s", "0", "-U", "-w", pcap, "tcp port 443 or udp")
		if err := pl.rl.StartCmd(capture); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second) // tcpdump starting
	}
	const bulk = 1 << 20
	sent := streamCheck(t, conn, marker, bulk)
	if capture != nil {
		capture.Process.Signal(os.Interrupt)
		capture.Wait()
		raw, err := os.ReadFile(pcap)
		if err != nil || len(raw) < 2*bulk {
			t.Errorf("%s: capture on the relay: %d bytes, %v; want both legs of the transfer", row, len(raw), err)
		}
		if bytes.Contains(raw, marker[:32]) {
			t.Errorf("%s: the relay saw the TCP payload in clear", row)
		}
		t.Logf("%s: %d bytes captured on the relay during the transfer, none of the payload in clear", row, len(raw))
	}
	checkBridgeCarried(t, pl, sent, bulk)
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
