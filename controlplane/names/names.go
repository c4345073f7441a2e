// Package names makes a user's hosts resolvable by name on each of them,
// without the user changing resolvers (issue 17): a DNS stub (RFC 1034/1035
// answers via miekg/dns) that answers AAAA for <host>.<user domain> from
// btmmd's peer table (stub.go); a per-link DNS route to it in
// systemd-resolved, set over D-Bus (org.freedesktop.resolve1, resolved.go);
// and, where resolved does not run, a managed block in /etc/hosts
// (hosts.go) that the system resolver reads. Names outside the user's
// domain never reach the stub.
package names

import (
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/miekg/dns"
)

// Host is one name in the user's domain.
type Host struct {
	Name string     // label, e.g. "laptop"
	ULA  netip.Addr // this boot's ULA
}

// Table is the current set of hosts of one domain. Safe for concurrent use.
type Table struct {
	domain string // canonical FQDN, e.g. "alice.btmm.example."

	mu    sync.RWMutex
	hosts map[string]netip.Addr // canonical FQDN -> ULA
}

// NewTable returns an empty table for domain.
func NewTable(domain string) *Table {
	return &Table{domain: dns.CanonicalName(domain), hosts: map[string]netip.Addr{}}
}

// Domain is the table's domain (canonical, fully qualified).
func (t *Table) Domain() string { return t.domain }

// Set replaces the table's contents and reports whether they changed.
// Hosts with an invalid ULA or a name that is not a single DNS label are
// left out.
func (t *Table) Set(hosts []Host) bool {
	m := map[string]netip.Addr{}
	for _, h := range hosts {
		if !h.ULA.IsValid() || !validLabel(h.Name) {
			continue
		}
		m[dns.CanonicalName(h.Name+"."+t.domain)] = h.ULA
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	same := len(m) == len(t.hosts)
	for k, v := range m {
		if t.hosts[k] != v {
			same = false
		}
	}
	t.hosts = m
	return !same
}

// Lookup returns the ULA of the fully qualified name (any case).
func (t *Table) Lookup(fqdn string) (netip.Addr, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	a, ok := t.hosts[dns.CanonicalName(fqdn)]
	return a, ok
}

// Hosts returns the table's contents sorted by name.
func (t *Table) Hosts() []Host {
	t.mu.RLock()
	defer t.mu.RUnlock()
	var out []Host
	for n, a := range t.hosts {
		out = append(out, Host{Name: strings.TrimSuffix(n, "."+t.domain), ULA: a})
	}
	slices.SortFunc(out, func(a, b Host) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// validLabel: one LDH label (what /etc/hosts and DNS both take).
func validLabel(s string) bool {
	if s == "" || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}
