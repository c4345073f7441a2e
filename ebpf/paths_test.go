package ebpf

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/btmm/btmm/controlplane"
)

// TestCheckPaths: in cleartext mode tunnel paths and tunnel endpoints are
// refused with an error that says why (no ESP: a tunnel never carries
// cleartext ULA traffic) and what to use instead; in secure mode they pass
// (the devices carry transport-mode ESP). ESP-in-UDP peers pass in both.
func TestCheckPaths(t *testing.T) {
	p := controlplane.Peer{Name: "b", ULA: netip.MustParseAddr("fd00::b"), Outer: netip.MustParseAddrPort("10.0.0.2:4500")}
	st := &controlplane.State{Peers: []controlplane.Peer{p}}
	for _, clear := range []bool{false, true} {
		if err := CheckPaths(st, clear); err != nil {
			t.Fatalf("ESP-in-UDP peer, cleartext %v: %v", clear, err)
		}
	}
	tun := p
	tun.Tunnels = []controlplane.Tunnel{{Kind: controlplane.PathIPv6, Remote: netip.MustParseAddrPort("[2001:db8::2]:0")}}
	for _, via := range []controlplane.PathKind{controlplane.PathESPInUDP, controlplane.PathIPv6} {
		tun.Via = via
		st.Peers = []controlplane.Peer{p, tun}
		if err := CheckPaths(st, false); err != nil {
			t.Errorf("secure mode, tunnel peer via %v: %v", via, err)
		}
		err := CheckPaths(st, true)
		if err == nil || !strings.Contains(err.Error(), "a tunnel never carries cleartext ULA traffic") ||
			!strings.Contains(err.Error(), `peer "b"`) {
			t.Errorf("cleartext, tunnel peer via %v: %v", via, err)
		}
	}
}
