package names

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/miekg/dns"
)

var (
	ulaLaptop = netip.MustParseAddr("fd12:3456:789a:1:a8bb:ccff:fedd:ee01")
	ulaDesk   = netip.MustParseAddr("fd12:3456:789a:1:a8bb:ccff:fedd:ee02")
)

func TestRenderHosts(t *testing.T) {
	const self, domain = "laptop.alice.btmm.example", "alice.btmm.example."
	base := "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
	other := "# BEGIN btmm desk.alice.btmm.example (managed by btmmd, removed when it stops)\nfd00::9\tx.alice.btmm.example x\n# END btmm desk.alice.btmm.example\n"
	block := "# BEGIN btmm laptop.alice.btmm.example (managed by btmmd, removed when it stops)\n" +
		"fd12:3456:789a:1:a8bb:ccff:fedd:ee02\tdesk.alice.btmm.example desk\n" +
		"fd12:3456:789a:1:a8bb:ccff:fedd:ee01\tlaptop.alice.btmm.example laptop\n" +
		"# END btmm laptop.alice.btmm.example\n"
	hosts := []Host{{"desk", ulaDesk}, {"laptop", ulaLaptop}}
	for _, tc := range []struct {
		name, old string
		hosts     []Host
		want      string
	}{
		{"add to a file", base, hosts, base + block},
		{"add to a file without final newline", "127.0.0.1 localhost", hosts, "127.0.0.1 localhost\n" + block},
		{"replace our block, keep the rest", base + block + "10.0.0.1 router\n", hosts[:1], base + "10.0.0.1 router\n" + block[:strings.Index(block, "fd12")] + "fd12:3456:789a:1:a8bb:ccff:fedd:ee02\tdesk.alice.btmm.example desk\n# END btmm laptop.alice.btmm.example\n"},
		{"remove our block only", base + other + block, nil, base + other},
		{"nothing to remove", base, nil, base},
		{"empty file", "", hosts, block},
	} {
		got := string(RenderHosts([]byte(tc.old), self, domain, tc.hosts))
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("%s (-want +got):\n%s", tc.name, diff)
		}
	}
}

func TestWriteHostsKeepsModeAndRest(t *testing.T) {
	p := filepath.Join(t.TempDir(), "hosts")
	os.WriteFile(p, []byte("127.0.0.1 localhost\n"), 0o640)
	if err := WriteHosts(p, "laptop.alice.btmm.example", "alice.btmm.example.", []Host{{"desk", ulaDesk}}); err != nil {
		t.Fatal(err)
	}
	if err := WriteHosts(p, "laptop.alice.btmm.example", "alice.btmm.example.", nil); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	st, _ := os.Stat(p)
	if string(b) != "127.0.0.1 localhost\n" || st.Mode().Perm() != 0o640 {
		t.Fatalf("after add+remove: %q mode %v", b, st.Mode())
	}
}

func TestTable(t *testing.T) {
	tb := NewTable("Alice.BTMM.example.")
	if !tb.Set([]Host{{"desk", ulaDesk}, {"bad name!", ulaLaptop}, {"noaddr", netip.Addr{}}}) {
		t.Fatal("first Set reports no change")
	}
	if tb.Set([]Host{{"desk", ulaDesk}}) {
		t.Fatal("same Set reports a change")
	}
	if a, ok := tb.Lookup("DESK.alice.btmm.example."); !ok || a != ulaDesk {
		t.Fatalf("Lookup = %v %v", a, ok)
	}
	if diff := cmp.Diff([]Host{{"desk", ulaDesk}}, tb.Hosts(), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Fatal(diff)
	}
}

