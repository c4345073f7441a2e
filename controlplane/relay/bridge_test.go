package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/pion/stun/v3"
)

var tunnelAddr = netip.MustParseAddrPort("127.0.0.1:4500")

// TestBridgeStateMachine (synctest, net.Pipe streams): Send fails while
// down; connection attempts back off 1 s, 2 s, 4 s (75-100% with jitter)
// capped at MaxBackoff; once up, OnUp runs and frames go out as
// length|port|datagram; non-ESP frames from the relay reach Deliver with
// their port (marker removed), ESP for a port without a socket is
// dropped; a bad frame ends the stream and the bridge reconnects; a full
// queue drops instead of blocking; cancelling Run closes the stream and
// returns with every goroutine gone (synctest fails otherwise).
func TestBridgeStateMachine(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		relays := make(chan net.Conn, 4)
		var attempts []time.Time
		fails := 3
		var ups atomic.Int32
		type delivery struct {
			b    []byte
			port uint16
		}
		delivered := make(chan delivery, 8)
		b := NewBridge(BridgeConfig{
			Dial: func(ctx context.Context) (net.Conn, error) {
				attempts = append(attempts, time.Now())
				if fails > 0 {
					fails--
					return nil, errors.New("connection refused")
				}
				host, relay := net.Pipe()
				relays <- relay
				return host, nil
			},
			Tunnel:     tunnelAddr,
			Deliver:    func(p []byte, port uint16) { delivered <- delivery{p, port} },
			OnUp:       func() { ups.Add(1) },
			Queue:      8,
			MinBackoff: time.Second, MaxBackoff: 4 * time.Second,
		})
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { b.Run(ctx); close(done) }()
		synctest.Wait()
		if err := b.Send(40001, []byte{1, 2, 3, 4, 5}); !errors.Is(err, ErrBridgeDown) {
			t.Errorf("Send while down: %v, want ErrBridgeDown", err)
		}
		relay := <-relays
		synctest.Wait()
		for i, step := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second} {
			if gap := attempts[i+1].Sub(attempts[i]); gap < step*3/4 || gap > step {
				t.Errorf("attempt %d came %v after the one before, want %v..%v", i+2, gap, step*3/4, step)
			}
		}
		if !b.Up() || ups.Load() != 1 {
			t.Fatalf("up %v, OnUp called %d times", b.Up(), ups.Load())
		}

		// Host -> relay.
		esp := []byte{0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1, 0x55}
		if err := b.Send(40001, esp); err != nil {
			t.Fatal(err)
		}
		rr := bufio.NewReader(relay)
		buf := make([]byte, MaxFrame)
		port, d, err := ReadFrame(rr, buf)
		if err != nil || port != 40001 || !bytes.Equal(d, esp) {
			t.Fatalf("relay read port %d %x (%v), want 40001 %x", port, d, err, esp)
		}
		// Relay -> host: keying reaches Deliver; ESP without a socket is dropped.
		keyingMsg := append(bytes.Clone(NonESPMarker), 1, 1, 0, 7)
		f, _ := AppendFrame(nil, 40002, keyingMsg)
		f, _ = AppendFrame(f, 40003, esp)
		if _, err := relay.Write(f); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		select {
		case got := <-delivered:
			if got.port != 40002 || !bytes.Equal(got.b, keyingMsg[4:]) {
				t.Errorf("delivered %x from port %d, want %x from 40002", got.b, got.port, keyingMsg[4:])
			}
		default:
			t.Fatal("keying message not delivered")
		}
		if st := b.Status(); st.FramesIn != 2 || st.FramesOut != 1 || st.Dropped != 2 {
			t.Errorf("status %+v, want 2 in, 1 out, 2 dropped (down, no socket)", st)
		}

		// A bad frame (length 0) ends the stream; the bridge comes back.
		relay.Write([]byte{0, 0, 0, 0})
		synctest.Wait()
		if b.Up() {
			t.Fatal("still up after a bad frame")
		}
		downAt := time.Now()
		relay = <-relays
		synctest.Wait()
		if gap := time.Since(downAt); gap > 4*time.Second || gap < 3*time.Second {
			t.Errorf("reconnected %v after the stream failed, want 3..4 s (the backoff reached)", gap)
		}
		if st := b.Status(); !st.Up || st.Reconnects != 1 || ups.Load() != 2 {
			t.Errorf("after reconnecting: %+v, OnUp %d times", st, ups.Load())
		}

		// Nobody reads the relay side: the writer blocks on the first
		// frame, Queue more wait, the rest are dropped at once.
		before := b.Status().Dropped
		var refused int
		for range 20 {
			if b.Send(40001, esp) != nil {
				refused++
			}
		}
		if after := b.Status().Dropped; refused < 20-8-1 || after-before != uint64(refused) {
			t.Errorf("%d of 20 sends refused, dropped %d -> %d", refused, before, after)
		}

		cancel()
		<-done
		if b.Up() || b.Send(40001, esp) == nil {
			t.Error("bridge still sending after Run returned")
		}
		if _, err := b.Socket(40001); err == nil {
			t.Error("Socket after Run returned")
		}
		relay.Close()
	})
}

