package ebpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// attachment is how the programs hang on the device: TCX links (pinned, so
// a restart updates them in place) or clsact filters (kernels before 6.6).
type attachment struct {
	tcx    map[string]link.Link // "egress", "ingress"
	clsact bool
}

func (a attachment) kind() string {
	switch {
	case a.clsact:
		return "clsact+cls_bpf"
	case len(a.tcx) > 0:
		return "tcx"
	}
	return "none"
}

func (d *Dataplane) linkPin(dir string) string {
	return filepath.Join(d.cfg.PinRoot, "link_"+dir+"_"+d.cfg.Device)
}

func (d *Dataplane) progs() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{"egress": d.objs.BtmmEgress, "ingress": d.objs.BtmmIngress}
}

// attachPrograms runs inside the namespace. It tries TCX (a real attach is
// the probe) and falls back to clsact when the kernel has no TCX.
func (d *Dataplane) attachPrograms() error {
	if !d.cfg.ForceClsact {
		err := d.attachTCX()
		if err == nil {
			// A previous run on an older path: drop its filters.
			d.delFilters()
			return nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return err
		}
		d.log.Info("no TCX on this kernel; attaching with clsact", "err", err)
	}
	for dir := range d.progs() {
		d.removeLinkPin(dir)
	}
	return d.attachClsact()
}

func (d *Dataplane) attachTCX() error {
	d.attach.tcx = map[string]link.Link{}
	types := map[string]ebpf.AttachType{"egress": ebpf.AttachTCXEgress, "ingress": ebpf.AttachTCXIngress}
	for dir, prog := range d.progs() {
		path := d.linkPin(dir)
		if l, err := link.LoadPinnedLink(path, nil); err == nil {
			// Restart: swap the program under the existing link, no gap.
			if err := l.Update(prog); err == nil {
				d.attach.tcx[dir] = l
				continue
			}
			l.Unpin()
			l.Close()
		}
		os.Remove(path)
		l, err := link.AttachTCX(link.TCXOptions{Interface: d.dev.Attrs().Index, Program: prog, Attach: types[dir]})
		if err != nil {
			d.closeTCX()
			return fmt.Errorf("ebpf: attach tcx %s on %s: %w", dir, d.cfg.Device, err)
		}
		if err := l.Pin(path); err != nil {
			l.Close()
			d.closeTCX()
			return fmt.Errorf("ebpf: pin tcx link %s: %w", dir, err)
		}
		d.attach.tcx[dir] = l
	}
	return nil
}

func (d *Dataplane) closeTCX() {
	for dir, l := range d.attach.tcx {
		l.Unpin()
		l.Close()
		os.Remove(d.linkPin(dir))
	}
	d.attach.tcx = nil
}

func (d *Dataplane) removeLinkPin(dir string) {
	if l, err := link.LoadPinnedLink(d.linkPin(dir), nil); err == nil {
		l.Unpin()
		l.Close()
	}
	os.Remove(d.linkPin(dir))
}

func (d *Dataplane) filter(dir string) *netlink.BpfFilter {
	parent := uint32(netlink.HANDLE_MIN_EGRESS)
	if dir == "ingress" {
		parent = netlink.HANDLE_MIN_INGRESS
	}
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: d.dev.Attrs().Index, Parent: parent, Handle: filterHandle,
			Protocol: unix.ETH_P_ALL, Priority: filterPrio},
		Name: "btmm_" + dir, DirectAction: true,
	}
	if p := d.progs()[dir]; p != nil {
		f.Fd = p.FD()
	}
	return f
}

func (d *Dataplane) attachClsact() error {
	q := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: d.dev.Attrs().Index,
		Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
	if err := d.nl.QdiscAdd(q); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("ebpf: clsact qdisc on %s: %w", d.cfg.Device, err)
	}
	for _, dir := range []string{"egress", "ingress"} {
		// Replace keeps handle and priority: a restart swaps the program in place.
		if err := d.nl.FilterReplace(d.filter(dir)); err != nil {
			return fmt.Errorf("ebpf: cls_bpf filter %s on %s: %w", dir, d.cfg.Device, err)
		}
	}
	d.attach.clsact = true
	return nil
}

// delFilters removes our clsact filters and the qdisc once nothing else uses it.
func (d *Dataplane) delFilters() error {
	var errs []error
	for _, dir := range []string{"egress", "ingress"} {
		if err := d.nl.FilterDel(d.filter(dir)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("delete filter %s: %w", dir, err))
		}
	}
	empty := true
	for _, parent := range []uint32{netlink.HANDLE_MIN_EGRESS, netlink.HANDLE_MIN_INGRESS} {
		fs, err := d.nl.FilterList(d.dev, parent)
		if err != nil || len(fs) > 0 {
			empty = false
		}
	}
	if empty {
		q := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: d.dev.Attrs().Index,
			Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
		d.nl.QdiscDel(q) // absent is fine
	}
	return errors.Join(errs...)
}

func (d *Dataplane) detach() error {
	if d.attach.clsact {
		return d.delFilters()
	}
	d.closeTCX()
	return nil
}
