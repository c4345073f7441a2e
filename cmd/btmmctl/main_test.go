package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/keying"
	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/dns/llqclient"
	"github.com/btmm/btmm/dns/register"
)

// serve answers GET /v1/status on a unix socket with st, as btmmd does.
func serve(t *testing.T, st agent.Status) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "btmmd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/status":
			json.NewEncoder(w).Encode(st)
		case "/v1/ping":
			if r.FormValue("peer") != "desktop" {
				http.Error(w, "no such peer: \""+r.FormValue("peer")+"\" (btmmctl peers lists them)", http.StatusNotFound)
				return
			}
			seq, _ := strconv.Atoi(r.FormValue("seq"))
			res := agent.PingResult{Peer: "desktop", ULA: netip.MustParseAddr("fd00::2"), Seq: seq, RTT: 2500 * time.Microsecond,
				Path:     path.Path{Kind: path.KindDirect, Local: netip.MustParseAddrPort("192.168.1.2:4500"), Remote: netip.MustParseAddrPort("11.0.0.1:40001")},
				External: netip.MustParseAddrPort("11.1.0.2:4500"), OuterSource: "dns", InTunnel: true}
			if seq == 2 {
				res.RTT, res.Error = 0, "no reply from fd00::2 within 2s"
			}
			json.NewEncoder(w).Encode(res)
		case "/v1/watch":
			for _, e := range []agent.Event{{Type: "watching", To: "laptop.alice.btmm.example"},
				{Type: "peer_health", Peer: "desktop", From: "ok", To: "stale", Reason: "sending for 20s with no packet back"}} {
				json.NewEncoder(w).Encode(e)
			}
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		default:
			http.NotFound(w, r)
		}
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func TestStatusAndPeers(t *testing.T) {
	st := agent.Status{
		Host: "laptop", Domain: "alice.btmm.example.", ULA: netip.MustParseAddr("fd00::1"), Label: "AutoTunnel-00-11-22-FF-FE-33-44-55",
		Dataplane: "ebpf-cleartext", TunnelPort: 4500,
		NAT: agent.NATReport{External: netip.MustParseAddrPort("11.1.0.2:4500"), Status: "mapped via PCP"},
		Peers: []agent.PeerStatus{{PeerStatus: controlplane.PeerStatus{Name: "desktop", ULA: netip.MustParseAddr("fd00::2"), Outer: netip.MustParseAddrPort("11.0.0.1:40001"), OuterBy: "path", Keyed: true, OutSPI: 0x1001, InSPI: 0x2002, InKernel: true},
			Path: path.Path{Kind: path.KindRelayUDP, Remote: netip.MustParseAddrPort("11.0.0.1:40001")}}},
		Paths: &agent.PathsStatus{NAT: "symmetric", NATText: "symmetric", Reflexive: []netip.AddrPort{netip.MustParseAddrPort("11.1.0.2:61000")},
			Relay: netip.MustParseAddrPort("11.0.0.1:40000"), Candidates: []register.Candidate{{Kind: "lan", Addr: netip.MustParseAddrPort("192.168.1.2:4500")}}},
		Repair:      &controlplane.Repair{At: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC), Count: 2, What: []string{"add state spi 0x00001001"}},
		Conflicts:   []agent.Conflict{{ULA: netip.MustParseAddr("fd00::3"), Names: []string{"mallory", "nas"}}},
		KeyingStats: &keying.Stats{Datagrams: 900, BadMAC1: 7, RateLimited: 800, CookiesSent: 12},
		Network: agent.NetworkStatus{Following: true, Online: true, State: "default via 192.168.2.1 dev eth0 src 192.168.2.3", Keepalive: "20s",
			Last: time.Date(2025, 3, 1, 12, 5, 0, 0, time.UTC), Reasons: []string{"outer address changed: 192.168.1.2 -> 192.168.2.3"}, Took: "262ms"},
	}
	sock := serve(t, st)
	var out, errOut bytes.Buffer
	if code := run([]string{"-socket", sock, "status"}, &out, &errOut); code != 0 {
		t.Fatalf("status exit %d: %s", code, errOut.String())
	}
	for _, want := range []string{"laptop.alice.btmm.example", "fd00::1", "11.1.0.2:4500", "WARNING: CLEARTEXT", "desktop", "out 0x00001001 in 0x00002002",
		"paths      NAT: symmetric (reflexive 11.1.0.2:61000)", "relay      11.0.0.1:40000", "candidates lan/192.168.1.2:4500", "relay-udp  11.0.0.1:40001",
		"repaired   2 times, last 2025-03-01T12:00:00Z: add state spi 0x00001001",
		"conflict   ULA fd00::3 is claimed by mallory, nas: keyed with none of them",
		"handshake  900 datagrams: 7 failed the cheap check, 800 rate-limited, 12 cookies sent",
		"network    online, default via 192.168.2.1 dev eth0 src 192.168.2.3; NAT keepalive 20s; last change 2025-03-01T12:05:00Z (outer address changed: 192.168.1.2 -> 192.168.2.3), followed in 262ms"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status output lacks %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	if code := run([]string{"-socket", sock, "--json", "peers"}, &out, &errOut); code != 0 {
		t.Fatalf("peers --json exit %d", code)
	}
	var back StatusJSON
	if err := json.Unmarshal(out.Bytes(), &back); err != nil || len(back.Peers) != 1 || back.Peers[0].Name != "desktop" ||
		back.Schema != schemaVersion || back.Host != "" {
		t.Fatalf("peers --json: %v %+v", err, back)
	}
}

