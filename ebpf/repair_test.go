package ebpf

import (
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/nldump"
	"github.com/btmm/btmm/controlplane/repair"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/btmm/btmm/internal/udpecho"
)

// outage runs brk (in h's namespace unless it starts with "bpftool") and
// returns when it had returned and how long the UDP echoes of pr stopped
// around it (from the last reply before it to the first one after).
func outage(t *testing.T, h *host, pr *udpecho.Prober, brk []string) (time.Time, time.Duration) {
	t.Helper()
	since := time.Now()
	if brk[0] == "bpftool" {
		if out, err := exec.Command(brk[0], brk[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%q: %v: %s", brk, err, out)
		}
	} else {
		h.ns.MustRun(t, brk[0], brk[1:]...)
	}
	returned := time.Now()
	gap, ok := pr.Outage(since, returned, 60*time.Second)
	if !ok {
		t.Fatalf("%q: echoes never came back", brk)
	}
	return returned, gap
}

// repairedAfter waits (30 s at most) for h's repair loop to record a repair
// beyond the n-th and returns the last one. Traffic comes back as soon as
// the repair's kernel change is made, a little before the loop records it.
func repairedAfter(h *host, n int) controlplane.Repair {
	deadline := time.Now().Add(30 * time.Second)
	for h.dp.LastRepair().Count <= n && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	return h.dp.LastRepair()
}

// echo probes b's ULA from a every 20 ms.
func echo(t *testing.T, a, b *host) *udpecho.Prober {
	return udpecho.Start(t, a.ns, b.ns, netip.AddrPortFrom(b.ula, 5007), 20*time.Millisecond)
}

// TestRepairNetNS: on this kernel (cleartext; TCX, and forced clsact),
// someone deletes the route to the peer's ULA, its neighbour entry, our ULA,
// detaches the egress program (bpftool link detach / tc filter del) or
// deletes the clsact qdisc: the dataplane puts it back by itself and pings
// flow again (time logged, generous bound asserted). A route and a tc
// filter an administrator adds stay.
func TestRepairNetNS(t *testing.T) {
	for _, force := range []bool{false, true} {
		t.Run(map[bool]string{false: "probe", true: "clsact"}[force], func(t *testing.T) {
			testRepair(t, Config{Cleartext: true, ForceClsact: force})
		})
	}
}

// TestRepairSecureVM is TestRepairNetNS in secure mode (ESP between the
// ULAs, 6.1: clsact), with `ip xfrm state flush` and `ip xfrm policy flush`
// too: the SAs come back with sequence numbers the peer accepts.
func TestRepairSecureVM(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	testRepair(t, Config{})
}

func testRepair(t *testing.T, cfg Config) {
	testenv.RequireBinary(t, "ping", "iputils-ping")
	a, b := topology(t)
	connect(t, a, b, cfg)
	// Traffic first: the peer's replay window moves far from 1.
	a.ns.MustRun(t, "ping", "-6", "-q", "-c", "200", "-i", "0.005", "-W", "2", b.ula.String())
	kind := a.dp.attach.kind()
	pr := echo(t, a, b)
	// An administrator's route and tc filter, left alone throughout.
	lo, err := a.ns.LinkByName("lo")
	must(t, err)
	foreignRoute := &netlink.Route{Dst: &net.IPNet{IP: net.ParseIP("fd99::9"), Mask: net.CIDRMask(128, 128)}, LinkIndex: lo.Attrs().Index, Protocol: 4}
	must(t, a.ns.Handle.RouteAdd(foreignRoute))
	foreignFilter := func() bool {
		out, _ := a.ns.Run("tc", "filter", "show", "dev", a.dev, "ingress")
		return strings.Contains(out, "pref 7 ")
	}
	breaks := [][]string{
		{"ip", "-6", "route", "del", b.ula.String() + "/128"},
		{"ip", "-6", "neigh", "del", b.ula.String(), "dev", a.dev},
		{"ip", "addr", "del", a.ula.String() + "/128", "dev", "lo"},
	}
	if kind == "tcx" {
		breaks = append(breaks, []string{"bpftool", "link", "detach", "pinned", filepath.Join(a.root, "link_egress_"+a.dev)},
			[]string{"bpftool", "link", "detach", "pinned", filepath.Join(a.root, "link_ingress_"+a.dev)})
	} else {
		breaks = append(breaks, []string{"tc", "filter", "del", "dev", a.dev, "egress", "prio", fmt.Sprint(filterPrio)},
			[]string{"tc", "qdisc", "del", "dev", a.dev, "clsact"})
	}
	if !cfg.Cleartext {
		breaks = append(breaks, []string{"ip", "xfrm", "state", "flush"}, []string{"ip", "xfrm", "policy", "flush"})
	}
	for _, brk := range breaks {
		if kind != "tcx" && !foreignFilter() {
			// Re-added after the qdisc went (it takes the filters along).
			a.ns.Run("tc", "qdisc", "add", "dev", a.dev, "clsact")
			a.ns.MustRun(t, "tc", "filter", "add", "dev", a.dev, "ingress", "prio", "7", "bpf", "bytecode", "1,6 0 0 0,") // matches nothing
		}
		n := a.dp.LastRepair().Count
		start, d := outage(t, a, pr, brk)
		r := repairedAfter(a, n)
		t.Logf("%q: repaired %v after the command returned; echoes stopped for %v; repair %d: %q", brk, r.At.Sub(start).Round(time.Millisecond), d.Round(time.Millisecond), r.Count, r.What)
		if r.Count <= n {
			t.Errorf("%q: no repair recorded (traffic came back by itself?)", brk)
		}
		if d > 10*time.Second {
			t.Errorf("%q: echoes stopped for %v", brk, d)
		}
		if o, err := a.ns.Run("ping", "-6", "-c", "20", "-i", "0.01", "-w", "10", b.ula.String()); err != nil || !strings.Contains(o, " 0% packet loss") {
			t.Errorf("%q: ping after the repair: %v\n%s", brk, err, o)
		}
		if kind != "tcx" && brk[1] != "qdisc" && !foreignFilter() {
			t.Errorf("%q: the administrator's tc filter is gone", brk)
		}
	}
	if rs, err := nldump.Retry(func() ([]netlink.Route, error) {
		return a.ns.Handle.RouteListFiltered(netlink.FAMILY_V6, foreignRoute, netlink.RT_FILTER_DST)
	}); err != nil || len(rs) != 1 || rs[0].Protocol != 4 {
		t.Errorf("the administrator's route: %v %v", rs, err)
	}
	if got := attached(t, a); kind == "tcx" && len(got) != 2 {
		t.Errorf("attached after the repairs: %q", got)
	}
	if foreignFilter() {
		a.ns.MustRun(t, "tc", "filter", "del", "dev", a.dev, "ingress", "prio", "7") // the administrator's, before the leftovers check
	}
	if !cfg.Cleartext {
		// An administrator's own SA and policy (another reqid) survive a repair.
		a.ns.MustRun(t, "ip", "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp", "spi", "0x9999",
			"reqid", "7", "mode", "tunnel", "aead", "rfc4106(gcm(aes))", "0x0102030405060708090a0b0c0d0e0f1011121314", "128")
		a.ns.MustRun(t, "ip", "xfrm", "policy", "add", "src", "fd99::1/128", "dst", "fd99::2/128", "dir", "out",
			"tmpl", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp", "reqid", "7", "mode", "tunnel")
		n := a.dp.LastRepair().Count
		outage(t, a, pr, []string{"ip", "xfrm", "state", "flush"}) // takes the admin's state too
		a.ns.MustRun(t, "ip", "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp", "spi", "0x9999",
			"reqid", "7", "mode", "tunnel", "aead", "rfc4106(gcm(aes))", "0x0102030405060708090a0b0c0d0e0f1011121314", "128")
		outage(t, a, pr, []string{"ip", "-6", "route", "del", b.ula.String() + "/128"})
		if c := repairedAfter(a, n+1).Count; c < n+2 {
			t.Errorf("repairs %d -> %d, want two more", n, c)
		}
		for _, c := range [][]string{{"ip", "xfrm", "state", "list", "spi", "0x9999"}, {"ip", "xfrm", "policy", "list", "dst", "fd99::2/128"}} {
			if out := a.ns.MustRun(t, c[0], c[1:]...); !strings.Contains(out, "reqid 7") {
				t.Errorf("the administrator's %s is gone: %q", c[2], out)
			}
		}
		a.ns.MustRun(t, "ip", "xfrm", "state", "del", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp", "spi", "0x9999")
		a.ns.MustRun(t, "ip", "xfrm", "policy", "del", "src", "fd99::1/128", "dst", "fd99::2/128", "dir", "out")

		st, err := b.dp.Stats(t.Context())
		must(t, err)
		ss, err := nldump.Retry(func() ([]netlink.XfrmState, error) { return b.ns.Handle.XfrmStateList(netlink.FAMILY_V6) })
		must(t, err)
		for _, s := range ss {
			if s.Statistics.ReplayWindow+s.Statistics.Replay+s.Statistics.Failed != 0 {
				t.Errorf("b's SA spi 0x%x dropped packets (replay window %d, replay %d, failed %d): sequence numbers not kept",
					s.Spi, s.Statistics.ReplayWindow, s.Statistics.Replay, s.Statistics.Failed)
			}
		}
		t.Logf("b: %+v", st)
	}
	closeAndCheck(t, a, b)
}

// TestRepairAuditNetNS: what the kernel does not announce (a map entry
// deleted with bpftool) is put back by the periodic audit.
func TestRepairAuditNetNS(t *testing.T) {
	testenv.RequireBinary(t, "ping", "iputils-ping")
	bpftool := testenv.RequireBinary(t, "bpftool", "bpftool")
	a, b := topology(t)
	connect(t, a, b, Config{Cleartext: true, Repair: repair.Config{Audit: time.Second}})
	ping(t, a, b)
	pr := echo(t, a, b)
	k := b.ula.As16()
	key := []string{"key"}
	for _, x := range k {
		key = append(key, fmt.Sprint(x))
	}
	n := a.dp.LastRepair().Count
	_, d := outage(t, a, pr, append([]string{bpftool, "map", "delete", "pinned", filepath.Join(a.root, "peer_by_ula")}, key...))
	r := repairedAfter(a, n)
	t.Logf("map entry deleted: echoes stopped for %v (audit every 1 s); repair %q", d.Round(time.Millisecond), r.What)
	if r.Count <= n || !strings.Contains(strings.Join(r.What, " "), "add map peer b") {
		t.Errorf("repair %+v, want the map entry put back", r)
	}
	var v btmmPeer
	must(t, a.dp.objs.PeerByUla.Lookup(ulaKey(b.ula), &v))
	if netip.AddrFrom4(v.OuterAddr) != b.outer {
		t.Errorf("peer_by_ula put back with %v", netip.AddrFrom4(v.OuterAddr))
	}
	closeAndCheck(t, a, b)
}
