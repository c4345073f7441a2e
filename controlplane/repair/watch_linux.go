package repair

import (
	"errors"
	"fmt"
	"sync"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Multicast groups the dataplanes watch (RTNLGRP_*, XFRMNLGRP_*).
const (
	GroupLink       = unix.RTNLGRP_LINK
	GroupNeigh      = unix.RTNLGRP_NEIGH
	GroupTC         = unix.RTNLGRP_TC
	GroupIPv6Addr   = unix.RTNLGRP_IPV6_IFADDR
	GroupIPv6Route  = unix.RTNLGRP_IPV6_ROUTE
	GroupXfrmSA     = 3 // XFRMNLGRP_SA
	GroupXfrmPolicy = 4 // XFRMNLGRP_POLICY
)

// Watcher reads one netlink multicast subscription.
type Watcher struct {
	c    *netlink.Conn
	wg   sync.WaitGroup
	mu   sync.Mutex
	done bool
}

// Watch joins groups of the netlink protocol (unix.NETLINK_ROUTE or
// unix.NETLINK_XFRM) in the network namespace nsFd and calls f with every
// message's type and body, on one goroutine, until Close. When the kernel
// dropped notifications because the socket overran, f gets Overrun and nil.
// Read errors other than that end the watch; onErr (if not nil) hears of it.
func Watch(nsFd, protocol int, groups []uint32, f func(typ uint16, body []byte), onErr func(error)) (*Watcher, error) {
	var mask uint32
	for _, g := range groups {
		if g == 0 || g > 32 {
			return nil, fmt.Errorf("watch: group %d out of range", g)
		}
		mask |= 1 << (g - 1)
	}
	c, err := netlink.Dial(protocol, &netlink.Config{NetNS: nsFd, Groups: mask})
	if err != nil {
		return nil, fmt.Errorf("watch: netlink protocol %d: %w", protocol, err)
	}
	// A flush notifies once per object: room for thousands.
	c.SetReadBuffer(1 << 20)
	w := &Watcher{c: c}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		for {
			msgs, err := c.Receive()
			if errors.Is(err, unix.ENOBUFS) {
				f(Overrun, nil)
				continue
			}
			if err != nil {
				w.mu.Lock()
				done := w.done
				w.mu.Unlock()
				if !done && onErr != nil {
					onErr(err)
				}
				return
			}
			for _, m := range msgs {
				f(uint16(m.Header.Type), m.Data)
			}
		}
	}()
	return w, nil
}

// Close ends the watch and waits for f's last call to return.
func (w *Watcher) Close() error {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
	err := w.c.Close()
	w.wg.Wait()
	return err
}
