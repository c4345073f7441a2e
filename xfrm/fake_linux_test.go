package xfrm

import (
	"bytes"
	"fmt"
	"net"
	"slices"
	"syscall"

	"github.com/vishvananda/netlink"
)

// fakeKernel is an in-memory XFRM + rtnetlink with the kernel's identity
// rules: states by (daddr, spi, proto), policies by (dir, selector, if_id),
// routes by (table, dst). It also answers XFRM_MSG_MIGRATE like the kernel.
type fakeKernel struct {
	states   []netlink.XfrmState
	policies []netlink.XfrmPolicy
	links    []netlink.Link
	fous     []netlink.Fou
	noFou    bool // the fou module is missing
	addrs    map[int][]netlink.Addr
	routes   []netlink.Route

	noXfrmi   bool            // LinkAdd of an xfrm interface fails
	noMigrate bool            // XFRM_MSG_MIGRATE answers ENOPROTOOPT
	failSPI   int             // XfrmStateAdd of this SPI fails
	migrated  int             // successful migrations
	noRD      map[string]bool // devices with router discovery turned off
	nextIndex int
	routeSrc  net.IP // RouteGet's answer
	routeSrc6 net.IP // RouteGet's answer for an IPv6 destination
	routeErr  error  // RouteGet fails
	routeDev  int
}

func newFakeKernel() *fakeKernel {
	k := &fakeKernel{addrs: map[int][]netlink.Addr{}, nextIndex: 3, routeSrc: net.ParseIP("10.0.0.1").To4(),
		routeSrc6: net.ParseIP("2001:db8:1::2"), routeDev: 2}
	k.links = []netlink.Link{
		&netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: "lo", Index: 1, Flags: net.FlagUp}},
		&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", Index: 2, Flags: net.FlagUp}},
	}
	return k
}

func cloneState(s netlink.XfrmState) netlink.XfrmState {
	for _, a := range []**netlink.XfrmStateAlgo{&s.Aead, &s.Crypt, &s.Auth} {
		if *a != nil {
			c := **a
			c.Key = bytes.Clone(c.Key)
			*a = &c
		}
	}
	if s.Encap != nil {
		e := *s.Encap
		s.Encap = &e
	}
	if s.Replay != nil {
		r := *s.Replay
		s.Replay = &r
	} else {
		s.Replay = &netlink.XfrmReplayState{}
	}
	s.Src, s.Dst = slices.Clone(s.Src), slices.Clone(s.Dst)
	return s
}

func (k *fakeKernel) stateIdx(s *netlink.XfrmState) int {
	return slices.IndexFunc(k.states, func(x netlink.XfrmState) bool {
		return x.Dst.Equal(s.Dst) && x.Spi == s.Spi && x.Proto == s.Proto
	})
}

func (k *fakeKernel) XfrmStateList(int) ([]netlink.XfrmState, error) {
	var out []netlink.XfrmState
	for _, s := range k.states {
		out = append(out, cloneState(s))
	}
	return out, nil
}

func (k *fakeKernel) XfrmStateAdd(s *netlink.XfrmState) error {
	if s.Spi == k.failSPI {
		return syscall.ENOSYS
	}
	if k.stateIdx(s) >= 0 {
		return syscall.EEXIST
	}
	k.states = append(k.states, cloneState(*s))
	return nil
}

// XfrmStateUpdate changes what the kernel's xfrm_state_update changes: the
// encapsulation (and lifetimes), never keys or replay state.
func (k *fakeKernel) XfrmStateUpdate(s *netlink.XfrmState) error {
	i := k.stateIdx(s)
	if i < 0 {
		return syscall.ESRCH
	}
	if s.Encap != nil && k.states[i].Encap != nil {
		e := *s.Encap
		k.states[i].Encap = &e
	}
	return nil
}

func (k *fakeKernel) XfrmStateDel(s *netlink.XfrmState) error {
	i := k.stateIdx(s)
	if i < 0 {
		return syscall.ESRCH
	}
	k.states = slices.Delete(k.states, i, i+1)
	return nil
}

