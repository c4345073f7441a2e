package register

import (
	"fmt"
	"strings"

	"github.com/miekg/dns"
)

// ServiceLabel is the autotunnel service and protocol (RFC 6281 §3).
const ServiceLabel = "_autotunnel._udp"

// Names are the DNS names one host publishes under its user's domain.
// For host "laptop" in "alice.btmm.example.":
//
//	Host     laptop.alice.btmm.example.                    AAAA  <ULA>
//	Instance _autotunnel._udp.laptop.alice.btmm.example.    SRV   0 0 <port> <Target>
//	                                                        TXT   <Capabilities>
//	Target   AutoTunnel-XX-XX-XX-FF-FE-XX-XX-XX.alice.btmm.example.  A  <outer IPv4>
//	Browse   _autotunnel._udp.alice.btmm.example.          PTR   <Instance>
//
// The browse PTR is DNS-SD (RFC 6763 §4) pointing at the RFC 6281 SRV name,
// so a browser finds SRV and TXT at the PTR's target and the host name by
// dropping the service labels.
type Names struct {
	Host, Instance, Target, Browse string
}

// NamesFor builds the names of host (a single label) with AutoTunnel label
// label under domain.
func NamesFor(host, label, domain string) (Names, error) {
	domain = dns.Fqdn(domain)
	if _, ok := dns.IsDomainName(domain); !ok || domain == "." {
		return Names{}, fmt.Errorf("register: domain %q is not a domain name", domain)
	}
	for _, l := range []string{host, label} {
		if l == "" || strings.ContainsAny(l, ". \t") || len(l) > 63 || strings.HasPrefix(l, "_") {
			return Names{}, fmt.Errorf("register: %q is not a single host label", l)
		}
	}
	h := dns.Fqdn(host + "." + domain)
	return Names{
		Host:     h,
		Instance: ServiceLabel + "." + h,
		Target:   dns.Fqdn(label + "." + domain),
		Browse:   ServiceLabel + "." + domain,
	}, nil
}

// BrowseName is the DNS-SD browse name of domain.
func BrowseName(domain string) string { return ServiceLabel + "." + dns.CanonicalName(domain) }

// HostFromInstance returns the host name ("laptop.alice.btmm.example.") of an
// instance name found in the browse PTR, or false when instance is not
// "_autotunnel._udp.<one label>.<domain>".
func HostFromInstance(instance, domain string) (string, bool) {
	instance, domain = dns.CanonicalName(instance), dns.CanonicalName(domain)
	rest, ok := strings.CutPrefix(instance, ServiceLabel+".")
	if !ok {
		return "", false
	}
	label, parent, ok := strings.Cut(rest, ".")
	if !ok || label == "" || parent != domain {
		return "", false
	}
	return rest, true
}
