package server_test

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llq"
	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/dns/store"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/miekg/dns"
)

// tlsConn dials the DoT listener trusting the generated certificate.
func tlsConn(t *testing.T, dir, addr string) *dns.Conn {
	t.Helper()
	pem, err := os.ReadFile(filepath.Join(dir, "tls", "cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	c := &dns.Client{Net: "tcp-tls", Timeout: 5 * time.Second,
		TLSConfig: &tls.Config{RootCAs: pool, ServerName: "ns.btmm.example"}}
	co, err := c.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { co.Close() })
	return co
}

func writeSigned(t *testing.T, co *dns.Conn, k tsig.Key, m *dns.Msg) {
	t.Helper()
	m.SetTsig(k.Name, k.Algorithm, 300, time.Now().Unix())
	data, _, err := dns.TsigGenerateWithProvider(m, k.Provider(), "", false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := co.Write(data); err != nil {
		t.Fatal(err)
	}
}

func read(t *testing.T, co *dns.Conn) *dns.Msg {
	t.Helper()
	co.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 65535)
	n, err := co.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	m := new(dns.Msg)
	if err := m.Unpack(buf[:n]); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestLLQOverTLS(t *testing.T) {
	dir := t.TempDir()
	srv, addrs := startServer(t, dir, nil)
	k := addUser(t, srv, "alice", "")
	co := tlsConn(t, dir, addrs.TLS)
	name := "mac.alice.btmm.example."

	// Updates over TLS work too.
	up := new(dns.Msg)
	up.SetUpdate(zoneName)
	up.Insert([]dns.RR{rr(t, name+" 60 IN AAAA fd00::1")})
	writeSigned(t, co, k, up)
	if r := read(t, co); r.Rcode != dns.RcodeSuccess {
		t.Fatalf("update over TLS: %v", r)
	}

	// Over a stream the first response is already the ACK with answers.
	writeSigned(t, co, k, llqQuery(name, dns.TypeAAAA, llq.OpSetup, 0, 900))
	first := read(t, co)
	o, ok := llq.Option(first)
	if !ok || o.Id == 0 || len(first.Answer) != 1 || srv.LLQs() != 1 {
		t.Fatalf("first response %v llqs %d", first, srv.LLQs())
	}
	// A four-way client's challenge response is ACKed again; no second LLQ.
	writeSigned(t, co, k, llqQuery(name, dns.TypeAAAA, llq.OpSetup, o.Id, o.LeaseLife))
	ack := read(t, co)
	if ao, _ := llq.Option(ack); ao == nil || ao.Id != o.Id || len(ack.Answer) != 1 || srv.LLQs() != 1 {
		t.Fatalf("ack %v llqs %d", ack, srv.LLQs())
	}
	// An update from another client produces an event on this connection.
	update(t, addrs.DNS, k, 3600, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, name+" 60 IN AAAA fd00::2")}) })
	ev := read(t, co)
	if eo, ok := llq.Option(ev); !ok || eo.Opcode != llq.OpEvent || eo.Id != o.Id || len(ev.Answer) != 1 {
		t.Fatalf("event %v", ev)
	}
	// Closing the connection deletes the LLQ.
	co.Close()
	deadline := time.Now().Add(5 * time.Second)
	for srv.LLQs() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if srv.LLQs() != 0 {
		t.Fatalf("LLQ survived its connection")
	}
}

func TestConfiguredCertificate(t *testing.T) {
	dir := t.TempDir()
	certPEM, keyPEM, err := server.SelfSigned("dot.example.", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cf, kf := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	os.WriteFile(cf, certPEM, 0o644)
	os.WriteFile(kf, keyPEM, 0o600)
	_, addrs := startServer(t, t.TempDir(), func(c *server.Config) { c.TLSCert, c.TLSKey = cf, kf })
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(certPEM)
	c := &dns.Client{Net: "tcp-tls", Timeout: 5 * time.Second, TLSConfig: &tls.Config{RootCAs: pool, ServerName: "dot.example"}}
	m := new(dns.Msg)
	m.SetQuestion(zoneName, dns.TypeSOA)
	r, _, err := c.Exchange(m, addrs.TLS)
	if err != nil || len(r.Answer) != 1 {
		t.Fatalf("DoT with configured cert: %v %v", r, err)
	}
}

func TestDefaultLeaseWithoutOption(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), func(c *server.Config) { c.UpdateLease.Default = server.Duration(45 * time.Minute) })
	k := addUser(t, srv, "alice", "")
	before := time.Now()
	r := update(t, addrs.DNS, k, 0, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, "d.alice.btmm.example. 60 IN A 192.0.2.1")}) })
	if r.Rcode != 0 || findUL(r) != nil {
		t.Fatalf("response %v (no lease option expected without one in the request)", r)
	}
	var exp time.Time
	srv.Store().Read(func(v store.View) { exp = v.Name("d.alice.btmm.example.")[0].Expires })
	if d := exp.Sub(before); d < 45*time.Minute || d > 46*time.Minute {
		t.Fatalf("default lease %v, want 45m", d)
	}
}
