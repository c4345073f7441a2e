package e2e

import (
	"cmp"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	ciliumebpf "github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane/nldump"
	"github.com/btmm/btmm/internal/lab"
	"github.com/btmm/btmm/internal/netns"
)

// TestVMReconvergence is issue 12's re-convergence benchmark (reported,
// never asserted; `make bench-vm`): btmmd on host1 and pub (xfrm), a
// `ping -i 0.01` from pub to host1's ULA, and three kinds of move, each
// repeated BTMM_BENCH_MOVES times (default 20):
//
//   - host changes NAT: host1 moves between gw1 and gw2;
//   - host goes public: host1 moves from behind gw1 to a public address
//     (and back, unmeasured);
//   - NAT public address change: gw1's WAN address changes (miniupnpd
//     announces it), host1 stays.
//
// For each move it reports the time from the move to pub's kernel SA
// pointing at host1's new address, and to the first echo reply to a request
// sent after the move; then p50 and p99 per kind.
func TestVMReconvergence(t *testing.T) { reconverge(t, "xfrm") }

// TestReconvergenceCleartext is the same benchmark on the host kernel
// (`make bench`) with the ebpf-cleartext dataplane: no TCG, so its times
// are those of a real kernel; "pub's kernel points at the new address" is
// its BPF map (peer_by_outer) holding host1's new outer address.
func TestReconvergenceCleartext(t *testing.T) { reconverge(t, "ebpf-cleartext") }

func reconverge(t *testing.T, dp string) {
	moves := benchStart(t, dp, "re-convergence", "BTMM_BENCH_MOVES")
	// BTMM_BENCH_DEBOUNCE sets network.debounce (default 250 ms), to
	// see what of a host's own move is the debounce.
	debounce := os.Getenv("BTMM_BENCH_DEBOUNCE")
	s := newSystem(t)
	l := s.l
	s.upnp(t, l.GW1, l.GW2)
	h1 := s.startHost(t, "host1", l.Host1, hostConf{dataplane: dp, debounce: debounce})
	pub := s.startHost(t, "pub", l.Pub, hostConf{dataplane: dp, debounce: debounce})
	sts := s.keyed(t, h1, pub)
	ula1 := sts["host1"].ULA
	outTo := func(addr string) (bool, error) { return xfrmOutTo(l.Pub, addr) }
	if dp != "xfrm" {
		// btmmd pinned its maps in its own bpffs (`ip netns exec` gives
		// it a mount namespace of its own): reach them through /proc.
		m, err := ciliumebpf.LoadPinnedMap(fmt.Sprintf("/proc/%d/root/sys/fs/bpf/btmm/peer_by_outer", pub.d.cmd.Process.Pid), nil)
		if err != nil {
			t.Fatalf("pub's peer_by_outer map: %v", err)
		}
		t.Cleanup(func() { m.Close() })
		outTo = func(addr string) (bool, error) { return mapOutTo(m, addr) }
	}
	// Conntrack counts packets per direction on the gateways, for the
	// snapshot of a slow round.
	for _, gw := range []*netns.NS{l.GW1, l.GW2} {
		if err := gw.Sysctl("net.netfilter.nf_conntrack_acct", "1"); err != nil {
			t.Fatal(err)
		}
	}
	p := startPingEvery(t, l.Pub, ula1, 10*time.Millisecond)
	// snapshot is the state along the echo's path, for a round whose
	// echo is slow to come back: both hosts' ESP states (with their
	// counters) and neighbours, host1's routes, the gateways' conntrack
	// entries and rules (miniupnpd's port forwards), inet's neighbours.
	snapshot := func() string {
		var b strings.Builder
		for _, c := range []struct {
			ns   *netns.NS
			cmds [][]string
		}{
			{l.Host1, [][]string{{"ip", "-s", "xfrm", "state"}, {"ip", "-4", "route"}, {"ip", "-4", "neigh"}}},
			{l.Pub, [][]string{{"ip", "-s", "xfrm", "state"}, {"ip", "-4", "neigh"}}},
			{l.GW1, [][]string{{"nft", "list", "ruleset"}, {"ip", "-4", "neigh"}}},
			{l.GW2, [][]string{{"nft", "list", "ruleset"}, {"ip", "-4", "neigh"}}},
			{l.Inet, [][]string{{"ip", "-4", "neigh"}}},
		} {
			fmt.Fprintf(&b, "== %s\n", c.ns.Name)
			for _, cmd := range c.cmds {
				out, err := c.ns.Run(cmd[0], cmd[1:]...)
				fmt.Fprintf(&b, "$ %s (err %v)\n%s", strings.Join(cmd, " "), err, out)
			}
			if c.ns == l.GW1 || c.ns == l.GW2 {
				flows, err := c.ns.Handle.ConntrackTableList(netlink.ConntrackTable, netlink.FAMILY_V4)
				fmt.Fprintf(&b, "$ conntrack -L (err %v)\n", err)
				for _, f := range flows {
					if f.Forward.Protocol == 17 {
						fmt.Fprintln(&b, f)
					}
				}
			}
		}
		return b.String()
	}
	logLen := func(h *host) int { return len(h.d.log.String()) }

	type sample struct{ sa, echo time.Duration }
	measure := func(kind string, want string, do func() error) sample {
		t.Helper()
		log1, logPub := logLen(h1), logLen(pub)
		t0 := time.Now()
		saAt := make(chan time.Time, 1)
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var polls, failed int
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				ok, err := outTo(want)
				polls++
				if err != nil {
					failed++
				}
				if ok {
					saAt <- time.Now()
					return
				}
				select {
				case <-stop:
					return
				case <-time.After(2 * time.Millisecond):
				}
			}
		}()
		if err := do(); err != nil {
			t.Fatal(err)
		}
		// Echo requests sent before the move finished may still take
		// the old path: count the first reply to one sent after it.
		done := time.Now()
		var smp sample
		select {
		case at := <-saAt:
			smp.sa = at.Sub(t0)
		case <-time.After(60 * time.Second):
			close(stop)
			wg.Wait()
			t.Fatalf("%s: pub's SA never pointed at %s", kind, want)
		}
		close(stop)
		wg.Wait()
		// A slow echo (3 s after the move, well past the SA's move)
		// leaves a snapshot of the path and both daemons' logs.
		var slow []string
		for deadline := t0.Add(60 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if at, ok := p.firstSentAfter(done); ok {
				smp.echo = at.Sub(t0)
				break
			}
			if len(slow) < 2 && time.Since(t0) > time.Duration(3+12*len(slow))*time.Second {
				slow = append(slow, fmt.Sprintf("--- snapshot %v after the move ---\n%s", time.Since(t0).Round(time.Millisecond), snapshot()))
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: no reply to an echo sent after the move in 60 s\n%s", kind, strings.Join(slow, ""))
			}
		}
		t.Logf("%s -> %s: SA %v (%d polls, %d failed), echo %v", kind, want, smp.sa.Round(time.Millisecond), polls, failed, smp.echo.Round(time.Millisecond))
		if slow != nil {
			slow = append(slow, fmt.Sprintf("--- snapshot at the first echo (%v) ---\n%s", smp.echo.Round(time.Millisecond), snapshot()))
			t.Logf("slow round (%s, move at %s):\n%s--- host1's log since the move ---\n%s--- pub's log since the move ---\n%s",
				kind, t0.Format("15:04:05.000"), strings.Join(slow, ""), h1.d.log.String()[log1:], pub.d.log.String()[logPub:])
		}
		time.Sleep(time.Second) // settle: MOVED acknowledged, NAT mapped, records published
		return smp
	}
	results := map[string][]sample{}
	kinds := []string{"host changes NAT", "host goes public", "NAT public address change"}
	wan := []string{"11.1.0.3", lab.GW1WAN}
	for i := range moves {
		// host changes NAT: gw1 -> gw2, then back gw2 -> gw1 (both counted).
		for _, to := range []lab.Place{lab.BehindGW2, lab.BehindGW1} {
			natWAN := map[lab.Place]string{lab.BehindGW1: currentWAN(t, l.GW1), lab.BehindGW2: lab.GW2WAN}[to]
			results[kinds[0]] = append(results[kinds[0]], measure(kinds[0], natWAN, func() error { return l.Move(l.Host1, to) }))
		}
		// host goes public (counted), then back behind gw1 (not counted).
		results[kinds[1]] = append(results[kinds[1]], measure(kinds[1], "11.4.0.2", func() error { return l.Move(l.Host1, lab.Public) }))
		measure("back behind gw1", currentWAN(t, l.GW1), func() error { return l.Move(l.Host1, lab.BehindGW1) })
		// NAT public address change.
		addr := wan[i%2]
		results[kinds[2]] = append(results[kinds[2]], measure(kinds[2], addr, func() error {
			if err := l.SetWAN(l.GW1, addr); err != nil {
				return err
			}
			return s.gws[l.GW1].Announce()
		}))
	}
	p.stop(t, time.Now())
	for _, k := range kinds {
		var sa, echo []time.Duration
		for _, r := range results[k] {
			sa, echo = append(sa, r.sa), append(echo, r.echo)
		}
		line := fmt.Sprintf("reconvergence (%s, debounce %s) %-26s n=%d  first echo: p50 %v p99 %v (min %v max %v)  peer SA moved: p50 %v p99 %v (min %v max %v)",
			dp, cmp.Or(debounce, "250ms"), k+":", len(sa), pct(echo, 50), pct(echo, 99), pct(echo, 0), pct(echo, 100), pct(sa, 50), pct(sa, 99), pct(sa, 0), pct(sa, 100))
		fmt.Println(line)
		t.Log(line)
	}
}

