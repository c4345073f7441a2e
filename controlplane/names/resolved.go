package names

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"syscall"

	"github.com/godbus/dbus/v5"
	"github.com/miekg/dns"
)

// systemd-resolved's D-Bus API (org.freedesktop.resolve1(5)).
const (
	resolvedName      = "org.freedesktop.resolve1"
	resolvedPath      = "/org/freedesktop/resolve1"
	resolvedInterface = "org.freedesktop.resolve1.Manager"
)

// Resolved is a connection to systemd-resolved over the system bus. Its
// methods are safe for concurrent use.
type Resolved struct {
	conn *dbus.Conn
}

// DialResolved connects to the system bus (its own connection, closed by
// Close). It does not check that resolved runs: see Owner.
func DialResolved() (*Resolved, error) {
	c, err := dbus.ConnectSystemBus()
	if err != nil {
		return nil, fmt.Errorf("system D-Bus: %w", err)
	}
	return &Resolved{conn: c}, nil
}

// Close closes the bus connection.
func (r *Resolved) Close() error { return r.conn.Close() }

// Owner returns the unique bus name that owns org.freedesktop.resolve1 ("":
// resolved does not run). A new owner is a restarted resolved.
func (r *Resolved) Owner() (string, error) {
	var owner string
	err := r.conn.BusObject().Call("org.freedesktop.DBus.GetNameOwner", 0, resolvedName).Store(&owner)
	var de dbus.Error
	if errors.As(err, &de) && de.Name == "org.freedesktop.DBus.Error.NameHasNoOwner" {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("system D-Bus: who owns %s: %w", resolvedName, err)
	}
	return owner, nil
}

// LinkDomain is one of a link's DNS domains: a search domain, or with
// RouteOnly a routing-only one ("~domain" in resolvectl).
type LinkDomain struct {
	Domain    string
	RouteOnly bool
}

// String is the domain as resolvectl shows it.
func (d LinkDomain) String() string {
	if d.RouteOnly {
		return "~" + d.Domain
	}
	return d.Domain
}

// Domains are the link domains that send the user's domain to btmmd's stub:
// with search, also a search domain (so `ping desk` finds
// desk.<domain>); otherwise routing only.
func Domains(domain string, search bool) []LinkDomain {
	return []LinkDomain{{Domain: strings.TrimSuffix(dns.CanonicalName(domain), "."), RouteOnly: !search}}
}

// dnsServerEx is SetLinkDNSEx's a(iayqs): family, address, port, TLS server name.
type dnsServerEx struct {
	Family  int32
	Address []byte
	Port    uint16
	Name    string
}

type linkDomain struct {
	Domain    string
	RouteOnly bool
}

// SetLink makes resolved send queries for domains to server on the link
// ifindex, and only those: the link is never the default route, and
// LLMNR, mDNS, DNSSEC and DNS over TLS are off on it (the stub answers
// unsigned, in clear, for the user's domain only). The link must exist and
// not be loopback or managed by systemd-networkd (resolved refuses those).
func (r *Resolved) SetLink(ifindex int, server netip.AddrPort, domains []LinkDomain) error {
	a := server.Addr().Unmap()
	fam := int32(syscall.AF_INET)
	if a.Is6() {
		fam = syscall.AF_INET6
	}
	var ds []linkDomain
	for _, d := range domains {
		ds = append(ds, linkDomain(d))
	}
	o := r.conn.Object(resolvedName, resolvedPath)
	i := int32(ifindex)
	for _, c := range []struct {
		method string
		args   []any
	}{
		{"SetLinkDNSEx", []any{i, []dnsServerEx{{Family: fam, Address: a.AsSlice(), Port: server.Port()}}}},
		{"SetLinkDomains", []any{i, ds}},
		{"SetLinkDefaultRoute", []any{i, false}},
		{"SetLinkLLMNR", []any{i, "no"}},
		{"SetLinkMulticastDNS", []any{i, "no"}},
		{"SetLinkDNSSEC", []any{i, "no"}},
		{"SetLinkDNSOverTLS", []any{i, "no"}},
	} {
		if err := o.Call(resolvedInterface+"."+c.method, 0, c.args...).Err; err != nil {
			return fmt.Errorf("systemd-resolved %s on link %d: %w", c.method, ifindex, err)
		}
	}
	return nil
}

// RevertLink drops everything set on the link ifindex (resolved then uses
// only what the network configuration says of it: for btmm's own links,
// nothing).
func (r *Resolved) RevertLink(ifindex int) error {
	if err := r.conn.Object(resolvedName, resolvedPath).Call(resolvedInterface+".RevertLink", 0, int32(ifindex)).Err; err != nil {
		return fmt.Errorf("systemd-resolved RevertLink on link %d: %w", ifindex, err)
	}
	return nil
}

// LinkSettings is what resolved has for one link (for checks and status).
type LinkSettings struct {
	DNS          []netip.AddrPort
	Domains      []LinkDomain
	DefaultRoute bool
}

// Link reads the link's DNS servers, domains and default-route flag back
// from resolved (org.freedesktop.resolve1.Link properties).
func (r *Resolved) Link(ifindex int) (LinkSettings, error) {
	var p dbus.ObjectPath
	if err := r.conn.Object(resolvedName, resolvedPath).Call(resolvedInterface+".GetLink", 0, int32(ifindex)).Store(&p); err != nil {
		return LinkSettings{}, fmt.Errorf("systemd-resolved GetLink %d: %w", ifindex, err)
	}
	o := r.conn.Object(resolvedName, p)
	var ls LinkSettings
	var servers []dnsServerEx
	var ds []linkDomain
	for _, g := range []struct {
		prop string
		to   any
	}{{"DNSEx", &servers}, {"Domains", &ds}, {"DefaultRoute", &ls.DefaultRoute}} {
		v, err := o.GetProperty("org.freedesktop.resolve1.Link." + g.prop)
		if err == nil {
			err = v.Store(g.to)
		}
		if err != nil {
			return LinkSettings{}, fmt.Errorf("systemd-resolved link %d %s: %w", ifindex, g.prop, err)
		}
	}
	for _, s := range servers {
		if a, ok := netip.AddrFromSlice(s.Address); ok {
			port := s.Port
			if port == 0 {
				port = 53
			}
			ls.DNS = append(ls.DNS, netip.AddrPortFrom(a, port))
		}
	}
	for _, d := range ds {
		ls.Domains = append(ls.Domains, LinkDomain(d))
	}
	return ls, nil
}