func (k *fakeKernel) policyIdx(p *netlink.XfrmPolicy) int {
	return slices.IndexFunc(k.policies, func(x netlink.XfrmPolicy) bool {
		return x.Dir == p.Dir && x.Src.String() == p.Src.String() && x.Dst.String() == p.Dst.String() && x.Ifid == p.Ifid
	})
}

func clonePolicy(p netlink.XfrmPolicy) netlink.XfrmPolicy {
	p.Tmpls = slices.Clone(p.Tmpls)
	return p
}

func (k *fakeKernel) XfrmPolicyList(int) ([]netlink.XfrmPolicy, error) {
	var out []netlink.XfrmPolicy
	for _, p := range k.policies {
		out = append(out, clonePolicy(p))
	}
	return out, nil
}

func (k *fakeKernel) XfrmPolicyAdd(p *netlink.XfrmPolicy) error {
	if k.policyIdx(p) >= 0 {
		return syscall.EEXIST
	}
	k.policies = append(k.policies, clonePolicy(*p))
	return nil
}

func (k *fakeKernel) XfrmPolicyUpdate(p *netlink.XfrmPolicy) error {
	if i := k.policyIdx(p); i >= 0 {
		k.policies[i] = clonePolicy(*p)
		return nil
	}
	return k.XfrmPolicyAdd(p)
}

func (k *fakeKernel) XfrmPolicyDel(p *netlink.XfrmPolicy) error {
	i := k.policyIdx(p)
	if i < 0 {
		return syscall.ENOENT
	}
	k.policies = slices.Delete(k.policies, i, i+1)
	return nil
}

func (k *fakeKernel) LinkByName(name string) (netlink.Link, error) {
	for _, l := range k.links {
		if l.Attrs().Name == name {
			return l, nil
		}
	}
	return nil, netlink.LinkNotFoundError{}
}

func (k *fakeKernel) LinkByIndex(i int) (netlink.Link, error) {
	for _, l := range k.links {
		if l.Attrs().Index == i {
			return l, nil
		}
	}
	return nil, netlink.LinkNotFoundError{}
}

// tunnelKey is how the kernel finds a sit or ip6tnl device: by its
// outer addresses; two devices with the same pair cannot exist.
func tunnelKey(l netlink.Link) string {
	switch t := l.(type) {
	case *netlink.Sittun:
		return "sit " + t.Local.String() + " " + t.Remote.String()
	case *netlink.Ip6tnl:
		return "ip6tnl " + t.Local.String() + " " + t.Remote.String()
	}
	return ""
}

func (k *fakeKernel) LinkAdd(l netlink.Link) error {
	if _, ok := l.(*netlink.Xfrmi); ok && k.noXfrmi {
		return syscall.EOPNOTSUPP
	}
	if _, err := k.LinkByName(l.Attrs().Name); err == nil {
		return syscall.EEXIST
	}
	if key := tunnelKey(l); key != "" && slices.ContainsFunc(k.links, func(x netlink.Link) bool { return tunnelKey(x) == key }) {
		return syscall.EEXIST
	}
	l = cloneLink(l)
	l.Attrs().Alias = "" // set by a later change only, as in the kernel
	l.Attrs().Index = k.nextIndex
	k.nextIndex++
	k.links = append(k.links, l)
	return nil
}

func (k *fakeKernel) LinkDel(l netlink.Link) error {
	i := slices.IndexFunc(k.links, func(x netlink.Link) bool { return x.Attrs().Name == l.Attrs().Name })
	if i < 0 {
		return syscall.ENODEV
	}
	idx := k.links[i].Attrs().Index
	k.links = slices.Delete(k.links, i, i+1)
	delete(k.addrs, idx)
	k.routes = slices.DeleteFunc(k.routes, func(r netlink.Route) bool { return r.LinkIndex == idx })
	return nil
}

func cloneLink(l netlink.Link) netlink.Link {
	switch t := l.(type) {
	case *netlink.Sittun:
		c := *t
		return &c
	case *netlink.Ip6tnl:
		c := *t
		return &c
	}
	return l
}

