package ebpf

import (
	"context"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/identity"
	"github.com/btmm/btmm/controlplane/repair"
)

// tcxCheck is how often the TCX links are checked: the kernel announces no
// detached TCX link (a removed clsact filter or qdisc it does announce).
const tcxCheck = 250 * time.Millisecond

var _ controlplane.Repairer = (*Dataplane)(nil)

// LastRepair implements controlplane.Repairer.
func (d *Dataplane) LastRepair() controlplane.Repair {
	if d.repair == nil {
		return controlplane.Repair{}
	}
	return d.repair.Last()
}

// startRepair watches our objects — IPv6 routes, addresses and neighbours,
// tc qdiscs and filters, links (rtnetlink), XFRM states and policies in
// secure mode, and the TCX links by polling — and runs the loop that
// re-applies the desired state when someone else removes or changes them.
func (d *Dataplane) startRepair() error {
	rc := d.cfg.Repair
	if rc.Off {
		return nil
	}
	if rc.Logger == nil {
		rc.Logger = d.log
	}
	d.repair = repair.New(d.reapply, rc)
	onErr := func(err error) {
		d.log.Warn("ebpf: kernel watcher stopped; repairs rely on the periodic audit", "err", err)
	}
	var closers []func() error
	stop := func() {
		for _, c := range closers {
			c()
		}
	}
	wr, err := repair.Watch(int(d.ns), unix.NETLINK_ROUTE,
		[]uint32{repair.GroupIPv6Route, repair.GroupIPv6Addr, repair.GroupNeigh, repair.GroupTC, repair.GroupLink}, d.onRoute, onErr)
	if err != nil {
		return err
	}
	closers = append(closers, wr.Close)
	if !d.cfg.Cleartext {
		wx, err := repair.Watch(int(d.ns), unix.NETLINK_XFRM, []uint32{repair.GroupXfrmSA, repair.GroupXfrmPolicy}, d.repair.KickOnXfrm(reqid), onErr)
		if err != nil {
			stop()
			return err
		}
		closers = append(closers, wx.Close)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { d.repair.Run(ctx); done <- struct{}{} }()
	go func() { d.pollTCX(ctx); done <- struct{}{} }()
	// The loop and poller stop first, so nothing kicks or repairs while
	// Close takes our objects down.
	closers = append([]func() error{func() error { cancel(); <-done; <-done; return nil }}, closers...)
	d.stopRep = stop
	return nil
}

// reapply is the repair loop's Apply: Set with the last desired state.
func (d *Dataplane) reapply(context.Context) ([]controlplane.Change, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed || d.desired == nil {
		return nil, nil
	}
	return d.setLocked(d.desired)
}

// pollTCX kicks the repair when one of our TCX links no longer hangs on
// its device (`bpftool link detach`, or the device went away), lo's
// included.
func (d *Dataplane) pollTCX(ctx context.Context) {
	t := time.NewTicker(tcxCheck)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d.mu.Lock()
		a := d.attach
		lost := len(a.tcx) > 0 && !d.intact(a)
		loLost := d.lo.tcx != nil && !d.loIntact(d.lo)
		d.mu.Unlock()
		if lost {
			d.repair.Kick("tcx program detached from " + a.name())
		}
		if loLost {
			d.repair.Kick("tcx program detached from lo (relay-tcp bridge)")
		}
	}
}

// onRoute kicks the repair when our routes (IPv6, protocol 98), our ULA,
// neighbour entries, clsact qdisc or filters (on our device, and on lo
// while a peer is bridged), our device, or a tunnel device of ours goes
// (or is set down).
func (d *Dataplane) onRoute(typ uint16, b []byte) {
	d.wmu.Lock()
	w := d.watching
	d.wmu.Unlock()
	m, more := d.repair.KickOnRoute(typ, b, routeProtocol, w.ula)
	if !more {
		return
	}
	dev := w.ifindex != 0 && m.Ifindex == w.ifindex
	lo := w.lo != 0 && m.Ifindex == w.lo
	switch {
	case m.Type == repair.RTMDelNeigh && m.Family == unix.AF_INET6 && dev && identity.IsULA(m.Addr):
		d.repair.Kick(fmt.Sprintf("neighbour %v deleted", m.Addr))
	case (m.Type == repair.RTMDelQdisc || m.Type == repair.RTMDelTfilter) && dev:
		d.repair.Kick("tc qdisc or filter deleted")
	case (m.Type == repair.RTMDelQdisc || m.Type == repair.RTMDelTfilter) && lo:
		d.repair.Kick("tc qdisc or filter deleted on lo (relay-tcp bridge)")
	case m.Type == repair.RTMDelLink && dev:
		d.repair.Kick("device deleted")
	case (m.Type == repair.RTMDelLink || m.Type == repair.RTMNewLink && !m.Up()) && w.tunnels[m.Ifindex]:
		// A tunnel device (its route went with it); the GUE listener
		// has no notification: the periodic audit puts it back.
		d.repair.Kick(fmt.Sprintf("tunnel device %d deleted or down", m.Ifindex))
	}
}
