package ebpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane/nldump"
)

// attachment is how the programs hang on one device: TCX links (pinned, so
// a restart updates them in place) or clsact filters (kernels before 6.6).
// The zero value is "not attached".
type attachment struct {
	dev    netlink.Link
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

// name is the device's name ("" when not attached).
func (a attachment) name() string {
	if a.dev == nil {
		return ""
	}
	return a.dev.Attrs().Name
}

func (a attachment) index() int {
	if a.dev == nil {
		return 0
	}
	return a.dev.Attrs().Index
}

const linkPinPrefix = "link_"

// linkPin is the pin of a TCX link: one per direction and device, so the
// links of the device we move to and of the one we leave can coexist.
func (d *Dataplane) linkPin(dir, dev string) string {
	return filepath.Join(d.cfg.PinRoot, linkPinPrefix+dir+"_"+dev)
}

func (d *Dataplane) progs() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{"egress": d.objs.BtmmEgress, "ingress": d.objs.BtmmIngress}
}

// attachTo attaches both programs to dev; it runs inside the namespace. It
// tries TCX (a real attach is the probe) and falls back to clsact when the
// kernel has no TCX.
func (d *Dataplane) attachTo(dev netlink.Link) (attachment, error) {
	a := attachment{dev: dev}
	if !d.cfg.ForceClsact {
		tcx, err := d.attachTCX(dev)
		if err == nil {
			a.tcx = tcx
			// A previous run on an older path: drop its filters.
			d.delFilters(dev)
			return a, nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return attachment{}, err
		}
		d.log.Info("no TCX on this kernel; attaching with clsact", "device", dev.Attrs().Name, "err", err)
	}
	for dir := range d.progs() {
		d.removeLinkPin(d.linkPin(dir, dev.Attrs().Name))
	}
	if err := d.attachClsact(dev); err != nil {
		return attachment{}, err
	}
	a.clsact = true
	return a, nil
}

func (d *Dataplane) attachTCX(dev netlink.Link) (map[string]link.Link, error) {
	links := map[string]link.Link{}
	closeAll := func() {
		for dir, l := range links {
			l.Unpin()
			l.Close()
			os.Remove(d.linkPin(dir, dev.Attrs().Name))
		}
	}
	types := map[string]ebpf.AttachType{"egress": ebpf.AttachTCXEgress, "ingress": ebpf.AttachTCXIngress}
	for dir, prog := range d.progs() {
		path := d.linkPin(dir, dev.Attrs().Name)
		if l, err := link.LoadPinnedLink(path, nil); err == nil {
			// Restart: swap the program under the existing link, no gap
			// (if the link is still attached to this device).
			if tcxIfindex(l) == dev.Attrs().Index {
				if err := l.Update(prog); err == nil {
					links[dir] = l
					continue
				}
			}
			l.Unpin()
			l.Close()
		}
		os.Remove(path)
		l, err := link.AttachTCX(link.TCXOptions{Interface: dev.Attrs().Index, Program: prog, Attach: types[dir]})
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("ebpf: attach tcx %s on %s: %w", dir, dev.Attrs().Name, err)
		}
		if err := l.Pin(path); err != nil {
			l.Close()
			closeAll()
			return nil, fmt.Errorf("ebpf: pin tcx link %s: %w", dir, err)
		}
		links[dir] = l
	}
	return links, nil
}

// tcxIfindex is the device a TCX link is attached to; 0 once someone
// detached it (`bpftool link detach`) or its device went away.
func tcxIfindex(l link.Link) int {
	info, err := l.Info()
	if err != nil {
		return 0
	}
	if t := info.TCX(); t != nil {
		return int(t.Ifindex)
	}
	return 0
}

func (d *Dataplane) removeLinkPin(path string) {
	if l, err := link.LoadPinnedLink(path, nil); err == nil {
		l.Unpin()
		l.Close()
	}
	os.Remove(path)
}

// removeStaleLinkPins detaches TCX links pinned by an earlier run for
// devices other than keep (the agent crashed after the host moved).
func (d *Dataplane) removeStaleLinkPins(keep string) {
	ents, err := os.ReadDir(d.cfg.PinRoot)
	if err != nil {
		return
	}
	for _, e := range ents {
		name := e.Name()
		if !strings.HasPrefix(name, linkPinPrefix) {
			continue
		}
		if name == linkPinPrefix+"egress_"+keep || name == linkPinPrefix+"ingress_"+keep {
			continue
		}
		d.log.Info("detaching programs left on another device by an earlier run", "pin", name)
		d.removeLinkPin(filepath.Join(d.cfg.PinRoot, name))
	}
}

