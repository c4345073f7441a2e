package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"time"
)

// The relay-tcp bridge (btmmd's side of the stream port, docs/paths.md).
//
// A host whose UDP is blocked reaches its peers through one TLS stream to
// the relay. The kernel keeps doing ESP-in-UDP: a peer reached this way
// has as its outer address a local UDP socket of the bridge (127.0.0.1,
// one per peer relay port), so the dataplane sends that peer's datagrams
// there; the bridge frames each onto the stream for the peer's relay port
// and writes what the relay sends from that port back from the same
// socket to our tunnel port, where the kernel takes it as from the peer.
// Keying messages, probes and STUN (non-ESP marker) from the relay go to
// Deliver instead, and the agent sends its own with Send. Go is in the
// data path here, and only here: this is the last-resort path, as
// Tailscale's DERP is.

// ErrBridgeDown reports a Send while no stream is up.
var ErrBridgeDown = errors.New("relay: bridge: no stream to the relay")

// BridgeConfig configures a Bridge.
type BridgeConfig struct {
	// Dial opens the stream: TLS to the relay's stream port, its
	// certificate verified by name, ALPN StreamALPN (DialStream).
	Dial func(ctx context.Context) (net.Conn, error)
	// Tunnel is our tunnel socket as the bridge sockets reach it over lo
	// (127.0.0.1:<tunnel port>). Only datagrams from its port are taken.
	Tunnel netip.AddrPort
	// Cleartext: the dataplane carries whole IPv6 packets in UDP (ebpf
	// cleartext mode), whose checksums and segmentation the bridge
	// completes (CompleteCleartext); ESP needs none of it.
	Cleartext bool
	// Deliver takes a non-ESP datagram (marker removed) that the relay
	// sent from port: keying, a probe, a STUN answer. It must not block.
	Deliver func(b []byte, port uint16)
	// OnUp is called (on its own goroutine) each time a stream comes up:
	// the agent allocates and binds over it again.
	OnUp func()
	// Queue bounds the frames waiting for the stream (256); more are
	// dropped, as a full socket buffer drops UDP.
	Queue int
	// MinBackoff and MaxBackoff bound the wait between connection
	// attempts (1 s doubling to 30 s, with jitter).
	MinBackoff, MaxBackoff time.Duration
	Logger                 *slog.Logger
}

// BridgeStatus is what btmmctl shows about the bridge.
type BridgeStatus struct {
	Up         bool      `json:"up"`
	Since      time.Time `json:"since,omitzero"` // when the current stream came up
	Sockets    int       `json:"sockets"`        // peer relay ports bridged
	FramesOut  uint64    `json:"frames_out"`
	FramesIn   uint64    `json:"frames_in"`
	BytesOut   uint64    `json:"bytes_out"` // datagram bytes framed onto the stream
	BytesIn    uint64    `json:"bytes_in"`  // datagram bytes taken off it
	Dropped    uint64    `json:"dropped"`   // queue full, stream down, no socket for a port
	Reconnects uint64    `json:"reconnects"`
	LastError  string    `json:"last_error,omitempty"`
}

// Bridge carries datagrams between local sockets and one stream.
type Bridge struct {
	cfg BridgeConfig
	log *slog.Logger

	mu     sync.Mutex
	q      chan []byte // frames for the current stream; nil while down
	socks  map[uint16]*net.UDPConn
	st     BridgeStatus
	closed bool
	wg     sync.WaitGroup // socket readers
}

