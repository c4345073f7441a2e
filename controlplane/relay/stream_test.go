package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"math/big"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/pion/stun/v3"
)

// testCert is a self-signed certificate for the relay's stream port.
func testCert(t *testing.T) tls.Certificate {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: []string{"relay.btmm.example"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, priv)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: priv}
}

// streamTestHost is a host attached to the relay by a TLS stream: STUN
// answers go to its client, every other frame to rx (with its port).
type streamTestHost struct {
	conn *tls.Conn
	cl   *Client
	rx   chan []byte
	port chan uint16
}

func dialStream(t *testing.T, addr netip.AddrPort, alpn string, host string, cred Credential) (*streamTestHost, error) {
	c, err := tls.Dial("tcp4", addr.String(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{alpn}})
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	h := &streamTestHost{conn: c, rx: make(chan []byte, 64), port: make(chan uint16, 64)}
	h.cl = &Client{Cred: cred, Host: host, RTO: 200 * time.Millisecond, Tries: 3,
		Send: func(b []byte, to netip.AddrPort) error {
			return h.send(to.Port(), append(bytes.Clone(NonESPMarker), b...))
		}}
	go func() {
		br := bufio.NewReader(c)
		buf := make([]byte, MaxFrame)
		for {
			port, d, err := ReadFrame(br, buf)
			if err != nil {
				return
			}
			d = bytes.Clone(d)
			if bytes.HasPrefix(d, NonESPMarker) && stun.IsMessage(d[4:]) {
				h.cl.Handle(d[4:], netip.AddrPortFrom(addr.Addr(), port))
				continue
			}
			h.rx <- d
			h.port <- port
		}
	}()
	return h, nil
}

func (h *streamTestHost) send(port uint16, d []byte) error {
	f, err := AppendFrame(nil, port, d)
	if err != nil {
		return err
	}
	_, err = h.conn.Write(f)
	return err
}

