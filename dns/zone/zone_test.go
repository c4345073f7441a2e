package zone

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/store"
	"github.com/miekg/dns"
)

func newZone(t testing.TB) *Zone {
	z, err := New(Zone{Origin: "btmm.example.", ServerAddr: []netip.Addr{netip.MustParseAddr("192.0.2.53")}, IsUser: func(u string) bool { return u == "alice" || u == "bob" },
		Ports: Ports{UpdateUDP: 53, LLQUDP: 53, UpdateTLS: 853, LLQTLS: 853}})
	if err != nil {
		t.Fatal(err)
	}
	return z
}

func mustRR(t testing.TB, s string) dns.RR {
	t.Helper()
	rr, err := dns.NewRR(s)
	if err != nil {
		t.Fatal(err)
	}
	return rr
}

// wire round-trips m so header fields (Rdlength) are as a server sees them.
func wire(t testing.TB, m *dns.Msg) *dns.Msg {
	t.Helper()
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	out := new(dns.Msg)
	if err := out.Unpack(b); err != nil {
		t.Fatal(err)
	}
	return out
}

var alice = Request{User: "alice", KeyName: "alice.btmm.example.", Lease: time.Hour, Now: time.Unix(1800000000, 0)}

func apply(t *testing.T, z *Zone, s store.Store, m *dns.Msg) int {
	t.Helper()
	m = wire(t, m)
	if err := z.CheckUpdate(m, alice); err != nil {
		return Rcode(err)
	}
	if _, err := s.Update(context.Background(), z.Update(m, alice)); err != nil {
		return Rcode(err)
	}
	return dns.RcodeSuccess
}

func TestUpdatePrerequisitesAndOps(t *testing.T) {
	z := newZone(t)
	s, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	h := "h.alice.btmm.example."
	msg := func(f func(m *dns.Msg)) *dns.Msg {
		m := new(dns.Msg)
		m.SetUpdate("btmm.example.")
		f(m)
		return m
	}
	steps := []struct {
		name  string
		m     *dns.Msg
		rcode int
		want  int // records at h afterwards
	}{
		{"add", msg(func(m *dns.Msg) {
			m.NameNotUsed([]dns.RR{mustRR(t, h+" 0 IN A 0.0.0.0")})
			m.Insert([]dns.RR{mustRR(t, h+" 60 IN A 192.0.2.1"), mustRR(t, h+" 60 IN TXT \"x\"")})
		}), dns.RcodeSuccess, 2},
		{"nxdomain prereq now fails", msg(func(m *dns.Msg) {
			m.NameNotUsed([]dns.RR{mustRR(t, h+" 0 IN A 0.0.0.0")})
			m.Insert([]dns.RR{mustRR(t, h+" 60 IN A 192.0.2.2")})
		}), dns.RcodeYXDomain, 2},
		{"rrset exists (value independent)", msg(func(m *dns.Msg) {
			m.RRsetUsed([]dns.RR{mustRR(t, h+" 0 IN AAAA ::")})
			m.Insert([]dns.RR{mustRR(t, h+" 60 IN A 192.0.2.2")})
		}), dns.RcodeNXRrset, 2},
		{"rrset exists (value dependent) mismatch", msg(func(m *dns.Msg) {
			m.Used([]dns.RR{mustRR(t, h+" 0 IN A 192.0.2.9")})
			m.Insert([]dns.RR{mustRR(t, h+" 60 IN A 192.0.2.2")})
		}), dns.RcodeNXRrset, 2},
		{"rrset exists (value dependent) match", msg(func(m *dns.Msg) {
			m.Used([]dns.RR{mustRR(t, h+" 0 IN A 192.0.2.1")})
			m.Insert([]dns.RR{mustRR(t, h+" 60 IN A 192.0.2.2")})
		}), dns.RcodeSuccess, 3},
		{"rrset does not exist fails", msg(func(m *dns.Msg) {
			m.RRsetNotUsed([]dns.RR{mustRR(t, h+" 0 IN TXT \"\"")})
		}), dns.RcodeYXRrset, 3},
		{"name in use ok + delete one RR", msg(func(m *dns.Msg) {
			m.NameUsed([]dns.RR{mustRR(t, h+" 0 IN A 0.0.0.0")})
			m.Remove([]dns.RR{mustRR(t, h+" 0 IN A 192.0.2.1")})
		}), dns.RcodeSuccess, 2},
		{"delete rrset", msg(func(m *dns.Msg) { m.RemoveRRset([]dns.RR{mustRR(t, h+" 0 IN A 0.0.0.0")}) }), dns.RcodeSuccess, 1},
		{"delete name", msg(func(m *dns.Msg) { m.RemoveName([]dns.RR{mustRR(t, h+" 0 IN A 0.0.0.0")}) }), dns.RcodeSuccess, 0},
		{"name-in-use on empty name", msg(func(m *dns.Msg) { m.NameUsed([]dns.RR{mustRR(t, h+" 0 IN A 0.0.0.0")}) }), dns.RcodeNameError, 0},
		{"other user", msg(func(m *dns.Msg) { m.Insert([]dns.RR{mustRR(t, "x.bob.btmm.example. 60 IN A 192.0.2.1")}) }), dns.RcodeRefused, 0},
		{"apex", msg(func(m *dns.Msg) { m.Insert([]dns.RR{mustRR(t, "btmm.example. 60 IN A 192.0.2.1")}) }), dns.RcodeRefused, 0},
		{"outside zone", msg(func(m *dns.Msg) { m.Insert([]dns.RR{mustRR(t, "x.other. 60 IN A 192.0.2.1")}) }), dns.RcodeNotZone, 0},
		{"ns type", msg(func(m *dns.Msg) { m.Insert([]dns.RR{mustRR(t, h+" 60 IN NS ns.x.")}) }), dns.RcodeRefused, 0},
		{"discovery srv", msg(func(m *dns.Msg) {
			m.Insert([]dns.RR{mustRR(t, "_dns-llq._udp.alice.btmm.example. 60 IN SRV 0 0 1 evil.")})
		}), dns.RcodeRefused, 0},
		{"unsupported type", msg(func(m *dns.Msg) { m.Insert([]dns.RR{mustRR(t, h+" 60 IN MX 10 mx.")}) }), dns.RcodeFormatError, 0},
		{"atomic: good add + failing prereq", msg(func(m *dns.Msg) {
			m.Used([]dns.RR{mustRR(t, h+" 0 IN A 192.0.2.77")})
			m.Insert([]dns.RR{mustRR(t, h+" 60 IN A 192.0.2.5")})
		}), dns.RcodeNXRrset, 0},
	}
	for _, st := range steps {
		got := apply(t, z, s, st.m)
		if got != st.rcode {
			t.Fatalf("%s: rcode %s, want %s", st.name, dns.RcodeToString[got], dns.RcodeToString[st.rcode])
		}
		var n int
		s.Read(func(v store.View) { n = len(v.Name(h)) })
		if n != st.want {
			t.Fatalf("%s: %d records, want %d", st.name, n, st.want)
		}
	}
	// Wrong zone: NOTAUTH.
	m := new(dns.Msg)
	m.SetUpdate("other.example.")
	if err := z.CheckUpdate(wire(t, m), alice); Rcode(err) != dns.RcodeNotAuth {
		t.Fatalf("wrong zone: %v", err)
	}
}

