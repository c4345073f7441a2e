// Package zone implements the authoritative rendezvous zone of btmm-dnsd
// (RFC 6281 §5): query answers, and RFC 2136 dynamic UPDATE processing —
// zone section checks, prerequisites (RFC 2136 §2.4, §3.2), update prescan
// and the add / delete-RR / delete-RRset / delete-name operations (§2.5,
// §3.4) — as a pure function over a [store.View], so that one UPDATE
// message commits atomically or not at all.
//
// Each user's subdomain (alice.btmm.example.) is a zone of its own, as in
// Back to My Mac (RFC 6281 §5.2, where a client finds the zone of a name by
// its SOA): SOA and NS at the user's apex (the parent, btmm.example., holds
// the same NS as its delegation, and the glue of the server's name), the
// user's SOA in the authority section of negative answers below it, and the
// discovery SRV records (_dns-update._udp, _dns-update-tls._tcp,
// _dns-llq._udp, _dns-llq-tls._tcp) at the user's apex. These are
// synthesised from the configuration and are not updatable. An UPDATE may
// name the parent zone or the user's zone.
package zone

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/btmm/btmm/dns/store"
	"github.com/miekg/dns"
)

// RcodeError is an update failure carrying the DNS RCODE to answer with.
type RcodeError struct {
	Rcode  int
	Reason string
}

func (e *RcodeError) Error() string {
	return fmt.Sprintf("zone: update %s: %s", dns.RcodeToString[e.Rcode], e.Reason)
}

func rcodeErr(rcode int, format string, args ...any) error {
	return &RcodeError{Rcode: rcode, Reason: fmt.Sprintf(format, args...)}
}

// Rcode returns the RCODE for an error from this package (SERVFAIL for others).
func Rcode(err error) int {
	var re *RcodeError
	if errors.As(err, &re) {
		return re.Rcode
	}
	return dns.RcodeServerFailure
}

// Ports are the advertised service ports for the discovery SRV records
// (zero: that record is not published).
type Ports struct {
	UpdateUDP, UpdateTLS, LLQUDP, LLQTLS uint16
}

// Zone is the static part of the zone.
type Zone struct {
	Origin     string       // "btmm.example."
	ServerName string       // primary name server, e.g. "ns.btmm.example."
	ServerAddr []netip.Addr // glue for ServerName when it is inside the zone
	Ports      Ports        // for discovery SRV records
	// Hosts returns the labels of a user's hosts that have keys of their
	// own (nil: none).
	Hosts func(user string) []string
	// IsUser reports whether a label below Origin is a user (whose
	// subdomain is then a zone of its own).
	IsUser func(user string) bool
	TTL    uint32 // TTL of synthesised records; default 300
	// Relays are btmm-relay servers, published as SRV
	// _btmm-relay._udp at the origin and at every user's apex (with A
	// records for a relay name inside the zone).
	Relays []Relay
	// Replicas lists the live servers of a replicated zone (the etcd
	// store); nil or empty: this server alone. Discovery SRVs and NS
	// records name every replica, with glue for names inside the zone.
	Replicas func() []store.Server
}

// RelayService is the SRV owner label of btmm-relay (docs/paths.md);
// RelayStreamService that of its TLS stream port (relay-tcp, for hosts
// whose UDP is blocked).
const (
	RelayService       = "_btmm-relay._udp."
	RelayStreamService = "_btmm-relay._tcp."
)

// Relay is one btmm-relay: its name, STUN/control port, TLS stream port
// (0: none) and addresses.
type Relay struct {
	Name    string
	Port    uint16
	TLSPort uint16
	Addrs   []netip.Addr
}

// New validates and returns a zone.
func New(z Zone) (*Zone, error) {
	if _, ok := dns.IsDomainName(z.Origin); !ok || z.Origin == "" || z.Origin == "." {
		return nil, fmt.Errorf("zone: bad origin %q", z.Origin)
	}
	z.Origin = strings.ToLower(dns.CanonicalName(z.Origin))
	if z.ServerName == "" {
		z.ServerName = "ns." + z.Origin
	}
	z.ServerName = strings.ToLower(dns.CanonicalName(z.ServerName))
	if z.TTL == 0 {
		z.TTL = 300
	}
	if z.IsUser == nil {
		z.IsUser = func(string) bool { return false }
	}
	for i, r := range z.Relays {
		if _, ok := dns.IsDomainName(r.Name); !ok || r.Name == "" || r.Port == 0 {
			return nil, fmt.Errorf("zone: relay %q port %d: want a name and a port", r.Name, r.Port)
		}
		z.Relays[i].Name = strings.ToLower(dns.CanonicalName(r.Name))
	}
	return &z, nil
}