func (h *streamTestHost) expect(t *testing.T, want []byte, port uint16) {
	t.Helper()
	select {
	case got := <-h.rx:
		p := <-h.port
		if !bytes.Equal(got, want) || p != port {
			t.Fatalf("stream received %x from port %d, want %x from %d", got, p, want, port)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("stream received nothing, want %x from port %d", want, port)
	}
}

// TestStreamForwarding (relay-tcp): host A's UDP is blocked, it reaches the
// relay by a TLS stream; host B is on UDP. A allocates, both bind at each
// other's port, ESP and keying messages cross both ways; each sees the
// other at the other's relay port. A stream without the ALPN, garbage on a
// stream and an unauthenticated Allocate over it are refused and forward
// nothing; when the stream closes its binds go and its allocation stays
// (until it expires: the host reconnects and binds again).
func TestStreamForwarding(t *testing.T) {
	s := startServer(t, Config{StreamListen: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")},
		TLS: &tls.Config{Certificates: []tls.Certificate{testCert(t)}}})
	srv, tcp := s.Addrs()[0], s.StreamAddrs()[0]
	ctx := context.Background()
	a, err := dialStream(t, tcp, StreamALPN, "a.alice.btmm.example.", alice)
	if err != nil {
		t.Fatal(err)
	}
	b := newTestHost(t, "b.alice.btmm.example.", alice)

	// The control port over the stream: Binding shows the TCP peer address.
	mapped, err := a.cl.Binding(ctx, srv)
	if want := a.conn.LocalAddr().(*net.TCPAddr).AddrPort(); err != nil || mapped != want {
		t.Fatalf("Binding over the stream = %v, %v; want %v", mapped, err, want)
	}
	aa, err := a.cl.Allocate(ctx, srv, 0)
	if err != nil {
		t.Fatal(err)
	}
	ba, err := b.cl.Allocate(ctx, srv, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.cl.Bind(ctx, ba.Relayed, aa); err != nil {
		t.Fatal(err)
	}
	esp := []byte{0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1, 0x55}
	b.conn.WriteToUDPAddrPort(esp, aa.Relayed)
	select {
	case got := <-a.rx:
		t.Fatalf("forwarded before both bound: %x", got)
	case <-time.After(300 * time.Millisecond):
	}
	if err := b.cl.Bind(ctx, aa.Relayed, ba); err != nil {
		t.Fatal(err)
	}
	b.conn.WriteToUDPAddrPort(esp, aa.Relayed)
	a.expect(t, esp, ba.Relayed.Port())
	back := []byte{0xca, 0xfe, 0, 2, 9, 9}
	if err := a.send(ba.Relayed.Port(), back); err != nil {
		t.Fatal(err)
	}
	b.expect(t, back, aa.Relayed)
	keyingMsg := append(bytes.Clone(NonESPMarker), 1, 1, 1, 0, 7)
	b.conn.WriteToUDPAddrPort(keyingMsg, aa.Relayed)
	a.expect(t, keyingMsg, ba.Relayed.Port())
	if st := s.Stats(); st.Streams != 1 || st.StreamFrames < 2 || st.GoForwardedESP != 2 || st.Flows != 2 {
		t.Errorf("stats %+v", st)
	}

	// Refusals: no ALPN (closed after the handshake), an unauthenticated
	// Allocate over a stream (401), garbage frames (nothing forwarded).
	before := s.Stats()
	if n, err := dialStream(t, tcp, "h2", "x", alice); err == nil {
		n.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := n.conn.Read(make([]byte, 1)); err == nil {
			t.Error("a stream without ALPN " + StreamALPN + " was kept open")
		}
	}
	e, err := dialStream(t, tcp, StreamALPN, "e.eve.btmm.example.", Credential{Name: "eve.btmm.example.", Secret: bytes.Repeat([]byte{3}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.cl.Allocate(ctx, srv, 0); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("unauthenticated allocation over a stream: %v, want ErrUnauthorized", err)
	}
	for i := range 200 {
		e.send(aa.Relayed.Port(), []byte{byte(i), 1, 2, 3, 4, 5, 6, 7})
		e.send(ba.Relayed.Port(), []byte{byte(i), 1, 2, 3, 4, 5, 6, 7})
	}
	b.expectNothing(t)
	select {
	case got := <-a.rx:
		t.Fatalf("garbage forwarded to the stream host: %x", got)
	default:
	}
	if after := s.Stats(); after.GoForwarded != before.GoForwarded || after.Allocations != 2 {
		t.Errorf("refusals: before %+v after %+v", before, after)
	}
	// A frame with a zero length ends that stream only.
	e.conn.Write([]byte{0, 0, 0, 0})
	e.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := e.conn.Read(make([]byte, 1)); err == nil {
		t.Error("a stream sending a bad frame was kept open")
	}
	b.conn.WriteToUDPAddrPort(esp, aa.Relayed)
	a.expect(t, esp, ba.Relayed.Port())

	// A's stream closes: its binds go (nothing forwarded to it), the
	// allocation stays until it expires (a host reconnects and binds again).
	a.conn.Close()
	deadline := time.Now().Add(5 * time.Second)
	for s.Stats().Streams != 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if st := s.Stats(); st.Streams != 0 || st.Flows != 0 || st.Allocations != 2 {
		t.Errorf("after the stream closed: %+v", st)
	}
}

// TestStreamConfig: stream ports without a certificate are refused.
func TestStreamConfig(t *testing.T) {
	_, err := Listen(Config{Listen: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")}, Keys: keys(alice),
		StreamListen: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")}})
	if err == nil {
		t.Fatal("StreamListen without TLS accepted")
	}
}

// TestFrameGolden: the frame layout (length of port + datagram, port).
func TestFrameGolden(t *testing.T) {
	g, err := AppendFrame(nil, 40000, []byte{1, 2, 3, 4})
	if want := []byte{0, 6, 0x9c, 0x40, 1, 2, 3, 4}; err != nil || !bytes.Equal(g, want) {
		t.Fatalf("AppendFrame = %x, %v; want %x", g, err, want)
	}
	if _, err := AppendFrame(nil, 1, nil); !errors.Is(err, ErrFrame) {
		t.Errorf("empty datagram: %v", err)
	}
	if _, err := AppendFrame(nil, 1, make([]byte, MaxFrame+1)); !errors.Is(err, ErrFrame) {
		t.Errorf("oversized datagram: %v", err)
	}
}

// FuzzFrame: ReadFrame never panics, and what it reads re-encodes to the
// bytes it consumed.
func FuzzFrame(f *testing.F) {
	g, _ := AppendFrame(nil, 40000, []byte{1, 2, 3, 4})
	f.Add(g)
	f.Add([]byte{0, 2, 0, 0})
	f.Add([]byte{0xff, 0xff, 1})
	buf := make([]byte, MaxFrame)
	f.Fuzz(func(t *testing.T, b []byte) {
		port, d, err := ReadFrame(bufio.NewReader(bytes.NewReader(b)), buf)
		if err != nil {
			return
		}
		again, err := AppendFrame(nil, port, d)
		if err != nil || !bytes.Equal(again, b[:len(again)]) {
			t.Fatalf("frame %x re-encodes to %x (%v)", b, again, err)
		}
	})
}

// TestStreamCloseDuringHandshake: a client that opens the stream port and
// stalls its TLS handshake does not hold the server's shutdown: Serve
// returns well before the handshake deadline (10 s), and the stalled
// connection is closed.
func TestStreamCloseDuringHandshake(t *testing.T) {
	s, err := Listen(Config{Listen: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")}, Keys: keys(alice),
		PortMin: 41000, PortMax: 41999,
		StreamListen: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")},
		TLS:          &tls.Config{Certificates: []tls.Certificate{testCert(t)}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	defer cancel()
	var stalled []net.Conn
	for range 3 {
		c, err := net.Dial("tcp4", s.StreamAddrs()[0].String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		stalled = append(stalled, c)
	}
	// Let the server accept them and start their handshakes.
	deadline := time.Now().Add(5 * time.Second)
	for s.handshaking() < len(stalled) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := s.handshaking(); n != len(stalled) {
		t.Fatalf("%d handshakes in progress, want %d", n, len(stalled))
	}
	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(streamHandshakeTimeout / 2):
		t.Fatalf("Serve did not return %v after its context ended, with %d stalled handshakes", streamHandshakeTimeout/2, len(stalled))
	}
	t.Logf("Serve returned %v after cancel", time.Since(start))
	for _, c := range stalled {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("stalled connection not closed by the server: %v", err)
		}
	}
}
