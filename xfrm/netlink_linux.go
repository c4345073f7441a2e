package xfrm

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/mdlayher/netlink"
)

// xfrmConn is a NETLINK_XFRM socket from mdlayher/netlink, bound to a
// network namespace, for the messages vishvananda/netlink lacks.
type xfrmConn struct{ c *netlink.Conn }

func dialMigrate(nsFd int) (*xfrmConn, error) {
	c, err := netlink.Dial(syscall.NETLINK_XFRM, &netlink.Config{NetNS: nsFd})
	if err != nil {
		return nil, err
	}
	return &xfrmConn{c: c}, nil
}

func (x *xfrmConn) Close() error { return x.c.Close() }

// migrate sends XFRM_MSG_MIGRATE and waits for the kernel's answer. Kernels
// built without CONFIG_XFRM_MIGRATE answer ENOPROTOOPT.
func (x *xfrmConn) migrate(m migration) error {
	_, err := x.c.Execute(netlink.Message{
		Header: netlink.Header{Type: msgMigrate, Flags: netlink.Request | netlink.Acknowledge},
		Data:   m.marshal(),
	})
	if err != nil {
		return fmt.Errorf("XFRM_MSG_MIGRATE: %w", err)
	}
	return nil
}

// dialMonitor joins the expire and mapping multicast groups.
func dialMonitor(nsFd int) (*netlink.Conn, error) {
	return netlink.Dial(syscall.NETLINK_XFRM, &netlink.Config{NetNS: nsFd,
		Groups: 1<<(grpExpire-1) | 1<<(grpMapping-1)})
}

// monitor reads kernel notifications until c is closed.
func (d *Dataplane) monitor(c *netlink.Conn) {
	for {
		msgs, err := c.Receive()
		if err != nil {
			var oe interface{ Timeout() bool }
			if errors.As(err, &oe) && oe.Timeout() {
				continue
			}
			d.mu.Lock()
			closed := d.closed
			d.mu.Unlock()
			if !closed {
				d.log.Warn("xfrm event monitor stopped", "err", err)
			}
			return
		}
		for _, m := range msgs {
			var e Event
			switch m.Header.Type {
			case msgExpire:
				e, err = parseExpire(m.Data)
			case msgMapping:
				e, err = parseMapping(m.Data)
			default:
				continue
			}
			if err != nil {
				d.log.Warn("xfrm event", "err", err)
				continue
			}
			if e.Reqid != d.cfg.Reqid {
				continue // not ours
			}
			if e.Kind == HardExpire {
				d.mu.Lock()
				d.expired[e.SPI] = true
				d.mu.Unlock()
			}
			d.deliver(e)
		}
	}
}
