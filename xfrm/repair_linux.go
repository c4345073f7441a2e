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
	// Close runs the closers in order: the loop stops before the watchers,
	// and both before Close removes our objects (so it does not fight it).
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
	if typ == repair.Overrun {
		d.repair.Kick("rtnetlink notifications lost (socket overrun)")
		return
	}
	m, err := repair.ParseRoute(typ, b)
	if err != nil {
		d.log.Debug("rtnetlink notification", "err", err)
		return
	}
	d.wmu.Lock()
	w := d.watch
	d.wmu.Unlock()
	switch {
	case m.Type == repair.RTMDelRoute && m.Family == syscall.AF_INET6 && m.Protocol == uint8(d.cfg.RouteProtocol) && m.Table == syscall.RT_TABLE_MAIN:
		d.repair.Kick(fmt.Sprintf("route %v deleted", m.Prefix))
	case m.Type == repair.RTMDelAddr && m.Family == syscall.AF_INET6 && w.ula.IsValid() && m.Prefix.Addr() == w.ula:
		d.repair.Kick(fmt.Sprintf("address %v deleted", m.Prefix))
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
