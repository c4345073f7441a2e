package names

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// TTL of the stub's answers: short, a peer's ULA changes when it reboots.
const TTL = 10

// Handler answers queries for the table's domain: AAAA of a known host,
// NODATA for its other types (so an A lookup does not fail the name),
// NXDOMAIN for unknown names in the domain, SOA at the apex, REFUSED for
// anything outside it (resolved never routes those here).
//
// Names in the domain that cannot be host names — service names such as
// _dns-update._udp.<domain> (a label starting with "_") and names more than
// one label below it — are passed to the zone's server when upstream
// returns one (its host:port, e.g. the server btmmd registers with): once
// systemd-resolved routes the whole domain here, discovery by SRV must
// still reach the real zone.
func Handler(t *Table, upstream func() string) dns.Handler {
	return dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		if up := forwardTo(t, r, upstream); up != "" {
			if m := forward(r, up); m != nil {
				w.WriteMsg(m)
				return
			}
			m := new(dns.Msg)
			m.SetRcode(r, dns.RcodeServerFailure)
			w.WriteMsg(m)
			return
		}
		w.WriteMsg(answer(t, r))
	})
}

// forwardTo returns the server to pass r to ("": answer it here).
func forwardTo(t *Table, r *dns.Msg, upstream func() string) string {
	if upstream == nil || r.Opcode != dns.OpcodeQuery || len(r.Question) != 1 {
		return ""
	}
	name := dns.CanonicalName(r.Question[0].Name)
	if name == t.domain || !dns.IsSubDomain(t.domain, name) {
		return ""
	}
	labels := dns.SplitDomainName(strings.TrimSuffix(name, t.domain))
	if len(labels) == 1 && !strings.HasPrefix(labels[0], "_") {
		return ""
	}
	return upstream()
}

// forward asks up (UDP, then TCP if the answer was truncated); nil: no answer.
func forward(r *dns.Msg, up string) *dns.Msg {
	q := r.Copy()
	q.RecursionDesired = false
	for _, n := range []string{"udp", "tcp"} {
		c := &dns.Client{Net: n, Timeout: 2 * time.Second}
		m, _, err := c.Exchange(q, up)
		if err != nil {
			return nil
		}
		if !m.Truncated || n == "tcp" {
			m.Id = r.Id
			return m
		}
	}
	return nil
}

func answer(t *Table, r *dns.Msg) *dns.Msg {
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	m.RecursionAvailable = false
	if r.Opcode != dns.OpcodeQuery || len(r.Question) != 1 {
		m.SetRcode(r, dns.RcodeNotImplemented)
		return m
	}
	q := r.Question[0]
	name := dns.CanonicalName(q.Name)
	if !dns.IsSubDomain(t.domain, name) || q.Qclass != dns.ClassINET {
		m.SetRcode(r, dns.RcodeRefused)
		return m
	}
	soa := &dns.SOA{Hdr: dns.RR_Header{Name: t.domain, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: TTL},
		Ns: "btmmd." + t.domain, Mbox: "hostmaster." + t.domain, Serial: 1, Refresh: 3600, Retry: 600, Expire: 86400, Minttl: TTL}
	switch ula, ok := t.Lookup(name); {
	case ok && (q.Qtype == dns.TypeAAAA || q.Qtype == dns.TypeANY):
		m.Answer = []dns.RR{&dns.AAAA{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: TTL}, AAAA: net.IP(ula.AsSlice())}}
	case ok || name == t.domain && q.Qtype != dns.TypeSOA:
		m.Ns = []dns.RR{soa} // NODATA
	case name == t.domain:
		m.Answer = []dns.RR{soa}
	default:
		m.SetRcode(r, dns.RcodeNameError)
		m.Ns = []dns.RR{soa}
	}
	return m
}

// Stub is the table served over UDP and TCP on one address.
type Stub struct {
	Addr netip.AddrPort
	udp  *dns.Server
	tcp  *dns.Server
}

// ListenStub serves t on addr (e.g. 127.0.0.77:53; port 0: any, the same
// for UDP and TCP) until Close. upstream may be nil (see Handler).
func ListenStub(addr netip.AddrPort, t *Table, upstream func() string, log *slog.Logger) (*Stub, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	pc, err := net.ListenPacket("udp", addr.String())
	if err != nil {
		return nil, fmt.Errorf("name stub: %w", err)
	}
	addr = pc.LocalAddr().(*net.UDPAddr).AddrPort()
	addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
	l, err := net.Listen("tcp", addr.String())
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("name stub: %w", err)
	}
	h := Handler(t, upstream)
	s := &Stub{Addr: addr,
		udp: &dns.Server{PacketConn: pc, Handler: h},
		tcp: &dns.Server{Listener: l, Handler: h, ReadTimeout: 5 * time.Second},
	}
	for _, srv := range []*dns.Server{s.udp, s.tcp} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go func() {
			if err := srv.ActivateAndServe(); err != nil && !strings.Contains(err.Error(), "closed") {
				log.Warn("name stub stopped", "err", err)
			}
		}()
		<-started
	}
	return s, nil
}

// Close stops the stub.
func (s *Stub) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return errors.Join(s.udp.ShutdownContext(ctx), s.tcp.ShutdownContext(ctx))
}
