package server_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llq"
	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/miekg/dns"
)

const zoneName = "btmm.example."

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// startServer runs a server on free loopback ports with users alice
// (hmac-sha256) and bob (hmac-md5).
func startServer(t *testing.T, dir string, mod func(*server.Config)) (*server.Server, server.Addrs) {
	t.Helper()
	cfg := server.Config{Zone: zoneName, DataDir: dir, Listen: "127.0.0.1:0", ListenTLS: "127.0.0.1:0",
		ServerAddrs: []string{"127.0.0.1"}}
	if mod != nil {
		mod(&cfg)
	}
	srv, err := server.New(cfg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := srv.Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv, addrs
}

func addUser(t *testing.T, srv *server.Server, user, alg string) tsig.Key {
	t.Helper()
	k, err := srv.AddUser(user, alg)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func client(k tsig.Key) *dns.Client {
	return &dns.Client{Net: "udp", TsigProvider: k.Provider(), Timeout: 5 * time.Second}
}

func sign(m *dns.Msg, k tsig.Key) *dns.Msg {
	m.SetTsig(k.Name, k.Algorithm, 300, time.Now().Unix())
	return m
}

func update(t *testing.T, addr string, k tsig.Key, leaseSecs uint32, build func(m *dns.Msg)) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	m.SetUpdate(zoneName)
	build(m)
	if leaseSecs != 0 {
		m.SetEdns0(1232, false)
		o := m.IsEdns0()
		o.Option = append(o.Option, &dns.EDNS0_UL{Code: dns.EDNS0UL, Lease: leaseSecs})
	}
	sign(m, k)
	r, _, err := client(k).Exchange(m, addr)
	if err != nil {
		t.Fatalf("update: %v", err)
	}
	return r
}

func rr(t testing.TB, s string) dns.RR {
	t.Helper()
	r, err := dns.NewRR(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func query(t *testing.T, addr, name string, qtype uint16) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	r, _, err := (&dns.Client{Timeout: 5 * time.Second}).Exchange(m, addr)
	if err != nil {
		t.Fatalf("query %s: %v", name, err)
	}
	return r
}

func TestUpdateWithLeaseAndQuery(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	alice := addUser(t, srv, "alice", "")
	r := update(t, addrs.DNS, alice, 60, func(m *dns.Msg) {
		m.Insert([]dns.RR{rr(t, "mac.alice.btmm.example. 60 IN AAAA fd00::1")})
	})
	if r.Rcode != dns.RcodeSuccess {
		t.Fatalf("rcode %s", dns.RcodeToString[r.Rcode])
	}
	if r.IsTsig() == nil {
		t.Error("response not signed")
	}
	ul := findUL(r)
	if ul == nil || ul.Lease != 1800 {
		t.Fatalf("lease echo = %v, want 1800 (clamped up)", ul)
	}
	q := signedQuery(t, addrs.DNS, alice, "mac.alice.btmm.example.", dns.TypeAAAA)
	if len(q.Answer) != 1 || !q.Authoritative {
		t.Fatalf("answer %v", q)
	}
	// Discovery SRV records are synthesised.
	q = query(t, addrs.DNS, "_dns-llq._udp.alice.btmm.example.", dns.TypeSRV)
	if len(q.Answer) != 1 {
		t.Fatalf("srv answer %v", q)
	}
	// NXDOMAIN carries the SOA.
	q = signedQuery(t, addrs.DNS, alice, "nope.alice.btmm.example.", dns.TypeA)
	if q.Rcode != dns.RcodeNameError || len(q.Ns) != 1 {
		t.Fatalf("nxdomain %v", q)
	}
}

func findUL(m *dns.Msg) *dns.EDNS0_UL {
	if o := m.IsEdns0(); o != nil {
		for _, x := range o.Option {
			if ul, ok := x.(*dns.EDNS0_UL); ok {
				return ul
			}
		}
	}
	return nil
}

func TestCrossUserUpdateRefused(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	alice := addUser(t, srv, "alice", "")
	addUser(t, srv, "bob", "hmac-md5")
	r := update(t, addrs.DNS, alice, 0, func(m *dns.Msg) {
		m.Insert([]dns.RR{rr(t, "evil.bob.btmm.example. 60 IN A 192.0.2.1")})
	})
	if r.Rcode != dns.RcodeRefused {
		t.Fatalf("rcode %s, want REFUSED", dns.RcodeToString[r.Rcode])
	}
	// A mixed message touching alice and bob changes nothing at all.
	r = update(t, addrs.DNS, alice, 0, func(m *dns.Msg) {
		m.Insert([]dns.RR{rr(t, "ok.alice.btmm.example. 60 IN A 192.0.2.1"), rr(t, "evil.bob.btmm.example. 60 IN A 192.0.2.1")})
	})
	if r.Rcode != dns.RcodeRefused {
		t.Fatalf("rcode %s, want REFUSED", dns.RcodeToString[r.Rcode])
	}
	if q := signedQuery(t, addrs.DNS, alice, "ok.alice.btmm.example.", dns.TypeA); len(q.Answer) != 0 {
		t.Fatalf("partial update applied: %v", q.Answer)
	}
	// Server-managed records are refused too.
	r = update(t, addrs.DNS, alice, 0, func(m *dns.Msg) {
		m.RemoveRRset([]dns.RR{rr(t, "_dns-llq._udp.alice.btmm.example. 0 IN SRV 0 0 1 x.")})
	})
	if r.Rcode != dns.RcodeRefused {
		t.Fatalf("rcode %s, want REFUSED", dns.RcodeToString[r.Rcode])
	}
	// Unsigned updates are refused.
	m := new(dns.Msg)
	m.SetUpdate(zoneName)
	m.Insert([]dns.RR{rr(t, "x.alice.btmm.example. 60 IN A 192.0.2.1")})
	resp, _, err := (&dns.Client{}).Exchange(m, addrs.DNS)
	if err != nil || resp.Rcode != dns.RcodeRefused {
		t.Fatalf("unsigned: %v %v", resp, err)
	}
	// A wrong secret gets NOTAUTH/BADSIG.
	bad := alice
	bad.Secret = append([]byte(nil), alice.Secret...)
	bad.Secret[0] ^= 1
	m = new(dns.Msg)
	m.SetUpdate(zoneName)
	m.Insert([]dns.RR{rr(t, "x.alice.btmm.example. 60 IN A 192.0.2.1")})
	sign(m, bad)
	resp, _, _ = client(bad).Exchange(m, addrs.DNS)
	if resp == nil || resp.Rcode != dns.RcodeNotAuth {
		t.Fatalf("bad secret: %v", resp)
	}
}

// llqClient is a minimal RFC 8764 client over one UDP socket.
type llqClient struct {
	t    *testing.T
	conn *net.UDPConn
	srv  *net.UDPAddr
	key  tsig.Key
}

func newLLQClient(t *testing.T, addr string, k tsig.Key) *llqClient {
	ua, _ := net.ResolveUDPAddr("udp", addr)
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &llqClient{t: t, conn: c, srv: ua, key: k}
}

func (c *llqClient) send(m *dns.Msg) {
	c.t.Helper()
	m.SetTsig(c.key.Name, c.key.Algorithm, 300, time.Now().Unix())
	data, _, err := dns.TsigGenerateWithProvider(m, c.key.Provider(), "", false)
	if err != nil {
		c.t.Fatal(err)
	}
	if _, err := c.conn.WriteToUDP(data, c.srv); err != nil {
		c.t.Fatal(err)
	}
}

func (c *llqClient) recv(timeout time.Duration) (*dns.Msg, error) {
	buf := make([]byte, 65535)
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	n, _, err := c.conn.ReadFromUDP(buf)
	if err != nil {
		return nil, err
	}
	if err := dns.TsigVerifyWithProvider(append([]byte(nil), buf[:n]...), c.key.Provider(), "", false); err != nil {
		// Responses are signed with the request MAC; events without. Only
		// check events here.
		m := new(dns.Msg)
		if m.Unpack(buf[:n]) == nil {
			if o, ok := llq.Option(m); ok && o.Opcode == llq.OpEvent {
				return nil, err
			}
		}
	}
	m := new(dns.Msg)
	return m, m.Unpack(buf[:n])
}

func (c *llqClient) exchange(m *dns.Msg) *dns.Msg {
	c.t.Helper()
	c.send(m)
	for {
		r, err := c.recv(5 * time.Second)
		if err != nil {
			c.t.Fatal(err)
		}
		if r.Id == m.Id {
			return r
		}
	}
}

func llqQuery(name string, qtype uint16, op uint16, id uint64, lease uint32) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	llq.SetOption(m, dns.EDNS0_LLQ{Version: llq.Version, Opcode: op, Id: id, LeaseLife: lease})
	return m
}

func (c *llqClient) setup(name string, qtype uint16) (uint64, *dns.Msg) {
	c.t.Helper()
	ch := c.exchange(llqQuery(name, qtype, llq.OpSetup, 0, 3600))
	o, ok := llq.Option(ch)
	if !ok || o.Error != llq.ErrNoError || o.Id == 0 || o.LeaseLife != 3600 {
		c.t.Fatalf("challenge: %v", ch)
	}
	ack := c.exchange(llqQuery(name, qtype, llq.OpSetup, o.Id, o.LeaseLife))
	ao, ok := llq.Option(ack)
	if !ok || ao.Error != llq.ErrNoError || ao.Id != o.Id {
		c.t.Fatalf("ack: %v", ack)
	}
	return o.Id, ack
}

func TestLLQSetupAndEventsUDP(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	alice := addUser(t, srv, "alice", "hmac-md5")
	name := "mac.alice.btmm.example."
	update(t, addrs.DNS, alice, 3600, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, name+" 60 IN AAAA fd00::1")}) })

	c := newLLQClient(t, addrs.DNS, alice)
	id, ack := c.setup(name, dns.TypeAAAA)
	if len(ack.Answer) != 1 {
		t.Fatalf("ack answers %v", ack.Answer)
	}
	if srv.LLQs() != 1 {
		t.Fatalf("llqs = %d", srv.LLQs())
	}
	// Replace the address: one event with the removal and the addition.
	update(t, addrs.DNS, alice, 3600, func(m *dns.Msg) {
		m.Remove([]dns.RR{rr(t, name+" 0 IN AAAA fd00::1")})
		m.Insert([]dns.RR{rr(t, name+" 60 IN AAAA fd00::2")})
	})
	ev, err := c.recv(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	o, ok := llq.Option(ev)
	if !ok || o.Opcode != llq.OpEvent || o.Id != id || !ev.Response {
		t.Fatalf("event %v", ev)
	}
	var added, removed int
	for _, a := range ev.Answer {
		if a.Header().Ttl == llq.RemovedTTL {
			removed++
		} else {
			added++
		}
	}
	if added != 1 || removed != 1 {
		t.Fatalf("event answers %v", ev.Answer)
	}
	// ACK it: the server must not resend.
	ackm := new(dns.Msg)
	ackm.Id = ev.Id
	ackm.Response = true
	ackm.Question = ev.Question
	llq.SetOption(ackm, dns.EDNS0_LLQ{Version: llq.Version, Opcode: llq.OpEvent, Id: id})
	c.send(ackm)
	if m, err := c.recv(3 * time.Second); err == nil {
		t.Fatalf("unexpected message after ack: %v", m)
	}
	// Refresh, then cancel.
	r := c.exchange(llqQuery(name, dns.TypeAAAA, llq.OpRefresh, id, 7200))
	if o, _ := llq.Option(r); o == nil || o.Error != 0 || o.LeaseLife != 7200 {
		t.Fatalf("refresh %v", r)
	}
	r = c.exchange(llqQuery(name, dns.TypeAAAA, llq.OpRefresh, id, 0))
	if o, _ := llq.Option(r); o == nil || o.Error != 0 || srv.LLQs() != 0 {
		t.Fatalf("cancel %v (llqs %d)", r, srv.LLQs())
	}
}

