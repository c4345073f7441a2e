package xfrm

import (
	"encoding/binary"
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

// fouConn adds and deletes fou listeners (Linux fou, generic netlink family
// "fou") in one namespace. vishvananda/netlink's FouAdd is refused by
// Debian's 6.1 kernel (ERANGE; `ip fou add` works), so the two commands
// that change something are sent here; listing stays with the handle.
type fouConn struct {
	c      *netlink.Conn
	family uint16
}

// Generic netlink and fou constants (linux/genetlink.h, linux/fou.h).
const (
	genlIDCtrl         = 0x10
	ctrlCmdGetFamily   = 3
	ctrlAttrFamilyID   = 1
	ctrlAttrFamilyName = 2
	fouCmdAdd          = 1
	fouCmdDel          = 2
	fouAttrPort        = 1
	fouAttrAF          = 2
	fouAttrType        = 4
)

func dialFou(nsFd int) (*fouConn, error) {
	c, err := netlink.Dial(syscall.NETLINK_GENERIC, &netlink.Config{NetNS: nsFd})
	if err != nil {
		return nil, err
	}
	return &fouConn{c: c}, nil
}

func (f *fouConn) Close() error { return f.c.Close() }

// resolve finds the fou family's id; it fails while the fou module is not
// loaded (the kernel loads it on `ip fou add`, we do not).
func (f *fouConn) resolve() error {
	if f.family != 0 {
		return nil
	}
	ae := netlink.NewAttributeEncoder()
	ae.String(ctrlAttrFamilyName, "fou")
	b, err := ae.Encode()
	if err != nil {
		return err
	}
	msgs, err := f.c.Execute(netlink.Message{
		Header: netlink.Header{Type: genlIDCtrl, Flags: netlink.Request},
		Data:   append([]byte{ctrlCmdGetFamily, 1, 0, 0}, b...),
	})
	if err != nil {
		return fmt.Errorf("generic netlink family fou (is the fou module loaded?): %w", err)
	}
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return err
		}
		for ad.Next() {
			if ad.Type() == ctrlAttrFamilyID {
				f.family = ad.Uint16()
			}
		}
		if err := ad.Err(); err != nil {
			return err
		}
	}
	if f.family == 0 {
		return errors.New("generic netlink family fou: no id in the answer")
	}
	return nil
}

func (f *fouConn) do(cmd uint8, port uint16, withType bool) error {
	if err := f.resolve(); err != nil {
		return err
	}
	ae := netlink.NewAttributeEncoder()
	ae.Do(fouAttrPort, func() ([]byte, error) { return binary.BigEndian.AppendUint16(nil, port), nil })
	ae.Uint8(fouAttrAF, syscall.AF_INET)
	if withType {
		ae.Uint8(fouAttrType, 2) // FOU_ENCAP_GUE
	}
	b, err := ae.Encode()
	if err != nil {
		return err
	}
	_, err = f.c.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(f.family), Flags: netlink.Request | netlink.Acknowledge},
		Data:   append([]byte{cmd, 1, 0, 0}, b...),
	})
	return err
}

// addGUE is `ip fou add port <port> gue` (IPv4).
func (f *fouConn) addGUE(port uint16) error { return f.do(fouCmdAdd, port, true) }

// del is `ip fou del port <port>` (IPv4).
func (f *fouConn) del(port uint16) error { return f.do(fouCmdDel, port, false) }
