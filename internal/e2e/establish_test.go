package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/internal/benchrun"
	"github.com/btmm/btmm/internal/lab"
	"github.com/btmm/btmm/internal/testenv"
)

// TestPathEstablishmentCleartext is issue 14's connection-establishment
// benchmark (reported, never asserted; `make bench`) on the host kernel
// with the ebpf-cleartext dataplane: for each path kind, how long from the
// LLQ event that tells host1 of a peer that just started to the first echo
// reply from the peer's ULA, and to host1 choosing the expected path; then
// relay throughput against direct throughput and the relay's own CPU,
// alternated rounds in the same run.
func TestPathEstablishmentCleartext(t *testing.T) { establish(t, "ebpf-cleartext") }

// TestVMPathEstablishment is the same benchmark with ESP (xfrm) in the VM
// (`make bench-vm`).
func TestVMPathEstablishment(t *testing.T) { establish(t, "xfrm") }

// establish: host1 stays behind gw1 (endpoint-independent NAT, no PCP) and
// runs btmmd throughout; the peer starts and stops once per try:
//
//	kind       peer
//	direct     pub (public address)
//	lan        host2 behind gw1 too (no hairpinning)
//	punched    host2 behind gw2 (endpoint-independent, no PCP)
//	relay-udp  host2 behind gw3 (symmetric: masquerade random,fully-random)
//
// BTMM_BENCH_TRIES tries of each kind (default 20), the kinds' order
// rotated every round. Before each try the peer's NAT forgets everything
// and gw1 forgets every mapping towards the peer's side, so no try rides on
// holes a previous one punched.
func establish(t *testing.T, dp string) {
	tries := benchStart(t, dp, "path-establishment", "BTMM_BENCH_TRIES")
	pl := newPathsLab(t, dp, false)
	l := pl.l
	h1, h2, pub := pl.hosts[0], pl.hosts[1], pl.hosts[2]
	setNAT(t, l.GW1, "192.168.1.0/24", false)
	setNAT(t, l.GW2, "192.168.2.0/24", false)
	setNAT(t, l.GW3, "192.168.3.0/24", true)
	pl.startHost(t, h1)
	testenv.WaitFor(t, "host1 ready (registered, LLQ up)", 60*time.Second, func() error {
		if logTime(h1.d.log.String(), time.Time{}, "msg=ready").IsZero() {
			return fmt.Errorf("not ready")
		}
		return nil
	})

	type kindCase struct {
		kind  path.Kind
		peer  *pathHost
		place lab.Place // host2's place ("" for pub)
	}
	cases := []kindCase{
		{path.KindDirect, pub, ""},
		{path.KindLAN, h2, lab.BehindGW1},
		{path.KindPunched, h2, lab.BehindGW2},
		{path.KindRelayUDP, h2, lab.BehindGW3},
	}
	// The peers' side of the lab, as gw1 sees it: its conntrack entries
	// towards these go before each try.
	peerSide := map[netip.Addr]bool{}
	for _, a := range []string{lab.GW2WAN, lab.GW3WAN, "11.3.0.2", "192.168.1.3"} {
		peerSide[netip.MustParseAddr(a)] = true
	}
	forget := func() {
		flushConntrack(t, l.GW2)
		flushConntrack(t, l.GW3)
		if _, err := l.GW1.Handle.ConntrackDeleteFilters(netlink.ConntrackTable, netlink.FAMILY_V4, flowsWith(peerSide)); err != nil {
			t.Fatalf("gw1's conntrack entries towards the peers: %v", err)
		}
	}
	stop := func(peer *pathHost) {
		stopWithin(t, &peer.host, 45*time.Second)
		peer.d = nil
		testenv.WaitFor(t, "host1 forgets "+peer.name, 60*time.Second, func() error {
			st, err := h1.status(t, pl.bins)
			if err != nil {
				return err
			}
			for _, p := range st.Peers {
				if p.Name == peer.name {
					return fmt.Errorf("still has %s", peer.name)
				}
			}
			return nil
		})
	}
	// One ping per peer runs throughout (ping cannot start without a
	// route to the ULA, which host1 has only while it knows the peer; it
	// keeps running when the route goes): a first, unmeasured start of
	// each peer.
	pingers := map[string]*pinger{}
	if err := l.Move(l.Host2, lab.BehindGW2); err != nil {
		t.Fatal(err)
	}
	for _, peer := range []*pathHost{pub, h2} {
		pl.startHost(t, peer)
		testenv.WaitFor(t, "host1 has "+peer.name+" keyed", 120*time.Second, func() error {
			st, err := h1.status(t, pl.bins)
			if err != nil {
				return err
			}
			for _, p := range st.Peers {
				if p.Name == peer.name && p.Keyed && p.InKernel {
					pingers[peer.name] = startPingEvery(t, l.Host1, p.ULA, 10*time.Millisecond)
					return nil
				}
			}
			return fmt.Errorf("not yet")
		})
		testenv.WaitFor(t, "an echo from "+peer.name, 60*time.Second, func() error {
			if pingers[peer.name].replies() == 0 {
				return fmt.Errorf("none yet")
			}
			return nil
		})
		stop(peer)
	}
	type sample struct{ echo, chosen time.Duration }
	results := map[path.Kind][]sample{}
	benchrun.Describe(t, fmt.Sprintf(`connection establishment (%s, host kernel unless xfrm): from host1's LLQ event for a
		peer that just started to the first echo reply from its ULA (ping -i 0.01), and to host1's path
		selector choosing the expected kind; one line per try (establish-<kind>: p50 is the median, p99 of 20 the maximum), %d tries per kind, kinds alternated; then
		throughput-direct and throughput-relay-udp: 8 MiB byte-checked through a TCP echo, host1 to pub (direct) and to host2 behind
		a symmetric NAT (through the relay's TC forwarder), alternated rounds, with the btmm-relay process's own CPU`, dp, tries))
	for r := range tries {
		for i := range cases {
			c := cases[(i+r)%len(cases)]
			if c.place != "" {
				if err := l.Move(l.Host2, c.place); err != nil {
					t.Fatal(err)
				}
			}
			forget()
			tStart := time.Now()
			pl.startHost(t, c.peer)
			var llq, chosen time.Time
			var echo time.Time
			testenv.WaitFor(t, fmt.Sprintf("try %d %v: host1 on %v to %s, an echo back", r, c.kind, c.kind, c.peer.name), 120*time.Second, func() error {
				log := h1.d.log.String()
				if llq.IsZero() {
					llq = logTime(log, tStart, `msg="peer added"`, `peer="`+c.peer.name+`.`)
				}
				if llq.IsZero() {
					return fmt.Errorf("no LLQ event for %s yet", c.peer.name)
				}
				if chosen.IsZero() {
					chosen = logTime(log, llq, `msg=path `, `peer=`+c.peer.name+` `, `to="`+c.kind.String()+` `)
				}
				if echo.IsZero() {
					echo = pingers[c.peer.name].firstAt(llq)
				}
				if chosen.IsZero() || echo.IsZero() {
					return fmt.Errorf("LLQ event at %v; path chosen %v, echo %v", llq, chosen, echo)
				}
				return nil
			})
			s := sample{echo.Sub(llq), chosen.Sub(llq)}
			results[c.kind] = append(results[c.kind], s)
			benchrun.Print(t, "establish-"+c.kind.String(), benchrun.Metric{Value: ms(s.echo), Unit: "ms-to-echo"}, benchrun.Metric{Value: ms(s.chosen), Unit: "ms-to-path"})
			t.Logf("try %d %v (%s): LLQ event %v after start, first echo %v after it, path chosen %v after it",
				r, c.kind, c.peer.name, llq.Sub(tStart).Round(time.Millisecond), s.echo.Round(time.Millisecond), s.chosen.Round(time.Millisecond))
			stop(c.peer)
		}
	}
	var summary []string
	for _, c := range cases {
		var echo, chosen []time.Duration
		for _, s := range results[c.kind] {
			echo, chosen = append(echo, s.echo), append(chosen, s.chosen)
		}
		line := fmt.Sprintf("%v: n=%d first echo p50 %v p99 %v (min %v max %v), path chosen p50 %v p99 %v (min %v max %v)",
			c.kind, len(echo), pct(echo, 50), pct(echo, 99), pct(echo, 0), pct(echo, 100), pct(chosen, 50), pct(chosen, 99), pct(chosen, 0), pct(chosen, 100))
		summary = append(summary, line)
		t.Log("establishment " + line)
	}
	for _, p := range pingers {
		p.stop(t, time.Now())
	}
	relayThroughput(t, pl, dp)
	t.Logf("establishment (%s):\n%s", dp, strings.Join(summary, "\n"))
}