func TestLLQOtherUserRefused(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	addUser(t, srv, "alice", "")
	bob := addUser(t, srv, "bob", "")
	c := newLLQClient(t, addrs.DNS, bob)
	r := c.exchange(llqQuery("mac.alice.btmm.example.", dns.TypeAAAA, llq.OpSetup, 0, 3600))
	if r.Rcode != dns.RcodeRefused {
		t.Fatalf("rcode %s", dns.RcodeToString[r.Rcode])
	}
}

func TestLeaseExpiryFiresLLQEvent(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), func(c *server.Config) {
		c.UpdateLease.Min = server.Duration(time.Second)
	})
	k := addUser(t, srv, "alice", "")
	name := "gone.alice.btmm.example."
	update(t, addrs.DNS, k, 1, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, name+" 60 IN A 192.0.2.1")}) })
	c := newLLQClient(t, addrs.DNS, k)
	id, _ := c.setup(name, dns.TypeA)
	// The 1 s lease ends: the record is removed and a removal event sent.
	for {
		ev, err := c.recv(5 * time.Second)
		if err != nil {
			t.Fatalf("no removal event: %v", err)
		}
		o, ok := llq.Option(ev)
		if !ok || o.Opcode != llq.OpEvent || o.Id != id {
			continue
		}
		if len(ev.Answer) != 1 || ev.Answer[0].Header().Ttl != llq.RemovedTTL {
			t.Fatalf("event %v", ev)
		}
		break
	}
	if q := signedQuery(t, addrs.DNS, k, name, dns.TypeA); len(q.Answer) != 0 {
		t.Fatalf("expired record still served: %v", q.Answer)
	}
}