func TestAnswer(t *testing.T) {
	z := newZone(t)
	s, _ := store.Open(t.TempDir())
	defer s.Close()
	now := time.Unix(1800000000, 0)
	r := mustRR(t, "h.alice.btmm.example. 600 IN A 192.0.2.1")
	s.Update(context.Background(), func(store.View) ([]store.Op, error) {
		return []store.Op{{Kind: store.Put, Record: store.Record{RR: r, Expires: now.Add(100 * time.Second)}}}, nil
	})
	ask := func(name string, qt uint16) *dns.Msg {
		m := new(dns.Msg)
		m.SetQuestion(name, qt)
		resp := new(dns.Msg)
		resp.SetReply(m)
		s.Read(func(v store.View) { z.Answer(v, m.Question[0], now, resp) })
		return resp
	}
	if a := ask("H.alice.btmm.example.", dns.TypeA); len(a.Answer) != 1 || a.Answer[0].Header().Ttl != 100 {
		t.Fatalf("A: %v", a)
	}
	if a := ask("h.alice.btmm.example.", dns.TypeAAAA); a.Rcode != 0 || len(a.Ns) != 1 {
		t.Fatalf("NODATA: %v", a)
	}
	if a := ask("alice.btmm.example.", dns.TypeA); a.Rcode != dns.RcodeSuccess {
		t.Fatalf("user domain is an empty non-terminal: %v", a)
	}
	if a := ask("alice.btmm.example.", dns.TypeA); a.Rcode != dns.RcodeSuccess {
		t.Fatalf("user domain: %v", a)
	}
	s.Update(context.Background(), func(store.View) ([]store.Op, error) {
		return []store.Op{{Kind: store.Put, Record: store.Record{RR: mustRR(t, "h._ssh._tcp.bob.btmm.example. 60 IN SRV 0 0 22 h.")}}}, nil
	})
	if a := ask("_tcp.bob.btmm.example.", dns.TypeA); a.Rcode != dns.RcodeSuccess || len(a.Ns) != 1 {
		t.Fatalf("empty non-terminal: %v", a)
	}
	if a := ask("_sctp.bob.btmm.example.", dns.TypeA); a.Rcode != dns.RcodeNameError {
		t.Fatalf("absent name: %v", a)
	}
	if a := ask("zed.btmm.example.", dns.TypeA); a.Rcode != dns.RcodeNameError {
		t.Fatalf("unknown user: %v", a)
	}
	if a := ask("btmm.example.", dns.TypeSOA); len(a.Answer) != 1 {
		t.Fatalf("SOA: %v", a)
	}
	if a := ask("_dns-update-tls._tcp.bob.btmm.example.", dns.TypeSRV); len(a.Answer) != 1 || a.Answer[0].(*dns.SRV).Port != 853 {
		t.Fatalf("SRV: %v", a)
	}
	if a := ask("example.org.", dns.TypeA); a.Rcode != dns.RcodeRefused {
		t.Fatalf("out of zone: %v", a)
	}
}