// TestBridgeThroughRelay: a bridge on a real TLS stream to a real relay
// (loopback), its certificate verified by name. Host A (bridged) and B
// (UDP) allocate and bind; A's "tunnel socket" sends ESP to A's bridge
// socket for B's port and B receives it from A's relay port, and back;
// B's keying message reaches A's Deliver with B's port; a datagram from a
// foreign port to the bridge socket goes nowhere. A bridge dialling a name
// the certificate does not carry stays down and says why. Run's end
// closes the sockets.
func TestBridgeThroughRelay(t *testing.T) {
	cert := testCert(t)
	s := startServer(t, Config{StreamListen: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")},
		TLS: &tls.Config{Certificates: []tls.Certificate{cert}}})
	srv, streamAddr := s.Addrs()[0], s.StreamAddrs()[0]
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(leaf)

	tunnel, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer tunnel.Close()
	var br *Bridge
	cl := &Client{Cred: alice, Host: "a.alice.btmm.example.", RTO: 200 * time.Millisecond, Tries: 5,
		Send: func(m []byte, to netip.AddrPort) error {
			return br.Send(to.Port(), append(bytes.Clone(NonESPMarker), m...))
		}}
	keyingIn := make(chan [2]any, 8)
	up := make(chan struct{}, 4)
	br = NewBridge(BridgeConfig{
		Dial:   DialStream(streamAddr.String(), "relay.btmm.example", roots),
		Tunnel: tunnel.LocalAddr().(*net.UDPAddr).AddrPort(),
		Deliver: func(m []byte, port uint16) {
			if stun.IsMessage(m) {
				cl.Handle(m, netip.AddrPortFrom(srv.Addr(), port))
				return
			}
			keyingIn <- [2]any{m, port}
		},
		OnUp: func() { up <- struct{}{} },
	})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { br.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	select {
	case <-up:
	case <-time.After(10 * time.Second):
		t.Fatalf("stream not up: %+v", br.Status())
	}

	b := newTestHost(t, "b.alice.btmm.example.", alice)
	aa, err := cl.Allocate(ctx, srv, 0)
	if err != nil {
		t.Fatal(err)
	}
	ba, err := b.cl.Allocate(ctx, srv, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Bind(ctx, ba.Relayed, aa); err != nil {
		t.Fatal(err)
	}
	if err := b.cl.Bind(ctx, aa.Relayed, ba); err != nil {
		t.Fatal(err)
	}
	sock, err := br.Socket(ba.Relayed.Port())
	if err != nil {
		t.Fatal(err)
	}
	if again, _ := br.Socket(ba.Relayed.Port()); again != sock || !sock.Addr().IsLoopback() {
		t.Fatalf("socket %v, again %v", sock, again)
	}
	esp := []byte{0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1, 0x55}
	tunnel.WriteToUDPAddrPort(esp, sock)
	b.expect(t, esp, aa.Relayed)

	back := []byte{0xca, 0xfe, 0, 2, 0, 0, 0, 9, 9}
	b.conn.WriteToUDPAddrPort(back, aa.Relayed)
	tunnel.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 2048)
	n, from, err := tunnel.ReadFromUDPAddrPort(buf)
	if err != nil || from != sock || !bytes.Equal(buf[:n], back) {
		t.Fatalf("tunnel socket got %x from %v (%v), want %x from %v", buf[:n], from, err, back, sock)
	}

	keyingMsg := append(bytes.Clone(NonESPMarker), 1, 1, 1, 0, 7)
	b.conn.WriteToUDPAddrPort(keyingMsg, aa.Relayed)
	select {
	case got := <-keyingIn:
		if !bytes.Equal(got[0].([]byte), keyingMsg[4:]) || got[1].(uint16) != ba.Relayed.Port() {
			t.Errorf("delivered %x from port %d, want %x from %d", got[0], got[1], keyingMsg[4:], ba.Relayed.Port())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("keying message not delivered")
	}

	// Only our tunnel port may use the bridge socket.
	stranger, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()
	dropped := br.Status().Dropped
	stranger.WriteToUDPAddrPort(esp, sock)
	b.expectNothing(t)
	if br.Status().Dropped != dropped+1 {
		t.Errorf("stranger's datagram not counted as dropped: %+v", br.Status())
	}

	// The wrong name: the certificate does not verify, the bridge stays down.
	wrong := NewBridge(BridgeConfig{Dial: DialStream(streamAddr.String(), "other.btmm.example", roots), Tunnel: tunnelAddr})
	wctx, wcancel := context.WithCancel(t.Context())
	wdone := make(chan struct{})
	go func() { wrong.Run(wctx); close(wdone) }()
	deadline := time.Now().Add(5 * time.Second)
	for wrong.Status().LastError == "" && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if st := wrong.Status(); st.Up || !strings.Contains(st.LastError, "certificate") {
		t.Errorf("bridge to a misnamed relay: %+v", st)
	}
	wcancel()
	<-wdone

	cancel()
	<-done
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(sock))
	if err != nil {
		t.Errorf("bridge socket %v still bound after Run returned: %v", sock, err)
	} else {
		c.Close()
	}
	deadline = time.Now().Add(5 * time.Second)
	for s.Stats().Streams != 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := s.Stats().Streams; n != 0 {
		t.Errorf("relay still has %d streams after the bridge stopped", n)
	}
}
