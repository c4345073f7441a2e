package ebpf

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane"
)

// Tunnel paths in secure mode (docs/tunnels.md, "The eBPF dataplane"): a
// peer with tunnel endpoints gets the same devices as with package xfrm
// (xfrm.Tunnels: ip6tnl for ipv6, sit for sit and fou, tagged with our
// reqid as their link group), whatever its path, so the peer's traffic and
// path checks on any kind get through. While its path (Via) is a tunnel
// kind, its /128 route goes into the device: the programs on the uplink
// never see its inner packets, only the device's outer ones (IPv6 to a
// global address, IPv4 protocol 41, UDP to a GUE port), which are not
// theirs and pass. ESP in transport mode between the ULAs protects what
// the route sends into the device (xfrm_linux.go).

// recorder collects the changes and errors of the shared tunnel code.
type recorder struct {
	changes []controlplane.Change
	errs    []error
}

func (r *recorder) Do(op, obj, what string, err error) bool {
	if err != nil {
		r.errs = append(r.errs, fmt.Errorf("%s %s %s: %w", op, obj, what, err))
		return false
	}
	r.changes = append(r.changes, controlplane.Change{Op: op, Object: obj, What: what})
	return true
}

func (r *recorder) Fail(err error) { r.errs = append(r.errs, err) }

// setTunnels makes the desired devices and the GUE listener; it returns the
// ifindex of each tunnel-path peer's device (absent: not made just now) and
// the ifindexes of all our devices (the repair loop watches them).
func (d *Dataplane) setTunnels(desired *controlplane.State) ([]controlplane.Change, map[netip.Addr]int, map[int]bool, error) {
	r := &recorder{}
	d.tun.Fou(r, desired.Local.FOUPort)
	klinks, err := d.tun.Links()
	if err != nil {
		return nil, nil, nil, err
	}
	have := map[string]netlink.Link{}
	for _, l := range klinks {
		have[l.Attrs().Name] = l
	}
	var want []netlink.Link
	for _, p := range desired.Peers {
		for _, t := range p.Tunnels {
			l, err := d.tun.Link(desired.Local, p, t)
			if err != nil {
				r.Fail(err)
				continue
			}
			want = append(want, l)
		}
	}
	idx := d.tun.Apply(r, want, have, desired.Local.ULA)
	all := map[int]bool{}
	for _, i := range idx {
		all[i] = true
	}
	via := map[netip.Addr]int{}
	for _, p := range desired.Peers {
		if p.Via == controlplane.PathESPInUDP {
			continue
		}
		if i, ok := idx[controlplane.TunnelDevice(p.Via, p.ULA)]; ok {
			via[p.ULA] = i
		}
	}
	return r.changes, via, all, errors.Join(r.errs...)
}

// oldTunnels deletes our devices no desired peer lists (once no route
// points into them) and a GUE listener on a port no longer desired.
func (d *Dataplane) oldTunnels(desired *controlplane.State) ([]controlplane.Change, error) {
	r := &recorder{}
	keep := map[string]bool{}
	for _, p := range desired.Peers {
		for _, t := range p.Tunnels {
			keep[controlplane.TunnelDevice(t.Kind, p.ULA)] = true
		}
	}
	klinks, err := d.tun.Links()
	if err != nil {
		return nil, err
	}
	for _, l := range klinks {
		if !keep[l.Attrs().Name] {
			r.Do("delete", "link", l.Attrs().Name, d.tun.Delete(l))
		}
	}
	d.tun.OldFou(r, desired.Local.FOUPort)
	return r.changes, errors.Join(r.errs...)
}