func TestBadTime(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	k := addUser(t, srv, "alice", "")
	m := new(dns.Msg)
	m.SetUpdate(zoneName)
	m.Insert([]dns.RR{rr(t, "x.alice.btmm.example. 60 IN A 192.0.2.1")})
	m.SetTsig(k.Name, k.Algorithm, 300, time.Now().Add(-time.Hour).Unix())
	data, _, err := dns.TsigGenerateWithProvider(m, k.Provider(), "", false)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("udp", addrs.DNS)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write(data)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4096)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	r := new(dns.Msg)
	if err := r.Unpack(buf[:n]); err != nil {
		t.Fatal(err)
	}
	if r.Rcode != dns.RcodeNotAuth || r.IsTsig() == nil || r.IsTsig().Error != dns.RcodeBadTime {
		t.Fatalf("stale signature: %v", r)
	}
	if q := signedQuery(t, addrs.DNS, k, "x.alice.btmm.example.", dns.TypeA); len(q.Answer) != 0 {
		t.Fatal("stale update applied")
	}
}

func TestConfigKeys(t *testing.T) {
	k, err := tsig.NewKey("carol.btmm.example.", "hmac-md5")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	_, addrs := startServer(t, dir, func(c *server.Config) { c.Keys = []tsig.Key{k} })
	r := update(t, addrs.DNS, k, 0, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, "h.carol.btmm.example. 60 IN A 192.0.2.1")}) })
	if r.Rcode != dns.RcodeSuccess {
		t.Fatalf("rcode %s", dns.RcodeToString[r.Rcode])
	}
	bad, _ := tsig.NewKey("carol.other.example.", "")
	if _, err := server.New(server.Config{Zone: zoneName, DataDir: t.TempDir(), Keys: []tsig.Key{bad}}, nil); err == nil {
		t.Fatal("key outside the zone accepted")
	}
	other, _ := tsig.NewKey("carol.btmm.example.", "hmac-md5")
	if _, err := server.New(server.Config{Zone: zoneName, DataDir: dir, Keys: []tsig.Key{other}}, nil); err == nil {
		t.Fatal("conflicting key accepted")
	}
}

