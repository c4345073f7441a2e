package server_test

import (
	"context"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llq"
	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/miekg/dns"
)

// startLogged is startServer with the server's log captured.
func startLogged(t *testing.T, mod func(*server.Config)) (*server.Server, server.Addrs, *testenv.SyncBuffer) {
	t.Helper()
	var buf testenv.SyncBuffer
	cfg := server.Config{Zone: zoneName, DataDir: t.TempDir(), Listen: "127.0.0.1:0", ListenTLS: "127.0.0.1:0", ServerAddrs: []string{"127.0.0.1"}}
	if mod != nil {
		mod(&cfg)
	}
	srv, err := server.New(cfg, slog.New(slog.NewTextHandler(&buf, nil)))
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := srv.Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv, addrs, &buf
}

func unsigned(t *testing.T, addr, name string, qtype uint16) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	r, _, err := (&dns.Client{Timeout: 5 * time.Second}).Exchange(m, addr)
	if err != nil {
		t.Fatalf("query %s: %v", name, err)
	}
	return r
}

func TestPrivateRecords(t *testing.T) {
	srv, addrs, log := startLogged(t, nil)
	alice := addUser(t, srv, "alice", "")
	laptop := addHost(t, srv, "alice", "laptop", "")
	bob := addUser(t, srv, "bob", "")
	update(t, addrs.DNS, laptop, 0, func(m *dns.Msg) { m.Insert(hostRecords(t, "laptop", "fd00::1", "AutoTunnel-L")) })
	d := ".alice.btmm.example."

	// Names below alice's domain: only alice's keys read them.
	for _, name := range []string{"laptop" + d, "_autotunnel._udp.laptop" + d, "autotunnel-l" + d, "_autotunnel._udp" + d, "nothing" + d} {
		if r := unsigned(t, addrs.DNS, name, dns.TypeANY); r.Rcode != dns.RcodeRefused {
			t.Fatalf("unsigned %s: %v", name, r)
		}
		r, _, err := client(bob).Exchange(sign(msgQ(name, dns.TypeANY), bob), addrs.DNS)
		if err != nil || r.Rcode != dns.RcodeRefused {
			t.Fatalf("bob's key, %s: %v %v", name, r, err)
		}
	}
	if r := signedQuery(t, addrs.DNS, laptop, "laptop"+d, dns.TypeAAAA); len(r.Answer) != 1 {
		t.Fatalf("host key: %v", r)
	}
	if r := signedQuery(t, addrs.DNS, alice, "_autotunnel._udp"+d, dns.TypePTR); len(r.Answer) != 1 {
		t.Fatalf("user key: %v", r)
	}
	if !strings.Contains(log.String(), "query refused") || !strings.Contains(log.String(), "private records: unsigned query") ||
		!strings.Contains(log.String(), "signed with another user's key") {
		t.Fatalf("refusals not logged with their reason:\n%s", log.String())
	}
	// Public: the zone's SOA and NS, the discovery SRVs.
	for _, q := range []struct {
		name  string
		qtype uint16
	}{{"alice.btmm.example.", dns.TypeSOA}, {"alice.btmm.example.", dns.TypeNS}, {"_dns-update._udp" + d, dns.TypeSRV},
		{"_dns-llq._udp" + d, dns.TypeSRV}, {"_dns-llq-tls._tcp" + d, dns.TypeSRV}, {"_dns-update-tls._tcp" + d, dns.TypeSRV}} {
		if r := unsigned(t, addrs.DNS, q.name, q.qtype); r.Rcode != dns.RcodeSuccess || len(r.Answer) == 0 {
			t.Fatalf("public %s: %v", q.name, r)
		}
	}
	if r := unsigned(t, addrs.DNS, "alice.btmm.example.", dns.TypeTXT); r.Rcode != dns.RcodeRefused {
		t.Fatalf("other data at the apex: %v", r)
	}
	// SOA below the apex: the zone, and nothing about whether the name exists.
	a, b := unsigned(t, addrs.DNS, "laptop"+d, dns.TypeSOA), unsigned(t, addrs.DNS, "nothing"+d, dns.TypeSOA)
	if a.Rcode != dns.RcodeSuccess || b.Rcode != dns.RcodeSuccess || len(a.Ns) != 1 || a.Ns[0].Header().Name != "alice.btmm.example." ||
		len(a.Answer)+len(b.Answer) != 0 || a.Ns[0].String() != b.Ns[0].String() {
		t.Fatalf("SOA below the apex:\n%v\n%v", a, b)
	}
	// LLQs: unsigned refused (and logged).
	c := newLLQClient(t, addrs.DNS, alice)
	m := llqQuery("laptop"+d, dns.TypeAAAA, llq.OpSetup, 0, 3600)
	data, _ := m.Pack()
	c.conn.WriteToUDP(data, c.srv)
	if r, err := c.recv(5 * time.Second); err != nil || r.Rcode != dns.RcodeRefused {
		t.Fatalf("unsigned LLQ: %v %v", r, err)
	}
	if !strings.Contains(log.String(), "llq refused") {
		t.Fatalf("LLQ refusal not logged:\n%s", log.String())
	}
}

func msgQ(name string, qtype uint16) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	return m
}

