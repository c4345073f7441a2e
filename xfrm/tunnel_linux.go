package xfrm

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/identity"
	"github.com/btmm/btmm/controlplane/nldump"
)

// Tunnel devices (issue 15, docs/tunnels.md). Per peer with tunnels: an
// ip6tnl (ip6ip6) device for its IPv6 tunnel and a sit device for its IPv4
// one, which sends plain protocol 41 (sit) or GUE to the peer's FOU port
// (Linux fou, `encap gue`). The sit device receives both: fou hands the
// packet inside GUE to the same protocol-41 handler, which finds the device
// by the outer addresses. Transport-mode ESP between the ULAs protects
// everything a route sends into a device (policies without if_id, see
// setLocked); the devices carry no cleartext ULA traffic.
//
// Ownership: the devices carry the dataplane's tag as their link group
// (`ip link show` prints "group 25217" for 0x6281) and a name bt6-/bts-
// (controlplane.TunnelDevice); nothing else is touched. The fou listener
// has no tag: the one on Local.FOUPort with GUE encapsulation is btmm's
// (a killed btmmd's is taken over), any other is left alone.
//
// Tunnels is shared: package ebpf's secure mode makes the same devices
// with its own tag (OpenTunnels), so there is one copy of this code.

const (
	ip6tnlIgnEncapLimit = 0x1 // IP6_TNL_F_IGN_ENCAP_LIMIT: no destination options header
	tunnelEncapGUE      = 2   // TUNNEL_ENCAP_GUE
	tunnelTTL           = 64
	ipprotoIPv6         = 41
	addrGenModeNone     = 1 // IN6_ADDR_GEN_MODE_NONE
)

// tunnelHandle is the part of a netlink handle the tunnel devices need.
type tunnelHandle interface {
	LinkByName(name string) (netlink.Link, error)
	LinkList() ([]netlink.Link, error)
	LinkAdd(netlink.Link) error
	LinkDel(netlink.Link) error
	LinkSetUp(netlink.Link) error
	LinkModify(netlink.Link) error
	LinkSetAlias(link netlink.Link, alias string) error
	LinkSetIP6AddrGenMode(link netlink.Link, mode int) error
	NoRouterDiscovery(dev string) error
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
	AddrAdd(link netlink.Link, addr *netlink.Addr) error
	AddrDel(link netlink.Link, addr *netlink.Addr) error
	RouteGet(dst net.IP) ([]netlink.Route, error)
	FouAdd(netlink.Fou) error
	FouDel(netlink.Fou) error
	FouList(family int) ([]netlink.Fou, error)
}

// Recorder collects what a step changed (Do reports success) and what
// failed.
type Recorder interface {
	Do(op, obj, what string, err error) bool
	Fail(err error)
}

// Tunnels makes, adopts and removes the tunnel devices and the GUE
// listener of one dataplane (tag: the devices' link group).
type Tunnels struct {
	h       tunnelHandle
	group   uint32
	log     *slog.Logger
	fouPort uint16 // the GUE listener we added (or took over); 0: none
	close   func() error
}

func newTunnels(h tunnelHandle, group uint32, log *slog.Logger) *Tunnels {
	return &Tunnels{h: h, group: group, log: log, close: func() error { return nil }}
}