func TestIPv6LLQEvent(t *testing.T) {
	if c, err := net.ListenPacket("udp6", "[::1]:0"); err != nil {
		testenv.Unavailable(t, fmt.Sprintf("no IPv6 loopback: %v", err))
	} else {
		c.Close()
	}
	srv, addrs := startServer(t, t.TempDir(), func(c *server.Config) { c.Listen, c.ListenTLS = "[::1]:0", "" })
	k := addUser(t, srv, "alice", "hmac-sha512")
	ua, _ := net.ResolveUDPAddr("udp", addrs.DNS)
	conn, err := net.ListenUDP("udp6", &net.UDPAddr{IP: net.IPv6loopback})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := &llqClient{t: t, conn: conn, srv: ua, key: k}
	name := "v6.alice.btmm.example."
	id, _ := c.setup(name, dns.TypeAAAA)
	update(t, addrs.DNS, k, 3600, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, name+" 60 IN AAAA fd00::6")}) })
	ev, err := c.recv(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if o, ok := llq.Option(ev); !ok || o.Id != id || o.Opcode != llq.OpEvent {
		t.Fatalf("event %v", ev)
	}
}

func TestLLQAckTruncatedOverUDP(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	k := addUser(t, srv, "alice", "")
	name := "big.alice.btmm.example."
	var rrs []dns.RR
	for i := range 80 {
		rrs = append(rrs, rr(t, fmt.Sprintf("%s 60 IN TXT \"%03d %s\"", name, i, strings.Repeat("x", 90))))
	}
	if r := update(t, addrs.DNS, k, 3600, func(m *dns.Msg) { m.Insert(rrs) }); r.Rcode != 0 {
		t.Fatalf("update %s", dns.RcodeToString[r.Rcode])
	}
	c := newLLQClient(t, addrs.DNS, k)
	_, ack := c.setup(name, dns.TypeTXT)
	if !ack.Truncated || len(ack.Answer) >= 80 {
		t.Fatalf("ack not truncated: tc=%v answers=%d", ack.Truncated, len(ack.Answer))
	}
	if _, ok := llq.Option(ack); !ok || ack.IsTsig() == nil {
		t.Fatal("truncated ack lost its LLQ option or TSIG")
	}
}

