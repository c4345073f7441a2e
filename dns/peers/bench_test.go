package peers_test

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/peers"
)

// BenchmarkPushLatency measures, over b.N changes of host A's published
// address (run with -benchtime=100x), the time from A's update being
// acknowledged by btmm-dnsd (register Status.LastSuccess) to host B's
// tracker delivering the Changed peer, and from SetOuter to delivery.
// Reported as p50/p99 metrics; nothing is asserted. "settle=off" shows the
// raw LLQ push; "settle=20ms" is the default tracker configuration.
func BenchmarkPushLatency(b *testing.B) {
	for _, settle := range []time.Duration{-1, 0} {
		name := "settle=off"
		if settle == 0 {
			name = "settle=20ms"
		}
		b.Run(name, func(b *testing.B) {
			l := startLab(b, 0)
			a := startAgent(b, l, "laptop", 1, time.Hour, settle)
			pb := startAgent(b, l, "desktop", 2, time.Hour, settle)
			pb.next(b, "B discovers A")
			var ackToEvent, setToEvent []time.Duration
			b.ResetTimer()
			for i := range b.N {
				want := netip.AddrPortFrom(netip.MustParseAddr("11.0.0.1"), uint16(20000+i%40000))
				set := time.Now()
				if err := a.reg.SetOuter(want); err != nil {
					b.Fatal(err)
				}
				pb.waitFor(b, "A moved", func(ev peers.Event) bool { return ev.Kind == peers.Changed && ev.Peer.Outer == want })
				got := time.Now()
				// The registrar records the ack right after the reply;
				// wait for that bookkeeping if the push was faster.
				var acked time.Time
				for acked = a.reg.Status().LastSuccess; acked.Before(set); acked = a.reg.Status().LastSuccess {
					time.Sleep(100 * time.Microsecond)
				}
				ackToEvent = append(ackToEvent, got.Sub(acked))
				setToEvent = append(setToEvent, got.Sub(set))
			}
			b.StopTimer()
			report(b, "ack-to-peer", ackToEvent)
			report(b, "set-to-peer", setToEvent)
		})
	}
}

func report(b *testing.B, what string, d []time.Duration) {
	slices.Sort(d)
	p := func(q float64) time.Duration { return d[min(len(d)-1, int(q*float64(len(d))))] }
	b.ReportMetric(float64(p(0.50).Microseconds()), what+"-p50-µs")
	b.ReportMetric(float64(p(0.99).Microseconds()), what+"-p99-µs")
	b.Logf("%s over %d changes: p50 %v p99 %v (min %v max %v)", what, len(d), p(0.5), p(0.99), d[0], d[len(d)-1])
}
