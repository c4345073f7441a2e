package agent

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/relay"
)

// TestNATWatch: the recheck's decisions. A full measurement runs when the
// first responder sees us elsewhere than the last measurement did, when
// it answers after UDP was blocked, and when it does not answer while UDP
// worked; never for the same answer, nor for silence while blocked. When
// not every responder answered the measurement, the first recheck's
// answer becomes the base.
func TestNATWatch(t *testing.T) {
	ap := netip.MustParseAddrPort
	servers := []netip.AddrPort{ap("11.4.0.2:3478"), ap("11.4.0.3:3478")}
	type step struct {
		got  string // "" : no answer
		full bool
		why  string
	}
	for _, tc := range []struct {
		name  string
		nat   relay.NAT
		seen  []netip.AddrPort
		steps []step
	}{
		{"same mapping", relay.NATIndependent, []netip.AddrPort{ap("11.1.0.2:4500"), ap("11.1.0.2:4500")},
			[]step{{"11.1.0.2:4500", false, ""}, {"11.1.0.2:4500", false, ""}}},
		{"NAT replaced", relay.NATIndependent, []netip.AddrPort{ap("11.1.0.2:4500"), ap("11.1.0.2:4500")},
			[]step{{"11.1.0.2:4500", false, ""}, {"11.1.0.2:20001", true, "11.1.0.2:20001 now, was 11.1.0.2:4500"}}},
		{"symmetric stays", relay.NATSymmetric, []netip.AddrPort{ap("11.2.0.2:31000"), ap("11.2.0.2:42000")},
			[]step{{"11.2.0.2:31000", false, ""}}},
		{"symmetric to endpoint-independent", relay.NATSymmetric, []netip.AddrPort{ap("11.2.0.2:31000"), ap("11.2.0.2:42000")},
			[]step{{"11.2.0.2:4500", true, "11.2.0.2:4500 now, was 11.2.0.2:31000"}}},
		{"UDP blocked now", relay.NATIndependent, []netip.AddrPort{ap("11.1.0.2:4500"), ap("11.1.0.2:4500")},
			[]step{{"", true, "no STUN answer"}}},
		{"still blocked", relay.NATBlocked, nil,
			[]step{{"", false, ""}, {"", false, ""}}},
		{"UDP back", relay.NATBlocked, nil,
			[]step{{"", false, ""}, {"11.1.0.2:4500", true, "after UDP was blocked"}}},
		{"second responder only: first answer is the base", relay.NATUnknown, []netip.AddrPort{ap("11.1.0.2:4500")},
			[]step{{"11.1.0.2:7000", false, ""}, {"11.1.0.2:7000", false, ""}, {"11.1.0.2:7001", true, "was 11.1.0.2:7000"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var w natWatch
			w.measured(tc.nat, servers, tc.seen)
			for i, s := range tc.steps {
				var got netip.AddrPort
				if s.got != "" {
					got = ap(s.got)
				}
				full, why := w.checked(got, s.got != "")
				if full != s.full || !strings.Contains(why, s.why) {
					t.Errorf("step %d (answer %q): full %v (%q), want %v (%q)", i, s.got, full, why, s.full, s.why)
				}
			}
		})
	}
	// A PONG's news triggers at most one recheck a second.
	var w natWatch
	t0 := time.Now()
	for i, want := range []bool{true, false, false, true} {
		at := t0.Add([]time.Duration{0, 10 * time.Millisecond, 900 * time.Millisecond, 1100 * time.Millisecond}[i])
		if got := w.seenChanged(at); got != want {
			t.Errorf("seenChanged at +%v = %v, want %v", at.Sub(t0), got, want)
		}
	}
}
