package zone

import (
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/store"
	"github.com/miekg/dns"
)

// mapView is an in-memory store.View for fuzzing.
type mapView map[string][]store.Record

func (m mapView) Name(n string) []store.Record { return m[strings.ToLower(dns.CanonicalName(n))] }
func (m mapView) Rev() uint64                  { return 7 }
func (m mapView) HasDescendants(n string) bool {
	n = strings.ToLower(dns.CanonicalName(n))
	for k := range m {
		if k != n && dns.IsSubDomain(n, k) {
			return true
		}
	}
	return false
}

var verdictOf func(m *dns.Msg, req Request) int

// FuzzUpdate feeds arbitrary messages through UPDATE processing: parse ->
// check -> prerequisites/ops, then marshal -> parse -> same verdict.
func FuzzUpdate(f *testing.F) {
	seed := func(build func(m *dns.Msg)) {
		m := new(dns.Msg)
		m.SetUpdate("btmm.example.")
		build(m)
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	rr := func(s string) dns.RR { r, _ := dns.NewRR(s); return r }
	seed(func(m *dns.Msg) { m.Insert([]dns.RR{rr("h.alice.btmm.example. 60 IN AAAA fd00::1")}) })
	seed(func(m *dns.Msg) {
		m.NameNotUsed([]dns.RR{rr("h.alice.btmm.example. 0 IN A 0.0.0.0")})
		m.Used([]dns.RR{rr("h.alice.btmm.example. 0 IN A 192.0.2.1")})
		m.RemoveRRset([]dns.RR{rr("h.alice.btmm.example. 0 IN A 0.0.0.0")})
		m.Remove([]dns.RR{rr("h.alice.btmm.example. 0 IN TXT \"x\"")})
		m.RemoveName([]dns.RR{rr("x.alice.btmm.example. 0 IN A 0.0.0.0")})
	})
	seed(func(m *dns.Msg) {
		m.Insert([]dns.RR{rr("_x._tcp.alice.btmm.example. 60 IN SRV 0 0 22 h.alice.btmm.example.")})
	})
	f.Add([]byte{0, 1, 0x28, 0, 0, 1, 0, 0, 0, 1, 0, 0})
	seed(func(m *dns.Msg) {
		m.Insert([]dns.RR{rr("_autotunnel._udp.laptop.alice.btmm.example. 60 IN SRV 0 0 4500 at-1.alice.btmm.example."),
			rr("at-1.alice.btmm.example. 60 IN A 192.0.2.1"),
			rr("_autotunnel._udp.alice.btmm.example. 60 IN PTR _autotunnel._udp.laptop.alice.btmm.example.")})
	})
	z, _ := New(Zone{Origin: "btmm.example.", IsUser: func(u string) bool { return u == "alice" },
		Hosts: func(string) []string { return []string{"laptop", "desktop"} }})
	view := mapView{}
	r0 := rr("h.alice.btmm.example. 60 IN A 192.0.2.1")
	view["h.alice.btmm.example."] = []store.Record{{RR: r0, Owner: "alice.btmm.example."}}
	view["desktop.alice.btmm.example."] = []store.Record{{RR: rr("desktop.alice.btmm.example. 60 IN AAAA fd00::d"), Owner: "desktop.alice.btmm.example."}}
	user := Request{User: "alice", KeyName: "alice.btmm.example.", Lease: time.Hour, Now: time.Unix(1800000000, 0)}
	host := user
	host.Host, host.KeyName = "laptop", "laptop.alice.btmm.example."
	verdict := func(m *dns.Msg) int { return verdictOf(m, user)*1000 + verdictOf(m, host) }
	verdictOf = func(m *dns.Msg, req Request) int {
		if err := z.CheckUpdate(m, req); err != nil {
			return Rcode(err)
		}
		ops, err := z.Update(m, req)(view)
		if err != nil {
			return Rcode(err)
		}
		for _, op := range ops {
			if op.Record.RR == nil || !z.InZone(op.Record.RR.Header().Name) ||
				!strings.EqualFold(z.UserOf(op.Record.RR.Header().Name), "alice") {
				t := op.Record.RR
				panic("op outside the user's subdomain: " + t.String())
			}
			// A host key never touches another host's name or a record
			// of another key.
			if req.Host != "" && (strings.HasSuffix(strings.ToLower(op.Record.RR.Header().Name), "desktop.alice.btmm.example.") ||
				op.Kind == store.Delete && strings.EqualFold(op.Record.RR.Header().Name, "h.alice.btmm.example.")) {
				panic("host key changed another's record: " + op.Record.RR.String())
			}
		}
		return 0
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m := new(dns.Msg)
		if m.Unpack(data) != nil || m.Opcode != dns.OpcodeUpdate {
			return
		}
		_ = verdict(m) // must not panic on anything the wire gives us
		// miekg/dns represents an RR with RDLENGTH 0 as a zero-valued struct,
		// which marshals with RDATA; so compare from the first marshal on:
		// marshal -> parse -> verdict must then be stable.
		b, err := m.Pack()
		if err != nil {
			return
		}
		m2 := new(dns.Msg)
		if err := m2.Unpack(b); err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		v2 := verdict(m2)
		b2, err := m2.Pack()
		if err != nil {
			t.Fatalf("re-marshal: %v", err)
		}
		m3 := new(dns.Msg)
		if err := m3.Unpack(b2); err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		if v3 := verdict(m3); v2 != v3 {
			t.Fatalf("verdict changed after marshal: %d -> %d", v2, v3)
		}
	})
}