// TestStub queries a real stub over UDP and TCP.
func TestStub(t *testing.T) {
	tb := NewTable("alice.btmm.example.")
	tb.Set([]Host{{"desk", ulaDesk}})
	s, err := ListenStub(netip.MustParseAddrPort("127.0.0.1:0"), tb, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, net := range []string{"udp", "tcp"} {
		c := &dns.Client{Net: net}
		for _, tc := range []struct {
			name  string
			qtype uint16
			rcode int
			ans   string
		}{
			{"desk.alice.btmm.example.", dns.TypeAAAA, dns.RcodeSuccess, ulaDesk.String()},
			{"DESK.Alice.btmm.example.", dns.TypeAAAA, dns.RcodeSuccess, ulaDesk.String()},
			{"desk.alice.btmm.example.", dns.TypeA, dns.RcodeSuccess, ""},
			{"gone.alice.btmm.example.", dns.TypeAAAA, dns.RcodeNameError, ""},
			{"alice.btmm.example.", dns.TypeSOA, dns.RcodeSuccess, "SOA"},
			{"example.com.", dns.TypeA, dns.RcodeRefused, ""},
			{"bob.btmm.example.", dns.TypeAAAA, dns.RcodeRefused, ""},
		} {
			m := new(dns.Msg)
			m.SetQuestion(tc.name, tc.qtype)
			r, _, err := c.Exchange(m, s.Addr.String())
			if err != nil {
				t.Fatalf("%s %s: %v", net, tc.name, err)
			}
			got := ""
			if len(r.Answer) == 1 {
				switch rr := r.Answer[0].(type) {
				case *dns.AAAA:
					got = rr.AAAA.String()
				case *dns.SOA:
					got = "SOA"
				}
			}
			if r.Rcode != tc.rcode || got != tc.ans || len(r.Answer) > 1 || !r.Authoritative && tc.rcode != dns.RcodeRefused {
				t.Errorf("%s %s %s: rcode %s answer %q, want %s %q", net, tc.name, dns.TypeToString[tc.qtype], dns.RcodeToString[r.Rcode], got, dns.RcodeToString[tc.rcode], tc.ans)
			}
		}
	}
}

// TestWriteHostsConcurrent: agents writing their blocks at once keep every
// block and the rest of the file.
func TestWriteHostsConcurrent(t *testing.T) {
	p := filepath.Join(t.TempDir(), "hosts")
	os.WriteFile(p, []byte("127.0.0.1 localhost\n"), 0o644)
	done := make(chan error)
	for i := range 8 {
		go func() {
			self := "h" + string(rune('a'+i)) + ".alice.btmm.example"
			done <- WriteHosts(p, self, "alice.btmm.example.", []Host{{"desk", ulaDesk}})
		}()
	}
	for range 8 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	b, _ := os.ReadFile(p)
	if !strings.HasPrefix(string(b), "127.0.0.1 localhost\n") || strings.Count(string(b), "# BEGIN btmm ") != 8 || strings.Count(string(b), "# END btmm ") != 8 {
		t.Fatalf("after 8 concurrent writers:\n%s", b)
	}
}

// TestStubForwardsServiceNames: SRV discovery names in the domain (and
// names deeper than a host) go to the zone's server; host names never do.
func TestStubForwardsServiceNames(t *testing.T) {
	zone := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		m.Authoritative = true
		if q := r.Question[0]; q.Qtype == dns.TypeSRV {
			m.Answer = []dns.RR{&dns.SRV{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeSRV, Class: dns.ClassINET, Ttl: 60},
				Port: 53, Target: "ns.btmm.example."}}
		}
		w.WriteMsg(m)
	})
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	zs := &dns.Server{PacketConn: pc, Handler: zone, NotifyStartedFunc: func() { close(started) }}
	go zs.ActivateAndServe()
	<-started
	defer zs.Shutdown()
	tb := NewTable("alice.btmm.example.")
	tb.Set([]Host{{"desk", ulaDesk}})
	var upstream atomic.Value
	upstream.Store(pc.LocalAddr().String())
	s, err := ListenStub(netip.MustParseAddrPort("127.0.0.1:0"), tb, func() string { return upstream.Load().(string) }, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ask := func(name string, qt uint16) *dns.Msg {
		t.Helper()
		m := new(dns.Msg)
		m.SetQuestion(name, qt)
		r, _, err := new(dns.Client).Exchange(m, s.Addr.String())
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	if r := ask("_dns-update._udp.alice.btmm.example.", dns.TypeSRV); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
		t.Fatalf("SRV not forwarded: %v", r)
	}
	if r := ask("a.b.alice.btmm.example.", dns.TypeSRV); len(r.Answer) != 1 {
		t.Fatalf("deep name not forwarded: %v", r)
	}
	if r := ask("desk.alice.btmm.example.", dns.TypeSRV); len(r.Answer) != 0 || r.Rcode != dns.RcodeSuccess {
		t.Fatalf("a host name was forwarded: %v", r)
	}
	if r := ask("gone.alice.btmm.example.", dns.TypeAAAA); r.Rcode != dns.RcodeNameError {
		t.Fatalf("unknown host: %v", r)
	}
	upstream.Store("")
	if r := ask("_dns-update._udp.alice.btmm.example.", dns.TypeSRV); r.Rcode != dns.RcodeNameError {
		t.Fatalf("without upstream: %v", r)
	}
	upstream.Store("127.0.0.1:1") // nothing there
	if r := ask("_dns-update._udp.alice.btmm.example.", dns.TypeSRV); r.Rcode != dns.RcodeServerFailure {
		t.Fatalf("upstream down: %v", r)
	}
}

func TestDomains(t *testing.T) {
	if got := Domains("Alice.btmm.example.", true); len(got) != 1 || got[0].String() != "alice.btmm.example" {
		t.Errorf("search: %v", got)
	}
	if got := Domains("alice.btmm.example", false); len(got) != 1 || got[0].String() != "~alice.btmm.example" {
		t.Errorf("routing only: %v", got)
	}
}
