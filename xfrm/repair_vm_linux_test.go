package xfrm

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/internal/testenv"
	"github.com/btmm/btmm/internal/udpecho"
)

// outage runs brk in h's namespace and returns when it had returned and
// how long the UDP echoes of pr stopped around it (from the last reply
// before it to the first one after).
func outage(t *testing.T, h *labHost, pr *udpecho.Prober, brk []string) (time.Time, time.Duration) {
	t.Helper()
	since := time.Now()
	h.ns.MustRun(t, brk[0], brk[1:]...)
	returned := time.Now()
	gap, ok := pr.Outage(since, returned, 60*time.Second)
	if !ok {
		t.Fatalf("%q: echoes never came back", brk)
	}
	return returned, gap
}

// waitRepair waits until h's dataplane reports more than n repairs.
func waitRepair(t *testing.T, h *labHost, n int) {
	t.Helper()
	waitFor(t, 30*time.Second, func() bool { return h.dp.LastRepair().Count > n })
}

// TestVMRepair: on a running host with ESP traffic, `ip xfrm state flush`,
// `ip xfrm policy flush`, `ip -6 route del <peer ULA>`, `ip xfrm state del`
// of the outbound SA and deleting the xfrm interface are each repaired by
// the dataplane itself: echoes flow again (time measured and logged; the
// bound asserted is generous, TCG is slow and shared), with the same SPIs
// and sequence numbers that the peer's replay window accepts (it saw 300
// packets before the flush). A state, policy and route an administrator
// adds meanwhile are left alone. Without the repair nothing would bring
// these objects back (the desired state does not change).
func TestVMRepair(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	l := newLab(t, 2)
	for i := range l.hosts {
		l.start(t, i, Config{})
		l.set(t, i)
	}
	a, b := l.hosts[0], l.hosts[1]
	a.ns.MustRun(t, "ping", "-6", "-q", "-c", "300", "-i", "0.005", "-W", "2", b.ula.String())
	pr := udpecho.Start(t, a.ns, b.ns, netip.AddrPortFrom(b.ula, 5007), 20*time.Millisecond)
	spis := func() string {
		ss, err := a.dp.states()
		must(t, err)
		var s []string
		for _, x := range ss {
			s = append(s, fmt.Sprintf("0x%x", x.Spi))
		}
		slices.Sort(s)
		return strings.Join(s, ",")
	}
	before := spis()
	out := fmt.Sprintf("0x%x", spi(0, 1))
	for _, tc := range []struct {
		name string
		cmd  []string
		want string // in the repair's changes
	}{
		{"state flush", []string{"ip", "xfrm", "state", "flush"}, "add state spi " + fmt.Sprintf("0x%08x", spi(0, 1))},
		{"policy flush", []string{"ip", "xfrm", "policy", "flush"}, "add policy dir out"},
		{"route to the peer's ULA deleted", []string{"ip", "-6", "route", "del", b.ula.String() + "/128"}, "add route " + b.ula.String()},
		{"outbound SA deleted", []string{"ip", "xfrm", "state", "del", "src", a.outer.String(), "dst", b.outer.String(), "proto", "esp", "spi", out}, "add state spi"},
		{"xfrm interface deleted", []string{"ip", "link", "del", "btmm0"}, "add route " + b.ula.String()},
	} {
		n := a.dp.LastRepair().Count
		start, d := outage(t, a, pr, tc.cmd)
		waitRepair(t, a, n)
		r := a.dp.LastRepair()
		t.Logf("%s: repaired %v after the command returned; echoes stopped for %v; repair %d: %q", tc.name, r.At.Sub(start).Round(time.Millisecond), d.Round(time.Millisecond), r.Count, r.What)
		if !strings.Contains(strings.Join(r.What, "\n"), tc.want) {
			t.Errorf("%s: repair %q lacks %q", tc.name, r.What, tc.want)
		}
		if d > 10*time.Second {
			t.Errorf("%s: echoes stopped for %v", tc.name, d)
		}
		// More traffic after the repair: the peer accepts the sequence numbers.
		if o, err := a.ns.Run("ping", "-6", "-c", "20", "-i", "0.01", "-w", "10", b.ula.String()); err != nil || !strings.Contains(o, " 0% packet loss") {
			t.Errorf("%s: ping after the repair: %v\n%s", tc.name, err, o)
		}
	}
	if after := spis(); after != before {
		t.Errorf("SPIs %s before, %s after the repairs: rekeyed?", before, after)
	}
	st, err := b.dp.Stats(t.Context())
	must(t, err)
	if len(st) != 1 || st[0].Drops != 0 {
		t.Errorf("b's counters %+v: want no replay or integrity drops", st)
	}

	// An administrator's own XFRM objects and route are left alone.
	foreignXfrm(t, a.ns.Handle, true)
	must(t, a.ns.Handle.RouteAdd(&netlink.Route{Dst: host128(netip.MustParseAddr("fd99::9")), LinkIndex: mustLink(t, a, "lo"), Protocol: 4}))
	foreign := func() []string {
		r, err := render(a.ns.Handle, "btmm0")
		must(t, err)
		var f []string
		for _, line := range strings.Split(r, "\n") {
			if strings.Contains(line, "reqid 0x7") || strings.Contains(line, "fd99::9") {
				f = append(f, line)
			}
		}
		return f
	}
	want := foreign()
	if len(want) != 3 {
		t.Fatalf("foreign objects %q, want a state, a policy and a route", want)
	}
	n := a.dp.LastRepair().Count
	outage(t, a, pr, []string{"ip", "-6", "route", "del", b.ula.String() + "/128"})
	waitRepair(t, a, n)
	if got := foreign(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("foreign objects after a repair: %q, want %q", got, want)
	}
}

