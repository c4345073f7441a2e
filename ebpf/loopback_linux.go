package ebpf

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/nldump"
)

// Loopback outer addresses (relay-tcp, docs/paths.md): a peer reached
// through btmmd's bridge has a 127.0.0.0/8 outer address, the bridge's
// local UDP socket. The egress program hands such a peer's datagrams to
// lo's ingress (bpf_redirect BPF_F_INGRESS), where the bridge socket
// receives them; the bridge writes the peer's datagrams from that socket
// to our tunnel port over lo, where the ingress program, attached to lo
// for as long as such a peer exists, takes them apart as it does on the
// device. The lo link is not pinned: it goes with the process (a restart
// attaches it again at its first Set); a clsact filter left by a crash is
// removed at start (removeStaleFilters).
//
// A datagram handed to lo's ingress by a program has no route attached,
// so the stack routes it as if it came from outside: lo must accept a
// local source address (net.ipv4.conf.lo.accept_local) and a 127.0.0.0/8
// destination (net.ipv4.conf.lo.route_localnet). Both are set on lo only
// while a bridged peer exists and put back as they were afterwards; they
// concern packets arriving on lo, which only this host sends.
var loSysctls = []string{"net/ipv4/conf/lo/accept_local", "net/ipv4/conf/lo/route_localnet"}

// loopbackOuter reports whether a is a bridge socket's address.
func loopbackOuter(a netip.AddrPort) bool {
	return a.Addr().Unmap().IsLoopback() && a.Addr().Unmap().Is4()
}

type loAttachment struct {
	dev    netlink.Link
	tcx    link.Link
	clsact bool
	saved  map[string]string // sysctl -> its value before we set it
}

// setLoopback attaches the ingress program to lo (want) or detaches it.
// It runs with d.mu held.
func (d *Dataplane) setLoopback(want bool) ([]controlplane.Change, error) {
	if !want {
		if d.lo.dev == nil {
			return nil, nil
		}
		err := d.inNS(d.detachLoopback)
		return []controlplane.Change{{Op: "delete", Object: "attach", What: "ingress program on lo (no relay-tcp peer)"}}, err
	}
	var prev map[string]string // sysctls as they were before our first attach
	again := ""
	if d.lo.dev != nil {
		if d.loIntact(d.lo) {
			return nil, nil
		}
		// Detached by someone else (a TCX link detached, our filter or
		// the clsact qdisc deleted): attach again. The repair loop gets
		// here (pollTCX, onRoute).
		if d.lo.tcx != nil {
			d.lo.tcx.Close()
		}
		prev, again = d.lo.saved, " again (it had been detached)"
		d.lo = loAttachment{}
	}
	var a loAttachment
	err := d.inNS(func() error {
		lo, err := d.nl.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("lo: %w", err)
		}
		a.dev = lo
		a.saved = map[string]string{}
		for _, k := range loSysctls {
			old, err := os.ReadFile("/proc/sys/" + k)
			if err != nil {
				return fmt.Errorf("sysctl %s: %w", k, err)
			}
			if v := strings.TrimSpace(string(old)); v != "1" {
				if err := os.WriteFile("/proc/sys/"+k, []byte("1"), 0o644); err != nil {
					return fmt.Errorf("sysctl %s=1: %w", k, err)
				}
				a.saved[k] = v
			}
		}
		if !d.cfg.ForceClsact {
			l, err := link.AttachTCX(link.TCXOptions{Interface: lo.Attrs().Index, Program: d.objs.BtmmIngress, Attach: ebpf.AttachTCXIngress})
			if err == nil {
				a.tcx = l
				return nil
			}
			if !errors.Is(err, ebpf.ErrNotSupported) {
				return fmt.Errorf("attach tcx ingress on lo: %w", err)
			}
		}
		if err := d.nl.QdiscAdd(clsactQdisc(lo)); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("clsact qdisc on lo: %w", err)
		}
		if err := d.nl.FilterReplace(d.filter(lo, "ingress")); err != nil {
			return fmt.Errorf("cls_bpf filter ingress on lo: %w", err)
		}
		a.clsact = true
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("ebpf: relay-tcp bridge: %w", err)
	}
	for k, v := range prev {
		a.saved[k] = v // what to put back is what was there before us
	}
	d.lo = a
	kind := "tcx"
	if a.clsact {
		kind = "clsact+cls_bpf"
	}
	return []controlplane.Change{{Op: "add", Object: "attach", What: "ingress program on lo via " + kind + again + " (relay-tcp bridge)"}}, nil
}

// index is lo's ifindex while attached (0: not attached).
func (a loAttachment) index() int {
	if a.dev == nil {
		return 0
	}
	return a.dev.Attrs().Index
}

// loIntact reports whether the ingress program still hangs on lo as a says
// (the kernel announces a deleted filter or qdisc, not a detached TCX link:
// pollTCX asks).
func (d *Dataplane) loIntact(a loAttachment) bool {
	switch {
	case a.dev == nil:
		return true
	case a.clsact:
		fs, err := nldump.Retry(func() ([]netlink.Filter, error) { return d.nl.FilterList(a.dev, netlink.HANDLE_MIN_INGRESS) })
		return err == nil && slices.ContainsFunc(fs, ourFilter)
	}
	return a.tcx != nil && tcxIfindex(a.tcx) == a.dev.Attrs().Index
}

// detachLoopback undoes setLoopback (inside the namespace).
func (d *Dataplane) detachLoopback() error {
	a := d.lo
	d.lo = loAttachment{}
	for k, v := range a.saved {
		os.WriteFile("/proc/sys/"+k, []byte(v), 0o644) // best effort: lo concerns this host only
	}
	switch {
	case a.tcx != nil:
		return a.tcx.Close()
	case a.clsact:
		err := d.nl.FilterDel(d.filter(a.dev, "ingress"))
		if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("delete filter ingress on lo: %w", err)
		}
		empty := true
		for _, parent := range []uint32{netlink.HANDLE_MIN_EGRESS, netlink.HANDLE_MIN_INGRESS} {
			if fs, err := nldump.Retry(func() ([]netlink.Filter, error) { return d.nl.FilterList(a.dev, parent) }); err != nil || len(fs) > 0 {
				empty = false
			}
		}
		if empty {
			d.nl.QdiscDel(clsactQdisc(a.dev))
		}
	}
	return nil
}