// snakeKeys fails t for any JSON object key that is not snake_case.
func snakeKeys(t *testing.T, what string, b []byte) {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("%s: %v\n%s", what, err, b)
	}
	re := regexp.MustCompile(`^[a-z][a-z0-9]*(_[a-z0-9]+)*$`)
	var walk func(v any)
	walk = func(v any) {
		switch x := v.(type) {
		case map[string]any:
			for k, e := range x {
				if !re.MatchString(k) {
					t.Errorf("%s: key %q is not snake_case", what, k)
				}
				walk(e)
			}
		case []any:
			for _, e := range x {
				walk(e)
			}
		}
	}
	walk(v)
}

// TestJSONSchema: status --json is the documented schema (docs/btmmctl.md):
// snake_case keys everywhere, durations in seconds, health per peer; the
// flag works after the command too.
func TestJSONSchema(t *testing.T) {
	now := time.Now()
	st := agent.Status{Host: "laptop", Domain: "alice.btmm.example.", ULA: netip.MustParseAddr("fd00::1"), Dataplane: "xfrm", TunnelPort: 4500,
		Started:     now.Add(-90 * time.Second),
		Register:    register.Status{Published: true, Server: "203.0.113.10:53", Lease: 90 * time.Minute, LeaseEchoed: true},
		LLQ:         &llqclient.Status{Server: "203.0.113.10:53", Queries: []llqclient.QueryStatus{{Name: "_autotunnel._udp.alice.btmm.example.", Type: "PTR", Mode: llqclient.ModeLLQ, Lease: time.Hour}}},
		Network:     agent.NetworkStatus{Following: true, Online: true, Keepalive: "20s", Took: "262ms"},
		KeyingStats: &keying.Stats{Datagrams: 3},
		Names:       &agent.NamesStatus{Mechanism: "hosts", Detail: "block in /etc/hosts", Why: "systemd-resolved is not running"},
		Counters:    []controlplane.PeerStats{{ULA: netip.MustParseAddr("fd00::2"), TxPackets: 5, RxPackets: 4}},
		Peers: []agent.PeerStatus{{PeerStatus: controlplane.PeerStatus{Name: "desktop", ULA: netip.MustParseAddr("fd00::2"),
			Outer: netip.MustParseAddrPort("11.0.0.1:40001"), OuterBy: "dns", Keyed: true, OutSPI: 0x1001, InSPI: 0x2002, InKernel: true},
			Health: agent.PeerHealth{State: agent.HealthOK, LastHandshake: now.Add(-time.Minute), LastReceived: now.Add(-5 * time.Second)}}},
	}
	sock := serve(t, st)
	var out, errOut bytes.Buffer
	if code := run([]string{"-socket", sock, "status", "--json"}, &out, &errOut); code != 0 {
		t.Fatalf("status --json exit %d: %s", code, errOut.String())
	}
	snakeKeys(t, "status --json", out.Bytes())
	var back StatusJSON
	if err := json.Unmarshal(out.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	p := back.Peers[0]
	if back.Schema != 1 || back.UptimeSeconds < 89 || back.Registration.LeaseSeconds != 5400 || back.Network.KeepaliveSeconds != 20 ||
		back.Network.LastTookSeconds != 0.262 || back.LLQ.Mode != "llq" || back.LLQ.Questions[0].LeaseSeconds != 3600 ||
		p.Health.State != "ok" || p.Health.LastHandshakeSeconds < 59 || p.Health.LastReceivedSeconds < 4 ||
		p.Counters == nil || p.Counters.RxPackets != 4 || back.Keying.Datagrams != 3 ||
		back.Names == nil || back.Names.Mechanism != "hosts" || back.Names.Why != "systemd-resolved is not running" {
		t.Errorf("status --json:\n%s", out.String())
	}
	for _, key := range []string{`"uptime_seconds"`, `"lease_seconds"`, `"last_handshake"`, `"last_received_seconds_ago"`, `"in_kernel"`} {
		if !strings.Contains(out.String(), key) {
			t.Errorf("status --json lacks %s", key)
		}
	}
}

// TestHealthInTables: the peers table has a health column; long errors
// are shortened there and shown whole by `btmmctl status PEER`.
func TestHealthInTables(t *testing.T) {
	now := time.Now()
	long := "keying with nas (fd00::3): peer refused the exchange: unknown Kerberos principal: KDC_ERR_S_PRINCIPAL_UNKNOWN host/nas.alice.btmm.example@BTMM.EXAMPLE\n(kadmin addprinc it)"
	st := agent.Status{Host: "laptop", Domain: "alice.btmm.example.",
		Peers: []agent.PeerStatus{
			{PeerStatus: controlplane.PeerStatus{Name: "desktop", ULA: netip.MustParseAddr("fd00::2"), Outer: netip.MustParseAddrPort("11.0.0.1:4500"), OuterBy: "dns", Keyed: true, InKernel: true},
				Health: agent.PeerHealth{State: agent.HealthStale, Reason: "sending for 20s with no packet back (last packet received 35s ago; 3 echoes through the tunnel unanswered)",
					LastHandshake: now.Add(-10 * time.Minute), LastReceived: now.Add(-35 * time.Second)}},
			{PeerStatus: controlplane.PeerStatus{Name: "nas", ULA: netip.MustParseAddr("fd00::3"), Outer: netip.MustParseAddrPort("11.0.0.3:4500"), OuterBy: "dns"},
				KeyingError: long, Health: agent.PeerHealth{State: agent.HealthUnreachable, Reason: "not keyed: " + long}},
		}}
	sock := serve(t, st)
	var out, errOut bytes.Buffer
	if code := run([]string{"-socket", sock, "peers"}, &out, &errOut); code != 0 {
		t.Fatalf("peers exit %d: %s", code, errOut.String())
	}
	table := out.String()
	for _, want := range []string{"HEALTH", "stale: sending for 20s with no packet back (...", "unreachable: not keyed: keying with nas (fd00::3):...", "error: keying with nas (fd00::3): peer refused the e...",
		"10m0s ago", "35s ago", "(shortened: btmmctl status PEER shows the whole text)"} {
		if !strings.Contains(table, want) {
			t.Errorf("peers table lacks %q:\n%s", want, table)
		}
	}
	for _, l := range strings.Split(strings.TrimSpace(table), "\n") {
		if len(l) > 300 || strings.Contains(l, "kadmin addprinc") {
			t.Errorf("a table line holds the whole error: %q", l)
		}
	}
	out.Reset()
	if code := run([]string{"-socket", sock, "status", "nas.alice.btmm.example"}, &out, &errOut); code != 0 {
		t.Fatalf("status nas exit %d: %s", code, errOut.String())
	}
	for _, want := range []string{"health        unreachable", oneLine(long), "handshake     never"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status nas lacks %q:\n%s", want, out.String())
		}
	}
	errOut.Reset()
	if code := run([]string{"-socket", sock, "status", "printer"}, &out, &errOut); code != 1 || !strings.Contains(errOut.String(), `no peer "printer" (peers: desktop, nas)`) {
		t.Errorf("status printer: exit %d, %q", code, errOut.String())
	}
}