// InZone reports whether name is at or below the origin.
func (z *Zone) InZone(name string) bool {
	return dns.IsSubDomain(z.Origin, dns.CanonicalName(name))
}

// UserOf returns the user whose subdomain contains name ("alice" for
// "host._ssh._tcp.alice.btmm.example."), or "" when name is the apex or
// outside the zone.
func (z *Zone) UserOf(name string) string {
	name = strings.ToLower(dns.CanonicalName(name))
	if !z.InZone(name) || name == z.Origin {
		return ""
	}
	rel := strings.TrimSuffix(name, "."+z.Origin)
	labels := dns.SplitDomainName(rel)
	if len(labels) == 0 {
		return ""
	}
	return labels[len(labels)-1]
}

// UserDomain returns the user's subdomain ("alice.btmm.example.").
func (z *Zone) UserDomain(user string) string { return strings.ToLower(user) + "." + z.Origin }

// SOA returns the parent zone's SOA with the given serial.
func (z *Zone) SOA(serial uint32) *dns.SOA { return z.soa(z.Origin, serial) }

func (z *Zone) soa(apex string, serial uint32) *dns.SOA {
	return &dns.SOA{
		Hdr: dns.RR_Header{Name: apex, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: z.TTL},
		Ns:  z.ServerName, Mbox: "hostmaster." + z.Origin,
		Serial: serial, Refresh: 3600, Retry: 600, Expire: 86400, Minttl: 60,
	}
}

// ZoneOf returns the apex of the zone holding name: the user's domain for
// names at or below a user's, else the origin ("" outside).
func (z *Zone) ZoneOf(name string) string {
	if !z.InZone(name) {
		return ""
	}
	if u := z.UserOf(name); u != "" && z.isUser(u) {
		return z.UserDomain(u)
	}
	return z.Origin
}

// IsApex reports whether name is the apex of a zone we serve.
func (z *Zone) IsApex(name string) bool {
	name = strings.ToLower(dns.CanonicalName(name))
	return name != "" && z.ZoneOf(name) == name
}

var discovery = []struct {
	prefix string
	port   func(Ports) uint16
}{
	{"_dns-update._udp.", func(p Ports) uint16 { return p.UpdateUDP }},
	{"_dns-update-tls._tcp.", func(p Ports) uint16 { return p.UpdateTLS }},
	{"_dns-llq._udp.", func(p Ports) uint16 { return p.LLQUDP }},
	{"_dns-llq-tls._tcp.", func(p Ports) uint16 { return p.LLQTLS }},
}

// replica is one server as the zone publishes it.
type replica struct {
	name  string
	addrs []netip.Addr
	ports Ports
}

func (z *Zone) servers() []replica {
	self := []replica{{z.ServerName, z.ServerAddr, z.Ports}}
	if z.Replicas == nil {
		return self
	}
	rs := z.Replicas()
	if len(rs) == 0 {
		return self
	}
	out := make([]replica, 0, len(rs))
	for _, r := range rs {
		x := replica{name: strings.ToLower(dns.CanonicalName(r.Name)),
			ports: Ports{UpdateUDP: r.DNS, LLQUDP: r.DNS, UpdateTLS: r.TLS, LLQTLS: r.TLS}}
		for _, a := range r.Addrs {
			if ip, err := netip.ParseAddr(a); err == nil {
				x.addrs = append(x.addrs, ip)
			}
		}
		out = append(out, x)
	}
	return out
}

// isServerName reports whether name is one of the zone's server names.
func (z *Zone) isServerName(name string) bool {
	for _, r := range z.servers() {
		if r.name == name {
			return true
		}
	}
	return name == z.ServerName
}

