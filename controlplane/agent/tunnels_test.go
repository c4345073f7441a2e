package agent

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

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
		// No IPv4 address at all: no IPv4 tunnel is any use, whatever the
		// NAT side says (it found no IPv4 default route).
		{"IPv6-only", NATReport{}, nil, six[:1],
			[]register.Candidate{{Kind: "v6", Addr: ap("[2001:db8:1::2]:4500")}},
			[]path.Kind{path.KindIPv6}},
	} {
		ag := &Agent{cfg: Config{TunnelPort: 4500, NAT: nat, Tunnels: &TunnelsConfig{IPv6: true, Sit: true, FOUPort: 4501,
			LocalAddrs6: func() []netip.Addr { return tc.six }}}, nat: tc.nat}
		p := &paths{a: ag, cfg: PathsConfig{LocalAddrs: func() []netip.Addr { return tc.local }}}
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

// IPv6-only hosts and peers (docs/tunnels.md): where keying goes, and which
// pairs share no address family at all.
func TestIPv6OnlyKeying(t *testing.T) {
	ap, a := netip.MustParseAddrPort, netip.MustParseAddr
	v6 := func(addr string) register.Candidate { return register.Candidate{Kind: "v6", Addr: ap(addr)} }
	dual := PeerEvent{Name: "host1", ULA: a("fd00::1"), Outer: ap("11.1.0.1:4500"),
		Capabilities: register.Capabilities{Candidates: []register.Candidate{v6("[2001:db8:1::2]:4500")}}}
	v4only := PeerEvent{Name: "host2", ULA: a("fd00::2"), Outer: ap("11.2.0.1:4500")}
	v6only := PeerEvent{Name: "v6only", ULA: a("fd00::4"),
		Capabilities: register.Capabilities{Candidates: []register.Candidate{v6("[2001:db8:4::2]:4500")}}}
	// A dual-stack peer whose NAT maps nothing yet: no SRV, but a LAN address.
	lan := PeerEvent{Name: "lan", ULA: a("fd00::5"),
		Capabilities: register.Capabilities{Candidates: []register.Candidate{{Kind: "lan", Addr: ap("192.168.1.5:4500")}, v6("[2001:db8:5::2]:4500")}}}
	for _, tc := range []struct {
		name      string
		local     []netip.Addr
		six       []netip.Addr
		ipv6      bool // [tunnels] ipv6
		peer      PeerEvent
		wantKey   netip.AddrPort // where keying goes
		wantWhy   string         // part of the reason ("": reachable)
		v6OnlyArg bool
	}{
		{"IPv6-only host, dual-stack peer: its c-v6, not its SRV", nil, []netip.Addr{a("2001:db8:4::2")}, true, dual, ap("[2001:db8:1::2]:4500"), "", true},
		{"IPv6-only host, IPv4-only peer", nil, []netip.Addr{a("2001:db8:4::2")}, true, v4only, ap("11.2.0.1:4500"),
			"this host is IPv6-only (no IPv4 address) and host2 publishes no IPv6 endpoint", true},
		{"IPv6-only host with ipv6 tunnels off", nil, []netip.Addr{a("2001:db8:4::2")}, false, dual, ap("11.1.0.1:4500"),
			"this host is IPv6-only and ipv6 tunnels are off", true},
		{"dual-stack host, IPv6-only peer", []netip.Addr{a("192.168.1.2")}, []netip.Addr{a("2001:db8:1::2")}, true, v6only, ap("[2001:db8:4::2]:4500"), "", false},
		{"dual-stack host, dual-stack peer: its SRV until a path is chosen", []netip.Addr{a("192.168.1.2")}, []netip.Addr{a("2001:db8:1::2")}, true, dual, ap("11.1.0.1:4500"), "", false},
		{"IPv4-only host, IPv6-only peer", []netip.Addr{a("192.168.1.2")}, nil, true, v6only, netip.AddrPort{},
			"v6only is IPv6-only (publishes only c-v6) and this host has no global IPv6 address", false},
		{"IPv4-only host, peer with a LAN candidate and no SRV", []netip.Addr{a("192.168.1.2")}, nil, true, lan, netip.AddrPort{}, "", false},
		{"no address at all (between networks): not taken for IPv6-only", nil, nil, true, v4only, ap("11.2.0.1:4500"), "", false},
	} {
		ag := &Agent{cfg: Config{TunnelPort: 4500, Tunnels: &TunnelsConfig{IPv6: tc.ipv6, LocalAddrs6: func() []netip.Addr { return tc.six }}}}
		sel, err := path.New(path.Config{Key: mustKey(t), Send: func([]byte, netip.AddrPort) error { return nil }})
		if err != nil {
			t.Fatal(err)
		}
		p := &paths{a: ag, sel: sel, cfg: PathsConfig{LocalAddrs: func() []netip.Addr { return tc.local }}}
		if got := p.ipv6Only(); got != tc.v6OnlyArg {
			t.Errorf("%s: ipv6Only %v, want %v", tc.name, got, tc.v6OnlyArg)
		}
		why := p.noCommonFamily(tc.peer)
		if tc.wantWhy == "" && why != "" || tc.wantWhy != "" && !strings.Contains(why, tc.wantWhy) {
			t.Errorf("%s: reason %q, want %q", tc.name, why, tc.wantWhy)
		}
		if why != "" {
			continue // not keyed at all
		}
		if got := p.keyingAt(tc.peer, 4500, tc.peer.Outer); got != tc.wantKey {
			t.Errorf("%s: keying to %v, want %v", tc.name, got, tc.wantKey)
		}
	}
}

func mustKey(t *testing.T) *path.Key {
	k, err := path.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// An IPv4-only host and an IPv6-only peer do not connect: the peer is never
// given to keying (no exchange is started, so none is retried), and Status
// (btmmctl peers) lists it unreachable with the reason. On an IPv6-only
// host an IPv4-only peer is the same, and a dual-stack one is keyed at its
// c-v6 endpoint.
func TestNoCommonAddressFamily(t *testing.T) {
	a := netip.MustParseAddr
	dnsSrv := startUpdateServer(t)
	noServers := func(context.Context) ([]netip.AddrPort, error) { return nil, nil }
	host := func(name, ula string, local, six []netip.Addr) *testHost {
		return newTestHost(t, name, ula, dnsSrv.addr, func(c *Config) {
			c.Paths = &PathsConfig{Servers: noServers, LocalAddrs: func() []netip.Addr { return local }}
			c.Tunnels = &TunnelsConfig{IPv6: true, LocalAddrs6: func() []netip.Addr { return six }}
		})
	}
	pk := mustKey(t).Public()
	probeKey := pk[:]
	caps := func(cands ...register.Candidate) register.Capabilities {
		return register.Capabilities{Version: 1, KeyingPort: 4500, ProbeKey: probeKey, Candidates: cands}
	}
	v6 := func(addr string) register.Candidate {
		return register.Candidate{Kind: "v6", Addr: netip.MustParseAddrPort(addr)}
	}
	check := func(h *testHost, name, why string) {
		t.Helper()
		eventually(t, h.name+" shows "+name+" unreachable", func() error {
			for _, p := range h.a.Status(t.Context()).Peers {
				if p.Name == name {
					if p.Health.State != HealthUnreachable || !strings.Contains(p.Health.Reason, why) {
						return fmt.Errorf("health %+v", p.Health)
					}
					return nil
				}
			}
			return fmt.Errorf("%s not listed", name)
		})
	}

	v4 := host("v4", "fd00::a", []netip.Addr{a("192.168.1.2")}, nil)
	v4.run(t)
	v4.events <- PeerEvent{Name: "v6only", ULA: a("fd00::4"), Capabilities: caps(v6("[2001:db8:4::2]:4500"))}
	check(v4, "v6only", "no common address family: v6only is IPv6-only")

	v6h := host("v6only", "fd00::4", nil, []netip.Addr{a("2001:db8:4::2")})
	v6h.run(t)
	v6h.events <- PeerEvent{Name: "host2", ULA: a("fd00::2"), Outer: netip.MustParseAddrPort("11.2.0.1:4500"), Capabilities: caps()}
	v6h.events <- PeerEvent{Name: "host1", ULA: a("fd00::1"), Outer: netip.MustParseAddrPort("11.1.0.1:4500"),
		Capabilities: caps(v6("[2001:db8:1::2]:4500"))}
	check(v6h, "host2", "no common address family: this host is IPv6-only")
	eventually(t, "v6only keys host1 at its c-v6", func() error {
		ks, err := v6h.a.keyer.Status(t.Context())
		if err != nil {
			return err
		}
		for _, k := range ks {
			if k.Name == "host1" && k.Outer == netip.MustParseAddrPort("[2001:db8:1::2]:4500") {
				return nil
			}
		}
		return fmt.Errorf("keying peers %+v", ks)
	})

	// The dataplane gets host1's tunnel and not its IPv4 endpoint, which
	// an IPv6-only host cannot route to (the xfrm dataplane refuses a
	// peer it has no route to).
	eventually(t, "v6only's dataplane state for host1", func() error {
		peers, _, _ := v6h.a.rec.Status()
		for _, p := range peers {
			if p.Name == "host1" || p.ULA == a("fd00::1") {
				if p.Outer.IsValid() || len(p.Tunnels) != 1 || p.Tunnels[0].Remote.Addr() != a("2001:db8:1::2") {
					return fmt.Errorf("host1: outer %v, tunnels %v", p.Outer, p.Tunnels)
				}
				return nil
			}
		}
		return fmt.Errorf("host1 not in the reconciler: %+v", peers)
	})

	time.Sleep(2 * time.Second) // keying's retries would have started by now
	for _, tc := range []struct {
		h    *testHost
		peer string
	}{{v4, "v6only"}, {v6h, "host2"}} {
		ks, err := tc.h.a.keyer.Status(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range ks {
			if k.Name == tc.peer {
				t.Errorf("%s: %s given to keying (%v, %v)", tc.h.name, tc.peer, k.Outer, k.LastError)
			}
		}
	}
	if st, err := v4.a.keyer.Stats(t.Context()); err != nil || st.Attempts != 0 {
		t.Errorf("v4 started %d keying exchanges with a peer it cannot reach (%v)", st.Attempts, err)
	}
}