// OpenTunnels returns the tunnel devices of the dataplane tagged group in
// network namespace ns, with netlink sockets of its own (Close closes
// them; it removes nothing: RemoveAll and CloseFou do).
func OpenTunnels(ns netns.NsHandle, group uint32, log *slog.Logger) (*Tunnels, error) {
	h, err := netlink.NewHandleAt(ns, syscall.NETLINK_ROUTE, syscall.NETLINK_GENERIC)
	if err != nil {
		return nil, fmt.Errorf("tunnels: netlink handle: %w", err)
	}
	fc, err := dialFou(int(ns))
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("tunnels: generic netlink socket: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	nh, closeNS, err := newNSHandle(ns, h, fc)
	if err != nil {
		fc.Close()
		h.Close()
		return nil, fmt.Errorf("tunnels: %w", err)
	}
	t := newTunnels(nh, group, log)
	t.close = func() error { h.Close(); closeNS(); return fc.Close() }
	return t, nil
}

// Close closes the netlink sockets of OpenTunnels.
func (t *Tunnels) Close() error { return t.close() }

// Ours reports whether l is one of our tunnel devices.
func (t *Tunnels) Ours(l netlink.Link) bool {
	switch l.(type) {
	case *netlink.Sittun, *netlink.Ip6tnl:
	default:
		return false
	}
	a := l.Attrs()
	return a.Group == t.group && (strings.HasPrefix(a.Name, "bt6-") || strings.HasPrefix(a.Name, "bts-"))
}

// Links lists our tunnel devices.
func (t *Tunnels) Links() ([]netlink.Link, error) {
	all, err := nldump.Retry(t.h.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var ours []netlink.Link
	for _, l := range all {
		if t.Ours(l) {
			ours = append(ours, l)
		}
	}
	return ours, nil
}

// Link is the device desired for peer p's tunnel tun.
func (t *Tunnels) Link(local controlplane.Local, p controlplane.Peer, tun controlplane.Tunnel) (netlink.Link, error) {
	// NewLinkAttrs: TxQLen -1, or the request would set the queue length.
	la := netlink.NewLinkAttrs()
	la.Name, la.Group, la.Alias = controlplane.TunnelDevice(tun.Kind, p.ULA), t.group, fmt.Sprintf("btmm %v to %s %v", tun.Kind, p.Name, p.ULA)
	remote := tun.Remote.Addr()
	switch tun.Kind {
	case controlplane.PathIPv6:
		// ip6tnl needs a local address to send (the kernel will not pick
		// one per packet for ip6ip6): ours, or the route's source.
		l6 := local.Outer6
		if !l6.IsValid() {
			rs, err := t.h.RouteGet(remote.AsSlice())
			if err != nil || len(rs) == 0 {
				return nil, fmt.Errorf("peer %q: no route to %v: %v", p.Name, remote, err)
			}
			a, ok := netip.AddrFromSlice(rs[0].Src)
			if !ok || !a.Is6() || a.Is4In6() || !a.IsGlobalUnicast() || identity.IsULA(a) {
				return nil, fmt.Errorf("peer %q: the route to %v has no global IPv6 source (%v)", p.Name, remote, rs[0].Src)
			}
			l6 = a
		}
		return &netlink.Ip6tnl{LinkAttrs: la, Local: l6.AsSlice(), Remote: remote.AsSlice(), Ttl: tunnelTTL,
			Proto: ipprotoIPv6, Flags: ip6tnlIgnEncapLimit}, nil
	case controlplane.PathSit, controlplane.PathFOU:
		// Local "any": the kernel picks the source per packet, so the
		// device survives our own moves, and receives what comes from
		// the peer's address to any of ours (behind a NAT: our private one).
		s := &netlink.Sittun{LinkAttrs: la, Remote: remote.AsSlice(), Ttl: tunnelTTL, Proto: ipprotoIPv6, PMtuDisc: 1}
		if tun.Kind == controlplane.PathFOU {
			s.EncapType, s.EncapSport, s.EncapDport = tunnelEncapGUE, local.FOUPort, tun.Remote.Port()
		}
		return s, nil
	}
	return nil, fmt.Errorf("peer %q: %v is not a tunnel kind", p.Name, tun.Kind)
}

func sameIP(a, b net.IP) bool {
	if len(a) == 0 || a.IsUnspecified() {
		return len(b) == 0 || b.IsUnspecified()
	}
	return a.Equal(b)
}

// sameLink compares what tunnelLink sets.
func sameLink(have, want netlink.Link) bool {
	if have.Attrs().Alias != want.Attrs().Alias || have.Attrs().Group != want.Attrs().Group {
		return false
	}
	switch w := want.(type) {
	case *netlink.Ip6tnl:
		h, ok := have.(*netlink.Ip6tnl)
		return ok && sameIP(h.Local, w.Local) && sameIP(h.Remote, w.Remote) && h.Ttl == w.Ttl &&
			h.Proto == w.Proto && h.Flags&ip6tnlIgnEncapLimit == w.Flags&ip6tnlIgnEncapLimit
	case *netlink.Sittun:
		h, ok := have.(*netlink.Sittun)
		return ok && sameIP(h.Local, w.Local) && sameIP(h.Remote, w.Remote) && h.Ttl == w.Ttl && h.Proto == w.Proto &&
			h.EncapType == w.EncapType && h.EncapSport == w.EncapSport && h.EncapDport == w.EncapDport
	}
	return false
}

func linkWhat(l netlink.Link) string {
	switch x := l.(type) {
	case *netlink.Ip6tnl:
		return fmt.Sprintf("%s ip6tnl ip6ip6 local %v remote %v", x.Name, x.Local, x.Remote)
	case *netlink.Sittun:
		s := fmt.Sprintf("%s sit remote %v", x.Name, x.Remote)
		if x.EncapType == tunnelEncapGUE {
			s += fmt.Sprintf(" encap gue sport %d dport %d", x.EncapSport, x.EncapDport)
		}
		return s
	}
	return l.Attrs().Name
}

// Apply makes the desired tunnel devices exist, up, as desired and with
// our link-local address (have: Links by name); it returns their ifindexes
// by name.
func (t *Tunnels) Apply(a Recorder, want []netlink.Link, have map[string]netlink.Link, ula netip.Addr) map[string]int {
	idx := map[string]int{}
	for _, w := range want {
		name := w.Attrs().Name
		h, ok := have[name]
		switch {
		case !ok:
			if other, err := t.h.LinkByName(name); err == nil {
				a.Fail(fmt.Errorf("add link %s: a %s device of that name exists and is not btmm's", name, other.Type()))
				continue
			}
			if !a.Do("add", "link", linkWhat(w), t.h.LinkAdd(w)) {
				continue
			}
			l, err := t.h.LinkByName(name)
			if err != nil {
				a.Fail(fmt.Errorf("add link %s: %w", name, err))
				continue
			}
			// The kernel takes the group (our tag) at creation, the
			// alias (for people) only from a change.
			if err := t.h.LinkSetAlias(l, w.Attrs().Alias); err != nil {
				a.Fail(fmt.Errorf("alias of %s: %w", name, err))
			}
			// Only our link-local address: none made from the outer one.
			if err := t.h.LinkSetIP6AddrGenMode(l, addrGenModeNone); err != nil {
				t.log.Debug("addrgenmode none", "link", name, "err", err)
			}
			// No router solicitations through the tunnel (set while
			// the device is down: the kernel sends them on up).
			if err := t.h.NoRouterDiscovery(name); err != nil {
				a.Fail(fmt.Errorf("router discovery off on %s: %w", name, err))
			}
			h = l
		case !sameLink(h, w):
			// Found by name (index 0): with an index and a name the
			// kernel tries a rename, which an up device refuses (EBUSY).
			w.Attrs().Index = 0
			if !a.Do("update", "link", linkWhat(w), t.h.LinkModify(w)) {
				continue
			}
		}
		if h.Attrs().Flags&net.FlagUp == 0 && h.Attrs().RawFlags&syscall.IFF_UP == 0 {
			if err := t.h.LinkSetUp(h); err != nil {
				a.Fail(fmt.Errorf("bring %s up: %w", name, err))
				continue
			}
		}
		idx[name] = h.Attrs().Index
		ll := controlplane.TunnelLinkLocal(ula)
		as, err := nldump.Retry(func() ([]netlink.Addr, error) { return t.h.AddrList(h, netlink.FAMILY_V6) })
		if err != nil {
			a.Fail(fmt.Errorf("list addresses on %s: %w", name, err))
			continue
		}
		found := false
		for _, x := range as {
			if ip := ipAddr(x.IP); ip == ll {
				found = true
			} else if ip.IsLinkLocalUnicast() {
				// An old ULA's, or the kernel's before addrgenmode none.
				a.Do("delete", "address", fmt.Sprintf("%v/64 dev %s", ip, name), t.h.AddrDel(h, &x))
			}
		}
		if !found {
			addr := &netlink.Addr{IPNet: &net.IPNet{IP: ll.AsSlice(), Mask: net.CIDRMask(64, 128)}, Flags: syscall.IFA_F_NODAD}
			a.Do("add", "address", fmt.Sprintf("%v/64 dev %s", ll, name), t.h.AddrAdd(h, addr))
		}
	}
	return idx
}

// Fou makes the GUE listener on port exist (0: none); it runs before the
// devices that send to peers. OldFou removes the one we had on another port.
func (t *Tunnels) Fou(a Recorder, port uint16) {
	if port == 0 {
		return
	}
	fs, err := nldump.Retry(func() ([]netlink.Fou, error) { return t.h.FouList(netlink.FAMILY_V4) })
	if err != nil {
		a.Fail(fmt.Errorf("list fou ports (is the fou module loaded?): %w", err))
		return
	}
	for _, f := range fs {
		if f.Port != int(port) {
			continue
		}
		if f.EncapType != netlink.FOU_ENCAP_GUE {
			a.Fail(fmt.Errorf("fou port %d is in use by a listener that is not btmm's (ipproto %d, not gue)", port, f.Protocol))
			return
		}
		if t.fouPort != port {
			t.log.Info("taking over the GUE listener on our FOU port (a killed btmmd's)", "port", port)
			t.fouPort = port
		}
		return
	}
	if a.Do("add", "fou", fmt.Sprintf("port %d gue", port), t.h.FouAdd(netlink.Fou{Family: netlink.FAMILY_V4, Port: int(port), EncapType: netlink.FOU_ENCAP_GUE})) {
		t.fouPort = port
	}
}

// OldFou removes our GUE listener when it is no longer desired on its port.
func (t *Tunnels) OldFou(a Recorder, port uint16) {
	if t.fouPort == 0 || t.fouPort == port {
		return
	}
	old := t.fouPort
	if a.Do("delete", "fou", fmt.Sprintf("port %d gue", old), t.delFou(old)) {
		t.fouPort = 0
	}
}

// CloseFou removes our GUE listener (Close).
func (t *Tunnels) CloseFou() error {
	if t.fouPort == 0 {
		return nil
	}
	if err := t.delFou(t.fouPort); err != nil {
		return fmt.Errorf("delete fou port %d: %w", t.fouPort, err)
	}
	t.fouPort = 0
	return nil
}

func (t *Tunnels) delFou(port uint16) error {
	err := t.h.FouDel(netlink.Fou{Family: netlink.FAMILY_V4, Port: int(port)})
	if absent(err) {
		return nil
	}
	return err
}

// Delete deletes one of our tunnel devices (gone already is no error).
func (t *Tunnels) Delete(l netlink.Link) error {
	if err := t.h.LinkDel(l); err != nil && !errors.Is(err, syscall.ENODEV) {
		return err
	}
	return nil
}

// RemoveAll deletes our tunnel devices (leftovers, Close).
func (t *Tunnels) RemoveAll() error {
	ls, err := t.Links()
	if err != nil {
		return err
	}
	var errs []error
	for _, l := range ls {
		if err := t.h.LinkDel(l); err != nil && !errors.Is(err, syscall.ENODEV) {
			errs = append(errs, fmt.Errorf("delete link %s: %w", l.Attrs().Name, err))
		}
	}
	return errors.Join(errs...)
}