// TestPing: one line per echo with the round trip, the path and outer
// endpoints; a lost echo says so; a summary; --json lines; unknown peers.
func TestPing(t *testing.T) {
	sock := serve(t, agent.Status{})
	var out, errOut bytes.Buffer
	if code := run([]string{"-socket", sock, "ping", "-c", "3", "-i", "0.01", "desktop"}, &out, &errOut); code != 0 {
		t.Fatalf("ping exit %d: %s", code, errOut.String())
	}
	for _, want := range []string{"pong from desktop (fd00::2) seq 1 in 2.50ms via direct 192.168.1.2:4500 -> 11.0.0.1:40001 (we are 11.1.0.2:4500 to it)",
		"desktop (fd00::2) seq 2: no reply from fd00::2 within 2s", "--- desktop: 3 echoes, 2 replies, rtt min/median/max 2.50ms/2.50ms/2.50ms"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("ping output lacks %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	if code := run([]string{"-socket", sock, "--json", "ping", "-c", "1", "desktop"}, &out, &errOut); code != 0 {
		t.Fatalf("ping --json exit %d: %s", code, errOut.String())
	}
	snakeKeys(t, "ping --json", out.Bytes())
	var pj PingJSON
	if err := json.Unmarshal(out.Bytes(), &pj); err != nil || !pj.OK || pj.RTTSeconds != 0.0025 || pj.Path.Kind != "direct" || !pj.InTunnel {
		t.Errorf("ping --json: %v %s", err, out.String())
	}
	errOut.Reset()
	if code := run([]string{"-socket", sock, "ping", "printer"}, &out, &errOut); code != 1 || !strings.Contains(errOut.String(), `no such peer: "printer"`) {
		t.Errorf("ping printer: exit %d, %q", code, errOut.String())
	}
}

// TestWatch prints btmmd's events as they come, as text or JSON lines.
func TestWatch(t *testing.T) {
	sock := serve(t, agent.Status{})
	defer func(f func() (context.Context, context.CancelFunc)) { interrupted = f }(interrupted)
	interrupted = func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), time.Second)
	}
	for _, asJSON := range []bool{false, true} {
		var out, errOut bytes.Buffer
		args := []string{"-socket", sock, "watch"}
		if asJSON {
			args = append(args, "--json")
		}
		if code := run(args, &out, &errOut); code != 0 {
			t.Fatalf("watch exit %d: %s", code, errOut.String())
		}
		if asJSON {
			snakeKeys(t, "watch --json", bytes.SplitN(out.Bytes(), []byte("\n"), 2)[0])
			if !strings.Contains(out.String(), `"type":"peer_health","peer":"desktop","from":"ok","to":"stale"`) {
				t.Errorf("watch --json:\n%s", out.String())
			}
		} else if !strings.Contains(out.String(), "peer_health desktop: ok -> stale (sending for 20s with no packet back)") {
			t.Errorf("watch:\n%s", out.String())
		}
	}
}