// Synth returns the synthesised records owned by name.
func (z *Zone) Synth(name string, serial uint32) []dns.RR {
	name = strings.ToLower(dns.CanonicalName(name))
	var out []dns.RR
	hdr := func(t uint16) dns.RR_Header {
		return dns.RR_Header{Name: name, Rrtype: t, Class: dns.ClassINET, Ttl: z.TTL}
	}
	servers := z.servers()
	if z.IsApex(name) {
		// The origin, or a user's zone: its SOA and NS (the NS at a
		// user's apex is also the parent's delegation), one per replica.
		out = append(out, z.soa(name, serial))
		for _, r := range servers {
			out = append(out, &dns.NS{Hdr: hdr(dns.TypeNS), Ns: r.name})
		}
	}
	for _, r := range servers {
		if name != r.name || !z.InZone(name) {
			continue
		}
		for _, a := range r.addrs {
			if a.Is4() {
				out = append(out, &dns.A{Hdr: hdr(dns.TypeA), A: a.AsSlice()})
			} else {
				out = append(out, &dns.AAAA{Hdr: hdr(dns.TypeAAAA), AAAA: a.AsSlice()})
			}
		}
	}
	if name == RelayService+z.Origin || z.isUser(z.UserOf(name)) && name == RelayService+z.UserDomain(z.UserOf(name)) {
		for _, r := range z.Relays {
			out = append(out, &dns.SRV{Hdr: hdr(dns.TypeSRV), Port: r.Port, Target: r.Name})
		}
	}
	if name == RelayStreamService+z.Origin || z.isUser(z.UserOf(name)) && name == RelayStreamService+z.UserDomain(z.UserOf(name)) {
		for _, r := range z.Relays {
			if r.TLSPort != 0 {
				out = append(out, &dns.SRV{Hdr: hdr(dns.TypeSRV), Port: r.TLSPort, Target: r.Name})
			}
		}
	}
	for _, r := range z.Relays {
		if name == r.Name && z.InZone(name) {
			for _, a := range r.Addrs {
				if a.Is4() {
					out = append(out, &dns.A{Hdr: hdr(dns.TypeA), A: a.AsSlice()})
				} else {
					out = append(out, &dns.AAAA{Hdr: hdr(dns.TypeAAAA), AAAA: a.AsSlice()})
				}
			}
		}
	}
	if u := z.UserOf(name); u != "" && z.isUser(u) {
		for _, d := range discovery {
			if name != d.prefix+z.UserDomain(u) {
				continue
			}
			for _, r := range servers {
				if d.port(r.ports) != 0 {
					out = append(out, &dns.SRV{Hdr: hdr(dns.TypeSRV), Priority: 0, Weight: 0,
						Port: d.port(r.ports), Target: r.name})
				}
			}
		}
	}
	return out
}

func (z *Zone) isUser(u string) bool { return u != "" && z.IsUser(strings.ToLower(u)) }

// Protected reports whether name/type is managed by the server and so may
// not be changed by an UPDATE.
func (z *Zone) Protected(name string, t uint16) bool {
	name = strings.ToLower(dns.CanonicalName(name))
	if name == z.Origin || z.isServerName(name) || strings.HasPrefix(name, RelayService) || strings.HasPrefix(name, RelayStreamService) {
		return true
	}
	for _, r := range z.Relays {
		if name == r.Name {
			return true
		}
	}
	if t == dns.TypeSOA || t == dns.TypeNS {
		return true
	}
	if u := z.UserOf(name); u != "" {
		for _, d := range discovery {
			if name == d.prefix+z.UserDomain(u) {
				return true
			}
		}
	}
	return false
}

// Exists reports whether name owns any record or is an empty non-terminal,
// used to tell NXDOMAIN from NODATA.
func (z *Zone) nameRecords(v store.View, name string, serial uint32) []dns.RR {
	var out []dns.RR
	for _, r := range v.Name(name) {
		out = append(out, r.RR)
	}
	return append(out, z.Synth(name, serial)...)
}

// UpdateTypes are the RR types an UPDATE may add.
var UpdateTypes = map[uint16]bool{
	dns.TypeA: true, dns.TypeAAAA: true, dns.TypeSRV: true, dns.TypeTXT: true,
	dns.TypePTR: true, dns.TypeCNAME: true, dns.TypeKEY: true, dns.TypeHINFO: true,
}

