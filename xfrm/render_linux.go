package xfrm

import (
	"fmt"
	"net"
	"sort"
	"strings"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane/identity"
	"github.com/btmm/btmm/controlplane/nldump"
)

// renderHandle is what render reads: a *netlink.Handle or the dataplane's.
type renderHandle interface {
	LinkByIndex(index int) (netlink.Link, error)
	LinkByName(name string) (netlink.Link, error)
	LinkList() ([]netlink.Link, error)
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
	FouList(family int) ([]netlink.Fou, error)
	XfrmStateList(family int) ([]netlink.XfrmState, error)
	XfrmPolicyList(family int) ([]netlink.XfrmPolicy, error)
	RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error)
}

// render describes what the kernel behind h holds that matters to this
// package, one object per line in `ip xfrm`-like words, sorted: the xfrm
// interface and ULA addresses, every XFRM state and policy (ours and
// foreign), and IPv6 routes to ULAs. Keys appear only as their length.
func render(h renderHandle, ifname string) (string, error) {
	var lines []string
	names := map[int]string{}
	name := func(i int) string {
		if n, ok := names[i]; ok {
			return n
		}
		n := fmt.Sprintf("if%d", i)
		if l, err := h.LinkByIndex(i); err == nil {
			n = l.Attrs().Name
		}
		names[i] = n
		return n
	}
	for _, dev := range []string{ifname, "lo"} {
		l, err := h.LinkByName(dev)
		if err != nil {
			continue
		}
		if x, ok := l.(*netlink.Xfrmi); ok {
			up := "down"
			if x.Attrs().Flags&0x1 != 0 || x.Attrs().RawFlags&0x1 != 0 {
				up = "up"
			}
			lines = append(lines, fmt.Sprintf("link %s xfrm if_id 0x%x %s", dev, x.Ifid, up))
		}
		as, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(l, netlink.FAMILY_V6) })
		if err != nil {
			return "", fmt.Errorf("render: addresses of %s: %w", dev, err)
		}
		for _, a := range as {
			ip := ipAddr(a.IP)
			if identity.IsULA(ip) {
				ones, _ := a.Mask.Size()
				lines = append(lines, fmt.Sprintf("addr %v/%d dev %s", ip, ones, dev))
			}
		}
	}
	// Tunnel devices (ours and anyone's), their link-local addresses, and
	// the fou listeners.
	ls, err := nldump.Retry(h.LinkList)
	if err != nil {
		return "", fmt.Errorf("render: links: %w", err)
	}
	for _, l := range ls {
		var desc string
		switch t := l.(type) {
		case *netlink.Sittun:
			desc = fmt.Sprintf("sit remote %v local %v ttl %d", t.Remote, orAny(t.Local), t.Ttl)
			if t.EncapType == tunnelEncapGUE {
				desc += fmt.Sprintf(" encap gue sport %d dport %d", t.EncapSport, t.EncapDport)
			}
		case *netlink.Ip6tnl:
			desc = fmt.Sprintf("ip6tnl remote %v local %v ttl %d", t.Remote, orAny(t.Local), t.Ttl)
			if t.Flags&ip6tnlIgnEncapLimit != 0 {
				desc += " encaplimit none"
			}
		default:
			continue
		}
		a := l.Attrs()
		up := "down"
		if a.Flags&net.FlagUp != 0 || a.RawFlags&0x1 != 0 {
			up = "up"
		}
		lines = append(lines, fmt.Sprintf("link %s %s group 0x%x alias %q %s", a.Name, desc, a.Group, a.Alias, up))
		as, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(l, netlink.FAMILY_V6) })
		if err != nil {
			return "", fmt.Errorf("render: addresses of %s: %w", a.Name, err)
		}
		for _, x := range as {
			ones, _ := x.Mask.Size()
			lines = append(lines, fmt.Sprintf("addr %v/%d dev %s", ipAddr(x.IP), ones, a.Name))
		}
	}
	if fs, err := nldump.Retry(func() ([]netlink.Fou, error) { return h.FouList(netlink.FAMILY_V4) }); err == nil {
		for _, f := range fs {
			if f.EncapType == netlink.FOU_ENCAP_GUE {
				lines = append(lines, fmt.Sprintf("fou port %d gue", f.Port))
			} else {
				lines = append(lines, fmt.Sprintf("fou port %d ipproto %d", f.Port, f.Protocol))
			}
		}
	}
	ss, err := nldump.Retry(func() ([]netlink.XfrmState, error) { return h.XfrmStateList(netlink.FAMILY_ALL) })
	if err != nil {
		return "", fmt.Errorf("render: states: %w", err)
	}
	for _, s := range ss {
		lines = append(lines, renderState(&s))
	}
	ps, err := nldump.Retry(func() ([]netlink.XfrmPolicy, error) { return h.XfrmPolicyList(netlink.FAMILY_ALL) })
	if err != nil {
		return "", fmt.Errorf("render: policies: %w", err)
	}
	for _, p := range ps {
		s := fmt.Sprintf("policy %s %v -> %v", p.Dir, p.Src, p.Dst)
		if p.Ifid != 0 {
			s += fmt.Sprintf(" if_id 0x%x", p.Ifid)
		}
		for _, t := range p.Tmpls {
			s += fmt.Sprintf(" tmpl %v -> %v %s %s reqid 0x%x", t.Src, t.Dst, t.Proto, t.Mode, t.Reqid)
		}
		lines = append(lines, s)
	}
	rs, err := nldump.Retry(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Table: 254}, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return "", fmt.Errorf("render: routes: %w", err)
	}
	for _, r := range rs {
		if r.Dst == nil || !identity.IsULA(ipAddr(r.Dst.IP)) {
			continue
		}
		if ones, _ := r.Dst.Mask.Size(); ones != 128 {
			continue
		}
		s := fmt.Sprintf("route %v dev %s", r.Dst, name(r.LinkIndex))
		if r.Src != nil {
			s += fmt.Sprintf(" src %v", r.Src)
		}
		s += fmt.Sprintf(" proto %d", int(r.Protocol))
		if r.MTU != 0 {
			s += fmt.Sprintf(" mtu %d", r.MTU)
		}
		lines = append(lines, s)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n", nil
}

