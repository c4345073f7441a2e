package controlplane_test

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"

	"github.com/btmm/btmm/controlplane"
)

func TestValidateTunnels(t *testing.T) {
	ap := netip.MustParseAddrPort
	v6 := controlplane.Tunnel{Kind: controlplane.PathIPv6, Remote: ap("[2001:db8:2::2]:0")}
	sit := controlplane.Tunnel{Kind: controlplane.PathSit, Remote: ap("11.3.0.2:0")}
	fou := controlplane.Tunnel{Kind: controlplane.PathFOU, Remote: ap("11.1.0.2:6080")}
	base := func() controlplane.Peer {
		return controlplane.Peer{Name: "b", ULA: bULA, Outer: ap("11.2.0.2:4500"), Out: sa(0x1001), In: sa(0x2001)}
	}
	withFOU := controlplane.Local{ULA: me, Port: 4500, FOUPort: 6080}
	for _, tc := range []struct {
		name  string
		local controlplane.Local
		peer  func(p *controlplane.Peer)
		other *controlplane.Peer
		err   string // substring; "" means valid
	}{
		{"esp-in-udp as before", local, func(p *controlplane.Peer) {}, nil, ""},
		{"ipv6 via, no ipv4 outer (ipv6-only peer)", local, func(p *controlplane.Peer) {
			p.Outer, p.Via, p.Tunnels = netip.AddrPort{}, controlplane.PathIPv6, []controlplane.Tunnel{v6}
		}, nil, ""},
		{"sit via with ipv6 beside it", local, func(p *controlplane.Peer) {
			p.Via, p.Tunnels = controlplane.PathSit, []controlplane.Tunnel{v6, sit}
		}, nil, ""},
		{"fou via", withFOU, func(p *controlplane.Peer) {
			p.Via, p.Tunnels = controlplane.PathFOU, []controlplane.Tunnel{fou}
		}, nil, ""},
		{"tunnels listed, sent by esp-in-udp", withFOU, func(p *controlplane.Peer) {
			p.Tunnels = []controlplane.Tunnel{v6, fou}
		}, nil, ""},
		{"esp-in-udp over ipv6 refused", local, func(p *controlplane.Peer) {
			p.Outer = ap("[2001:db8:2::2]:4500")
		}, nil, "not IPv4:port"},
		{"esp-in-udp with no outer", local, func(p *controlplane.Peer) { p.Outer = netip.AddrPort{} }, nil, "no outer address"},
		{"via names no tunnel", local, func(p *controlplane.Peer) {
			p.Via, p.Tunnels = controlplane.PathSit, []controlplane.Tunnel{v6}
		}, nil, "no sit tunnel"},
		{"fou without a local fou port", local, func(p *controlplane.Peer) {
			p.Tunnels = []controlplane.Tunnel{fou}
		}, nil, "no local FOU port"},
		{"sit and fou both (one device)", withFOU, func(p *controlplane.Peer) {
			p.Tunnels = []controlplane.Tunnel{sit, fou}
		}, nil, "at most one"},
		{"ipv6 tunnel to a ULA", local, func(p *controlplane.Peer) {
			p.Tunnels = []controlplane.Tunnel{{Kind: controlplane.PathIPv6, Remote: ap("[fd00::9]:0")}}
		}, nil, "not a global IPv6"},
		{"ipv6 tunnel to link-local", local, func(p *controlplane.Peer) {
			p.Tunnels = []controlplane.Tunnel{{Kind: controlplane.PathIPv6, Remote: ap("[fe80::9]:0")}}
		}, nil, "not a global IPv6"},
		{"sit tunnel to an ipv6 address", local, func(p *controlplane.Peer) {
			p.Tunnels = []controlplane.Tunnel{{Kind: controlplane.PathSit, Remote: ap("[2001:db8::1]:0")}}
		}, nil, "not a unicast IPv4"},
		{"fou tunnel without a port", withFOU, func(p *controlplane.Peer) {
			p.Tunnels = []controlplane.Tunnel{{Kind: controlplane.PathFOU, Remote: ap("11.1.0.2:0")}}
		}, nil, "address:port"},
		{"esp-in-udp is not a tunnel", local, func(p *controlplane.Peer) {
			p.Tunnels = []controlplane.Tunnel{{Kind: controlplane.PathESPInUDP, Remote: ap("11.1.0.2:4500")}}
		}, nil, "not a tunnel kind"},
		{"unknown via", local, func(p *controlplane.Peer) { p.Via = 9 }, nil, "unknown path kind"},
		{"two peers, one tunnel remote", local, func(p *controlplane.Peer) {
			p.Tunnels = []controlplane.Tunnel{sit}
		}, &controlplane.Peer{Name: "c", ULA: netip.MustParseAddr("fd33::3"), Outer: ap("11.3.0.2:4500"),
			Out: sa(0x1002), In: sa(0x2002), Tunnels: []controlplane.Tunnel{sit}}, "also peer"},
		{"fou port equal to the tunnel port", controlplane.Local{ULA: me, Port: 4500, FOUPort: 4500}, func(p *controlplane.Peer) {}, nil, "is the tunnel port"},
		{"local ipv6 outer not global", controlplane.Local{ULA: me, Port: 4500, Outer6: netip.MustParseAddr("fd00::1")}, func(p *controlplane.Peer) {}, nil, "not a global IPv6"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := base()
			tc.peer(&p)
			st := &controlplane.State{Local: tc.local, Peers: []controlplane.Peer{p}}
			if tc.other != nil {
				st.Peers = append(st.Peers, *tc.other)
			}
			err := st.Validate()
			switch {
			case tc.err == "" && err != nil:
				t.Fatalf("Validate: %v, want valid", err)
			case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
				t.Fatalf("Validate: %v, want an error containing %q", err, tc.err)
			}
		})
	}
}

func TestTunnelDeviceAndKindText(t *testing.T) {
	a, b := netip.MustParseAddr("fd00::a"), netip.MustParseAddr("fd00::b")
	for _, k := range []controlplane.PathKind{controlplane.PathIPv6, controlplane.PathSit, controlplane.PathFOU} {
		d := controlplane.TunnelDevice(k, a)
		if len(d) > 15 || d == controlplane.TunnelDevice(k, b) {
			t.Errorf("TunnelDevice(%v) = %q: longer than 15 bytes or not per peer", k, d)
		}
	}
	if controlplane.TunnelDevice(controlplane.PathSit, a) != controlplane.TunnelDevice(controlplane.PathFOU, a) {
		t.Error("sit and fou must share the sit device")
	}
	if d := controlplane.TunnelDevice(controlplane.PathESPInUDP, a); d != "" {
		t.Errorf("esp-in-udp device %q, want none", d)
	}
	for k := controlplane.PathESPInUDP; k <= controlplane.PathFOU; k++ {
		b, _ := json.Marshal(k)
		var back controlplane.PathKind
		if err := json.Unmarshal(b, &back); err != nil || back != k {
			t.Errorf("%v: JSON %s back to %v, %v", k, b, back, err)
		}
	}
	var k controlplane.PathKind
	if err := k.UnmarshalText([]byte("gre")); err == nil {
		t.Error("unknown kind parsed")
	}
}
