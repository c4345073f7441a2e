package zone

import (
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/btmm/btmm/controlplane/identity"
	"github.com/btmm/btmm/dns/store"
	"github.com/miekg/dns"
)

// Who may change what (docs/dnsd.md, "Keys and what they may change").
//
// A user's key (alice.btmm.example.) may change any unprotected name in the
// user's zone. A host's key (laptop.alice.btmm.example.) may change only
// what is the host's own:
//
//   - the host's names: laptop.alice.btmm.example. and every name below it
//     (_autotunnel._udp.laptop.alice.btmm.example. ...);
//   - its own records in a shared DNS-SD browse RRset (a PTR at
//     _service._proto.alice.btmm.example. whose target is one of its own
//     names), added or deleted one record at a time;
//   - its SRV target name (AutoTunnel-XX-XX-XX-FF-FE-XX-XX-XX.alice...): an
//     A or AAAA at a name one label below the user's domain, which is not
//     another host's label, holds no record of another key, and is the
//     target of an SRV of the host (in the same UPDATE, or the one at
//     _autotunnel._udp.laptop.alice.btmm.example.).
//
// For every key: prerequisites may name only names the key may change (a
// host key probing another host's names, or a user key another user's, is
// REFUSED); CNAME and DNAME are refused below a user (a name must not be
// redirected into another host's); and an AAAA with a ULA (fc00::/7) that
// another host of the same user already holds at its host name is refused.

// Request is what an UPDATE handler knows about the sender.
type Request struct {
	// User is the authenticated user ("" when the key is an admin key
	// allowed everywhere but protected names). Updates may touch only
	// names in that user's subdomain.
	User string
	// Host is the host label of a host key ("" for the user's own key).
	Host string
	// Admin allows any unprotected name.
	Admin bool
	// KeyName is recorded as the owner of added records.
	KeyName string
	// Lease is the granted update lease (0: no expiry).
	Lease time.Duration
	Now   time.Time
}

// scope says how a host key relates to a name of its user's zone.
type scope int

const (
	scopeNone    scope = iota
	scopeOwn           // the host's name or below
	scopeBrowse        // a shared DNS-SD browse name (_service._proto.<user>)
	scopeForeign       // one label below the user: a possible SRV target name
)

// hostLabel returns the label directly below the user's domain of name
// ("laptop" for "_autotunnel._udp.laptop.alice.btmm.example."), "" at the
// user's apex or outside it.
func (z *Zone) hostLabel(name, user string) string {
	name = strings.ToLower(dns.CanonicalName(name))
	rest, ok := strings.CutSuffix(name, "."+z.UserDomain(user))
	if !ok || rest == "" {
		return ""
	}
	labels := dns.SplitDomainName(rest)
	return labels[len(labels)-1]
}

// depth is the number of labels of name below the user's domain.
func (z *Zone) depth(name, user string) int {
	rest, ok := strings.CutSuffix(strings.ToLower(dns.CanonicalName(name)), "."+z.UserDomain(user))
	if !ok {
		return 0
	}
	return len(dns.SplitDomainName(rest))
}

func (z *Zone) isHost(user, label string) bool {
	return z.Hosts != nil && slices.Contains(z.Hosts(user), label)
}

// scopeOf classifies name for the host key of req.
func (z *Zone) scopeOf(name string, req Request) scope {
	label := z.hostLabel(name, req.User)
	switch {
	case label == "":
		return scopeNone
	case label == req.Host:
		return scopeOwn
	case z.depth(name, req.User) == 2 && strings.HasPrefix(label, "_") && strings.HasPrefix(dns.SplitDomainName(name)[0], "_"):
		return scopeBrowse
	case z.depth(name, req.User) == 1 && !strings.HasPrefix(label, "_") && !z.isHost(req.User, label):
		return scopeForeign
	}
	return scopeNone
}

// inHost reports whether name is the host's name or below it.
func (z *Zone) inHost(name string, req Request) bool {
	return dns.IsSubDomain(req.Host+"."+z.UserDomain(req.User), dns.CanonicalName(name))
}

