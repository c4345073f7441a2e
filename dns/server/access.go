package server

import (
	"net"
	"strings"

	"github.com/btmm/btmm/dns/store"
	"github.com/miekg/dns"
)

// Who may read what (docs/dnsd.md, "Private records").
//
// With private records (the default) a query for a name at or below a
// user's domain must be signed by a key of that user (the user's own or one
// of its hosts'); anything else is REFUSED. Public are the zone's
// infrastructure: the SOA and NS at the user's apex, the discovery SRV names,
// and SOA queries below the apex, answered as NODATA with the user's SOA
// whether or not the name exists (a client finds the zone this way, as
// Apple's does, and learns nothing about the names in it).
//
// LLQs always need a key of the name's user, except with the Apple-client
// compatibility switch (apple_compat): for the users it covers, unsigned
// UDP queries and LLQ setup, refresh and acknowledgements are accepted
// (Apple's client signs neither over UDP) and their records are public.

// unsignedLLQKey is the LLQ table's key for the unsigned LLQs of a user (an
// apple_compat user): it is never a TSIG key's name, so their events go out
// unsigned, and each user has its own limit of LLQs.
func unsignedLLQKey(user string) string { return "unsigned:" + user }

// compat reports whether apple_compat covers user.
func (s *Server) compat(user string) bool {
	for _, u := range s.cfg.AppleCompat {
		if u == "*" || strings.EqualFold(u, user) {
			return true
		}
	}
	return false
}

// private reports whether queries for names of user need its key.
func (s *Server) private(user string) bool {
	return !s.cfg.PublicRecords && !s.compat(user)
}

// publicName reports whether q is the zone's public infrastructure.
func (s *Server) publicName(q dns.Question, user string) bool {
	name := strings.ToLower(dns.CanonicalName(q.Name))
	if name == s.zone.UserDomain(user) {
		return q.Qtype == dns.TypeSOA || q.Qtype == dns.TypeNS
	}
	return s.zone.Protected(name, dns.TypeNone)
}

// queryAccess decides a standard query: "" when it may be answered, else
// the reason it is refused. hideSOA is set for an SOA query below a user's
// apex that is answered as the zone's NODATA.
func (s *Server) queryAccess(q dns.Question, a authInfo) (reason string, hideSOA bool) {
	user := s.zone.UserOf(q.Name)
	if user == "" || !s.isUser(user) || a.user == user {
		return "", false
	}
	if a.key != "" {
		return "private records: signed with another user's key", false
	}
	if !s.private(user) || s.publicName(q, user) {
		return "", false
	}
	if q.Qtype == dns.TypeSOA {
		return "", true
	}
	return "private records: unsigned query for a user's names", false
}

// zoneNoData answers q as NODATA of the user's zone (SOA in authority).
func (s *Server) zoneNoData(q dns.Question, resp *dns.Msg) {
	resp.Authoritative = true
	s.store.Read(func(v store.View) {
		apex := s.zone.ZoneOf(q.Name)
		for _, rr := range s.zone.Synth(apex, uint32(v.Rev())) {
			if rr.Header().Rrtype == dns.TypeSOA {
				resp.Ns = append(resp.Ns, rr)
			}
		}
	})
}

// llqAccess decides an LLQ request: the TSIG key (or the unsigned key of
// an apple_compat user) to set it up with, or the reason it is refused.
func (s *Server) llqAccess(w dns.ResponseWriter, q dns.Question, a authInfo) (key, reason string) {
	if !s.zone.InZone(q.Name) {
		return "", "name outside the zone"
	}
	user := s.zone.UserOf(q.Name)
	switch {
	case a.key != "" && user != "" && user == a.user:
		return a.key, ""
	case a.key != "":
		return "", "name of another user"
	case user == "" || !s.isUser(user):
		return "", "unsigned LLQ"
	case !s.compat(user):
		return "", "unsigned LLQ (apple_compat is off for this user)"
	}
	if _, udp := w.RemoteAddr().(*net.UDPAddr); !udp {
		return "", "unsigned LLQ over TCP/TLS (apple_compat accepts them over UDP only)"
	}
	return unsignedLLQKey(user), ""
}

// logCompat says at start which users apple_compat covers.
func (s *Server) logCompat() {
	if len(s.cfg.AppleCompat) == 0 {
		if s.cfg.PublicRecords {
			s.log.Warn("public_records: anyone may read every user's records")
		}
		return
	}
	s.log.Warn("apple_compat: unsigned UDP queries and LLQs accepted, private records off",
		"users", strings.Join(s.cfg.AppleCompat, ","))
}
