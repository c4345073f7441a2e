package xfrm

import (
	"net"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane/nldump"
	"github.com/btmm/btmm/internal/testenv"
)

// TestNetNSOwnership runs the real netlink backend in a namespace of the
// running kernel: leftovers with our tags are removed at start, policies and
// routes go in, foreign objects survive, Close leaves nothing of ours. On a
// kernel without ESP (this project's dev kernel) the SAs fail and Set says
// so; everything independent of them is still applied. In the VM the SAs go
// in too.
func TestNetNSOwnership(t *testing.T) {
	testenv.RequireNetNS(t)
	esp := testenv.Has(t, testenv.ESP)
	l := newLab(t, 2)
	a := l.hosts[0]
	h := a.ns.Handle
	// Without xfrm interfaces the routes go via the outer device, which then needs IPv6.
	must(t, a.ns.Sysctl("net.ipv6.conf.eth0.disable_ipv6", "0"))

	foreignXfrm(t, h, esp)
	// A foreign route to a ULA (the veths carry no IPv6, so it points at lo).
	must(t, h.RouteAdd(&netlink.Route{Dst: host128(ulaC), LinkIndex: mustLink(t, a, "lo"), Protocol: 4}))
	foreign, err := render(h, "btmm0")
	must(t, err)

	// Leftovers of a killed run: a policy with our reqid, a route with our protocol.
	must(t, h.XfrmPolicyAdd(&netlink.XfrmPolicy{Dir: netlink.XFRM_DIR_IN, Src: host128(ulaB), Dst: host128(ulaA),
		Tmpls: []netlink.XfrmPolicyTmpl{{Src: net.ParseIP("10.0.2.2"), Dst: net.ParseIP("10.0.1.2"),
			Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: DefaultTag}}}))
	must(t, h.RouteAdd(&netlink.Route{Dst: host128(ulaB), LinkIndex: mustLink(t, a, "lo"), Protocol: DefaultRouteProtocol}))

	l.start(t, 0, Config{})
	got, err := render(h, "btmm0")
	must(t, err)
	if diff := cmp.Diff(foreign, withoutLink(got)); diff != "" {
		t.Fatalf("after start: leftovers not removed or foreign objects touched (-want +got):\n%s", diff)
	}

	_, err = a.dp.Set(t.Context(), l.desired(0))
	switch {
	case esp && err != nil:
		t.Fatalf("Set: %v", err)
	case !esp && (err == nil || !strings.Contains(err.Error(), "add state")):
		t.Fatalf("Set on a kernel without ESP: err = %v, want state errors", err)
	case !esp:
		t.Logf("no ESP on this kernel, as expected: %v", err)
		// Errors name SPIs and addresses, never keys.
		for _, k := range l.keys {
			if strings.Contains(err.Error(), string(k)) || strings.Contains(err.Error(), hexString(k[:6])) {
				t.Fatal("key material in error")
			}
		}
	}
	got, err = render(h, "btmm0")
	must(t, err)
	dev := "eth0"
	if a.dp.XfrmInterface() {
		dev = "btmm0"
	}
	for _, want := range []string{
		"policy dir out fd00::a/128 -> fd00::b/128",
		"policy dir in fd00::b/128 -> fd00::a/128",
		"policy dir fwd fd00::b/128 -> fd00::a/128",
		"route fd00::b/128 dev " + dev + " src fd00::a proto 98 mtu 1438",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("kernel lacks %q:\n%s", want, got)
		}
	}
	if esp && !strings.Contains(got, "spi 0x00001001") {
		t.Errorf("kernel lacks our SA:\n%s", got)
	}
	t.Logf("kernel after Set:\n%s", got)

	// Idempotent on the real kernel (where the SAs can exist).
	if esp {
		if ch, err := a.dp.Set(t.Context(), l.desired(0)); err != nil || len(ch) != 0 {
			t.Errorf("second Set = %v, %v; want no changes", ch, err)
		}
	}

	must(t, a.dp.Close())
	got, err = render(h, "btmm0")
	must(t, err)
	if diff := cmp.Diff(foreign, got); diff != "" {
		t.Fatalf("after Close (-want +got):\n%s", diff)
	}
	if _, err := h.LinkByName("btmm0"); err == nil {
		t.Error("btmm0 survived Close")
	}
	if addrs, _ := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(nil, netlink.FAMILY_V6) }); strings.Contains(fmtAddrs(addrs), "fd00::a") {
		t.Errorf("ULA survived Close: %v", addrs)
	}
}

func mustLink(t *testing.T, h *labHost, dev string) int {
	t.Helper()
	l, err := h.ns.LinkByName(dev)
	must(t, err)
	return l.Attrs().Index
}

func fmtAddrs(as []netlink.Addr) string {
	var s []string
	for _, a := range as {
		s = append(s, a.IPNet.String())
	}
	return strings.Join(s, " ")
}
