package ebpf

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/btmm/btmm/controlplane"
)

// TestCheckPaths: tunnel paths are refused with an error that says why and
// what to use instead; ESP-in-UDP peers pass.
func TestCheckPaths(t *testing.T) {
	p := controlplane.Peer{Name: "b", ULA: netip.MustParseAddr("fd00::b"), Outer: netip.MustParseAddrPort("10.0.0.2:4500")}
	st := &controlplane.State{Peers: []controlplane.Peer{p}}
	if err := CheckPaths(st); err != nil {
		t.Fatalf("ESP-in-UDP peer: %v", err)
	}
	p.Tunnels = []controlplane.Tunnel{{Kind: controlplane.PathIPv6, Remote: netip.MustParseAddrPort("[2001:db8::2]:0")}}
	p.Via = controlplane.PathIPv6
	st.Peers = []controlplane.Peer{p}
	err := CheckPaths(st)
	if err == nil || !strings.Contains(err.Error(), "need the xfrm dataplane") {
		t.Fatalf("ipv6 path: %v", err)
	}
}
