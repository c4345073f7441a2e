package register

import (
	"cmp"
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// Discover resolves a DNS-SD style service name (e.g.
// "_dns-update._udp.alice.btmm.example.") to "addr:port" through resolver:
// the SRV with the lowest priority (then highest weight), its target's
// address from the additional section or an A, then AAAA query.
func Discover(ctx context.Context, resolver, service string, timeout time.Duration) (string, error) {
	addr, _, err := DiscoverSRV(ctx, resolver, service, timeout)
	return addr, err
}

// DiscoverSRV is Discover that also returns the chosen SRV record's target
// (without the final dot): the name a TLS connection to addr verifies the
// server's certificate against (RFC 7858 §4.2 with RFC 2782: the SRV target
// is the authenticated name; the address is only where it lives).
func DiscoverSRV(ctx context.Context, resolver, service string, timeout time.Duration) (addr, target string, err error) {
	c := &dns.Client{Timeout: timeout}
	q := new(dns.Msg)
	q.SetQuestion(dns.CanonicalName(service), dns.TypeSRV)
	reply, _, err := c.ExchangeContext(ctx, q, resolver)
	if err != nil {
		return "", "", fmt.Errorf("srv %s: %w", service, err)
	}
	if reply.Rcode != dns.RcodeSuccess {
		return "", "", fmt.Errorf("srv %s: %s", service, dns.RcodeToString[reply.Rcode])
	}
	var srvs []*dns.SRV
	for _, rr := range reply.Answer {
		if s, ok := rr.(*dns.SRV); ok && s.Target != "." && s.Port != 0 {
			srvs = append(srvs, s)
		}
	}
	if len(srvs) == 0 {
		return "", "", fmt.Errorf("srv %s: no usable SRV record", service)
	}
	slices.SortStableFunc(srvs, func(a, b *dns.SRV) int {
		return cmp.Or(cmp.Compare(a.Priority, b.Priority), cmp.Compare(b.Weight, a.Weight))
	})
	srv := srvs[0]
	port := strconv.Itoa(int(srv.Port))
	if a, ok := addrIn(reply.Extra, srv.Target); ok {
		return net.JoinHostPort(a.String(), port), strings.TrimSuffix(srv.Target, "."), nil
	}
	for _, t := range []uint16{dns.TypeA, dns.TypeAAAA} {
		q := new(dns.Msg)
		q.SetQuestion(srv.Target, t)
		r, _, err := c.ExchangeContext(ctx, q, resolver)
		if err != nil {
			return "", "", fmt.Errorf("srv %s: resolve target %s: %w", service, srv.Target, err)
		}
		if a, ok := addrIn(r.Answer, srv.Target); ok {
			return net.JoinHostPort(a.String(), port), strings.TrimSuffix(srv.Target, "."), nil
		}
	}
	return "", "", fmt.Errorf("srv %s: target %s has no address", service, srv.Target)
}

func addrIn(rrs []dns.RR, name string) (netip.Addr, bool) {
	for _, rr := range rrs {
		if !dns.IsSubDomain(rr.Header().Name, name) || !dns.IsSubDomain(name, rr.Header().Name) {
			continue
		}
		switch v := rr.(type) {
		case *dns.A:
			if a, ok := netip.AddrFromSlice(v.A.To4()); ok {
				return a, true
			}
		case *dns.AAAA:
			if a, ok := netip.AddrFromSlice(v.AAAA); ok {
				return a, true
			}
		}
	}
	return netip.Addr{}, false
}
