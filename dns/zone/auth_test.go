package zone

import (
	"context"
	"strings"
	"testing"

	"github.com/btmm/btmm/dns/store"
	"github.com/miekg/dns"
)

func hostReq(host string) Request {
	r := alice
	r.Host = host
	r.KeyName = host + ".alice.btmm.example."
	return r
}

// register is what dns/register sends for a host: AAAA, SRV, TXT, target A
// and its own browse PTR.
func register(t *testing.T, host, ula, target string) []dns.RR {
	d := ".alice.btmm.example."
	return []dns.RR{
		mustRR(t, host+d+" 60 IN AAAA "+ula),
		mustRR(t, "_autotunnel._udp."+host+d+" 60 IN SRV 0 0 4500 "+target+d),
		mustRR(t, "_autotunnel._udp."+host+d+" 60 IN TXT \"txtvers=1\""),
		mustRR(t, target+d+" 60 IN A 198.51.100.7"),
		mustRR(t, "_autotunnel._udp"+d+" 60 IN PTR _autotunnel._udp."+host+d),
	}
}

// TestHostKeyAuthorization: a host's key may change only what is the host's
// own; the malicious-host cases of issue 13 (a) another's ULA under its own
// name, (b) its ULA under another's name, are REFUSED and change nothing.
func TestHostKeyAuthorization(t *testing.T) {
	z, err := New(Zone{Origin: "btmm.example.", IsUser: func(u string) bool { return u == "alice" || u == "bob" },
		Hosts: func(u string) []string {
			if u == "alice" {
				return []string{"laptop", "desktop", "mallory"}
			}
			return nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	s, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	do := func(req Request, zoneName string, f func(m *dns.Msg)) int {
		m := new(dns.Msg)
		m.SetUpdate(zoneName)
		f(m)
		m = wire(t, m)
		if err := z.CheckUpdate(m, req); err != nil {
			t.Logf("  %v", err)
			return Rcode(err)
		}
		if _, err := s.Update(context.Background(), z.Update(m, req)); err != nil {
			t.Logf("  %v", err)
			return Rcode(err)
		}
		return dns.RcodeSuccess
	}
	all := func() string {
		recs, _ := s.All()
		var b strings.Builder
		for _, r := range recs {
			b.WriteString(r.RR.String() + " owner=" + r.Owner + "\n")
		}
		return b.String()
	}
	desktop, laptop, mallory, user := hostReq("desktop"), hostReq("laptop"), hostReq("mallory"), alice
	// Desktop and laptop register with their own keys, as dns/register does.
	for _, h := range []struct {
		req              Request
		host, ula, label string
	}{{desktop, "desktop", "fd00::d", "AutoTunnel-D"}, {laptop, "laptop", "fd00::1", "AutoTunnel-L"}} {
		if rc := do(h.req, "btmm.example.", func(m *dns.Msg) {
			m.RemoveRRset(register(t, h.host, h.ula, h.label)[:4])
			m.Insert(register(t, h.host, h.ula, h.label))
		}); rc != dns.RcodeSuccess {
			t.Fatalf("%s registers: %s", h.host, dns.RcodeToString[rc])
		}
	}
	// ...and refresh, naming the user's zone this time.
	if rc := do(laptop, "alice.btmm.example.", func(m *dns.Msg) { m.Insert(register(t, "laptop", "fd00::1", "AutoTunnel-L")) }); rc != dns.RcodeSuccess {
		t.Fatalf("refresh in the user's zone: %s", dns.RcodeToString[rc])
	}
	before := all()
	d := ".alice.btmm.example."
	for _, tc := range []struct {
		name  string
		req   Request
		f     func(m *dns.Msg)
		rcode int
	}{
		{"(a) another host's ULA under its own name", mallory, func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "mallory"+d+" 60 IN AAAA fd00::d")})
		}, dns.RcodeRefused},
		{"(a) another host's ULA below its own name", mallory, func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "x.mallory"+d+" 60 IN AAAA fd00::d")})
		}, dns.RcodeRefused},
		{"(b) its ULA under another host's name", mallory, func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "desktop"+d+" 60 IN AAAA fd00::66")})
		}, dns.RcodeRefused},
		{"(b) deleting another host's AAAA", mallory, func(m *dns.Msg) {
			m.RemoveRRset([]dns.RR{mustRR(t, "desktop"+d+" 0 IN AAAA ::")})
		}, dns.RcodeRefused},
		{"another host's TXT", mallory, func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "_autotunnel._udp.desktop"+d+" 60 IN TXT \"krb=host/mallory@X\"")})
		}, dns.RcodeRefused},
		{"another host's SRV target", mallory, func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "_autotunnel._udp.mallory"+d+" 60 IN SRV 0 0 1 AutoTunnel-D"+d),
				mustRR(t, "AutoTunnel-D"+d+" 60 IN A 203.0.113.66")})
		}, dns.RcodeRefused},
		{"an A that is not its SRV target", mallory, func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "www"+d+" 60 IN A 203.0.113.66")})
		}, dns.RcodeRefused},
		{"another host's PTR deleted", mallory, func(m *dns.Msg) {
			m.Remove([]dns.RR{mustRR(t, "_autotunnel._udp"+d+" 0 IN PTR _autotunnel._udp.desktop"+d)})
		}, dns.RcodeRefused},
		{"the browse RRset deleted", mallory, func(m *dns.Msg) {
			m.RemoveRRset([]dns.RR{mustRR(t, "_autotunnel._udp"+d+" 0 IN PTR .")})
		}, dns.RcodeRefused},
		{"a PTR to another host", mallory, func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "_autotunnel._udp"+d+" 60 IN PTR _autotunnel._udp.desktop"+d)})
		}, dns.RcodeRefused},
		{"a CNAME at its own name", mallory, func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "mallory"+d+" 60 IN CNAME desktop"+d)})
		}, dns.RcodeRefused},
		{"a CNAME with the user's key", user, func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "www"+d+" 60 IN CNAME desktop"+d)})
		}, dns.RcodeRefused},
		{"a DNAME", user, func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "www"+d+" 60 IN DNAME desktop"+d)})
		}, dns.RcodeRefused},
		{"the user's apex", mallory, func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "alice.btmm.example. 60 IN TXT \"x\"")})
		}, dns.RcodeRefused},
		{"prerequisite on another host's name", mallory, func(m *dns.Msg) {
			m.NameUsed([]dns.RR{mustRR(t, "desktop"+d+" 0 IN A 0.0.0.0")})
			m.Insert([]dns.RR{mustRR(t, "mallory"+d+" 60 IN AAAA fd00::66")})
		}, dns.RcodeRefused},
		{"prerequisite on another host's target", mallory, func(m *dns.Msg) {
			m.RRsetUsed([]dns.RR{mustRR(t, "AutoTunnel-D"+d+" 0 IN A 0.0.0.0")})
		}, dns.RcodeRefused},
		{"prerequisite on another user's name", user, func(m *dns.Msg) {
			m.NameNotUsed([]dns.RR{mustRR(t, "x.bob.btmm.example. 0 IN A 0.0.0.0")})
			m.Insert([]dns.RR{mustRR(t, "x"+d+" 60 IN A 192.0.2.1")})
		}, dns.RcodeRefused},
		{"another user's name", mallory, func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "x.bob.btmm.example. 60 IN A 192.0.2.1")})
		}, dns.RcodeRefused},
		{"the user's key: a ULA another host holds", user, func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "newhost"+d+" 60 IN AAAA fd00::1")})
		}, dns.RcodeRefused},
	} {
		if rc := do(tc.req, "btmm.example.", tc.f); rc != tc.rcode {
			t.Errorf("%s: rcode %s, want %s", tc.name, dns.RcodeToString[rc], dns.RcodeToString[tc.rcode])
		}
		if after := all(); after != before {
			t.Fatalf("%s changed the zone:\n%s", tc.name, after)
		}
	}
	// Mallory's own registration works, and so do names below its own.
	if rc := do(mallory, "alice.btmm.example.", func(m *dns.Msg) {
		m.NameNotUsed([]dns.RR{mustRR(t, "mallory"+d+" 0 IN A 0.0.0.0")})
		m.Insert(register(t, "mallory", "fd00::66", "AutoTunnel-M"))
		m.Insert([]dns.RR{mustRR(t, "web._http._tcp.mallory"+d+" 60 IN SRV 0 0 80 mallory"+d)})
	}); rc != dns.RcodeSuccess {
		t.Fatalf("mallory's own records: %s", dns.RcodeToString[rc])
	}
	// Its target, now held: another host's SRV cannot take it over.
	if rc := do(laptop, "btmm.example.", func(m *dns.Msg) {
		m.Insert([]dns.RR{mustRR(t, "_autotunnel._udp.laptop"+d+" 60 IN SRV 0 0 1 AutoTunnel-M"+d), mustRR(t, "AutoTunnel-M"+d+" 60 IN A 192.0.2.9")})
	}); rc != dns.RcodeRefused {
		t.Fatalf("laptop took mallory's target: %s", dns.RcodeToString[rc])
	}
	// Mallory deletes its own PTR and target (what its clean shutdown sends).
	if rc := do(mallory, "btmm.example.", func(m *dns.Msg) {
		m.Remove([]dns.RR{mustRR(t, "_autotunnel._udp"+d+" 0 IN PTR _autotunnel._udp.mallory"+d)})
		m.RemoveRRset([]dns.RR{mustRR(t, "AutoTunnel-M"+d+" 0 IN A 0.0.0.0")})
	}); rc != dns.RcodeSuccess {
		t.Fatalf("mallory's clean shutdown: %s", dns.RcodeToString[rc])
	}
	// The user's key moves a ULA from one host to another in one update.
	if rc := do(user, "btmm.example.", func(m *dns.Msg) {
		m.RemoveRRset([]dns.RR{mustRR(t, "laptop"+d+" 0 IN AAAA ::")})
		m.Insert([]dns.RR{mustRR(t, "newhost"+d+" 60 IN AAAA fd00::1")})
	}); rc != dns.RcodeSuccess {
		t.Fatalf("user moves a ULA: %s", dns.RcodeToString[rc])
	}
}