// CheckUpdate does the message-only checks of an UPDATE (RFC 2136 §3.1, §3.4.1
// prescan, authorization); it needs no zone data. It returns an RcodeError.
func (z *Zone) CheckUpdate(m *dns.Msg, req Request) error {
	if len(m.Question) != 1 {
		return rcodeErr(dns.RcodeFormatError, "zone section must hold exactly one record")
	}
	q := m.Question[0]
	if q.Qtype != dns.TypeSOA {
		return rcodeErr(dns.RcodeFormatError, "zone section type must be SOA")
	}
	if q.Qclass != dns.ClassINET {
		return rcodeErr(dns.RcodeNotAuth, "zone class %s not served", dns.Class(q.Qclass))
	}
	// The parent zone (btmm's own clients) or a user's zone (Apple's
	// client, which names the zone it found by its SOA).
	apex := strings.ToLower(dns.CanonicalName(q.Name))
	if !z.IsApex(apex) {
		return rcodeErr(dns.RcodeNotAuth, "not authoritative for zone %q", q.Name)
	}
	inZone := func(name string) bool { return dns.IsSubDomain(apex, dns.CanonicalName(name)) }
	if apex != z.Origin && !req.Admin && !strings.EqualFold(z.UserOf(apex), req.User) {
		return rcodeErr(dns.RcodeRefused, "key not authorized for zone %q", apex)
	}
	for _, rr := range m.Answer {
		h := rr.Header()
		if h.Ttl != 0 {
			return rcodeErr(dns.RcodeFormatError, "prerequisite TTL must be 0")
		}
		if !inZone(h.Name) {
			return rcodeErr(dns.RcodeNotZone, "prerequisite name %q outside zone %s", h.Name, apex)
		}
		switch h.Class {
		case dns.ClassANY, dns.ClassNONE:
			if h.Rdlength != 0 {
				return rcodeErr(dns.RcodeFormatError, "prerequisite with class %s must have no RDATA", dns.Class(h.Class))
			}
		case dns.ClassINET:
			if h.Rrtype == dns.TypeANY || h.Rdlength == 0 {
				return rcodeErr(dns.RcodeFormatError, "value-dependent prerequisite needs a type and RDATA")
			}
		default:
			return rcodeErr(dns.RcodeFormatError, "prerequisite class %s", dns.Class(h.Class))
		}
	}
	for _, rr := range m.Ns {
		h := rr.Header()
		if !inZone(h.Name) {
			return rcodeErr(dns.RcodeNotZone, "update name %q outside zone %s", h.Name, apex)
		}
		switch h.Class {
		case dns.ClassINET:
			if h.Rrtype == dns.TypeSOA || h.Rrtype == dns.TypeNS {
				return rcodeErr(dns.RcodeRefused, "%s records are managed by the server", dns.Type(h.Rrtype))
			}
			if h.Rrtype == dns.TypeDNAME {
				return rcodeErr(dns.RcodeRefused, "DNAME is not allowed")
			}
			if !UpdateTypes[h.Rrtype] || h.Rdlength == 0 {
				return rcodeErr(dns.RcodeFormatError, "cannot add %s record", dns.Type(h.Rrtype))
			}
		case dns.ClassANY:
			if h.Ttl != 0 || h.Rdlength != 0 || (h.Rrtype != dns.TypeANY && isMeta(h.Rrtype)) {
				return rcodeErr(dns.RcodeFormatError, "bad delete-RRset / delete-name record")
			}
		case dns.ClassNONE:
			if h.Ttl != 0 || h.Rrtype == dns.TypeANY || isMeta(h.Rrtype) {
				return rcodeErr(dns.RcodeFormatError, "bad delete-RR record")
			}
		default:
			return rcodeErr(dns.RcodeFormatError, "update class %s", dns.Class(h.Class))
		}
		if z.Protected(h.Name, h.Rrtype) {
			return rcodeErr(dns.RcodeRefused, "%q %s is managed by the server", h.Name, dns.Type(h.Rrtype))
		}
	}
	// Authorization: a user's key changes only that user's zone, a host's
	// key only what is the host's own (auth.go).
	return z.checkAuth(m, req)
}

// isMeta reports QTYPEs and meta types (RFC 6895 §3.1) that never appear as data.
func isMeta(t uint16) bool { return t == dns.TypeOPT || t >= 128 && t <= 255 }

