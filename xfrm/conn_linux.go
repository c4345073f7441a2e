package xfrm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/btmm/btmm/controlplane/nsthread"
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

// Listen6 opens the keying channel's IPv6 socket on laddr (e.g. [::]:4500,
// IPv6 only) in the caller's network namespace: keying messages and path
// checks to and from IPv6 endpoints, global ones (ipv6 paths) and the
// link-local ones of tunnel devices (docs/tunnels.md), with the same
// non-ESP marker as the IPv4 tunnel socket. No ESP arrives on it: IPv6 and
// the tunnel devices carry ESP in IP, not in UDP.
func Listen6(ctx context.Context, laddr netip.AddrPort) (*Conn, error) {
	if !laddr.Addr().Is6() || laddr.Addr().Is4In6() {
		return nil, fmt.Errorf("xfrm: listen6 %v: not an IPv6 address", laddr)
	}
	var lc net.ListenConfig
	pc, err := lc.ListenPacket(ctx, "udp6", laddr.String())
	if err != nil {
		return nil, fmt.Errorf("xfrm: listen %v: %w", laddr, err)
	}
	return &Conn{c: pc.(*net.UDPConn)}, nil
}

// ListenAt6 is Listen6 inside network namespace ns.
func ListenAt6(ctx context.Context, ns netns.NsHandle, laddr netip.AddrPort) (*Conn, error) {
	return listenIn(ns, func() (*Conn, error) { return Listen6(ctx, laddr) })
}

// ListenAt is Listen inside network namespace ns. The socket stays in ns
// for its lifetime.
func ListenAt(ctx context.Context, ns netns.NsHandle, laddr netip.AddrPort) (*Conn, error) {
	return listenIn(ns, func() (*Conn, error) { return Listen(ctx, laddr) })
}

func listenIn(ns netns.NsHandle, listen func() (*Conn, error)) (*Conn, error) {
	var c *Conn
	if err := nsthread.In(ns, func() (err error) { c, err = listen(); return err }); err != nil {
		if c != nil {
			c.Close()
		}
		return nil, fmt.Errorf("xfrm: listen: %w", err)
	}
	return c, nil
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

// Dual joins the IPv4 tunnel socket and the IPv6 keying socket into one
// keying channel (controlplane/keying.Transport): WriteKeying and
// SendKeepalive go out of the socket of the destination's family,
// ReadKeying returns what either received. Either may be nil (a host
// without IPv4, or without IPv6). Close closes both and ends every
// goroutine of the channel.
type Dual struct {
	V4, V6   *Conn
	once     sync.Once
	rx       chan dualMsg
	done     chan struct{} // closed once: by Close, or when every reader failed
	doneOnce sync.Once
	readers  sync.WaitGroup
	mu       sync.Mutex
	err      error
	open     int
	closed   bool // Close began: start launches no reader
}

type dualMsg struct {
	b    []byte
	from netip.AddrPort
}

// NewDual joins v4 and v6 (either may be nil, not both).
func NewDual(v4, v6 *Conn) (*Dual, error) {
	if v4 == nil && v6 == nil {
		return nil, errors.New("xfrm: dual keying channel without sockets")
	}
	return &Dual{V4: v4, V6: v6, rx: make(chan dualMsg, 64), done: make(chan struct{})}, nil
}

func (d *Dual) start() {
	d.once.Do(func() {
		d.mu.Lock() // Close's Wait comes after every Add, or no reader starts
		defer d.mu.Unlock()
		if d.closed {
			return
		}
		for _, c := range []*Conn{d.V4, d.V6} {
			if c == nil {
				continue
			}
			d.open++
			d.readers.Add(1)
			go func() {
				defer d.readers.Done()
				buf := make([]byte, maxKeyingDatagram)
				for {
					n, from, err := c.ReadKeying(buf)
					if err != nil {
						d.mu.Lock()
						d.open--
						last := d.open == 0
						d.mu.Unlock()
						if last {
							d.finish(err)
						} else {
							d.setErr(err)
						}
						return
					}
					// A reader blocked on a full rx leaves when the
					// channel closes (done), not only when its socket
					// fails: nobody may drain rx after Close.
					select {
					case d.rx <- dualMsg{append([]byte(nil), buf[:n]...), from}:
					case <-d.done:
						return
					}
				}
			}()
		}
	})
}

func (d *Dual) setErr(err error) {
	d.mu.Lock()
	if d.err == nil {
		d.err = err
	}
	d.mu.Unlock()
}

// finish records err (the first one wins) and closes done.
func (d *Dual) finish(err error) {
	d.setErr(err)
	d.doneOnce.Do(func() { close(d.done) })
}

// ReadKeying returns the next keying datagram from either socket. An error
// means both are closed.
func (d *Dual) ReadKeying(b []byte) (int, netip.AddrPort, error) {
	d.start()
	select {
	case <-d.done: // closed: no more messages, even buffered ones
		d.mu.Lock()
		defer d.mu.Unlock()
		return 0, netip.AddrPort{}, d.err
	default:
	}
	select {
	case m := <-d.rx:
		return copy(b, m.b), m.from, nil
	case <-d.done:
		d.mu.Lock()
		defer d.mu.Unlock()
		return 0, netip.AddrPort{}, d.err
	}
}

func (d *Dual) pick(to netip.AddrPort) (*Conn, error) {
	c := d.V4
	if to.Addr().Is6() && !to.Addr().Is4In6() {
		c = d.V6
	}
	if c == nil {
		return nil, fmt.Errorf("xfrm: no socket for %v", to)
	}
	return c, nil
}

// WriteKeying sends b from the socket of to's family.
func (d *Dual) WriteKeying(b []byte, to netip.AddrPort) error {
	c, err := d.pick(to)
	if err != nil {
		return err
	}
	return c.WriteKeying(b, to)
}

// SendKeepalive sends a NAT-keepalive from the socket of to's family.
func (d *Dual) SendKeepalive(to netip.AddrPort) error {
	c, err := d.pick(to)
	if err != nil {
		return err
	}
	return c.SendKeepalive(to)
}

// Close closes both sockets and ends the channel: ReadKeying returns an
// error (net.ErrClosed) from then on, and Close returns once both readers
// have left, including one that was blocked handing over a datagram nobody
// reads any more.
func (d *Dual) Close() error {
	d.mu.Lock()
	d.closed = true
	d.mu.Unlock()
	var errs []error
	for _, c := range []*Conn{d.V4, d.V6} {
		if c != nil {
			if err := c.Close(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	d.finish(fmt.Errorf("xfrm: dual keying channel: %w", net.ErrClosed))
	if len(errs) == 0 {
		// Both sockets are closed, so every reader's read fails or
		// its hand-over sees done: they leave at once. (After a failed
		// close a reader could still sit in a read: do not wait.)
		d.readers.Wait()
	}
	return errors.Join(errs...)
}
