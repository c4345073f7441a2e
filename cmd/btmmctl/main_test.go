package main

import (
	"bytes"
	"encoding/json"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
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
	path := filepath.Join(t.TempDir(), "btmmd.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/status" {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(st)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return path
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
	var back agent.Status
	if err := json.Unmarshal(out.Bytes(), &back); err != nil || len(back.Peers) != 1 || back.Peers[0].Name != "desktop" {
		t.Fatalf("--json: %v %+v", err, back)
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
		"llq        2 questions on 203.0.113.10:53: 1 pushed, 1 polling (server does not sign its responses"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status output lacks %q:\n%s", want, out.String())
		}
	}
}