// relayThroughput is relay throughput / direct throughput in the same run:
// host1 (gw1, endpoint-independent) streams byte-checked data through an
// echo server on pub (direct) and on host2 behind gw3 (symmetric: through
// the relay), alternated rounds; the relay process's own CPU during each.
func relayThroughput(t *testing.T, pl *pathsLab, dp string) {
	l := pl.l
	h2, pub := pl.hosts[1], pl.hosts[2]
	if err := l.Move(l.Host2, lab.BehindGW3); err != nil {
		t.Fatal(err)
	}
	pl.startHost(t, h2)
	pl.startHost(t, pub)
	var sts map[string]*agent.Status
	testenv.WaitFor(t, "host1 reaches pub direct and host2 through the relay", 120*time.Second, func() error {
		sts = pl.statuses(t)
		st := sts["host1"]
		if st == nil {
			return fmt.Errorf("no status")
		}
		want := map[string]path.Kind{"pub": path.KindDirect, "host2": path.KindRelayUDP}
		for _, p := range st.Peers {
			if k, ok := want[p.Name]; ok && p.Keyed && p.InKernel && p.Path.Kind == k {
				delete(want, p.Name)
			}
		}
		if len(want) > 0 {
			return fmt.Errorf("not yet: %v", want)
		}
		return nil
	})
	conns := map[string]net.Conn{}
	for _, h := range []*pathHost{h2, pub} {
		echo := startEcho(t, h.ns, sts[h.name].ULA)
		conns[h.name] = dialEcho(t, l.Host1, echo)
		defer conns[h.name].Close()
	}
	marker := bytes.Repeat([]byte("THROUGHPUT-MARKER "), 64)
	const n = 8 << 20
	transfer := func(name string) func(testing.TB) []benchrun.Metric {
		return func(testing.TB) []benchrun.Metric {
			c0 := procCPU(t, pl.relayd.cmd.Process.Pid)
			t0 := time.Now()
			streamCheck(t, conns[name], marker, n)
			d := time.Since(t0)
			c1 := procCPU(t, pl.relayd.cmd.Process.Pid)
			return []benchrun.Metric{{Value: float64(n) * 8 / d.Seconds() / 1e6, Unit: "Mbit/s"}, {Value: ms(c1 - c0), Unit: "ms-relay-cpu"}}
		}
	}
	benchrun.Alternate(t, fmt.Sprintf(`relay throughput (%s): 8 MiB byte-checked through a TCP echo between ULAs, host1 behind an
		endpoint-independent NAT to pub (direct, the baseline) and to host2 behind a symmetric NAT (relay-udp:
		the relay's TC forwarder), alternated; ms-relay-cpu is the btmm-relay process's own CPU during the
		transfer (10 ms ticks; idle for the direct case)`, dp), "throughput-direct",
		benchrun.Case{Name: "throughput-direct", Run: transfer("pub")},
		benchrun.Case{Name: "throughput-relay-udp", Run: transfer("host2")})
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// flowsWith matches conntrack entries with any of addrs at either end.
type flowsWith map[netip.Addr]bool

func (f flowsWith) MatchConntrackFlow(fl *netlink.ConntrackFlow) bool {
	for _, ip := range []net.IP{fl.Forward.SrcIP, fl.Forward.DstIP, fl.Reverse.SrcIP, fl.Reverse.DstIP} {
		if a, ok := netip.AddrFromSlice(ip); ok && f[a.Unmap()] {
			return true
		}
	}
	return false
}

// logTime is the time of the first line of a btmmd log (slog text, time=
// first) at or after since that contains every one of subs.
func logTime(log string, since time.Time, subs ...string) time.Time {
	sc := bufio.NewScanner(strings.NewReader(log))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
next:
	for sc.Scan() {
		line := sc.Text()
		for _, s := range subs {
			if !strings.Contains(line, s) {
				continue next
			}
		}
		ts, _, _ := strings.Cut(strings.TrimPrefix(line, "time="), " ")
		at, err := time.Parse(time.RFC3339Nano, ts)
		if err == nil && !at.Before(since) {
			return at
		}
	}
	return time.Time{}
}

// firstAt is when the first echo reply at or after t0 arrived (zero: none
// yet).
func (p *pinger) firstAt(t0 time.Time) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, at := range p.at {
		if !at.Before(t0) {
			return at
		}
	}
	return time.Time{}
}
