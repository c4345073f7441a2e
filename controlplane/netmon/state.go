package netmon

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/btmm/btmm/controlplane/identity"
)

// Link is a network interface as rtnetlink reports it.
type Link struct {
	Index    int    `json:"index"`
	Name     string `json:"name"`
	Up       bool   `json:"up"`             // administratively up and with carrier (operstate up or unknown)
	Kind     string `json:"kind,omitempty"` // "veth", "bridge", "xfrm", ...; "" for plain devices
	Loopback bool   `json:"loopback,omitempty"`
	// Downs is the kernel's carrier-down count of the link
	// (IFLA_CARRIER_DOWN_COUNT; 0 where not read). It only grows, and it
	// counts a down-and-up that reached us as one "up" notification.
	// State.Equal ignores it: a flap is a reason, not a state.
	Downs uint32 `json:"carrier_downs,omitempty"`
}

// Addr is one address of a link.
type Addr struct {
	Index     int          `json:"index"`
	Prefix    netip.Prefix `json:"prefix"` // the address with its prefix length
	Secondary bool         `json:"secondary,omitempty"`
}

// Route is one route of the main table.
type Route struct {
	Table    int          `json:"table"`
	Dst      netip.Prefix `json:"dst"` // 0.0.0.0/0 or ::/0 for a default route
	Gateway  netip.Addr   `json:"gateway,omitzero"`
	Index    int          `json:"index"` // output link
	Src      netip.Addr   `json:"src,omitzero"`
	Priority int          `json:"priority,omitempty"`
	Protocol int          `json:"protocol,omitempty"`
}

// mainTable is RT_TABLE_MAIN.
const mainTable = 254

// Snapshot is what the kernel has at one moment.
type Snapshot struct {
	Links  []Link  `json:"links"`
	Addrs  []Addr  `json:"addrs"`
	Routes []Route `json:"routes"`
}

// DefaultRoute is the IPv4 default route as btmm uses it.
type DefaultRoute struct {
	Device  string     `json:"device"`
	Index   int        `json:"index"`
	Gateway netip.Addr `json:"gateway,omitzero"`
	// Outer is the source address the kernel uses on this route: the
	// route's preferred source, else the device's primary IPv4 address
	// (the one in the gateway's subnet when there are several).
	Outer netip.Addr `json:"outer,omitzero"`
	Up    bool       `json:"up"`
}

// Valid reports whether there is a default route.
func (d DefaultRoute) Valid() bool { return d.Index != 0 }

func (d DefaultRoute) String() string {
	if !d.Valid() {
		return "none"
	}
	s := "dev " + d.Device
	if d.Gateway.IsValid() {
		s = "via " + d.Gateway.String() + " " + s
	}
	if d.Outer.IsValid() {
		s += " src " + d.Outer.String()
	}
	if !d.Up {
		s += " (link down)"
	}
	return s
}

// State is what the Monitor compares: the links that may carry tunnel
// traffic, their addresses, and the default routes.
type State struct {
	Links    []Link       `json:"links"` // not ignored, not loopback; by index
	Addrs    []Addr       `json:"addrs"` // of those links, without link-local and ULA; sorted
	Default4 DefaultRoute `json:"default4"`
	Default6 DefaultRoute `json:"default6"`
}

// Online reports whether the host has an IPv4 default route with a source
// address (it can reach the rendezvous server and its peers).
func (s State) Online() bool {
	return s.Default4.Valid() && s.Default4.Outer.IsValid() && s.Default4.Up
}

// Equal reports whether two states are the same.
func (s State) Equal(o State) bool {
	return slices.EqualFunc(s.Links, o.Links, sameLink) && slices.Equal(s.Addrs, o.Addrs) &&
		s.Default4 == o.Default4 && s.Default6 == o.Default6
}

// sameLink compares two links but for their carrier-down counts.
func sameLink(a, b Link) bool {
	a.Downs, b.Downs = 0, 0
	return a == b
}

// carrierLost reports whether the kernel took the carrier of link index away
// between s and later (its carrier-down count grew).
func (s State) carrierLost(later State, index int) bool {
	i := slices.IndexFunc(s.Links, func(l Link) bool { return l.Index == index })
	j := slices.IndexFunc(later.Links, func(l Link) bool { return l.Index == index })
	return i >= 0 && j >= 0 && later.Links[j].Downs > s.Links[i].Downs
}

func (s State) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "default %v", s.Default4)
	if s.Default6.Valid() {
		fmt.Fprintf(&b, "; v6 default %v", s.Default6)
	}
	for _, l := range s.Links {
		up := "down"
		if l.Up {
			up = "up"
		}
		fmt.Fprintf(&b, "; %s %s", l.Name, up)
		for _, a := range s.Addrs {
			if a.Index == l.Index {
				fmt.Fprintf(&b, " %v", a.Prefix)
			}
		}
	}
	return b.String()
}