// On a wildcard listener, events leave from the address the client sent
// its LLQ to (127.0.0.2 here), not whatever the routing table prefers.
func TestEventSourceAddressOnWildcard(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), func(c *server.Config) { c.Listen, c.ListenTLS = "0.0.0.0:0", "" })
	k := addUser(t, srv, "alice", "")
	_, port, _ := net.SplitHostPort(addrs.DNS)
	target := net.JoinHostPort("127.0.0.2", port)
	c := newLLQClient(t, target, k)
	name := "src.alice.btmm.example."
	id, _ := c.setup(name, dns.TypeA)
	update(t, net.JoinHostPort("127.0.0.1", port), k, 3600, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, name+" 60 IN A 192.0.2.1")}) })
	buf := make([]byte, 65535)
	c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, from, err := c.conn.ReadFromUDP(buf)
	if err != nil {
		t.Fatal(err)
	}
	m := new(dns.Msg)
	if err := m.Unpack(buf[:n]); err != nil {
		t.Fatal(err)
	}
	if o, ok := llq.Option(m); !ok || o.Id != id || o.Opcode != llq.OpEvent {
		t.Fatalf("event %v", m)
	}
	if from.String() != target {
		t.Fatalf("event came from %v, want %v", from, target)
	}
}

// Over real UDP: an unacknowledged event is sent three times with the same
// message ID, then the LLQ is deleted.
func TestUnackedEventDeletesLLQ(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), func(c *server.Config) { c.LLQ.Retransmit = server.Duration(100 * time.Millisecond) })
	k := addUser(t, srv, "alice", "")
	c := newLLQClient(t, addrs.DNS, k)
	name := "quiet.alice.btmm.example."
	id, _ := c.setup(name, dns.TypeA)
	update(t, addrs.DNS, k, 3600, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, name+" 60 IN A 192.0.2.1")}) })
	var ids []uint16
	for {
		ev, err := c.recv(2 * time.Second)
		if err != nil {
			break
		}
		if o, ok := llq.Option(ev); ok && o.Opcode == llq.OpEvent && o.Id == id {
			ids = append(ids, ev.Id)
		}
	}
	if len(ids) != 3 || ids[0] != ids[1] || ids[1] != ids[2] {
		t.Fatalf("transmissions %v, want 3 with one message ID", ids)
	}
	if srv.LLQs() != 0 {
		t.Fatal("LLQ kept after three unacknowledged transmissions")
	}
}

