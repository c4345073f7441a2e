package main

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/keying"
	"github.com/btmm/btmm/dns/llqclient"
	"github.com/btmm/btmm/dns/register"
)

// TestMetrics: the collector turns one status snapshot into the documented
// metrics (docs/btmmd.md): per-peer counters and health, keying attempts
// and failures by reason, registration, LLQ and NAT; promlint finds nothing.
func TestMetrics(t *testing.T) {
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	desk, nas := netip.MustParseAddr("fd00::2"), netip.MustParseAddr("fd00::3")
	st := agent.Status{
		Peers: []agent.PeerStatus{
			{PeerStatus: controlplane.PeerStatus{Name: "desk", ULA: desk, Keyed: true, InKernel: true}, Health: agent.PeerHealth{State: agent.HealthOK}},
			{PeerStatus: controlplane.PeerStatus{Name: "nas", ULA: nas}, KeyingError: "peer did not answer",
				Health: agent.PeerHealth{State: agent.HealthStale, Reason: "sending for 20s with no packet back"}},
		},
		Counters:    []controlplane.PeerStats{{ULA: desk, TxPackets: 7, TxBytes: 700, RxPackets: 5, RxBytes: 500, Drops: 1}},
		KeyingStats: &keying.Stats{Attempts: 4, InitsRefused: 2, Failures: map[string]uint64{"timeout": 2, "clock_skew": 1}},
		Register:    register.Status{Published: true, LastSuccess: now.Add(-90 * time.Second), Failures: 0},
		NAT:         agent.NATReport{External: netip.MustParseAddrPort("203.0.113.5:4500"), Status: "mapped by PCP"},
	}
	c := &collector{status: func(context.Context) agent.Status { return st }, now: func() time.Time { return now },
		llq: func() (llqclient.Status, bool) {
			return llqclient.Status{Queries: []llqclient.QueryStatus{{Mode: llqclient.ModeLLQ}, {Mode: llqclient.ModePolling}}}, true
		}}
	want := `
# HELP btmm_keying_attempts_total Key exchanges this host started as initiator.
# TYPE btmm_keying_attempts_total counter
btmm_keying_attempts_total 4
# HELP btmm_keying_failures_total Key exchanges this host started that failed, by reason (timeout, clock_skew, unknown_principal, ...).
# TYPE btmm_keying_failures_total counter
btmm_keying_failures_total{reason="clock_skew"} 1
btmm_keying_failures_total{reason="timeout"} 2
# HELP btmm_peer_health 1 for the peer's current health state (ok, stale, unreachable), 0 for the others.
# TYPE btmm_peer_health gauge
btmm_peer_health{peer="desk",state="ok"} 1
btmm_peer_health{peer="desk",state="stale"} 0
btmm_peer_health{peer="desk",state="unreachable"} 0
btmm_peer_health{peer="nas",state="ok"} 0
btmm_peer_health{peer="nas",state="stale"} 1
btmm_peer_health{peer="nas",state="unreachable"} 0
# HELP btmm_peer_packets_total Inner packets through the tunnel to/from a peer (kernel counters).
# TYPE btmm_peer_packets_total counter
btmm_peer_packets_total{direction="rx",peer="desk"} 5
btmm_peer_packets_total{direction="tx",peer="desk"} 7
# HELP btmm_registration_age_seconds Seconds since the records were last published or refreshed.
# TYPE btmm_registration_age_seconds gauge
btmm_registration_age_seconds 90
# HELP btmm_llq_questions Watched questions by LLQ state (llq: pushed; setup; polling: LLQ unavailable).
# TYPE btmm_llq_questions gauge
btmm_llq_questions{state="llq"} 1
btmm_llq_questions{state="polling"} 1
btmm_llq_questions{state="setup"} 0
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "btmm_keying_attempts_total", "btmm_keying_failures_total",
		"btmm_peer_health", "btmm_peer_packets_total", "btmm_registration_age_seconds", "btmm_llq_questions"); err != nil {
		t.Error(err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %+v", err, problems)
	}
}
