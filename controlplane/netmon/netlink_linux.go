package netmon

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane/nldump"
)

// NewSource returns the rtnetlink Source of network namespace ns; a closed
// handle (netns.None()) means the caller's namespace.
func NewSource(ns netns.NsHandle) Source { return &nlSource{ns: ns} }

type nlSource struct{ ns netns.NsHandle }

func (s *nlSource) nsOpt() *netns.NsHandle {
	if !s.ns.IsOpen() {
		return nil
	}
	ns := s.ns
	return &ns
}

// Subscribe implements Source with three rtnetlink sockets (links,
// addresses, routes). If one of them fails, all are closed and the channel
// closes: the Monitor subscribes again.
func (s *nlSource) Subscribe(ctx context.Context) (<-chan Msg, error) {
	done := make(chan struct{})
	lch := make(chan netlink.LinkUpdate, 64)
	ach := make(chan netlink.AddrUpdate, 64)
	rch := make(chan netlink.RouteUpdate, 64)
	const rcvbuf = 1 << 20
	ignore := func(error) {} // a failed socket closes its channel, which is what counts
	if err := netlink.LinkSubscribeWithOptions(lch, done, netlink.LinkSubscribeOptions{Namespace: s.nsOpt(), ErrorCallback: ignore, ReceiveBufferSize: rcvbuf}); err != nil {
		close(done)
		return nil, fmt.Errorf("netmon: subscribe to links: %w", err)
	}
	if err := netlink.AddrSubscribeWithOptions(ach, done, netlink.AddrSubscribeOptions{Namespace: s.nsOpt(), ErrorCallback: ignore, ReceiveBufferSize: rcvbuf}); err != nil {
		close(done)
		go drain(lch)
		return nil, fmt.Errorf("netmon: subscribe to addresses: %w", err)
	}
	if err := netlink.RouteSubscribeWithOptions(rch, done, netlink.RouteSubscribeOptions{Namespace: s.nsOpt(), ErrorCallback: ignore, ReceiveBufferSize: rcvbuf}); err != nil {
		close(done)
		go drain(lch)
		go drain(ach)
		return nil, fmt.Errorf("netmon: subscribe to routes: %w", err)
	}
	out := make(chan Msg, 64)
	go func() {
		defer close(out)
		stopped := false
		stop := func() {
			if !stopped {
				stopped = true
				close(done)
			}
		}
		send := func(m Msg) {
			if stopped {
				return
			}
			select {
			case out <- m:
			case <-ctx.Done():
				stop()
			}
		}
		ctxDone := ctx.Done()
		// Read until all three closed: the library's goroutines block on
		// their channel otherwise.
		for lch != nil || ach != nil || rch != nil {
			select {
			case <-ctxDone:
				ctxDone = nil
				stop()
			case u, ok := <-lch:
				if !ok {
					lch = nil
					stop()
					continue
				}
				send(linkMsg(u))
			case u, ok := <-ach:
				if !ok {
					ach = nil
					stop()
					continue
				}
				send(addrMsg(u))
			case u, ok := <-rch:
				if !ok {
					rch = nil
					stop()
					continue
				}
				if m, ok := routeMsg(u); ok {
					send(m)
				}
			}
		}
	}()
	return out, nil
}

func drain[T any](ch <-chan T) {
	for range ch {
	}
}

func linkOf(l netlink.Link) Link {
	a := l.Attrs()
	kind := l.Type()
	if kind == "device" {
		kind = ""
	}
	return Link{
		Index: a.Index, Name: a.Name, Kind: kind,
		Up:       a.Flags&net.FlagUp != 0 && (a.OperState == netlink.OperUp || a.OperState == netlink.OperUnknown),
		Loopback: a.Flags&net.FlagLoopback != 0,
	}
}

func linkMsg(u netlink.LinkUpdate) Msg {
	l := linkOf(u.Link)
	kind := LinkChanged
	if u.Header.Type == unix.RTM_DELLINK {
		kind = LinkDeleted
	}
	return Msg{Kind: kind, Link: &l}
}

func prefixOf(n *net.IPNet) netip.Prefix {
	if n == nil {
		return netip.Prefix{}
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones)
}

func addrMsg(u netlink.AddrUpdate) Msg {
	a := Addr{Index: u.LinkIndex, Prefix: prefixOf(&u.LinkAddress), Secondary: u.Flags&unix.IFA_F_SECONDARY != 0}
	kind := AddrAdded
	if !u.NewAddr {
		kind = AddrDeleted
	}
	return Msg{Kind: kind, Addr: &a}
}

func routeOf(r netlink.Route) (Route, bool) {
	out := Route{Table: r.Table, Index: r.LinkIndex, Priority: r.Priority, Protocol: int(r.Protocol)}
	switch {
	case r.Dst != nil:
		out.Dst = prefixOf(r.Dst)
	case r.Family == unix.AF_INET:
		out.Dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	case r.Family == unix.AF_INET6:
		out.Dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	default:
		return Route{}, false
	}
	gw, idx := r.Gw, r.LinkIndex
	if len(r.MultiPath) > 0 && idx == 0 {
		gw, idx = r.MultiPath[0].Gw, r.MultiPath[0].LinkIndex
	}
	out.Index = idx
	if a, ok := netip.AddrFromSlice(gw); ok {
		out.Gateway = a.Unmap()
	}
	if a, ok := netip.AddrFromSlice(r.Src); ok {
		out.Src = a.Unmap()
	}
	return out, true
}

func routeMsg(u netlink.RouteUpdate) (Msg, bool) {
	r, ok := routeOf(u.Route)
	if !ok {
		return Msg{}, false
	}
	kind := RouteAdded
	if u.Type == unix.RTM_DELROUTE {
		kind = RouteDeleted
	}
	return Msg{Kind: kind, Route: &r}, true
}

// Snapshot implements Source: links, addresses and main-table routes, each
// dump retried when the kernel reports it interrupted.
func (s *nlSource) Snapshot(ctx context.Context) (Snapshot, error) {
	var h *netlink.Handle
	var err error
	if s.ns.IsOpen() {
		h, err = netlink.NewHandleAt(s.ns, unix.NETLINK_ROUTE)
	} else {
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
	}
	if err != nil {
		return Snapshot{}, fmt.Errorf("netmon: snapshot: netlink: %w", err)
	}
	defer h.Close()
	var sn Snapshot
	links, err := nldump.Retry(h.LinkList)
	if err != nil {
		return Snapshot{}, fmt.Errorf("netmon: snapshot: links: %w", err)
	}
	downs, err := s.carrierDowns()
	if err != nil {
		return Snapshot{}, err
	}
	for _, l := range links {
		ll := linkOf(l)
		ll.Downs = downs[ll.Index]
		sn.Links = append(sn.Links, ll)
	}
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(nil, netlink.FAMILY_ALL) })
	if err != nil {
		return Snapshot{}, fmt.Errorf("netmon: snapshot: addresses: %w", err)
	}
	for _, a := range addrs {
		sn.Addrs = append(sn.Addrs, Addr{Index: a.LinkIndex, Prefix: prefixOf(a.IPNet), Secondary: a.Flags&unix.IFA_F_SECONDARY != 0})
	}
	routes, err := nldump.Retry(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return Snapshot{}, fmt.Errorf("netmon: snapshot: routes: %w", err)
	}
	for _, r := range routes {
		if rr, ok := routeOf(r); ok {
			sn.Routes = append(sn.Routes, rr)
		}
	}
	return sn, nil
}
