package natpmp

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane/nldump"
)

// DefaultRoute finds the IPv4 default route through h (nil: a handle in the
// calling thread's namespace) and returns its gateway and our source
// address on it (the route's preferred source, else the first global IPv4
// address of its link).
func DefaultRoute(h *netlink.Handle) (Route, error) {
	if h == nil {
		nh, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return Route{}, fmt.Errorf("natpmp: default route: netlink: %w", err)
		}
		defer nh.Close()
		h = nh
	}
	routes, err := nldump.Retry(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return Route{}, fmt.Errorf("natpmp: default route: list routes: %w", err)
	}
	var best *netlink.Route
	for i := range routes {
		r := &routes[i]
		if r.Gw == nil || r.Gw.To4() == nil {
			continue
		}
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue
			}
		}
		if best == nil || r.Priority < best.Priority {
			best = r
		}
	}
	if best == nil {
		return Route{}, fmt.Errorf("natpmp: default route: %w", ErrNoRoute)
	}
	gw, _ := netip.AddrFromSlice(best.Gw.To4())
	rt := Route{Gateway: gw}
	if best.Src != nil {
		rt.Local, _ = netip.AddrFromSlice(best.Src.To4())
		return rt, nil
	}
	link, err := h.LinkByIndex(best.LinkIndex)
	if err != nil {
		return rt, fmt.Errorf("natpmp: default route: link %d: %w", best.LinkIndex, err)
	}
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(link, netlink.FAMILY_V4) })
	if err != nil {
		return rt, fmt.Errorf("natpmp: default route: addresses of %s: %w", link.Attrs().Name, err)
	}
	for _, a := range addrs {
		if a.Scope != unix.RT_SCOPE_UNIVERSE {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if ok && (a.IPNet == nil || a.IPNet.Contains(best.Gw) || !rt.Local.IsValid()) {
			rt.Local = ip
			if a.IPNet != nil && a.IPNet.Contains(best.Gw) {
				break
			}
		}
	}
	if !rt.Local.IsValid() {
		return rt, fmt.Errorf("natpmp: default route: no IPv4 address on %s", link.Attrs().Name)
	}
	return rt, nil
}

// DialGateway opens the UDP socket to the gateway's NAT-PMP/PCP port. Call
// it inside the namespace the client should speak from.
func DialGateway(gw netip.AddrPort) (Conn, error) {
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(gw))
	if err != nil {
		return nil, fmt.Errorf("natpmp: dial %v: %w", gw, err)
	}
	return c, nil
}

// ListenAnnouncements opens 0.0.0.0:5350 (with SO_REUSEADDR so several
// clients can share it) for the gateway's announcements to 224.0.0.1,
// which Linux delivers to every host without an explicit join.
func ListenAnnouncements() (PacketConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(context.Background(), "udp4", fmt.Sprintf("0.0.0.0:%d", ClientPort))
	if err != nil {
		return nil, fmt.Errorf("natpmp: listen for announcements: %w", err)
	}
	return pc, nil
}