func (d *Dataplane) filter(dev netlink.Link, dir string) *netlink.BpfFilter {
	parent := uint32(netlink.HANDLE_MIN_EGRESS)
	if dir == "ingress" {
		parent = netlink.HANDLE_MIN_INGRESS
	}
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: dev.Attrs().Index, Parent: parent, Handle: filterHandle,
			Protocol: unix.ETH_P_ALL, Priority: filterPrio},
		Name: "btmm_" + dir, DirectAction: true,
	}
	if p := d.progs()[dir]; p != nil {
		f.Fd = p.FD()
	}
	return f
}

func clsactQdisc(dev netlink.Link) *netlink.GenericQdisc {
	return &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: dev.Attrs().Index,
		Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
}

func (d *Dataplane) attachClsact(dev netlink.Link) error {
	if err := d.nl.QdiscAdd(clsactQdisc(dev)); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("ebpf: clsact qdisc on %s: %w", dev.Attrs().Name, err)
	}
	for _, dir := range []string{"egress", "ingress"} {
		// Replace keeps handle and priority: a restart swaps the program in place.
		if err := d.nl.FilterReplace(d.filter(dev, dir)); err != nil {
			return fmt.Errorf("ebpf: cls_bpf filter %s on %s: %w", dir, dev.Attrs().Name, err)
		}
	}
	return nil
}

// ourFilter: a direct-action cls_bpf filter with our priority, handle and name.
func ourFilter(f netlink.Filter) bool {
	b, ok := f.(*netlink.BpfFilter)
	return ok && b.Priority == filterPrio && b.Handle == filterHandle && strings.HasPrefix(b.Name, "btmm_")
}

// clsactIntact reports whether both our filters are on dev.
func (d *Dataplane) clsactIntact(dev netlink.Link) bool {
	for _, parent := range []uint32{netlink.HANDLE_MIN_EGRESS, netlink.HANDLE_MIN_INGRESS} {
		fs, err := nldump.Retry(func() ([]netlink.Filter, error) { return d.nl.FilterList(dev, parent) })
		if err != nil || !slices.ContainsFunc(fs, ourFilter) {
			return false
		}
	}
	return true
}

// delFilters removes our clsact filters and the qdisc once nothing else uses it.
func (d *Dataplane) delFilters(dev netlink.Link) error {
	var errs []error
	for _, dir := range []string{"egress", "ingress"} {
		err := d.nl.FilterDel(d.filter(dev, dir))
		if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete filter %s on %s: %w", dir, dev.Attrs().Name, err))
		}
	}
	empty := true
	for _, parent := range []uint32{netlink.HANDLE_MIN_EGRESS, netlink.HANDLE_MIN_INGRESS} {
		fs, err := nldump.Retry(func() ([]netlink.Filter, error) { return d.nl.FilterList(dev, parent) })
		if err != nil || len(fs) > 0 {
			empty = false
		}
	}
	if empty {
		d.nl.QdiscDel(clsactQdisc(dev)) // absent is fine
	}
	return errors.Join(errs...)
}

// removeStaleFilters deletes our clsact filters from every device but keep
// (an earlier run's, left when the agent died after the host moved).
func (d *Dataplane) removeStaleFilters(keep int) {
	links, err := nldump.Retry(d.nl.LinkList)
	if err != nil {
		return
	}
	for _, l := range links {
		if l.Attrs().Index == keep {
			continue
		}
		found := false
		for _, parent := range []uint32{netlink.HANDLE_MIN_EGRESS, netlink.HANDLE_MIN_INGRESS} {
			if fs, err := nldump.Retry(func() ([]netlink.Filter, error) { return d.nl.FilterList(l, parent) }); err == nil && slices.ContainsFunc(fs, ourFilter) {
				found = true
			}
		}
		if found {
			d.log.Info("removing filters left on another device by an earlier run", "device", l.Attrs().Name)
			d.delFilters(l)
		}
	}
}

// detach undoes a (on a device that may be gone already).
func (d *Dataplane) detach(a attachment) error {
	if a.dev == nil {
		return nil
	}
	if a.clsact {
		return d.delFilters(a.dev)
	}
	for dir, l := range a.tcx {
		l.Unpin()
		l.Close()
		os.Remove(d.linkPin(dir, a.name()))
	}
	return nil
}

// intact reports whether the programs are still attached as a says (for
// the repair loop: the kernel sends no notification when a TCX link is
// detached).
func (d *Dataplane) intact(a attachment) bool {
	switch {
	case a.dev == nil:
		return true
	case a.clsact:
		return d.clsactIntact(a.dev)
	}
	for _, l := range a.tcx {
		if tcxIfindex(l) != a.index() {
			return false
		}
	}
	return len(a.tcx) == 2
}
