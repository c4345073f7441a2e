package netmon

import (
	"encoding/binary"
	"fmt"

	mnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// carrierDowns reads every link's IFLA_CARRIER_DOWN_COUNT (how many times
// the kernel took its carrier away since the link was created), keyed by
// index. vishvananda/netlink does not decode the attribute, so this is
// one raw RTM_GETLINK dump. The counter moves even when the kernel's
// linkwatch folds a quick down-and-up into a single notification that
// already shows the link up, which is what a busy host sees when it is
// plugged into another switch port or roams between access points.
func (s *nlSource) carrierDowns() (map[int]uint32, error) {
	cfg := &mnl.Config{}
	if s.ns.IsOpen() {
		cfg.NetNS = int(s.ns)
	}
	c, err := mnl.Dial(unix.NETLINK_ROUTE, cfg)
	if err != nil {
		return nil, fmt.Errorf("netmon: carrier counts: %w", err)
	}
	defer c.Close()
	msgs, err := c.Execute(mnl.Message{
		Header: mnl.Header{Type: unix.RTM_GETLINK, Flags: mnl.Request | mnl.Dump},
		Data:   make([]byte, unix.SizeofIfInfomsg), // AF_UNSPEC, every link
	})
	if err != nil {
		return nil, fmt.Errorf("netmon: carrier counts: %w", err)
	}
	downs := make(map[int]uint32, len(msgs))
	for _, m := range msgs {
		if idx, n, ok := parseCarrierDowns(m.Data); ok {
			downs[idx] = n
		}
	}
	return downs, nil
}

// parseCarrierDowns reads an RTM_NEWLINK body: the ifinfomsg's index and the
// IFLA_CARRIER_DOWN_COUNT attribute, if present.
func parseCarrierDowns(b []byte) (index int, downs uint32, ok bool) {
	if len(b) < unix.SizeofIfInfomsg {
		return 0, 0, false
	}
	index = int(int32(binary.NativeEndian.Uint32(b[4:8])))
	ad, err := mnl.NewAttributeDecoder(b[unix.SizeofIfInfomsg:])
	if err != nil {
		return 0, 0, false
	}
	for ad.Next() {
		if ad.Type() == unix.IFLA_CARRIER_DOWN_COUNT && len(ad.Bytes()) == 4 {
			downs, ok = ad.Uint32(), true
		}
	}
	if ad.Err() != nil || !ok {
		return 0, 0, false
	}
	return index, downs, true
}
