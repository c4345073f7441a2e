package xfrm

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"syscall"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/repair"
)

var _ controlplane.Repairer = (*Dataplane)(nil)

// LastRepair implements controlplane.Repairer.
func (d *Dataplane) LastRepair() controlplane.Repair {
	if d.repair == nil {
		return controlplane.Repair{}
	}
	return d.repair.Last()
}

// startRepair watches our objects in the namespace nsFd — XFRM states and
// policies (XFRMNLGRP_SA, _POLICY), IPv6 routes and addresses, links — and
// runs the loop that re-applies the desired state when someone else
// removes or changes them.
func (d *Dataplane) startRepair(nsFd int) error {
	rc := d.cfg.Repair
	if rc.Off {
		return nil
	}
	if rc.Logger == nil {
		rc.Logger = d.log
	}
	d.repair = repair.New(d.reapply, rc)
	onErr := func(err error) {
		d.log.Warn("xfrm: kernel watcher stopped; repairs rely on the periodic audit", "err", err)
	}
	wx, err := repair.Watch(nsFd, syscall.NETLINK_XFRM, []uint32{repair.GroupXfrmSA, repair.GroupXfrmPolicy}, d.repair.KickOnXfrm(d.cfg.Reqid), onErr)
	if err != nil {
		return err
	}
	wr, err := repair.Watch(nsFd, syscall.NETLINK_ROUTE, []uint32{repair.GroupIPv6Route, repair.GroupIPv6Addr, repair.GroupLink}, d.onRoute, onErr)
	if err != nil {
		wx.Close()
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); d.repair.Run(ctx) }()
	// Close removes our objects first, under d.mu with d.closed set, so a
	// repair kicked by those very deletions finds reapply doing nothing
	// (and one already running finishes before the removal starts). Only
	// then does it run the closers, in order: this loop stops (cancel,
	// wait), then the two watchers close, then the closers that were
	// there before (event monitor, the netlink handles reapply uses).
	d.closers = append([]func() error{func() error { cancel(); <-done; return nil }, wx.Close, wr.Close}, d.closers...)
	return nil
}

// reapply is the repair loop's Apply: Set with the last desired state.
func (d *Dataplane) reapply(ctx context.Context) ([]controlplane.Change, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed || d.desired == nil {
		return nil, nil
	}
	return d.setLocked(ctx, d.desired)
}

// onRoute kicks the repair when one of our routes (IPv6, our protocol) or
// our ULA goes, or the xfrm interface or a tunnel device is deleted or set
// down.
func (d *Dataplane) onRoute(typ uint16, b []byte) {
	d.wmu.Lock()
	w := d.watch
	d.wmu.Unlock()
	m, more := d.repair.KickOnRoute(typ, b, uint8(d.cfg.RouteProtocol), w.ula)
	if !more {
		return
	}
	switch {
	case (m.Type == repair.RTMDelLink || m.Type == repair.RTMNewLink && !m.Up()) && w.ifindex != 0 && m.Ifindex == w.ifindex:
		d.repair.Kick(fmt.Sprintf("interface %s deleted or down", d.cfg.Interface))
	case (m.Type == repair.RTMDelLink || m.Type == repair.RTMNewLink && !m.Up()) && w.tunnels[m.Ifindex]:
		// A tunnel device (its route went with it). The GUE listener
		// has no notification: the periodic audit puts it back.
		d.repair.Kick(fmt.Sprintf("tunnel device %d deleted or down", m.Ifindex))
	}
}

// CloneState copies a desired state (keys included) so the caller may
// reuse its own; the dataplanes keep one for their repairs.
func CloneState(s *controlplane.State) *controlplane.State {
	c := &controlplane.State{Local: s.Local, Peers: slices.Clone(s.Peers)}
	for i := range c.Peers {
		p := &c.Peers[i]
		p.Out.Key, p.In.Key = bytes.Clone(p.Out.Key), bytes.Clone(p.In.Key)
		p.PrevIn = slices.Clone(p.PrevIn)
		for j := range p.PrevIn {
			p.PrevIn[j].Key = bytes.Clone(p.PrevIn[j].Key)
		}
	}
	return c
}