// Update returns the store transaction for a checked UPDATE message: it
// evaluates the prerequisites against v and computes the operations. Any
// failure is an RcodeError and commits nothing.
func (z *Zone) Update(m *dns.Msg, req Request) func(store.View) ([]store.Op, error) {
	return func(v store.View) ([]store.Op, error) {
		if err := z.checkOwnership(v, m, req); err != nil {
			return nil, err
		}
		serial := uint32(v.Rev())
		// Prerequisites (RFC 2136 §3.2).
		valueSets := map[string][]dns.RR{} // name+type -> required RRset
		for _, rr := range m.Answer {
			h := rr.Header()
			have := z.nameRecords(v, h.Name, serial)
			switch h.Class {
			case dns.ClassANY:
				if h.Rrtype == dns.TypeANY {
					if len(have) == 0 {
						return nil, rcodeErr(dns.RcodeNameError, "prerequisite: %q not in use", h.Name)
					}
				} else if len(ofType(have, h.Rrtype)) == 0 {
					return nil, rcodeErr(dns.RcodeNXRrset, "prerequisite: %q %s does not exist", h.Name, dns.Type(h.Rrtype))
				}
			case dns.ClassNONE:
				if h.Rrtype == dns.TypeANY {
					if len(have) != 0 {
						return nil, rcodeErr(dns.RcodeYXDomain, "prerequisite: %q in use", h.Name)
					}
				} else if len(ofType(have, h.Rrtype)) != 0 {
					return nil, rcodeErr(dns.RcodeYXRrset, "prerequisite: %q %s exists", h.Name, dns.Type(h.Rrtype))
				}
			case dns.ClassINET:
				k := strings.ToLower(dns.CanonicalName(h.Name)) + "/" + dns.Type(h.Rrtype).String()
				valueSets[k] = append(valueSets[k], rr)
			}
		}
		for _, want := range valueSets {
			h := want[0].Header()
			have := ofType(z.nameRecords(v, h.Name, serial), h.Rrtype)
			if !sameSet(want, have) {
				return nil, rcodeErr(dns.RcodeNXRrset, "prerequisite: %q %s differs", h.Name, dns.Type(h.Rrtype))
			}
		}
		// Updates (RFC 2136 §3.4.2), in order, against a working copy.
		work := map[string][]store.Record{}
		get := func(name string) []store.Record {
			n := strings.ToLower(dns.CanonicalName(name))
			if r, ok := work[n]; ok {
				return r
			}
			r := v.Name(n)
			work[n] = r
			return r
		}
		var ops []store.Op
		for _, rr := range m.Ns {
			h := rr.Header()
			n := strings.ToLower(dns.CanonicalName(h.Name))
			recs := get(n)
			switch h.Class {
			case dns.ClassINET:
				add := dns.Copy(rr)
				add.Header().Name = n
				rec := store.Record{RR: add, Owner: req.KeyName}
				if req.Lease > 0 {
					rec.Expires = req.Now.Add(req.Lease)
				}
				// CNAME exclusivity (RFC 2136 §3.4.2.2): a CNAME add to a
				// name holding other data, or data added to a CNAME, is ignored.
				if conflictsCNAME(recs, h.Rrtype) {
					continue
				}
				replaced := false
				for i := range recs {
					if recs[i].Key() == rec.Key() || h.Rrtype == dns.TypeCNAME && recs[i].RR.Header().Rrtype == dns.TypeCNAME {
						if recs[i].Key() != rec.Key() {
							ops = append(ops, store.Op{Kind: store.Delete, Record: recs[i]})
						}
						recs[i] = rec
						replaced = true
						break
					}
				}
				if !replaced {
					recs = append(recs, rec)
				}
				ops = append(ops, store.Op{Kind: store.Put, Record: rec})
			case dns.ClassANY:
				keep := recs[:0:0]
				for _, r := range recs {
					if h.Rrtype == dns.TypeANY || r.RR.Header().Rrtype == h.Rrtype {
						ops = append(ops, store.Op{Kind: store.Delete, Record: r})
					} else {
						keep = append(keep, r)
					}
				}
				recs = keep
			case dns.ClassNONE:
				del := dns.Copy(rr)
				del.Header().Class = dns.ClassINET
				k := store.RRKey(del)
				keep := recs[:0:0]
				for _, r := range recs {
					if r.Key() == k {
						ops = append(ops, store.Op{Kind: store.Delete, Record: r})
					} else {
						keep = append(keep, r)
					}
				}
				recs = keep
			}
			work[n] = recs
		}
		if err := z.checkULAs(m, req, get); err != nil {
			return nil, err
		}
		return ops, nil
	}
}

func conflictsCNAME(recs []store.Record, t uint16) bool {
	for _, r := range recs {
		rt := r.RR.Header().Rrtype
		if t == dns.TypeCNAME && rt != dns.TypeCNAME {
			return true
		}
		if t != dns.TypeCNAME && rt == dns.TypeCNAME {
			return true
		}
	}
	return false
}

