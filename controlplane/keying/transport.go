package keying

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"sync"
)

// Transport carries keying messages between hosts. On a real host it is the
// ESP-in-UDP socket of the tunnel port (package xfrm), where the kernel hands
// userspace only datagrams that start with the RFC 3948 non-ESP marker; in
// tests it is a plain UDP socket (UDPTransport) or an in-memory network.
type Transport interface {
	// WriteKeying sends one keying message to addr. b does not include the
	// non-ESP marker: the transport prepends it. WriteKeying must not retain b.
	WriteKeying(b []byte, addr netip.AddrPort) error
	// ReadKeying blocks until the next keying message arrives and copies it,
	// without the non-ESP marker, into b. Datagrams that are not keying
	// messages (no marker, NAT-keepalives) are skipped. It returns an error
	// once the transport is closed; messages longer than b are truncated.
	ReadKeying(b []byte) (n int, from netip.AddrPort, err error)
}

// UDPTransport is a Transport on a plain UDP socket, for tests and for hosts
// whose tunnel socket is not an ESP-in-UDP socket.
type UDPTransport struct {
	conn *net.UDPConn
	mu   sync.Mutex // guards buf (one read at a time)
	buf  []byte
}

// ListenUDP opens a UDP socket on addr (port 0 picks a free port).
func ListenUDP(addr netip.AddrPort) (*UDPTransport, error) {
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
	if err != nil {
		return nil, fmt.Errorf("keying: listen %v: %w", addr, err)
	}
	return &UDPTransport{conn: c}, nil
}

// NewUDPTransport wraps an open socket; Close closes it.
func NewUDPTransport(c *net.UDPConn) *UDPTransport { return &UDPTransport{conn: c} }

// LocalAddr is where the socket listens.
func (u *UDPTransport) LocalAddr() netip.AddrPort {
	return u.conn.LocalAddr().(*net.UDPAddr).AddrPort()
}

// WriteKeying sends the non-ESP marker and b to addr.
func (u *UDPTransport) WriteKeying(b []byte, addr netip.AddrPort) error {
	d := make([]byte, 0, len(NonESPMarker)+len(b))
	d = append(append(d, NonESPMarker[:]...), b...)
	if _, err := u.conn.WriteToUDPAddrPort(d, addr); err != nil {
		return fmt.Errorf("keying: send to %v: %w", addr, err)
	}
	return nil
}

// ReadKeying returns the next datagram that starts with the non-ESP marker.
func (u *UDPTransport) ReadKeying(b []byte) (int, netip.AddrPort, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.buf == nil {
		u.buf = make([]byte, MaxMessageLen+len(NonESPMarker)+1)
	}
	buf := u.buf
	for {
		n, from, err := u.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return 0, netip.AddrPort{}, fmt.Errorf("keying: read: %w", err)
		}
		if n <= len(NonESPMarker) || !bytes.Equal(buf[:len(NonESPMarker)], NonESPMarker[:]) {
			continue // ESP, NAT-keepalive (0xff) or noise
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		return copy(b, buf[len(NonESPMarker):n]), from, nil
	}
}

// Close closes the socket, unblocking ReadKeying.
func (u *UDPTransport) Close() error { return u.conn.Close() }