// LinkSetUp sets the flag on the kernel's link (found by name, as the
// kernel finds it by index) and on l.
func (k *fakeKernel) LinkSetUp(l netlink.Link) error {
	switch l.(type) {
	case *netlink.Sittun, *netlink.Ip6tnl:
		if !k.noRD[l.Attrs().Name] {
			// The real kernel would send router solicitations
			// through the tunnel from here on.
			return fmt.Errorf("fake: tunnel device %s brought up with router discovery on", l.Attrs().Name)
		}
	}
	if kl, err := k.LinkByName(l.Attrs().Name); err == nil {
		kl.Attrs().Flags |= net.FlagUp
	}
	l.Attrs().Flags |= net.FlagUp
	return nil
}

// LinkSetAlias sets the alias, which LinkAdd ignores as the kernel does.
func (k *fakeKernel) LinkSetAlias(l netlink.Link, alias string) error {
	kl, err := k.LinkByName(l.Attrs().Name)
	if err != nil {
		return syscall.ENODEV
	}
	kl.Attrs().Alias = alias
	return nil
}

// LinkModify changes an existing tunnel device in place (changelink),
// found by name; an index with a name is a rename, which the kernel
// refuses for an up device.
func (k *fakeKernel) LinkModify(l netlink.Link) error {
	if l.Attrs().Index != 0 {
		return syscall.EBUSY
	}
	i := slices.IndexFunc(k.links, func(x netlink.Link) bool { return x.Attrs().Name == l.Attrs().Name })
	if i < 0 {
		return syscall.ENODEV
	}
	l = cloneLink(l)
	l.Attrs().Index = k.links[i].Attrs().Index
	if k.links[i].Type() != l.Type() {
		return syscall.EOPNOTSUPP
	}
	if key := tunnelKey(l); slices.ContainsFunc(k.links, func(x netlink.Link) bool {
		return x.Attrs().Index != l.Attrs().Index && tunnelKey(x) == key
	}) {
		return syscall.EEXIST
	}
	c := cloneLink(l)
	c.Attrs().Flags = k.links[i].Attrs().Flags
	k.links[i] = c
	return nil
}

func (k *fakeKernel) LinkSetIP6AddrGenMode(netlink.Link, int) error { return nil }

// NoRouterDiscovery records the device: tests check every tunnel device
// had router discovery turned off before it came up.
func (k *fakeKernel) NoRouterDiscovery(dev string) error {
	if k.noRD == nil {
		k.noRD = map[string]bool{}
	}
	k.noRD[dev] = true
	return nil
}

func (k *fakeKernel) FouAdd(f netlink.Fou) error {
	if k.noFou {
		return syscall.ENOENT
	}
	if slices.ContainsFunc(k.fous, func(x netlink.Fou) bool { return x.Port == f.Port && x.Family == f.Family }) {
		return syscall.EEXIST
	}
	k.fous = append(k.fous, f)
	return nil
}

func (k *fakeKernel) FouDel(f netlink.Fou) error {
	i := slices.IndexFunc(k.fous, func(x netlink.Fou) bool { return x.Port == f.Port && x.Family == f.Family })
	if i < 0 {
		return syscall.ENOENT
	}
	k.fous = slices.Delete(k.fous, i, i+1)
	return nil
}

func (k *fakeKernel) FouList(fam int) ([]netlink.Fou, error) {
	if k.noFou {
		return nil, syscall.ENOENT
	}
	var out []netlink.Fou
	for _, f := range k.fous {
		if f.Family == fam {
			out = append(out, f)
		}
	}
	return out, nil
}

func (k *fakeKernel) AddrList(l netlink.Link, _ int) ([]netlink.Addr, error) {
	return slices.Clone(k.addrs[l.Attrs().Index]), nil
}

func (k *fakeKernel) AddrAdd(l netlink.Link, a *netlink.Addr) error {
	i := l.Attrs().Index
	if slices.ContainsFunc(k.addrs[i], func(x netlink.Addr) bool { return x.IP.Equal(a.IP) }) {
		return syscall.EEXIST
	}
	k.addrs[i] = append(k.addrs[i], *a)
	return nil
}

