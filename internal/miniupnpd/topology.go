package miniupnpd

import (
	"net/netip"
	"testing"

	"github.com/btmm/btmm/internal/netns"
)

// Addresses of the topology NewTopology builds.
var (
	LANHost    = netip.MustParseAddr("192.168.1.2")
	GatewayLAN = netip.MustParseAddr("192.168.1.1")
	GatewayWAN = netip.MustParseAddr("11.0.0.1") // looks public, never leaves the namespaces
	WANHost    = netip.MustParseAddr("11.0.0.2")
)

// Topology is REAL-PEERS.md's proven NAT layout:
//
//	LAN 192.168.1.2 (eth0) <-> (lan0) 192.168.1.1 GW 11.0.0.1 (wan0) <-> (eth0) 11.0.0.2 WAN
//
// LAN's default route is the gateway; WAN has no route back to
// 192.168.1.0/24, so only mapped ports reach LAN from WAN.
type Topology struct {
	LAN, GW, WAN *netns.NS
}

// NewTopology builds the namespaces (removed at t's cleanup) without
// starting miniupnpd; Start it with Options().
func NewTopology(t testing.TB) *Topology {
	t.Helper()
	tp := &Topology{LAN: netns.New(t, "lan"), GW: netns.New(t, "gw"), WAN: netns.New(t, "wan")}
	netns.MustVeth(t, tp.LAN, "eth0", tp.GW, "lan0")
	netns.MustVeth(t, tp.GW, "wan0", tp.WAN, "eth0")
	tp.LAN.MustAddr(t, "eth0", "192.168.1.2/24")
	tp.GW.MustAddr(t, "lan0", "192.168.1.1/24")
	tp.GW.MustAddr(t, "wan0", "11.0.0.1/24")
	tp.WAN.MustAddr(t, "eth0", "11.0.0.2/24")
	tp.LAN.MustRoute(t, "default", "192.168.1.1", "eth0")
	return tp
}

// Options are the miniupnpd options for this topology.
func (tp *Topology) Options() Options {
	return Options{WAN: "wan0", LAN: "lan0", LANNet: netip.MustParsePrefix("192.168.1.0/24")}
}
