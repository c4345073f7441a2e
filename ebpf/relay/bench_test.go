package relay

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/testenv"
)

// BenchmarkRelayThroughput (reported, not asserted; docs/benchmarks.md):
// 1400-byte ESP-like datagrams from host a to host b for 1 s, five rounds,
// the three paths alternating within each round: direct (through the
// router only), through the relay's kernel forwarder, through the relay's
// Go fallback. Reports the median and spread of what b received, the
// ratios against direct, and how many datagrams the relay's Go code
// forwarded on the kernel path (0: Go idle).
//
//	sudo go test -run '^$' -bench RelayThroughput -benchtime 1x ./ebpf/relay/
func BenchmarkRelayThroughput(b *testing.B) {
	testenv.RequireNetNS(b)
	ctx := context.Background()
	type path struct {
		name string
		from *host
		to   netip.AddrPort
		rx   *host
	}
	var paths []path
	var kernelTopo *topo
	for _, mode := range []string{"kernel", "go"} {
		tp := newTopo(b, mode, false)
		if mode == "kernel" {
			kernelTopo = tp
			b.Cleanup(func() { tp.fw.Close() })
		}
		ha := newHost(b, tp.a, hostA, "a.alice.btmm.example.", tp.cred)
		hb := newHost(b, tp.b, hostB, "b.alice.btmm.example.", tp.cred)
		server := netip.AddrPortFrom(relayAddr, 3478)
		aa, err := ha.cl.Allocate(ctx, server, 0)
		must(b, err)
		ba, err := hb.cl.Allocate(ctx, server, 0)
		must(b, err)
		must(b, ha.cl.Bind(ctx, ba.Relayed, aa))
		must(b, hb.cl.Bind(ctx, aa.Relayed, ba))
		paths = append(paths, path{"relay-" + mode, ha, ba.Relayed, hb})
		if mode == "kernel" {
			paths = append(paths, path{"direct", ha, hostB, hb})
		}
	}
	const size, rounds = 1400, 5
	results := map[string][]float64{}
	for i := 0; i < b.N; i++ {
		for r := 0; r < rounds; r++ {
			for _, p := range paths {
				results[p.name] = append(results[p.name], blast(p.from, p.rx, p.to, size, time.Second))
			}
		}
	}
	med := map[string]float64{}
	for _, p := range paths {
		v := slices.Clone(results[p.name])
		slices.Sort(v)
		med[p.name] = v[len(v)/2]
		b.Logf("%-12s median %7.1f Mbit/s  (min %.1f, max %.1f, n=%d)", p.name, v[len(v)/2], v[0], v[len(v)-1], len(v))
		b.ReportMetric(v[len(v)/2], p.name+"-Mbit/s")
	}
	b.ReportMetric(med["relay-kernel"]/med["direct"], "kernel/direct")
	b.ReportMetric(med["relay-go"]/med["direct"], "go/direct")
	st := kernelTopo.srv.Stats()
	b.Logf("kernel path: relay Go forwarded %d ESP datagrams, the kernel %d; kernel/direct %.2f, go/direct %.2f",
		st.GoForwardedESP, st.KernelForwarded, med["relay-kernel"]/med["direct"], med["relay-go"]/med["direct"])
	b.ReportMetric(float64(st.GoForwardedESP), "go-forwarded-on-kernel-path")
}

// blast sends size-byte datagrams from h to 'to' for d and returns the
// rate at which they arrived on rx's interface (its kernel counters, so the
// receiving application's speed does not enter), in Mbit/s.
func blast(h, rx *host, to netip.AddrPort, size int, d time.Duration) float64 {
	rxBytes := func() uint64 {
		l, err := rx.ns.LinkByName("b0")
		if err != nil {
			return 0
		}
		return l.Attrs().Statistics.RxBytes
	}
	before := rxBytes()
	p := make([]byte, size)
	p[0], p[3] = 0x10, 0x01 // a non-zero SPI: ESP, not the non-ESP marker
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		for range 64 {
			h.conn.WriteToUDPAddrPort(p, to)
		}
	}
	time.Sleep(100 * time.Millisecond)
	for len(rx.rx) > 0 {
		<-rx.rx
	}
	return float64(rxBytes()-before) * 8 / d.Seconds() / 1e6
}