func (k *fakeKernel) AddrDel(l netlink.Link, a *netlink.Addr) error {
	i := l.Attrs().Index
	n := len(k.addrs[i])
	k.addrs[i] = slices.DeleteFunc(k.addrs[i], func(x netlink.Addr) bool { return x.IP.Equal(a.IP) })
	if len(k.addrs[i]) == n {
		return syscall.EADDRNOTAVAIL
	}
	return nil
}

func (k *fakeKernel) routeIdx(r *netlink.Route) int {
	return slices.IndexFunc(k.routes, func(x netlink.Route) bool {
		return x.Table == r.Table && x.Dst.String() == r.Dst.String()
	})
}

func (k *fakeKernel) RouteListFiltered(_ int, f *netlink.Route, mask uint64) ([]netlink.Route, error) {
	var out []netlink.Route
	for _, r := range k.routes {
		if mask&netlink.RT_FILTER_PROTOCOL != 0 && r.Protocol != f.Protocol {
			continue
		}
		if mask&netlink.RT_FILTER_TABLE != 0 && r.Table != f.Table {
			continue
		}
		out = append(out, r)
	}
	return out, nil
}

func (k *fakeKernel) RouteAdd(r *netlink.Route) error {
	if k.routeIdx(r) >= 0 {
		return syscall.EEXIST
	}
	if _, err := k.LinkByIndex(r.LinkIndex); err != nil {
		return syscall.ENODEV
	}
	k.routes = append(k.routes, *r)
	return nil
}

func (k *fakeKernel) RouteReplace(r *netlink.Route) error {
	if i := k.routeIdx(r); i >= 0 {
		k.routes[i] = *r
		return nil
	}
	return k.RouteAdd(r)
}

func (k *fakeKernel) RouteDel(r *netlink.Route) error {
	i := k.routeIdx(r)
	if i < 0 {
		return syscall.ESRCH
	}
	k.routes = slices.Delete(k.routes, i, i+1)
	return nil
}

func (k *fakeKernel) RouteGet(dst net.IP) ([]netlink.Route, error) {
	if k.routeErr != nil {
		return nil, k.routeErr
	}
	if dst.To4() == nil {
		return []netlink.Route{{Src: k.routeSrc6, LinkIndex: k.routeDev}}, nil
	}
	return []netlink.Route{{Src: k.routeSrc, LinkIndex: k.routeDev}}, nil
}

// migrate does what xfrm_migrate does: find the policy by selector, dir and
// if_id, clone the first matching state (same reqid, old addresses) to the
// new addresses and encapsulation keeping its replay state, delete the old
// one, and rewrite the policy's template.
func (k *fakeKernel) migrate(m migration) error {
	if k.noMigrate {
		return syscall.ENOPROTOOPT
	}
	pol := slices.IndexFunc(k.policies, func(p netlink.XfrmPolicy) bool {
		return uint8(p.Dir) == m.Dir && ipnetPrefix(p.Src) == m.SelSrc && ipnetPrefix(p.Dst) == m.SelDst && uint32(p.Ifid) == m.IfID
	})
	if pol < 0 {
		return syscall.ENOENT
	}
	for i, s := range k.states {
		if uint32(s.Reqid) != m.Reqid || ipAddr(s.Src) != m.OldSrc || ipAddr(s.Dst) != m.OldDst || uint32(s.Ifid) != m.IfID {
			continue
		}
		c := cloneState(s)
		c.Src, c.Dst = m.NewSrc.AsSlice(), m.NewDst.AsSlice()
		c.Encap.SrcPort, c.Encap.DstPort = int(m.EncapSport), int(m.EncapDport)
		k.states = slices.Delete(k.states, i, i+1)
		k.states = append(k.states, c)
		break
	}
	for i := range k.policies[pol].Tmpls {
		t := &k.policies[pol].Tmpls[i]
		if ipAddr(t.Src) == m.OldSrc && ipAddr(t.Dst) == m.OldDst {
			t.Src, t.Dst = m.NewSrc.AsSlice(), m.NewDst.AsSlice()
		}
	}
	k.migrated++
	return nil
}

func (k *fakeKernel) LinkList() ([]netlink.Link, error) { return slices.Clone(k.links), nil }
