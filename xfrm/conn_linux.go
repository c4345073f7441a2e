package xfrm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
)

// Socket options of RFC 3948 UDP encapsulation (linux/udp.h).
const (
	solUDP            = 17  // IPPROTO_UDP
	udpEncap          = 100 // UDP_ENCAP
	udpEncapESPInUDP  = 2   // UDP_ENCAP_ESPINUDP
	natKeepaliveByte  = 0xff
	maxKeyingDatagram = 65507
)

// Conn is the tunnel port's UDP socket with UDP_ENCAP_ESPINUDP set (RFC 3948).
// The kernel decapsulates the ESP packets that arrive on it; datagrams that
// start with the non-ESP marker (four zero bytes) are keying messages and
// reach ReadKeying without the marker. WriteKeying adds the marker, so
// keying and ESP leave from the same address and port and one NAT mapping
// serves both. Outbound ESP is sent by the kernel, not through Conn.
//
// Conn is IPv4 only (BTMM's outer header). Its methods may be called
// concurrently; ReadKeying from one goroutine at a time.
type Conn struct {
	c *net.UDPConn
}

// Listen opens the tunnel socket on laddr (e.g. 0.0.0.0:4500) in the
// caller's network namespace.
func Listen(ctx context.Context, laddr netip.AddrPort) (*Conn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), solUDP, udpEncap, udpEncapESPInUDP)
		})
		if err == nil {
			err = serr
		}
		if err != nil {
			return fmt.Errorf("setsockopt UDP_ENCAP_ESPINUDP: %w", err)
		}
		return nil
	}}
	pc, err := lc.ListenPacket(ctx, "udp4", laddr.String())
	if err != nil {
		return nil, fmt.Errorf("xfrm: listen %v: %w", laddr, err)
	}
	return &Conn{c: pc.(*net.UDPConn)}, nil
}

// ListenAt is Listen inside network namespace ns. The socket stays in ns
// for its lifetime.
func ListenAt(ctx context.Context, ns netns.NsHandle, laddr netip.AddrPort) (*Conn, error) {
	type result struct {
		c   *Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			done <- result{err: fmt.Errorf("xfrm: listen: current netns: %w", err)}
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			done <- result{err: fmt.Errorf("xfrm: listen: enter netns: %w", err)}
			runtime.UnlockOSThread()
			return
		}
		c, err := Listen(ctx, laddr)
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread() // else the thread dies with the goroutine
		}
		done <- result{c, err}
	}()
	r := <-done
	return r.c, r.err
}

// ReadKeying reads the next keying message into b and returns its length
// and sender. Datagrams without the non-ESP marker are skipped (the kernel
// has already taken ESP packets and NAT keepalives). A message longer than b
// is truncated to len(b), as controlplane/keying.Transport specifies: an
// oversized datagram from anyone must not end the caller's read loop. An
// error means the socket is closed (or its read deadline passed).
func (c *Conn) ReadKeying(b []byte) (int, netip.AddrPort, error) {
	buf := make([]byte, len(b)+len(nonESPMarker))
	for {
		n, from, err := c.c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return 0, netip.AddrPort{}, fmt.Errorf("xfrm: read keying: %w", err)
		}
		msg, err := parseKeying(buf[:n])
		if err != nil {
			continue
		}
		return copy(b, msg), netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), nil
	}
}

// WriteKeying sends one keying message to the peer's tunnel port, behind the
// non-ESP marker.
func (c *Conn) WriteKeying(b []byte, to netip.AddrPort) error {
	if len(b)+len(nonESPMarker) > maxKeyingDatagram {
		return fmt.Errorf("xfrm: write keying to %v: %d bytes is too long", to, len(b))
	}
	if _, err := c.c.WriteToUDPAddrPort(marshalKeying(b), to); err != nil {
		return fmt.Errorf("xfrm: write keying to %v: %w", to, err)
	}
	return nil
}

// SendKeepalive sends an RFC 3948 §2.3 NAT-keepalive (one 0xFF byte) to
// keep the NAT mapping of the tunnel port alive.
func (c *Conn) SendKeepalive(to netip.AddrPort) error {
	if _, err := c.c.WriteToUDPAddrPort([]byte{natKeepaliveByte}, to); err != nil {
		return fmt.Errorf("xfrm: keepalive to %v: %w", to, err)
	}
	return nil
}

// LocalAddr is the socket's bound address.
func (c *Conn) LocalAddr() netip.AddrPort {
	return c.c.LocalAddr().(*net.UDPAddr).AddrPort()
}

// SetReadDeadline bounds ReadKeying.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.c.SetReadDeadline(t) }

// Close closes the socket; inbound ESP-in-UDP for this port stops.
func (c *Conn) Close() error {
	if err := c.c.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("xfrm: close tunnel socket: %w", err)
	}
	return nil
}
