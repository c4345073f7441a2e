package agent

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/dns/llqclient"
	"github.com/btmm/btmm/dns/register"
)

func TestDiff(t *testing.T) {
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	desk := func(f func(*PeerStatus)) PeerStatus {
		p := PeerStatus{PeerStatus: controlplane.PeerStatus{Name: "desk", ULA: netip.MustParseAddr("fd00::2"),
			Outer: netip.MustParseAddrPort("198.51.100.7:4500"), OuterBy: "dns", Keyed: true, OutSPI: 1, InSPI: 2, InKernel: true},
			Health: PeerHealth{State: HealthOK}}
		if f != nil {
			f(&p)
		}
		return p
	}
	llq := func(modes ...llqclient.Mode) *llqclient.Status {
		l := &llqclient.Status{Server: "203.0.113.10:53"}
		for _, m := range modes {
			q := llqclient.QueryStatus{Name: "desk.alice.btmm.example.", Mode: m}
			if m == llqclient.ModePolling {
				q.Reason = "no answer to LLQ setup"
			}
			l.Queries = append(l.Queries, q)
		}
		return l
	}
	base := Status{Peers: []PeerStatus{desk(nil)}, NAT: NATReport{External: netip.MustParseAddrPort("203.0.113.5:4500"), Status: "mapped by PCP"},
		Register: register.Status{Published: true, Server: "203.0.113.10:53"}, LLQ: llq(llqclient.ModeLLQ)}
	for _, tc := range []struct {
		name string
		cur  func(*Status)
		want []string
	}{
		{"nothing", func(*Status) {}, nil},
		{"peer added", func(s *Status) {
			s.Peers = append(s.Peers, PeerStatus{PeerStatus: controlplane.PeerStatus{Name: "nas", ULA: netip.MustParseAddr("fd00::3")},
				Health: PeerHealth{State: HealthUnreachable, Reason: "not keyed yet (keying in progress)"}})
		}, []string{"peer_added nas: fd00::3 at none"}},
		{"peer removed", func(s *Status) { s.Peers = nil }, []string{"peer_removed desk"}},
		{"moved, rekeyed, stale", func(s *Status) {
			s.Peers = []PeerStatus{desk(func(p *PeerStatus) {
				p.Outer, p.OuterBy, p.OutSPI = netip.MustParseAddrPort("198.51.100.9:1024"), "keying", 7
				p.Health = PeerHealth{State: HealthStale, Reason: "sending for 20s with no packet back"}
			})}
		}, []string{"peer_moved desk: 198.51.100.7:4500 -> 198.51.100.9:1024 (learnt from keying)",
			"peer_rekeyed desk: out 0x00000001 -> out 0x00000007", "peer_health desk: ok -> stale (sending for 20s with no packet back)"}},
		{"keying failed", func(s *Status) {
			s.Peers = []PeerStatus{desk(func(p *PeerStatus) { p.Keyed, p.KeyingError = false, "peer did not answer" })}
		}, []string{"peer_keying_failed desk (peer did not answer)"}},
		{"nat, registration, llq", func(s *Status) {
			s.NAT = NATReport{Status: "no gateway"}
			s.Register = register.Status{Server: "203.0.113.10:53", Failures: 2, LastError: "BADSIG"}
			s.LLQ = llq(llqclient.ModePolling)
		}, []string{"nat: 203.0.113.5:4500 -> none (no gateway)", "registration: not published (2 failures, last: BADSIG)",
			"llq: llq -> polling (no answer to LLQ setup)"}},
	} {
		cur := base
		cur.Peers = append([]PeerStatus(nil), base.Peers...)
		tc.cur(&cur)
		var got []string
		for _, e := range Diff(&base, &cur, now) {
			if !e.Time.Equal(now) {
				t.Errorf("%s: event time %v", tc.name, e.Time)
			}
			got = append(got, e.String())
		}
		if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
			t.Errorf("%s:\n%s\nwant:\n%s", tc.name, strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
		}
	}
}
