package agent

import (
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/keying"
	"github.com/btmm/btmm/controlplane/relay"
	"github.com/btmm/btmm/dns/register"
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

// TestRefreshAbandonedOnMove: a measurement under way when our network
// changes (Kick) is abandoned at once, publishing nothing it measured on
// the old network (row 4 of the e2e table: the relay lookup waited 3 s on
// a socket of the old address, then published the old LAN address), and
// the kick stays queued for the next measurement.
func TestRefreshAbandonedOnMove(t *testing.T) {
	tr, err := keying.ListenUDP(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	a := &Agent{cfg: Config{Transport: tr, Host: "h", Domain: "alice.btmm.example."}, log: slog.New(slog.DiscardHandler)}
	asked := make(chan struct{})
	p, err := newPaths(a, PathsConfig{
		Servers: func(ctx context.Context) ([]netip.AddrPort, error) {
			close(asked)
			<-ctx.Done() // a lookup stuck on the old network
			return nil, ctx.Err()
		},
		LocalAddrs: func() []netip.Addr { return []netip.Addr{netip.MustParseAddr("192.168.1.3")} },
	}, register.Capabilities{})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan time.Duration, 1)
	go func() { done <- p.refresh(context.Background()) }()
	<-asked
	t0 := time.Now()
	p.Kick()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the measurement went on after the move")
	}
	t.Logf("abandoned %v after the move", time.Since(t0).Round(time.Microsecond))
	st := p.status()
	if st.LastError != "" || len(st.Candidates) != 0 {
		t.Errorf("the abandoned measurement left error %q and candidates %v", st.LastError, st.Candidates)
	}
	select {
	case <-p.kick:
	default:
		t.Error("no measurement queued after the move")
	}
}