func TestPublicRecords(t *testing.T) {
	srv, addrs, _ := startLogged(t, func(c *server.Config) { c.PublicRecords = true })
	addUser(t, srv, "alice", "")
	k := addHost(t, srv, "alice", "desktop", "")
	update(t, addrs.DNS, k, 0, func(m *dns.Msg) { m.Insert(hostRecords(t, "desktop", "fd00::d", "AutoTunnel-D")) })
	if r := unsigned(t, addrs.DNS, "desktop.alice.btmm.example.", dns.TypeAAAA); len(r.Answer) != 1 {
		t.Fatalf("public_records: %v", r)
	}
}

// TestAppleCompat: for the users apple_compat covers, unsigned UDP queries
// and LLQs (setup, refresh, acknowledgements) work, as Apple's client sends
// them; other users stay private, and the switch is logged at start.
func TestAppleCompat(t *testing.T) {
	srv, addrs, log := startLogged(t, func(c *server.Config) { c.AppleCompat = []string{"alice"} })
	if !strings.Contains(log.String(), "apple_compat") || !strings.Contains(log.String(), "users=alice") {
		t.Fatalf("switch not logged at start:\n%s", log.String())
	}
	alice := addUser(t, srv, "alice", "hmac-md5")
	bob := addUser(t, srv, "bob", "")
	update(t, addrs.DNS, alice, 0, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, "mac.alice.btmm.example. 60 IN AAAA fd00::1")}) })
	update(t, addrs.DNS, bob, 0, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, "pc.bob.btmm.example. 60 IN AAAA fd00::2")}) })
	if r := unsigned(t, addrs.DNS, "mac.alice.btmm.example.", dns.TypeAAAA); len(r.Answer) != 1 {
		t.Fatalf("unsigned query, compat user: %v", r)
	}
	if r := unsigned(t, addrs.DNS, "pc.bob.btmm.example.", dns.TypeAAAA); r.Rcode != dns.RcodeRefused {
		t.Fatalf("unsigned query, other user: %v", r)
	}
	// An unsigned UDP LLQ, as Apple's client sets it up.
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	srvAddr, _ := net.ResolveUDPAddr("udp", addrs.DNS)
	exch := func(m *dns.Msg) *dns.Msg {
		t.Helper()
		b, _ := m.Pack()
		conn.WriteToUDP(b, srvAddr)
		for {
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 65535)
			n, _, err := conn.ReadFromUDP(buf)
			if err != nil {
				t.Fatal(err)
			}
			r := new(dns.Msg)
			if r.Unpack(buf[:n]) == nil && r.Id == m.Id {
				return r
			}
		}
	}
	name := "mac.alice.btmm.example."
	ch := exch(llqQuery(name, dns.TypeAAAA, llq.OpSetup, 0, 3600))
	o, ok := llq.Option(ch)
	if !ok || o.Id == 0 || ch.IsTsig() != nil {
		t.Fatalf("challenge: %v", ch)
	}
	ack := exch(llqQuery(name, dns.TypeAAAA, llq.OpSetup, o.Id, 3600))
	if ao, ok := llq.Option(ack); !ok || ao.Id != o.Id || len(ack.Answer) != 1 || srv.LLQs() != 1 {
		t.Fatalf("ack: %v", ack)
	}
	if r := exch(llqQuery(name, dns.TypeAAAA, llq.OpRefresh, o.Id, 3600)); r.Rcode != dns.RcodeSuccess {
		t.Fatalf("refresh: %v", r)
	}
	// An event arrives unsigned; the acknowledgement echoes its LLQ option.
	update(t, addrs.DNS, alice, 0, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, name+" 60 IN AAAA fd00::3")}) })
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 65535)
	n, _, err := conn.ReadFromUDP(buf)
	if err != nil {
		t.Fatalf("no event: %v", err)
	}
	ev := new(dns.Msg)
	ev.Unpack(buf[:n])
	eo, ok := llq.Option(ev)
	if !ok || eo.Opcode != llq.OpEvent || ev.IsTsig() != nil {
		t.Fatalf("event: %v", ev)
	}
	ackEv := new(dns.Msg)
	ackEv.Id, ackEv.Response = ev.Id, true
	ackEv.Question = ev.Question
	llq.SetOption(ackEv, *eo)
	b, _ := ackEv.Pack()
	conn.WriteToUDP(b, srvAddr)
	// Acknowledged: no retransmission comes (first one after 2 s).
	conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, _, err := conn.ReadFromUDP(buf); err == nil {
		t.Fatal("event sent again after the acknowledgement")
	}
	// Over TCP an unsigned LLQ is still refused; so is one for bob.
	m := llqQuery(name, dns.TypeAAAA, llq.OpSetup, 0, 3600)
	r, _, err := (&dns.Client{Net: "tcp", Timeout: 5 * time.Second}).Exchange(m, addrs.DNS)
	if err != nil || r.Rcode != dns.RcodeRefused {
		t.Fatalf("unsigned TCP LLQ: %v %v", r, err)
	}
	if r := exch(llqQuery("pc.bob.btmm.example.", dns.TypeAAAA, llq.OpSetup, 0, 3600)); r.Rcode != dns.RcodeRefused {
		t.Fatalf("unsigned LLQ for bob: %v", r)
	}
}
