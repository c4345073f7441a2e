package server_test

import (
	"net"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llq"
	"github.com/btmm/btmm/dns/server"
	"github.com/miekg/dns"
)

// waitClosed reads from c until the server closes it; it returns how long
// that took, or fails after limit.
func waitClosed(t *testing.T, c net.Conn, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	c.SetReadDeadline(start.Add(limit))
	buf := make([]byte, 512)
	for {
		_, err := c.Read(buf)
		if err == nil {
			continue
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatalf("connection still open after %v", limit)
		}
		return time.Since(start)
	}
}

// 300 idle connections from one source take at most max_conns_per_client
// slots: another source is still served, and the silent connections are
// closed after idle_timeout.
func TestIdleConnectionsFromOneSource(t *testing.T) {
	_, addrs := startServer(t, t.TempDir(), func(c *server.Config) {
		c.Limits.MaxConns = 200 // below the flood: the old global cap alone locked everyone out
		c.Limits.IdleTimeout = server.Duration(2 * time.Second)
	})
	var flood []net.Conn
	for range 300 {
		c, err := net.Dial("tcp", addrs.DNS)
		if err != nil {
			t.Fatal(err)
		}
		flood = append(flood, c)
		defer c.Close()
	}
	// Another source (127.0.0.2 is loopback too) is answered over TCP and TLS.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	c := &dns.Client{Net: "tcp", Timeout: 5 * time.Second, Dialer: &d}
	m := new(dns.Msg)
	m.SetQuestion(zoneName, dns.TypeSOA)
	if r, _, err := c.Exchange(m, addrs.DNS); err != nil || len(r.Answer) != 1 {
		t.Fatalf("other source locked out: %v %v", r, err)
	}
	// Of the flood, max_conns_per_client (64) were admitted; the rest were
	// closed at once, the admitted ones after the idle timeout.
	closedNow := 0
	for _, fc := range flood {
		fc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if _, err := fc.Read(make([]byte, 1)); err != nil {
			if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
				closedNow++
			}
		}
	}
	if closedNow < 300-64 {
		t.Fatalf("%d of 300 connections from one source closed at once, want at least %d", closedNow, 300-64)
	}
	for _, fc := range flood {
		waitClosed(t, fc, 30*time.Second)
	}
}

// A client that opens a TLS connection and never completes the handshake is
// cut after tls_handshake_timeout, not after minutes.
func TestSlowTLSHandshakeCut(t *testing.T) {
	_, addrs := startServer(t, t.TempDir(), func(c *server.Config) {
		c.Limits.TLSHandshakeTimeout = server.Duration(time.Second)
		c.Limits.IdleTimeout = server.Duration(time.Hour) // the handshake deadline must do it
	})
	silent, err := net.Dial("tcp", addrs.TLS)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	slow, err := net.Dial("tcp", addrs.TLS)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	slow.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}) // the start of a ClientHello, then nothing
	start := time.Now()
	for _, c := range []net.Conn{silent, slow} {
		waitClosed(t, c, 20*time.Second)
	}
	if d := time.Since(start); d < 900*time.Millisecond {
		t.Fatalf("closed after %v, before the 1s deadline", d)
	}
}

// A TLS connection holding an LLQ stays open through silences longer than
// idle_timeout (the client refreshes within the lease) and gets its events.
func TestLLQConnectionOutlivesIdleTimeout(t *testing.T) {
	dir := t.TempDir()
	srv, addrs := startServer(t, dir, func(c *server.Config) {
		c.Limits.IdleTimeout = server.Duration(time.Second)
	})
	k := addUser(t, srv, "alice", "")
	co := tlsConn(t, dir, addrs.TLS)
	name := "mac.alice.btmm.example."
	writeSigned(t, co, k, llqQuery(name, dns.TypeAAAA, llq.OpSetup, 0, 900))
	first := read(t, co)
	o, ok := llq.Option(first)
	if !ok || o.Id == 0 {
		t.Fatalf("setup: %v", first)
	}
	plain, err := net.Dial("tcp", addrs.DNS)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	waitClosed(t, plain, 20*time.Second) // a silent connection without LLQ goes after ~1s
	time.Sleep(1500 * time.Millisecond)  // the LLQ connection was silent as long
	update(t, addrs.DNS, k, 3600, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, name+" 60 IN AAAA fd00::2")}) })
	ev := read(t, co)
	if eo, ok := llq.Option(ev); !ok || eo.Opcode != llq.OpEvent || eo.Id != o.Id {
		t.Fatalf("event %v", ev)
	}
}