// currentWAN is a gateway's WAN address now.
func currentWAN(t *testing.T, gw *netns.NS) string {
	t.Helper()
	out, err := gw.Run("ip", "-4", "-o", "addr", "show", "dev", "wan")
	f := strings.Fields(out)
	if err != nil || len(f) < 4 {
		t.Fatalf("WAN address of %s: %v %q", gw.Name, err, out)
	}
	return strings.Split(f[3], "/")[0]
}

// xfrmOutTo reports whether ns has an ESP-in-UDP state sending to addr.
func xfrmOutTo(ns *netns.NS, addr string) (bool, error) {
	states, err := nldump.Retry(func() ([]netlink.XfrmState, error) { return ns.Handle.XfrmStateList(netlink.FAMILY_V4) })
	if err != nil {
		return false, err
	}
	want := netip.MustParseAddr(addr)
	for _, s := range states {
		if a, ok := netip.AddrFromSlice(s.Dst); ok && a.Unmap() == want && s.Encap != nil {
			return true, nil
		}
	}
	return false, nil
}

// mapOutTo reports whether the eBPF dataplane's peer_by_outer map (key:
// struct outer, IPv4 address first) has an entry for addr.
func mapOutTo(m *ciliumebpf.Map, addr string) (bool, error) {
	want := netip.MustParseAddr(addr).As4()
	key := make([]byte, m.KeySize())
	val := make([]byte, m.ValueSize())
	it := m.Iterate()
	for it.Next(&key, &val) {
		if [4]byte(key[:4]) == want {
			return true, nil
		}
	}
	return false, it.Err()
}

// pct is the p-th percentile (nearest rank) of ds; 0 is the minimum.
func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (p*len(s) + 99) / 100
	return s[max(i-1, 0)].Round(time.Millisecond)
}