// checkAuth is CheckUpdate's authorization of the message alone.
func (z *Zone) checkAuth(m *dns.Msg, req Request) error {
	if req.Admin {
		return nil
	}
	mine := func(name string) bool { return req.User != "" && strings.EqualFold(z.UserOf(name), req.User) }
	for _, rr := range m.Answer {
		h := rr.Header()
		if !mine(h.Name) {
			return rcodeErr(dns.RcodeRefused, "prerequisite names %q, not the key's", h.Name)
		}
		if req.Host != "" && z.scopeOf(h.Name, req) == scopeNone {
			return rcodeErr(dns.RcodeRefused, "prerequisite names %q, another host's", h.Name)
		}
	}
	for _, rr := range m.Ns {
		h := rr.Header()
		if !mine(h.Name) {
			return rcodeErr(dns.RcodeRefused, "key not authorized for %q", h.Name)
		}
		if h.Class == dns.ClassINET && (h.Rrtype == dns.TypeCNAME || h.Rrtype == dns.TypeDNAME) {
			return rcodeErr(dns.RcodeRefused, "%s below a user is not allowed", dns.Type(h.Rrtype))
		}
		if req.Host == "" {
			continue
		}
		switch z.scopeOf(h.Name, req) {
		case scopeOwn:
		case scopeBrowse:
			ptr, ok := rr.(*dns.PTR)
			if h.Rrtype != dns.TypePTR || h.Class == dns.ClassANY || !ok || !z.inHost(ptr.Ptr, req) {
				return rcodeErr(dns.RcodeRefused, "host key may change only its own PTR at %q", h.Name)
			}
		case scopeForeign:
			if h.Rrtype != dns.TypeA && h.Rrtype != dns.TypeAAAA && !(h.Class == dns.ClassANY && h.Rrtype == dns.TypeANY) {
				return rcodeErr(dns.RcodeRefused, "host key may put only A/AAAA at its SRV target %q", h.Name)
			}
		default:
			return rcodeErr(dns.RcodeRefused, "host key not authorized for %q", h.Name)
		}
	}
	return nil
}

// checkOwnership is the part of the authorization that needs the zone's
// data, before the prerequisites are evaluated: the SRV target names a host
// key touches must hold no other key's records.
func (z *Zone) checkOwnership(v store.View, m *dns.Msg, req Request) error {
	if !req.Admin && req.Host != "" {
		// Names outside the host's own that it names: nobody else's.
		check := func(name string) error {
			if z.scopeOf(name, req) != scopeForeign {
				return nil
			}
			for _, r := range v.Name(name) {
				if !strings.EqualFold(r.Owner, req.KeyName) {
					return rcodeErr(dns.RcodeRefused, "%q holds records of another key", name)
				}
			}
			return nil
		}
		for _, rr := range m.Answer {
			if err := check(rr.Header().Name); err != nil {
				return err
			}
		}
		for _, rr := range m.Ns {
			h := rr.Header()
			if err := check(h.Name); err != nil {
				return err
			}
			if h.Class == dns.ClassINET && z.scopeOf(h.Name, req) == scopeForeign && !z.targetOfHost(v, m, h.Name, req) {
				return rcodeErr(dns.RcodeRefused, "%q is not the target of the host's SRV", h.Name)
			}
		}
	}
	return nil
}

// checkULAs refuses an AAAA with a ULA that another host of the user holds
// once the update is applied; get returns a name's records as the update
// leaves them.
func (z *Zone) checkULAs(m *dns.Msg, req Request, get func(string) []store.Record) error {
	if req.Admin {
		return nil
	}
	for _, rr := range m.Ns {
		a, ok := rr.(*dns.AAAA)
		if !ok || a.Hdr.Class != dns.ClassINET {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.AAAA)
		if !ok || !identity.IsULA(ip) {
			continue
		}
		if other := z.ulaHolder(req.User, z.hostLabel(a.Hdr.Name, req.User), ip, get); other != "" {
			return rcodeErr(dns.RcodeRefused, "ULA %s is held by another host, %s", ip, other)
		}
	}
	return nil
}

// targetOfHost reports whether name is the target of an SRV the host adds
// in m or holds at its _autotunnel._udp instance.
func (z *Zone) targetOfHost(v store.View, m *dns.Msg, name string, req Request) bool {
	is := func(rr dns.RR) bool {
		s, ok := rr.(*dns.SRV)
		return ok && strings.EqualFold(dns.CanonicalName(s.Target), dns.CanonicalName(name))
	}
	for _, rr := range m.Ns {
		if rr.Header().Class == dns.ClassINET && z.inHost(rr.Header().Name, req) && is(rr) {
			return true
		}
	}
	for _, r := range v.Name("_autotunnel._udp." + req.Host + "." + z.UserDomain(req.User)) {
		if is(r.RR) {
			return true
		}
	}
	return false
}

// ulaHolder returns the host name of user, other than the one of label,
// holding ip in an AAAA ("" when none). The hosts are those with a key and
// those in the _autotunnel._udp browse RRset (hosts registered with the
// user's key).
func (z *Zone) ulaHolder(user, label string, ip netip.Addr, get func(string) []store.Record) string {
	hosts := map[string]bool{}
	if z.Hosts != nil {
		for _, h := range z.Hosts(user) {
			hosts[h] = true
		}
	}
	for _, r := range get("_autotunnel._udp." + z.UserDomain(user)) {
		if p, ok := r.RR.(*dns.PTR); ok {
			if h := z.hostLabel(p.Ptr, user); h != "" && z.depth(p.Ptr, user) == 3 {
				hosts[h] = true
			}
		}
	}
	delete(hosts, label)
	for h := range hosts {
		name := h + "." + z.UserDomain(user)
		for _, r := range get(name) {
			if a, ok := r.RR.(*dns.AAAA); ok {
				if got, _ := netip.AddrFromSlice(a.AAAA); got == ip {
					return name
				}
			}
		}
	}
	return ""
}