// NewBridge returns a bridge; Run connects it.
func NewBridge(cfg BridgeConfig) *Bridge {
	if cfg.Queue <= 0 {
		cfg.Queue = 256
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = time.Second
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = max(30*time.Second, cfg.MinBackoff)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Deliver == nil {
		cfg.Deliver = func([]byte, uint16) {}
	}
	return &Bridge{cfg: cfg, log: cfg.Logger, socks: map[uint16]*net.UDPConn{}}
}

// Run keeps a stream up until ctx ends (reconnecting with backoff), then
// closes the stream and every socket and returns once all its goroutines
// have.
func (b *Bridge) Run(ctx context.Context) {
	defer b.shutdown()
	backoff := b.cfg.MinBackoff
	for ctx.Err() == nil {
		conn, err := b.cfg.Dial(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			b.setErr(err)
			b.log.Info("relay-tcp: stream not up", "err", err, "retry_in", backoff)
		} else {
			started := time.Now()
			b.serve(ctx, conn)
			if time.Since(started) > b.cfg.MaxBackoff {
				backoff = b.cfg.MinBackoff // it was up for a while: a fresh failure
			}
			if ctx.Err() != nil {
				return
			}
		}
		// Jitter: 75-100% of the step, so hosts behind one outage do
		// not all come back at the same instant.
		wait := backoff - time.Duration(rand.Int64N(int64(backoff)/4+1))
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, b.cfg.MaxBackoff)
	}
}

// serve runs one stream until it fails or ctx ends.
func (b *Bridge) serve(ctx context.Context, conn net.Conn) {
	q := make(chan []byte, b.cfg.Queue)
	done := make(chan struct{})
	b.mu.Lock()
	b.q = q
	if !b.st.Since.IsZero() {
		b.st.Reconnects++
	}
	b.st.Up, b.st.Since, b.st.LastError = true, time.Now(), ""
	b.mu.Unlock()
	b.log.Info("relay-tcp: stream up", "remote", conn.RemoteAddr())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // writer
		defer wg.Done()
		defer conn.Close()
		for {
			select {
			case f := <-q:
				conn.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
				if _, err := conn.Write(f); err != nil {
					b.setErr(err)
					return
				}
			case <-done:
				return
			case <-ctx.Done():
				return
			}
		}
	}()
	go func() { // closes the stream when ctx ends (the reader is blocked in Read)
		defer wg.Done()
		select {
		case <-ctx.Done():
			conn.Close()
		case <-done:
		}
	}()
	if b.cfg.OnUp != nil {
		wg.Add(1)
		go func() { defer wg.Done(); b.cfg.OnUp() }()
	}
	err := b.read(conn)
	b.mu.Lock()
	b.q = nil
	b.st.Up = false
	b.mu.Unlock()
	close(done)
	conn.Close()
	wg.Wait()
	if ctx.Err() == nil {
		b.setErr(err)
		b.log.Warn("relay-tcp: stream down", "err", err)
	}
}

// read takes frames off the stream until it fails.
func (b *Bridge) read(conn net.Conn) error {
	br := bufio.NewReaderSize(conn, 65536)
	buf := make([]byte, MaxFrame)
	for {
		port, d, err := ReadFrame(br, buf)
		if err != nil {
			return err
		}
		b.mu.Lock()
		b.st.FramesIn++
		b.st.BytesIn += uint64(len(d))
		sock := b.socks[port]
		b.mu.Unlock()
		switch {
		case len(d) >= 4 && bytes.Equal(d[:4], NonESPMarker):
			b.cfg.Deliver(bytes.Clone(d[4:]), port)
		case len(d) == 1 && d[0] == 0xff:
			// NAT keepalive: nothing to keep alive on a stream.
		case sock == nil:
			b.drop()
		case b.cfg.Cleartext:
			for _, p := range CompleteCleartext(d, MaxFrame) {
				sock.WriteToUDPAddrPort(p, b.cfg.Tunnel)
			}
		default:
			sock.WriteToUDPAddrPort(d, b.cfg.Tunnel)
		}
	}
}

