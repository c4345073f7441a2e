package ebpf

import (
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane/nldump"
)

func hasULA(t *testing.T, h *host) bool {
	t.Helper()
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.ns.Handle.AddrList(nil, netlink.FAMILY_V6) })
	must(t, err)
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip == h.ula {
			return true
		}
	}
	return false
}

// TestLocalULAOwnedNetNS: the dataplane assigns our ULA (the routes to the
// peers use it as source) when nobody has, removes it at Close, and leaves
// alone a ULA that was already assigned.
func TestLocalULAOwnedNetNS(t *testing.T) {
	a, b := topology(t)
	lo, err := a.ns.LinkByName("lo")
	must(t, err)
	must(t, a.ns.Handle.AddrDel(lo, &netlink.Addr{IPNet: &net.IPNet{IP: a.ula.AsSlice(), Mask: net.CIDRMask(128, 128)}}))

	a.start(t, Config{Cleartext: true})
	a.set(t, a.state(b, netip.AddrPortFrom(b.outer, b.port)))
	if !hasULA(t, a) {
		t.Fatal("Set did not assign the local ULA")
	}
	closeAndCheck(t, a)
	if hasULA(t, a) {
		t.Fatal("Close left the ULA it had added")
	}

	// Left by a btmmd that crashed (as we add it: /128 nodad): adopted,
	// removed at Close.
	must(t, a.ns.Handle.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: a.ula.AsSlice(), Mask: net.CIDRMask(128, 128)}, Flags: unix.IFA_F_NODAD}))
	a.start(t, Config{Cleartext: true})
	a.set(t, a.state(b, netip.AddrPortFrom(b.outer, b.port)))
	closeAndCheck(t, a)
	if hasULA(t, a) {
		t.Fatal("Close left the ULA a crashed run had added")
	}

	// Assigned by someone else (`ip addr add ULA/128 dev lo`: no nodad):
	// used, never removed.
	must(t, a.ns.Handle.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: a.ula.AsSlice(), Mask: net.CIDRMask(128, 128)}}))
	a.start(t, Config{Cleartext: true})
	a.set(t, a.state(b, netip.AddrPortFrom(b.outer, b.port)))
	closeAndCheck(t, a)
	if !hasULA(t, a) {
		t.Fatal("Close removed a ULA it had not added")
	}
}