func TestErrors(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"-socket", filepath.Join(t.TempDir(), "none.sock"), "status"}, &out, &errOut); code != 1 ||
		!strings.Contains(errOut.String(), "is it running?") {
		t.Errorf("no btmmd: exit %d, %q", code, errOut.String())
	}
	errOut.Reset()
	if code := run([]string{"frobnicate"}, &out, &errOut); code != 2 || !strings.Contains(errOut.String(), "unknown command") {
		t.Errorf("unknown command: exit %d, %q", code, errOut.String())
	}
}

// The signing policy shows: unsigned answers accepted, and why LLQs poll.
func TestStatusSigningPolicy(t *testing.T) {
	st := agent.Status{Host: "laptop", Domain: "alice.btmm.example.",
		Register: register.Status{Published: true, Server: "203.0.113.10:53", Lease: time.Hour, LeaseEchoed: true, AcceptUnsigned: true},
		Names:    &agent.NamesStatus{Mechanism: "resolved", Detail: "systemd-resolved, link btmm0: DNS 127.0.0.77:53, domain alice.btmm.example, not default route"},
		LLQ: &llqclient.Status{Server: "203.0.113.10:53", Polling: 1, Queries: []llqclient.QueryStatus{
			{Name: "_autotunnel._udp.alice.btmm.example.", Type: "PTR", Mode: llqclient.ModeLLQ},
			{Name: "desktop.alice.btmm.example.", Type: "AAAA", Mode: llqclient.ModePolling, Reason: "server does not sign its responses (accept_unsigned accepts them, for Apple's dnsextd)"},
		}}}
	sock := serve(t, st)
	var out, errOut bytes.Buffer
	if code := run([]string{"-socket", sock, "status"}, &out, &errOut); code != 0 {
		t.Fatalf("status exit %d: %s", code, errOut.String())
	}
	for _, want := range []string{"UNSIGNED answers accepted (dns.accept_unsigned)",
		"llq        2 questions on 203.0.113.10:53: 1 pushed, 1 polling (server does not sign its responses",
		"names      resolved: systemd-resolved, link btmm0: DNS 127.0.0.77:53, domain alice.btmm.example, not default route\n"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status output lacks %q:\n%s", want, out.String())
		}
	}
}