func ofType(rrs []dns.RR, t uint16) []dns.RR {
	var out []dns.RR
	for _, rr := range rrs {
		if rr.Header().Rrtype == t {
			out = append(out, rr)
		}
	}
	return out
}

func sameSet(a, b []dns.RR) bool {
	ka := map[string]bool{}
	for _, rr := range a {
		x := dns.Copy(rr)
		x.Header().Class = dns.ClassINET
		ka[store.RRKey(x)] = true
	}
	kb := map[string]bool{}
	for _, rr := range b {
		kb[store.RRKey(rr)] = true
	}
	if len(ka) != len(kb) {
		return false
	}
	for k := range ka {
		if !kb[k] {
			return false
		}
	}
	return true
}

// Answer fills resp (already SetReply'd) for a standard query of q against
// v: authoritative answer, NODATA or NXDOMAIN with the SOA in authority,
// REFUSED outside the zone. Records with a lease report their remaining
// lease as TTL when that is shorter.
func (z *Zone) Answer(v store.View, q dns.Question, now time.Time, resp *dns.Msg) {
	if !z.InZone(q.Name) || q.Qclass != dns.ClassINET && q.Qclass != dns.ClassANY {
		resp.Rcode = dns.RcodeRefused
		return
	}
	resp.Authoritative = true
	rrs := z.Records(v, q.Name, now)
	for _, rr := range rrs {
		if q.Qtype == dns.TypeANY || rr.Header().Rrtype == q.Qtype ||
			rr.Header().Rrtype == dns.TypeCNAME && q.Qtype != dns.TypeCNAME {
			rr = dns.Copy(rr)
			rr.Header().Name = q.Name
			resp.Answer = append(resp.Answer, rr)
		}
	}
	if len(resp.Answer) > 0 {
		z.glue(resp)
		return
	}
	resp.Ns = append(resp.Ns, z.soa(z.ZoneOf(q.Name), uint32(v.Rev())))
	if len(rrs) == 0 && !z.hasDescendant(v, q.Name) {
		resp.Rcode = dns.RcodeNameError
	}
}

// glue adds the server's addresses to the additional section when an NS or
// SRV answer names it (the delegation's glue; what a client resolving a
// discovery SRV needs next).
func (z *Zone) glue(resp *dns.Msg) {
	for _, rr := range resp.Answer {
		if srv, ok := rr.(*dns.SRV); ok {
			for _, r := range z.Relays {
				if strings.EqualFold(srv.Target, r.Name) && z.InZone(r.Name) {
					resp.Extra = append(resp.Extra, z.Synth(r.Name, 0)...)
				}
			}
		}
	}
	done := map[string]bool{}
	for _, rr := range resp.Answer {
		var target string
		switch r := rr.(type) {
		case *dns.NS:
			target = r.Ns
		case *dns.SRV:
			target = r.Target
		}
		target = strings.ToLower(target)
		if target == "" || done[target] || !z.InZone(target) || !z.isServerName(target) {
			continue
		}
		done[target] = true
		resp.Extra = append(resp.Extra, z.Synth(target, 0)...)
	}
}

// Records returns all records at name (stored and synthesised) with TTLs
// capped by the remaining lease.
func (z *Zone) Records(v store.View, name string, now time.Time) []dns.RR {
	var out []dns.RR
	for _, r := range v.Name(name) {
		rr := r.RR
		if !r.Expires.IsZero() {
			left := r.Expires.Sub(now)
			if left <= 0 {
				continue // expired, removal pending
			}
			if s := uint32(left / time.Second); s < rr.Header().Ttl {
				rr = dns.Copy(rr)
				rr.Header().Ttl = s
			}
		}
		out = append(out, rr)
	}
	return append(out, z.Synth(name, uint32(v.Rev()))...)
}

// hasDescendant reports whether an empty non-terminal exists at name: the
// apex, a user's subdomain, or a discovery service name.
func (z *Zone) hasDescendant(v store.View, name string) bool {
	name = strings.ToLower(dns.CanonicalName(name))
	if name == z.Origin || v.HasDescendants(name) {
		return true
	}
	if u := z.UserOf(name); u != "" && z.isUser(u) {
		if name == z.UserDomain(u) {
			return true
		}
		for _, d := range discovery {
			if dns.IsSubDomain(name, d.prefix+z.UserDomain(u)) {
				return true
			}
		}
	}
	return false
}
