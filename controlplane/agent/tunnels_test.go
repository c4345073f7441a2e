package agent

import (
	"context"
	"net/netip"
	"slices"
	"testing"

	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/dns/register"
)

// Our tunnel candidates (issue 15): c-v6 for our global IPv6 addresses,
// c-sit only without a NAT in front of us, c-fou at the gateway's mapping
// of the GUE port (or our own address without NAT); what is usable of a
// peer's follows the same facts.
func TestTunnelCandidates(t *testing.T) {
	ap, a := netip.MustParseAddrPort, netip.MustParseAddr
	nat := func(context.Context, uint16, func(NATReport)) error { return nil }
	six := []netip.Addr{a("2001:db8:1::2"), a("2001:db8:1::3"), a("2001:db8:1::4")}
	for _, tc := range []struct {
		name  string
		nat   NATReport
		local []netip.Addr
		six   []netip.Addr
		want  []register.Candidate
		use   []path.Kind
	}{
		{"public dual-stack", NATReport{External: ap("11.1.0.2:4500"), FOU: ap("11.1.0.2:4501")}, []netip.Addr{a("11.1.0.2")}, six,
			[]register.Candidate{{Kind: "v6", Addr: ap("[2001:db8:1::2]:4500")}, {Kind: "v6", Addr: ap("[2001:db8:1::3]:4500")},
				{Kind: "sit", Addr: ap("11.1.0.2:4500")}, {Kind: "fou", Addr: ap("11.1.0.2:4501")}},
			[]path.Kind{path.KindIPv6, path.KindSit, path.KindFOU}},
		{"behind a NAT that maps both ports, no IPv6", NATReport{External: ap("11.3.0.1:4500"), FOU: ap("11.3.0.1:16080"), BehindNAT: true},
			[]netip.Addr{a("192.168.3.2")}, nil,
			[]register.Candidate{{Kind: "fou", Addr: ap("11.3.0.1:16080")}},
			[]path.Kind{path.KindFOU}},
		{"no gateway answered (treated as public, our private address)", NATReport{External: ap("192.168.3.2:4500"), FOU: ap("192.168.3.2:4501"), BehindNAT: true},
			[]netip.Addr{a("192.168.3.2")}, six[:1],
			[]register.Candidate{{Kind: "v6", Addr: ap("[2001:db8:1::2]:4500")}},
			[]path.Kind{path.KindIPv6, path.KindFOU}},
		{"behind a NAT without PCP", NATReport{BehindNAT: true}, []netip.Addr{a("192.168.3.2")}, six[:1],
			[]register.Candidate{{Kind: "v6", Addr: ap("[2001:db8:1::2]:4500")}},
			[]path.Kind{path.KindIPv6, path.KindFOU}},
	} {
		ag := &Agent{cfg: Config{TunnelPort: 4500, NAT: nat, Tunnels: &TunnelsConfig{IPv6: true, Sit: true, FOUPort: 4501,
			LocalAddrs6: func() []netip.Addr { return tc.six }}}, nat: tc.nat}
		p := &paths{a: ag}
		if got := p.tunnelCandidates(tc.local); !slices.Equal(got, tc.want) {
			t.Errorf("%s: candidates %v, want %v", tc.name, got, tc.want)
		}
		var use []path.Kind
		for _, k := range []path.Kind{path.KindIPv6, path.KindSit, path.KindFOU} {
			if p.usable(k) {
				use = append(use, k)
			}
		}
		if !slices.Equal(use, tc.use) {
			t.Errorf("%s: usable %v, want %v", tc.name, use, tc.use)
		}
	}
}

// Keying follows the chosen path's family: IPv6 to the c-v6 endpoint, the
// sit address at the keying port, and for FOU (and no choice yet) the
// ESP-in-UDP endpoint.
func TestKeyingOuter(t *testing.T) {
	ap := netip.MustParseAddrPort
	def := ap("11.3.0.1:4500")
	for _, tc := range []struct {
		p    path.Path
		want netip.AddrPort
	}{
		{path.Path{}, def},
		{path.Path{Kind: path.KindIPv6, Remote: ap("[2001:db8:2::2]:4500")}, ap("[2001:db8:2::2]:4500")},
		{path.Path{Kind: path.KindSit, Remote: ap("11.2.0.2:0")}, ap("11.2.0.2:4500")},
		{path.Path{Kind: path.KindFOU, Remote: ap("11.3.0.1:16080")}, def},
		{path.Path{Kind: path.KindRelayUDP, Remote: ap("11.0.0.1:40001")}, ap("11.0.0.1:40001")},
	} {
		if got := keyingOuter(tc.p, 4500, def); got != tc.want {
			t.Errorf("%v: keying to %v, want %v", tc.p, got, tc.want)
		}
	}
}