// btmmctl peers shows a tunnel path's kind, device and remote (issue 15).
func TestPeersTunnelPath(t *testing.T) {
	ula := netip.MustParseAddr("fd00::2")
	dev := controlplane.TunnelDevice(controlplane.PathIPv6, ula)
	st := agent.Status{Host: "laptop", Domain: "alice.btmm.example.", ULA: netip.MustParseAddr("fd00::1"), TunnelPort: 4500,
		Peers: []agent.PeerStatus{{PeerStatus: controlplane.PeerStatus{Name: "desktop", ULA: ula, Outer: netip.MustParseAddrPort("11.2.0.2:4500"),
			OuterBy: "dns", Keyed: true, OutSPI: 0x1001, InSPI: 0x2002, InKernel: true, Via: controlplane.PathIPv6, Device: dev,
			Tunnels: []controlplane.Tunnel{{Kind: controlplane.PathIPv6, Remote: netip.MustParseAddrPort("[2001:db8:2::2]:0")}}},
			Path: path.Path{Kind: path.KindIPv6, Remote: netip.MustParseAddrPort("[2001:db8:2::2]:4500")}}},
	}
	sock := serve(t, st)
	var out, errOut bytes.Buffer
	if code := run([]string{"-socket", sock, "peers"}, &out, &errOut); code != 0 {
		t.Fatalf("peers exit %d: %s", code, errOut.String())
	}
	if want := "ipv6 dev " + dev + "  2001:db8:2::2"; !strings.Contains(out.String(), want) {
		t.Errorf("peers output lacks %q:\n%s", want, out.String())
	}
}

// TestNetcheckWithBtmmd: with btmmd running, netcheck shows the tunnel
// port's mapping, the NAT kind and UDP reachability found by STUN, the
// registration and the LLQ mode with its reason, in the table and --json.
func TestNetcheckWithBtmmd(t *testing.T) {
	st := agent.Status{Host: "laptop", Domain: "alice.btmm.example.", Dataplane: "xfrm", TunnelPort: 4500,
		NAT:      agent.NATReport{External: netip.MustParseAddrPort("203.0.113.5:4500"), Status: "mapped by PCP", BehindNAT: true},
		Register: register.Status{Published: true, Server: "203.0.113.10:53", Lease: time.Hour},
		LLQ: &llqclient.Status{Server: "203.0.113.10:53", Queries: []llqclient.QueryStatus{
			{Name: "desk.alice.btmm.example.", Type: "AAAA", Mode: llqclient.ModePolling, Reason: "no answer to LLQ setup"}}},
		Paths: &agent.PathsStatus{NAT: "address-dependent", NATText: "address-dependent mapping (symmetric): direct paths need the peer's help or a relay",
			Reflexive: []netip.AddrPort{netip.MustParseAddrPort("203.0.113.5:40001")}}}
	sock := serve(t, st)
	kc := filepath.Join(t.TempDir(), "krb5.conf") // none: PSK
	var out, errOut bytes.Buffer
	if code := run([]string{"-socket", sock, "-krb5-conf", kc, "netcheck"}, &out, &errOut); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	for _, want := range []string{"tunnel 4500/udp", "external 203.0.113.5:4500 (mapped by PCP)", "nat kind", "address-dependent",
		"STUN answered: seen from 203.0.113.5:40001", "llq", "polling: 0 of 1 questions pushed, 1 polling (no answer to LLQ setup)"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("netcheck lacks %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	run([]string{"-socket", sock, "-krb5-conf", kc, "netcheck", "--json"}, &out, &errOut)
	snakeKeys(t, "netcheck --json", out.Bytes())
	var n Netcheck
	if err := json.Unmarshal(out.Bytes(), &n); err != nil || n.Schema != 1 || n.NAT == nil || !n.NAT.UDP || n.NAT.Kind != "address-dependent" ||
		!n.NAT.BehindNAT || n.LLQ == nil || n.LLQ.Mode != "polling" || n.DNS == nil || !n.DNS.Registered {
		t.Errorf("netcheck --json: %v\n%s", err, out.String())
	}
	// Without path selection the NAT kind is unknown, and says why.
	st.Paths = nil
	sock = serve(t, st)
	out.Reset()
	run([]string{"-socket", sock, "-krb5-conf", kc, "netcheck"}, &out, &errOut)
	if !strings.Contains(out.String(), "no path selection (no STUN servers configured)") {
		t.Errorf("netcheck without paths:\n%s", out.String())
	}
}