func orAny(ip net.IP) string {
	if len(ip) == 0 || ip.IsUnspecified() {
		return "any"
	}
	return ip.String()
}

func renderState(s *netlink.XfrmState) string {
	b := fmt.Sprintf("state %s spi 0x%08x %s %s reqid 0x%x", outerWhat(s), uint32(s.Spi), s.Proto, s.Mode, s.Reqid)
	if s.Ifid != 0 {
		b += fmt.Sprintf(" if_id 0x%x", s.Ifid)
	}
	for _, a := range []struct {
		kind string
		alg  *netlink.XfrmStateAlgo
	}{{"aead", s.Aead}, {"enc", s.Crypt}, {"auth", s.Auth}} {
		if a.alg == nil {
			continue
		}
		b += fmt.Sprintf(" %s %s key[%d]", a.kind, a.alg.Name, len(a.alg.Key))
		if a.alg.ICVLen != 0 {
			b += fmt.Sprintf(" icv %d", a.alg.ICVLen)
		}
		if a.alg.TruncateLen != 0 {
			b += fmt.Sprintf(" trunc %d", a.alg.TruncateLen)
		}
	}
	if s.Encap == nil {
		b += " encap none"
	}
	if s.ReplayWindow != 0 {
		b += fmt.Sprintf(" replay-window %d", s.ReplayWindow)
	}
	if s.Selector != nil {
		b += fmt.Sprintf(" sel %v -> %v", s.Selector.Src, s.Selector.Dst)
	}
	return b
}