// IgnoreFunc reports whether a link is ours (or otherwise irrelevant) and
// must not count as the host's network.
type IgnoreFunc func(name string) bool

// DefaultIgnore ignores btmm's own links (btmm0, the xfrm interface and
// anything else named btmm*).
func DefaultIgnore(name string) bool { return strings.HasPrefix(name, "btmm") }

// interestingAddr reports whether an address can be a tunnel endpoint.
func interestingAddr(p netip.Prefix) bool {
	a := p.Addr()
	return a.IsValid() && !a.IsLoopback() && !a.IsLinkLocalUnicast() && !a.IsMulticast() && !identity.IsULA(a)
}

// State reduces a snapshot to what the Monitor compares.
func (sn Snapshot) State(ignore IgnoreFunc) State {
	if ignore == nil {
		ignore = DefaultIgnore
	}
	var st State
	links := map[int]Link{}
	for _, l := range sn.Links {
		if l.Loopback || ignore(l.Name) {
			continue
		}
		links[l.Index] = l
		st.Links = append(st.Links, l)
	}
	slices.SortFunc(st.Links, func(a, b Link) int { return a.Index - b.Index })
	for _, a := range sn.Addrs {
		if _, ok := links[a.Index]; ok && interestingAddr(a.Prefix) {
			st.Addrs = append(st.Addrs, a)
		}
	}
	slices.SortFunc(st.Addrs, func(a, b Addr) int {
		if a.Index != b.Index {
			return a.Index - b.Index
		}
		return a.Prefix.Addr().Compare(b.Prefix.Addr())
	})
	st.Default4 = sn.defaultRoute(links, st.Addrs, true)
	st.Default6 = sn.defaultRoute(links, st.Addrs, false)
	return st
}

func (sn Snapshot) defaultRoute(links map[int]Link, addrs []Addr, v4 bool) DefaultRoute {
	var best *Route
	for i := range sn.Routes {
		r := &sn.Routes[i]
		if r.Table != 0 && r.Table != mainTable || r.Dst.Bits() != 0 || r.Dst.Addr().Is4() != v4 {
			continue
		}
		if _, ok := links[r.Index]; !ok {
			continue // through an ignored link (e.g. our own), or a dead index
		}
		if best == nil || r.Priority < best.Priority || r.Priority == best.Priority && r.Index < best.Index {
			best = r
		}
	}
	if best == nil {
		return DefaultRoute{}
	}
	l := links[best.Index]
	d := DefaultRoute{Device: l.Name, Index: best.Index, Gateway: best.Gateway, Outer: best.Src, Up: l.Up}
	if !d.Outer.IsValid() {
		// The kernel's choice (inet_select_addr): a primary address of
		// the device, preferably in the gateway's subnet.
		for _, a := range addrs {
			if a.Index != best.Index || a.Secondary || a.Prefix.Addr().Is4() != v4 {
				continue
			}
			if !d.Outer.IsValid() || d.Gateway.IsValid() && a.Prefix.Contains(d.Gateway) {
				d.Outer = a.Prefix.Addr()
				if d.Gateway.IsValid() && a.Prefix.Contains(d.Gateway) {
					break
				}
			}
		}
	}
	return d
}

// Classify compares two states and says whether the change is major (the
// tunnels must follow it) and why. An unchanged state gives major false
// and no reasons.
func Classify(old, cur State) (major bool, reasons []string) {
	o, n := old.Default4, cur.Default4
	switch {
	case !o.Valid() && n.Valid():
		major = true
		reasons = append(reasons, "IPv4 default route appeared: "+n.String())
	case o.Valid() && !n.Valid():
		major = true
		reasons = append(reasons, "IPv4 default route gone (offline): was "+o.String())
	case o.Valid() && n.Valid():
		if o.Index != n.Index || o.Device != n.Device || o.Gateway != n.Gateway {
			major = true
			reasons = append(reasons, fmt.Sprintf("IPv4 default route changed: %v -> %v", o, n))
		}
		if o.Outer != n.Outer {
			major = true
			reasons = append(reasons, fmt.Sprintf("outer address changed: %v -> %v", o.Outer, n.Outer))
		}
		if o.Up != n.Up {
			major = true
			reasons = append(reasons, fmt.Sprintf("default route's link %s went %s", n.Device, upDown(n.Up)))
		}
	}
	if old.Default6 != cur.Default6 {
		reasons = append(reasons, fmt.Sprintf("IPv6 default route: %v -> %v (btmm's outer is IPv4)", old.Default6, cur.Default6))
	}
	if !slices.EqualFunc(old.Links, cur.Links, sameLink) || !slices.Equal(old.Addrs, cur.Addrs) {
		if !major {
			reasons = append(reasons, "links or addresses changed off the default route")
		}
	}
	return major, reasons
}

func upDown(up bool) string {
	if up {
		return "up"
	}
	return "down"
}