// TestRelaySRV: configured relays are published as SRV _btmm-relay._udp
// at the origin and at a user's apex, with their addresses as glue, and no
// UPDATE may touch those names.
func TestRelaySRV(t *testing.T) {
	z, err := New(Zone{Origin: "btmm.example.", IsUser: func(u string) bool { return u == "alice" },
		Relays: []Relay{{Name: "Relay.btmm.example", Port: 3478, TLSPort: 443, Addrs: []netip.Addr{netip.MustParseAddr("11.0.0.1")}},
			{Name: "r2.example.net.", Port: 3479}}})
	if err != nil {
		t.Fatal(err)
	}
	s, _ := store.Open(t.TempDir())
	defer s.Close()
	for _, name := range []string{"_btmm-relay._udp.btmm.example.", "_btmm-relay._udp.alice.btmm.example."} {
		m := new(dns.Msg)
		m.SetQuestion(name, dns.TypeSRV)
		resp := new(dns.Msg)
		resp.SetReply(m)
		s.Read(func(v store.View) { z.Answer(v, m.Question[0], time.Now(), resp) })
		if len(resp.Answer) != 2 || resp.Answer[0].(*dns.SRV).Target != "relay.btmm.example." || resp.Answer[0].(*dns.SRV).Port != 3478 ||
			resp.Answer[1].(*dns.SRV).Target != "r2.example.net." {
			t.Fatalf("%s: %v", name, resp)
		}
		if len(resp.Extra) != 1 || resp.Extra[0].(*dns.A).A.String() != "11.0.0.1" {
			t.Errorf("%s: glue %v", name, resp.Extra)
		}
	}
	// The TLS stream port: only relays that have one.
	for _, name := range []string{"_btmm-relay._tcp.btmm.example.", "_btmm-relay._tcp.alice.btmm.example."} {
		m := new(dns.Msg)
		m.SetQuestion(name, dns.TypeSRV)
		resp := new(dns.Msg)
		resp.SetReply(m)
		s.Read(func(v store.View) { z.Answer(v, m.Question[0], time.Now(), resp) })
		if len(resp.Answer) != 1 || resp.Answer[0].(*dns.SRV).Target != "relay.btmm.example." || resp.Answer[0].(*dns.SRV).Port != 443 {
			t.Fatalf("%s: %v", name, resp)
		}
		if len(resp.Extra) != 1 || resp.Extra[0].(*dns.A).A.String() != "11.0.0.1" {
			t.Errorf("%s: glue %v", name, resp.Extra)
		}
	}
	for _, n := range []string{"_btmm-relay._udp.alice.btmm.example.", "_btmm-relay._tcp.alice.btmm.example.", "relay.btmm.example."} {
		if !z.Protected(n, dns.TypeSRV) {
			t.Errorf("%s not protected", n)
		}
	}
	if _, err := New(Zone{Origin: "btmm.example.", Relays: []Relay{{Name: "r."}}}); err == nil {
		t.Error("relay without a port accepted")
	}
}