// TestMetricsHooks: OnStoreSync sees each fsync that commits an UPDATE,
// and OnLLQEvents each change's events with their latency (btmm-dnsd's
// btmm_dnsd_store_fsync_seconds and btmm_dnsd_llq_event_seconds).
func TestMetricsHooks(t *testing.T) {
	var mu sync.Mutex
	var syncs, events, changes int
	var worst time.Duration
	srv, addrs := startServer(t, t.TempDir(), func(c *server.Config) {
		c.OnStoreSync = func(took time.Duration) {
			mu.Lock()
			defer mu.Unlock()
			syncs++
		}
		c.OnLLQChange = func(n int, took time.Duration) {
			mu.Lock()
			defer mu.Unlock()
			events += n
			changes++
			worst = max(worst, took)
		}
	})
	alice := addUser(t, srv, "alice", "hmac-md5")
	name := "mac.alice.btmm.example."
	update(t, addrs.DNS, alice, 3600, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, name+" 60 IN AAAA fd00::1")}) })
	mu.Lock()
	if syncs == 0 || events != 0 {
		t.Errorf("after an UPDATE and no LLQ: %d fsyncs, %d events", syncs, events)
	}
	mu.Unlock()
	c := newLLQClient(t, addrs.DNS, alice)
	c.setup(name, dns.TypeAAAA)
	update(t, addrs.DNS, alice, 3600, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, name+" 60 IN AAAA fd00::2")}) })
	if _, err := c.recv(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	// The hook runs after the last event left: it may lag the client.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		done := changes > 0
		mu.Unlock()
		if done || time.Now().After(deadline) {
			break
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if events != 1 || changes != 1 || worst <= 0 || syncs < 2 {
		t.Errorf("after an UPDATE with one LLQ: %d events in %d changes (latency %v), %d fsyncs", events, changes, worst, syncs)
	}
}

// After a restart, a restored UDP LLQ's events still leave from the address
// the client sent its LLQ to (127.0.0.2), as before the restart: the local
// address is persisted with the LLQ (issue 17 rough edge).
func TestRestoredEventSourceOnWildcard(t *testing.T) {
	dir := t.TempDir()
	srv, addrs := startServer(t, dir, func(c *server.Config) { c.Listen, c.ListenTLS = "0.0.0.0:0", "" })
	k := addUser(t, srv, "alice", "")
	_, port, _ := net.SplitHostPort(addrs.DNS)
	target := net.JoinHostPort("127.0.0.2", port)
	c := newLLQClient(t, target, k)
	name := "src.alice.btmm.example."
	id, _ := c.setup(name, dns.TypeA)
	srv.Close()
	var srv2 *server.Server
	for range 50 { // the old socket may linger for a moment
		s, err := server.New(server.Config{Zone: zoneName, DataDir: dir, Listen: "0.0.0.0:" + port, ServerAddrs: []string{"127.0.0.1"}}, testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Start(context.Background()); err == nil {
			srv2 = s
			break
		}
		s.Close()
		time.Sleep(20 * time.Millisecond)
	}
	if srv2 == nil {
		t.Fatal("restart failed")
	}
	t.Cleanup(func() { srv2.Close() })
	if srv2.LLQs() != 1 {
		t.Fatalf("%d LLQs restored", srv2.LLQs())
	}
	update(t, net.JoinHostPort("127.0.0.1", port), k, 3600, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, name+" 60 IN A 192.0.2.1")}) })
	buf := make([]byte, 65535)
	c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, from, err := c.conn.ReadFromUDP(buf)
	if err != nil {
		t.Fatal(err)
	}
	m := new(dns.Msg)
	if err := m.Unpack(buf[:n]); err != nil {
		t.Fatal(err)
	}
	if o, ok := llq.Option(m); !ok || o.Id != id || o.Opcode != llq.OpEvent {
		t.Fatalf("event %v", m)
	}
	if from.String() != target {
		t.Fatalf("restored LLQ's event came from %v, want %v", from, target)
	}
}
