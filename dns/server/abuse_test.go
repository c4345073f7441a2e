package server

import (
	"context"
	"encoding/binary"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llq"
	"github.com/miekg/dns"
)

// fakeWriter is a dns.ResponseWriter capturing what the handler writes.
type fakeWriter struct {
	msgs []*dns.Msg
	tsig error
}

func (w *fakeWriter) LocalAddr() net.Addr { return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53} }
func (w *fakeWriter) RemoteAddr() net.Addr {
	return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5353}
}
func (w *fakeWriter) WriteMsg(m *dns.Msg) error {
	if _, err := m.Pack(); err != nil {
		return err
	}
	w.msgs = append(w.msgs, m)
	return nil
}
func (w *fakeWriter) Write(b []byte) (int, error) { return len(b), nil }
func (w *fakeWriter) Close() error                { return nil }
func (w *fakeWriter) TsigStatus() error           { return w.tsig }
func (w *fakeWriter) TsigTimersOnly(bool)         {}
func (w *fakeWriter) Hijack()                     {}

func newTestServer(t testing.TB) *Server {
	s, err := New(Config{Zone: "btmm.example.", DataDir: t.TempDir(), Listen: "127.0.0.1:0"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// FuzzServe feeds arbitrary messages to the handler as if they had arrived
// (with a verified TSIG of user alice when they carry one): it must answer
// with something that marshals, or nothing, and never panic.
func FuzzServe(f *testing.F) {
	m := new(dns.Msg)
	m.SetUpdate("btmm.example.")
	rr, _ := dns.NewRR("h.alice.btmm.example. 60 IN AAAA fd00::1")
	m.Insert([]dns.RR{rr})
	m.SetTsig("alice.btmm.example.", dns.HmacSHA256, 300, 0)
	b, _ := m.Pack()
	f.Add(b)
	q := new(dns.Msg)
	q.SetQuestion("h.alice.btmm.example.", dns.TypeAAAA)
	llq.SetOption(q, dns.EDNS0_LLQ{Version: 1, Opcode: llq.OpSetup, LeaseLife: 3600})
	q.SetTsig("alice.btmm.example.", dns.HmacSHA256, 300, 0)
	b, _ = q.Pack()
	f.Add(b)
	f.Add([]byte{0, 0, 0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0})
	s := newTestServer(f)
	if _, err := s.AddUser("alice", ""); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m := new(dns.Msg)
		if m.Unpack(data) != nil {
			return
		}
		w := &fakeWriter{}
		s.ServeDNS(w, m)
		if len(w.msgs) > 1 {
			t.Fatalf("%d responses", len(w.msgs))
		}
		if m.Response && len(w.msgs) != 0 {
			t.Fatal("answered a response")
		}
	})
}

func TestMalformedUDP(t *testing.T) {
	s := newTestServer(t)
	c, err := net.Dial("udp", s.udp.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Header of a query claiming one question, then garbage: FORMERR.
	c.Write([]byte{0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff})
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	r := new(dns.Msg)
	if err := r.Unpack(buf[:n]); err != nil || r.Rcode != dns.RcodeFormatError || r.Id != 0x1234 {
		t.Fatalf("got %v %v", r, err)
	}
	// An oversized datagram (over limits.max_message_size), a runt or a response is dropped; the server still answers afterwards.
	big := make([]byte, 20000)
	copy(big, []byte{0x56, 0x78, 0x28, 0x00, 0, 1, 0, 0, 0, 0, 0, 0})
	c.Write(big)
	c.Write([]byte{1, 2, 3})
	c.Write([]byte{0, 1, 0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0})
	q := new(dns.Msg)
	q.SetQuestion("btmm.example.", dns.TypeSOA)
	qb, _ := q.Pack()
	c.Write(qb)
	n, err = c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Unpack(buf[:n]); err != nil || r.Id != q.Id || len(r.Answer) != 1 {
		t.Fatalf("after garbage: %v %v", r, err)
	}
}

func TestOversizedTCPClosed(t *testing.T) {
	s := newTestServer(t)
	c, err := net.Dial("tcp", s.udp.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var hdr [2]byte
	binary.BigEndian.PutUint16(hdr[:], 60000)
	c.Write(hdr[:])
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 10)); err == nil {
		t.Fatal("oversized message: connection not closed")
	}
}

func TestUpdateRateLimit(t *testing.T) {
	l := newRateLimiter(1, 3)
	now := time.Unix(1800000000, 0)
	for i := range 3 {
		if !l.allow("k.", now) {
			t.Fatalf("burst %d refused", i)
		}
	}
	if l.allow("k.", now) {
		t.Fatal("over the burst allowed")
	}
	if !l.allow("other.", now) {
		t.Fatal("limit is not per key")
	}
	if !l.allow("k.", now.Add(time.Second)) {
		t.Fatal("no refill")
	}
}

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	p := dir + "/c.toml"
	write := func(s string) {
		if err := writeFile(p, s); err != nil {
			t.Fatal(err)
		}
	}
	write("zone = \"btmm.example.\"\ndata_dir = \"/x\"\n[update_lease]\nmin = \"10m\"\n[llq]\nmax_per_key = 5\n")
	c, err := LoadConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	if time.Duration(c.UpdateLease.Min) != 10*time.Minute || c.LLQ.MaxPerKey != 5 {
		t.Fatalf("%+v", c)
	}
	write("zone = \"btmm.example.\"\nbogus = 1\n")
	if _, err := LoadConfig(p); err == nil {
		t.Fatal("unknown key accepted")
	}
	write("zone = \"btmm.example.\"\n[update_lease]\nmin = \"soon\"\n")
	if _, err := LoadConfig(p); err == nil {
		t.Fatal("bad duration accepted")
	}
	c = Config{Zone: "btmm.example.", DataDir: dir}
	c.UpdateLease.Min = Duration(3 * time.Hour)
	if _, err := New(c, nil); err == nil {
		t.Fatal("min > max accepted")
	}
}

func TestCloseLeavesNoGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	s, err := New(Config{Zone: "btmm.example.", DataDir: t.TempDir(), Listen: "127.0.0.1:0", ListenTLS: "127.0.0.1:0"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	// An open TCP connection must not keep the server alive.
	c, err := net.Dial("tcp", s.udp.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	time.Sleep(50 * time.Millisecond)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		buf := make([]byte, 1<<16)
		t.Fatalf("%d goroutines left (was %d):\n%s", n, before, buf[:runtime.Stack(buf, true)])
	}
}

func TestClientKey(t *testing.T) {
	for _, tc := range []struct{ a, b string }{
		{"[2001:db8::1]:5", "[2001:db8::ffff:1]:7"},
		{"[::ffff:192.0.2.1]:5", "192.0.2.1:9"},
	} {
		a, _ := net.ResolveTCPAddr("tcp", tc.a)
		b, _ := net.ResolveTCPAddr("tcp", tc.b)
		if clientKey(a) != clientKey(b) {
			t.Errorf("%s and %s are different clients: %v %v", tc.a, tc.b, clientKey(a), clientKey(b))
		}
	}
	a, _ := net.ResolveTCPAddr("tcp", "[2001:db8::1]:5")
	b, _ := net.ResolveTCPAddr("tcp", "[2001:db8:0:1::1]:5")
	c, _ := net.ResolveTCPAddr("tcp", "192.0.2.2:5")
	d, _ := net.ResolveTCPAddr("tcp", "192.0.2.1:5")
	if clientKey(a) == clientKey(b) || clientKey(c) == clientKey(d) {
		t.Error("different /64s or IPv4 addresses share a key")
	}
}

func TestRefuseLimiter(t *testing.T) {
	var l refuseLimiter
	now := time.Unix(1_700_000_000, 0)
	logged := 0
	for range 100 {
		if ok, _ := l.allow(now); ok {
			logged++
		}
	}
	if logged != refuseBurst {
		t.Fatalf("burst: %d lines logged, want %d", logged, refuseBurst)
	}
	// A second later, refuseRate more lines; the first says how many were left out.
	now = now.Add(time.Second)
	ok, dropped := l.allow(now)
	if !ok || dropped != 100-refuseBurst {
		t.Fatalf("after a second: %v, %d not logged", ok, dropped)
	}
	for range int(refuseRate) - 1 {
		if ok, _ := l.allow(now); !ok {
			t.Fatal("rate")
		}
	}
	if ok, _ := l.allow(now); ok {
		t.Fatal("more than the rate")
	}
}
