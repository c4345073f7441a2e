package peers_test

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/peers"
	"github.com/btmm/btmm/internal/benchrun"
)

// BenchmarkPushLatency measures, at one clock, how long a change of host
// A's published address takes to reach host B as a Changed peer: from
// A's SetOuter (the registrar sends the signed UPDATE to btmm-dnsd) to B's
// tracker delivering the event (btmm-dnsd's LLQ event, received, acked,
// settled). Both agents and the server run in this process, so both ends
// are timestamped by the same clock. Two labs side by side, alternated
// over benchrun.Rounds() rounds of 40 changes: the tracker with settling off
// (the raw push) and with its default 20 ms settle. Reported, not asserted.
//
//	go test -run '^$' -bench PushLatency -benchtime 1x ./dns/peers/
func BenchmarkPushLatency(b *testing.B) {
	type pair struct{ a, b *agent }
	start := func(settle time.Duration) pair {
		l := startLab(b, 0)
		a := startAgent(b, l, "laptop", 1, time.Hour, settle)
		pb := startAgent(b, l, "desktop", 2, time.Hour, settle)
		pb.next(b, "B discovers A")
		return pair{a, pb}
	}
	port := uint16(20000)
	round := func(p pair) func(testing.TB) []benchrun.Metric {
		return func(testing.TB) []benchrun.Metric {
			var lat []time.Duration
			for range 40 {
				port++
				want := netip.AddrPortFrom(netip.MustParseAddr("11.0.0.1"), port)
				set := time.Now()
				if err := p.a.reg.SetOuter(want); err != nil {
					b.Fatal(err)
				}
				p.b.waitFor(b, "A moved", func(ev peers.Event) bool { return ev.Kind == peers.Changed && ev.Peer.Outer == want })
				lat = append(lat, time.Since(set))
			}
			slices.Sort(lat)
			ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
			return []benchrun.Metric{{Value: ms(lat[len(lat)/2]), Unit: "p50-ms"}, {Value: ms(lat[len(lat)*99/100]), Unit: "p99-ms"}}
		}
	}
	off, on := start(-1), start(0)
	benchrun.Alternate(b, "push latency at one clock: host A's SetOuter (signed UPDATE to btmm-dnsd) to host B's tracker "+
		"emitting the Changed peer (LLQ event received and acked), 40 changes a round, p50/p99 per round; "+
		"tracker settle off vs the default 20 ms; agents and btmm-dnsd in one process on 127.0.0.1",
		"settle-off",
		benchrun.Case{Name: "settle-off", Run: round(off)},
		benchrun.Case{Name: "settle-20ms", Run: round(on)},
	)
}