// Send frames a datagram (ESP, or the non-ESP marker and a message) for
// the relay port onto the stream. It never blocks: with the stream down
// or its queue full the datagram is dropped.
func (b *Bridge) Send(port uint16, datagram []byte) error {
	f, err := AppendFrame(make([]byte, 0, len(datagram)+4), port, datagram)
	if err != nil {
		b.drop()
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.q == nil {
		b.st.Dropped++
		return ErrBridgeDown
	}
	select {
	case b.q <- f:
		b.st.FramesOut++
		b.st.BytesOut += uint64(len(datagram))
		return nil
	default:
		b.st.Dropped++
		return fmt.Errorf("relay: bridge: queue full (%d frames)", cap(b.q))
	}
}

// Socket returns the local socket for a peer relay port, opening it if
// needed: the address the dataplane sends that peer's datagrams to.
func (b *Bridge) Socket(port uint16) (netip.AddrPort, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return netip.AddrPort{}, errors.New("relay: bridge closed")
	}
	if c := b.socks[port]; c != nil {
		return c.LocalAddr().(*net.UDPAddr).AddrPort(), nil
	}
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: b.cfg.Tunnel.Addr().AsSlice()})
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("relay: bridge socket: %w", err)
	}
	b.socks[port] = c
	b.st.Sockets = len(b.socks)
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		b.readSocket(c, port)
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort(), nil
}

// Release closes the socket of a peer relay port (the peer left the path).
func (b *Bridge) Release(port uint16) {
	b.mu.Lock()
	c := b.socks[port]
	delete(b.socks, port)
	b.st.Sockets = len(b.socks)
	b.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

// Ports lists the peer relay ports with a socket.
func (b *Bridge) Ports() []uint16 {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []uint16
	for p := range b.socks {
		out = append(out, p)
	}
	return out
}

// readSocket frames what the kernel sends to a bridge socket.
func (b *Bridge) readSocket(c *net.UDPConn, port uint16) {
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		if from.Port() != b.cfg.Tunnel.Port() || !from.Addr().Unmap().IsLoopback() && from.Addr().Unmap() != b.cfg.Tunnel.Addr() {
			b.drop() // only our tunnel socket (or the dataplane on its behalf) sends here
			continue
		}
		d := buf[:n]
		if b.cfg.Cleartext && !(len(d) >= 4 && bytes.Equal(d[:4], NonESPMarker)) {
			for _, p := range CompleteCleartext(d, MaxCleartextPacket) {
				b.Send(port, p)
			}
			continue
		}
		b.Send(port, d)
	}
}

func (b *Bridge) drop() {
	b.mu.Lock()
	b.st.Dropped++
	b.mu.Unlock()
}

func (b *Bridge) setErr(err error) {
	if err == nil {
		return
	}
	b.mu.Lock()
	b.st.LastError = err.Error()
	b.mu.Unlock()
}

// Status reports the bridge's state and counters.
func (b *Bridge) Status() BridgeStatus {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.st
}

// Up reports whether a stream is up.
func (b *Bridge) Up() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.q != nil
}

func (b *Bridge) shutdown() {
	b.mu.Lock()
	b.closed = true
	socks := b.socks
	b.socks = map[uint16]*net.UDPConn{}
	b.st.Sockets, b.st.Up = 0, false
	b.mu.Unlock()
	for _, c := range socks {
		c.Close()
	}
	b.wg.Wait()
}

// DialStream returns a BridgeConfig.Dial for the relay's stream port at
// addr whose certificate must name serverName, issued by roots (nil: the
// system's): TLS 1.3, ALPN StreamALPN.
func DialStream(addr, serverName string, roots *x509.CertPool) func(ctx context.Context) (net.Conn, error) {
	return func(ctx context.Context) (net.Conn, error) {
		d := &tls.Dialer{
			NetDialer: &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second},
			Config: &tls.Config{ServerName: serverName, RootCAs: roots, NextProtos: []string{StreamALPN},
				MinVersion: tls.VersionTLS13},
		}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("relay-tcp: %s (%s): %w", addr, serverName, err)
		}
		if p := c.(*tls.Conn).ConnectionState().NegotiatedProtocol; p != StreamALPN {
			c.Close()
			return nil, fmt.Errorf("relay-tcp: %s: ALPN %q, want %q", addr, p, StreamALPN)
		}
		return c, nil
	}
}