// TestNetNSRepair is the part of TestVMRepair this kernel can run (no ESP,
// no xfrm interfaces: the lo fallback; in the VM it runs with both):
// `ip xfrm policy flush`, `ip -6 route del <peer ULA>` and deleting our ULA
// are put back by
// the dataplane's watchers within a generous bound (the time is logged), and
// an administrator's policy and route are left alone.
func TestNetNSRepair(t *testing.T) {
	testenv.RequireNetNS(t)
	l := newLab(t, 2)
	a := l.hosts[0]
	must(t, a.ns.Sysctl("net.ipv6.conf.eth0.disable_ipv6", "0"))
	l.start(t, 0, Config{})
	a.dp.Set(t.Context(), l.desired(0)) // the SAs fail without ESP; the rest goes in
	mine := func() string {
		r, err := render(a.ns.Handle, "btmm0")
		must(t, err)
		var keep []string
		for _, line := range strings.Split(r, "\n") {
			if strings.Contains(line, "reqid 0x6281") || strings.Contains(line, "proto 98") || strings.HasPrefix(line, "addr fd00::a") {
				keep = append(keep, line)
			}
		}
		return strings.Join(keep, "\n")
	}
	want := mine()
	if !strings.Contains(want, "policy dir out") || !strings.Contains(want, "route fd00::b/128") {
		t.Fatalf("Set did not program policies and route:\n%s", want)
	}
	foreignXfrm(t, a.ns.Handle, false)
	must(t, a.ns.Handle.RouteAdd(&netlink.Route{Dst: host128(netip.MustParseAddr("fd99::9")), LinkIndex: mustLink(t, a, "lo"), Protocol: 4}))
	ulaDev := "lo" // this kernel; in the VM the ULA is on the xfrm interface
	if a.dp.XfrmInterface() {
		ulaDev = "btmm0"
	}
	for _, brk := range [][]string{
		{"ip", "xfrm", "policy", "flush"},
		{"ip", "-6", "route", "del", "fd00::b/128"},
		{"ip", "addr", "del", "fd00::a/128", "dev", ulaDev},
	} {
		n := a.dp.LastRepair().Count
		start := time.Now()
		a.ns.MustRun(t, brk[0], brk[1:]...)
		if brk[2] == "policy" {
			foreignXfrm(t, a.ns.Handle, false) // the flush took the admin's too; they add it again
		}
		waitFor(t, 30*time.Second, func() bool { return mine() == want })
		d := time.Since(start)
		waitRepair(t, a, n)
		t.Logf("%q: put back after %v: %q", brk, d.Round(time.Millisecond), a.dp.LastRepair().What)
		if d > 10*time.Second {
			t.Errorf("%q: put back only after %v", brk, d)
		}
		r, err := render(a.ns.Handle, "btmm0")
		must(t, err)
		for _, f := range []string{"tmpl 192.0.2.1 -> 192.0.2.2 esp tunnel reqid 0x7", "route fd99::9/128 dev lo proto 4"} {
			if !strings.Contains(r, f) {
				t.Errorf("%q: the administrator's %q is gone:\n%s", brk, f, r)
			}
		}
	}
}