// TestZonePerUser: each user's domain answers as a zone of its own (issue:
// Apple's client finds the zone of a name by its SOA, then the discovery
// SRVs at that zone).
func TestZonePerUser(t *testing.T) {
	z := newZone(t)
	s, _ := store.Open(t.TempDir())
	defer s.Close()
	now := time.Unix(1800000000, 0)
	ask := func(name string, qt uint16) *dns.Msg {
		m := new(dns.Msg)
		m.SetQuestion(name, qt)
		resp := new(dns.Msg)
		resp.SetReply(m)
		s.Read(func(v store.View) { z.Answer(v, m.Question[0], now, resp) })
		return resp
	}
	soaOf := func(rrs []dns.RR) string {
		for _, rr := range rrs {
			if soa, ok := rr.(*dns.SOA); ok {
				return soa.Hdr.Name
			}
		}
		return ""
	}
	if a := ask("alice.btmm.example.", dns.TypeSOA); soaOf(a.Answer) != "alice.btmm.example." || !a.Authoritative {
		t.Fatalf("SOA at the user's apex: %v", a)
	}
	a := ask("alice.btmm.example.", dns.TypeNS)
	if len(a.Answer) != 1 || a.Answer[0].(*dns.NS).Ns != "ns.btmm.example." || len(a.Extra) != 1 {
		t.Fatalf("NS at the user's apex with glue: %v", a)
	}
	// Negative answers below the user carry the user's SOA; the parent's
	// carry the parent's.
	if a := ask("laptop.alice.btmm.example.", dns.TypeSOA); a.Rcode != dns.RcodeNameError || soaOf(a.Ns) != "alice.btmm.example." {
		t.Fatalf("NXDOMAIN below the user: %v", a)
	}
	if a := ask("_dns-update._udp.alice.btmm.example.", dns.TypeA); a.Rcode != dns.RcodeSuccess || soaOf(a.Ns) != "alice.btmm.example." {
		t.Fatalf("NODATA at a discovery name: %v", a)
	}
	if a := ask("zed.btmm.example.", dns.TypeSOA); a.Rcode != dns.RcodeNameError || soaOf(a.Ns) != "btmm.example." {
		t.Fatalf("NXDOMAIN in the parent: %v", a)
	}
	// The discovery SRVs at the zone found, with the server's glue.
	a = ask("_dns-update._udp.alice.btmm.example.", dns.TypeSRV)
	if len(a.Answer) != 1 || a.Answer[0].(*dns.SRV).Target != "ns.btmm.example." || len(a.Extra) != 1 {
		t.Fatalf("SRV: %v", a)
	}
	if z.ZoneOf("x.y.alice.btmm.example.") != "alice.btmm.example." || z.ZoneOf("zed.btmm.example.") != "btmm.example." || z.ZoneOf("example.org.") != "" {
		t.Fatal("ZoneOf")
	}
}

func TestUpdateZoneSection(t *testing.T) {
	z := newZone(t)
	for _, tc := range []struct {
		name  string
		zone  string
		rr    string
		req   Request
		rcode int
	}{
		{"parent zone", "btmm.example.", "h.alice.btmm.example. 60 IN A 192.0.2.1", alice, dns.RcodeSuccess},
		{"user's zone", "alice.btmm.example.", "h.alice.btmm.example. 60 IN A 192.0.2.1", alice, dns.RcodeSuccess},
		{"user's zone, case", "ALICE.btmm.example.", "h.alice.btmm.example. 60 IN A 192.0.2.1", alice, dns.RcodeSuccess},
		{"another user's zone", "bob.btmm.example.", "h.bob.btmm.example. 60 IN A 192.0.2.1", alice, dns.RcodeRefused},
		{"name outside the user's zone", "alice.btmm.example.", "h.bob.btmm.example. 60 IN A 192.0.2.1", alice, dns.RcodeNotZone},
		{"not a zone", "h.alice.btmm.example.", "h.alice.btmm.example. 60 IN A 192.0.2.1", alice, dns.RcodeNotAuth},
		{"unknown user", "zed.btmm.example.", "h.zed.btmm.example. 60 IN A 192.0.2.1", alice, dns.RcodeNotAuth},
		{"SOA at the user's apex", "alice.btmm.example.", "alice.btmm.example. 60 IN SOA a. b. 1 2 3 4 5", alice, dns.RcodeRefused},
		{"NS at the user's apex", "alice.btmm.example.", "alice.btmm.example. 60 IN NS evil.example.", alice, dns.RcodeRefused},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := new(dns.Msg)
			m.SetUpdate(tc.zone)
			m.Insert([]dns.RR{mustRR(t, tc.rr)})
			if got := Rcode(z.CheckUpdate(wire(t, m), tc.req)); tc.rcode == dns.RcodeSuccess && z.CheckUpdate(wire(t, m), tc.req) != nil || tc.rcode != dns.RcodeSuccess && got != tc.rcode {
				t.Fatalf("rcode %s, want %s (%v)", dns.RcodeToString[got], dns.RcodeToString[tc.rcode], z.CheckUpdate(wire(t, m), tc.req))
			}
		})
	}
}
