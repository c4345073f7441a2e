package ebpf

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/identity"
	"github.com/btmm/btmm/controlplane/nldump"
	"github.com/btmm/btmm/controlplane/nsthread"
	"github.com/btmm/btmm/controlplane/repair"
	"github.com/btmm/btmm/xfrm"
)

// DefaultPinRoot is where programs, maps and links are pinned.
const DefaultPinRoot = "/sys/fs/bpf/btmm"

// Tags on the kernel objects this dataplane owns; cleanup goes by them.
const (
	routeProtocol = 98      // rtm_protocol of our /128 ULA routes
	reqid         = 0xb7e0f // reqid of our XFRM states and policies
	filterPrio    = 0xb7e   // clsact filter priority (6.1 path)
	filterHandle  = 1
	outerOverhead = 20 + 8 // IPv4 + UDP
)

// Program modes (enum mode in bpf/btmm.c).
const (
	modeOff       = 0
	modeSecure    = 1
	modeCleartext = 2
)

// DropReason indexes the drops map (enum drop_reason in bpf/btmm.c).
type DropReason uint32

// Why the programs drop packets.
const (
	DropUnknownPeer DropReason = iota
	DropMalformed
	DropFragment
	DropOversize
	DropNotESP
	DropSpoofed
	DropNoRoute
	DropAdjustFailed
	numDropReasons
)

var dropNames = [...]string{"unknown-peer", "malformed", "fragment", "oversize", "not-esp", "spoofed", "no-route", "adjust-failed"}

func (r DropReason) String() string {
	if r < numDropReasons {
		return dropNames[r]
	}
	return fmt.Sprintf("drop-reason-%d", uint32(r))
}

// Config configures a Dataplane.
type Config struct {
	// Device is the interface carrying the tunnel traffic; the programs
	// attach to it and the peers' ULA routes point at it. A desired
	// state's Local.Device overrides it. Both empty means the IPv4 default
	// route's device, looked up again at every Set: when the host's
	// default route moves to another device, the programs, routes and
	// neighbour entries follow.
	Device string
	// NetNS is the path of the network namespace to work in (for example
	// /run/netns/NAME); empty means the caller's.
	NetNS string
	// PinRoot is the bpffs directory for pins (default DefaultPinRoot).
	// One directory per Dataplane.
	PinRoot string
	// Cleartext carries IPv6 in UDP without ESP. INSECURE: only for kernels
	// without ESP or traffic that is already encrypted.
	Cleartext bool
	// ForceClsact attaches with clsact + cls_bpf even where TCX works
	// (exercises the pre-6.6 path on a new kernel).
	ForceClsact bool
	// Repair tunes the loop that puts back our kernel objects (programs,
	// routes, neighbours, the ULA, XFRM states and policies) when someone
	// else removes or changes them (docs/ebpf.md).
	Repair repair.Config
	Logger *slog.Logger
	Now    func() time.Time
}

// Dataplane implements controlplane.Dataplane with TC BPF programs and XFRM.
type Dataplane struct {
	cfg  Config
	log  *slog.Logger
	now  func() time.Time
	ns   netns.NsHandle
	nl   *netlink.Handle
	objs btmmObjects

	mu sync.Mutex
	// attach is where the programs are now (its zero value: nowhere yet,
	// for a host that started without a default route).
	attach attachment
	closed bool
	names  map[netip.Addr]string
	moved  map[netip.Addr]time.Time
	// loULA is the local ULA this dataplane put on lo (invalid if it was
	// there already: then it is not ours to remove).
	loULA netip.Addr
	// lo is the ingress program on lo while a peer's outer address is a
	// relay-tcp bridge socket (loopback_linux.go).
	lo loAttachment
	// desired is the last valid desired state, which a repair re-applies.
	desired *controlplane.State
	guard   xfrm.SeqGuard
	// tun makes the tunnel devices and the GUE listener of peers on
	// tunnel paths (secure mode only; package xfrm's code, our tag).
	tun *xfrm.Tunnels

	repair   *repair.Loop
	stopRep  func()     // stops the repair loop and watchers
	wmu      sync.Mutex // guards watch, read by the watchers
	watching watchInfo
}

// watchInfo is what the watchers need to tell our objects' notifications.
type watchInfo struct {
	ula     netip.Addr
	ifindex int          // the device the programs are on
	lo      int          // lo's ifindex while the ingress program is on it (relay-tcp)
	tunnels map[int]bool // ifindexes of our tunnel devices (secure mode)
}

var _ controlplane.Dataplane = (*Dataplane)(nil)

// New loads the programs (reusing compatible pinned maps, replacing
// incompatible ones), attaches them to cfg.Device (or the default route's
// device; with neither, the first Set that finds one attaches them) and pins
// everything under cfg.PinRoot. It changes no routes, SAs or peers: Set does.
func New(cfg Config) (*Dataplane, error) {
	if cfg.PinRoot == "" {
		cfg.PinRoot = DefaultPinRoot
	}
	d := &Dataplane{cfg: cfg, log: cfg.Logger, now: cfg.Now, names: map[netip.Addr]string{}, moved: map[netip.Addr]time.Time{}}
	if d.log == nil {
		d.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if d.now == nil {
		d.now = time.Now
	}
	var err error
	if cfg.NetNS == "" {
		d.ns, err = netns.Get()
	} else {
		d.ns, err = netns.GetFromPath(cfg.NetNS)
	}
	if err != nil {
		return nil, fmt.Errorf("ebpf: open netns %q: %w", cfg.NetNS, err)
	}
	d.nl, err = netlink.NewHandleAt(d.ns)
	if err != nil {
		d.ns.Close()
		return nil, fmt.Errorf("ebpf: netlink handle: %w", err)
	}
	if !cfg.Cleartext {
		// Devices a crashed run left are adopted: the first Set keeps the
		// desired ones and deletes the others.
		if d.tun, err = xfrm.OpenTunnels(d.ns, reqid, d.log); err != nil {
			d.nl.Close()
			d.ns.Close()
			return nil, fmt.Errorf("ebpf: %w", err)
		}
	}
	if err := d.start(); err != nil {
		if d.tun != nil {
			d.tun.Close()
		}
		d.nl.Close()
		d.ns.Close()
		return nil, err
	}
	if err := d.startRepair(); err != nil {
		d.Close()
		return nil, fmt.Errorf("ebpf: %w", err)
	}
	return d, nil
}

func (d *Dataplane) start() error {
	dev, err := d.wantDevice("")
	if err != nil && d.cfg.Device != "" {
		return fmt.Errorf("ebpf: %w", err)
	}
	if err := checkBPFFS(d.cfg.PinRoot); err != nil {
		return err
	}
	if err := os.MkdirAll(d.cfg.PinRoot, 0o700); err != nil {
		return fmt.Errorf("ebpf: pin root: %w", err)
	}
	if err := d.load(); err != nil {
		return err
	}
	if dev == nil {
		// A host that starts offline: Set attaches once there is a route.
		d.log.Warn("ebpf dataplane loaded but not attached yet", "err", err, "pins", d.cfg.PinRoot, "mode", d.modeName())
		return nil
	}
	if err := d.inNS(func() (err error) { d.attach, err = d.attachTo(dev); return err }); err != nil {
		d.objs.Close()
		return err
	}
	d.inNS(func() error {
		d.removeStaleLinkPins(dev.Attrs().Name)
		d.removeStaleFilters(dev.Attrs().Index)
		return nil
	})
	d.log.Info("ebpf dataplane attached", "device", dev.Attrs().Name, "attach", d.attach.kind(), "pins", d.cfg.PinRoot,
		"mode", d.modeName())
	return nil
}

// wantDevice is the device the programs belong on: local (a desired
// state's Local.Device), else Config.Device, else the IPv4 default route's
// (the one with the lowest metric).
func (d *Dataplane) wantDevice(local string) (netlink.Link, error) {
	name := local
	if name == "" {
		name = d.cfg.Device
	}
	if name == "" {
		rs, err := nldump.Retry(func() ([]netlink.Route, error) {
			return d.nl.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		})
		if err != nil {
			return nil, fmt.Errorf("find default route: %w", err)
		}
		best := -1
		for i, r := range rs {
			if (r.Dst == nil || r.Dst.IP.IsUnspecified() && isZeroMask(r.Dst.Mask)) && r.LinkIndex > 0 && (best < 0 || r.Priority < rs[best].Priority) {
				best = i
			}
		}
		if best < 0 {
			return nil, errors.New("no device named and no IPv4 default route")
		}
		l, err := d.nl.LinkByIndex(rs[best].LinkIndex)
		if err != nil {
			return nil, fmt.Errorf("default route's device: %w", err)
		}
		return l, nil
	}
	l, err := d.nl.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("device %q: %w", name, err)
	}
	return l, nil
}

func isZeroMask(m net.IPMask) bool {
	ones, _ := m.Size()
	return ones == 0
}

// load loads the collection with maps pinned by name under PinRoot. A pinned
// map from an incompatible build is unpinned and replaced (its peers are
// then re-added by the next Set).
func (d *Dataplane) load() error {
	spec, err := loadBtmm()
	if err != nil {
		return fmt.Errorf("ebpf: load spec: %w", err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinByName
	}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: d.cfg.PinRoot}}
	err = spec.LoadAndAssign(&d.objs, opts)
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		d.log.Warn("pinned maps incompatible with this build; replacing them", "pins", d.cfg.PinRoot, "err", err)
		for name := range spec.Maps {
			os.Remove(filepath.Join(d.cfg.PinRoot, name))
		}
		err = spec.LoadAndAssign(&d.objs, opts)
	}
	if err != nil {
		return fmt.Errorf("ebpf: load programs and maps: %w", err)
	}
	for name, p := range map[string]*ebpf.Program{"prog_egress": d.objs.BtmmEgress, "prog_ingress": d.objs.BtmmIngress} {
		path := filepath.Join(d.cfg.PinRoot, name)
		os.Remove(path) // a previous run's program; links keep what they run alive
		if err := p.Pin(path); err != nil {
			d.objs.Close()
			return fmt.Errorf("ebpf: pin %s: %w", name, err)
		}
	}
	return nil
}

func (d *Dataplane) modeName() string {
	if d.cfg.Cleartext {
		return "CLEARTEXT (IPv6 in UDP, NO ENCRYPTION)"
	}
	return "secure (XFRM ESP between ULAs, outer IPv4/UDP swapped in TC)"
}

// Status is a one-line summary for btmmctl; in cleartext mode it says so loudly.
func (d *Dataplane) Status() string {
	d.mu.Lock()
	on := "no device yet (no default route)"
	if a := d.attach; a.dev != nil {
		on = a.name() + " via " + a.kind()
	}
	d.mu.Unlock()
	s := fmt.Sprintf("ebpf dataplane on %s, pinned at %s, mode %s", on, d.cfg.PinRoot, d.modeName())
	if d.cfg.Cleartext {
		s = "WARNING: TRAFFIC IS NOT ENCRYPTED. " + s
	}
	return s
}

// inNS runs f inside the dataplane's namespace (attach calls resolve
// interface indexes in the caller's namespace).
func (d *Dataplane) inNS(f func() error) error { return nsthread.In(d.ns, f) }

// peerEntry is what the maps say about one peer.
type peerEntry struct {
	outer netip.AddrPort
	local netip.Addr
}

func ulaKey(a netip.Addr) btmmUla { return btmmUla{Addr: a.As16()} }

func outerKey(ap netip.AddrPort) btmmOuter { return btmmOuter{Addr: ap.Addr().As4(), Port: ap.Port()} }

func (d *Dataplane) readPeers() (map[netip.Addr]peerEntry, error) {
	out := map[netip.Addr]peerEntry{}
	var k btmmUla
	var v btmmPeer
	it := d.objs.PeerByUla.Iterate()
	for it.Next(&k, &v) {
		out[netip.AddrFrom16(k.Addr)] = peerEntry{
			outer: netip.AddrPortFrom(netip.AddrFrom4(v.OuterAddr), v.OuterPort),
			local: netip.AddrFrom4(v.LocalAddr),
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read peer_by_ula: %w", err)
	}
	return out, nil
}

// CheckPaths refuses what this dataplane cannot carry. In secure mode a
// peer may have tunnel devices (ipv6, sit, fou paths, docs/tunnels.md):
// its route goes into the device, which the programs never see, and ESP
// in transport mode between the ULAs protects it. Cleartext mode has no
// ESP, and a tunnel never carries cleartext ULA traffic: every peer goes by
// UDP encapsulation (the program) there.
func CheckPaths(s *controlplane.State, cleartext bool) error {
	if !cleartext {
		return nil
	}
	var errs []error
	for _, p := range s.Peers {
		if p.Via != controlplane.PathESPInUDP || len(p.Tunnels) > 0 {
			errs = append(errs, fmt.Errorf("peer %q: %v path and tunnels %v: the ebpf dataplane in cleartext mode carries only IPv6 in UDP over IPv4 (a tunnel never carries cleartext ULA traffic: tunnel paths need ESP, the ebpf dataplane in secure mode or the xfrm one)", p.Name, p.Via, p.Tunnels))
		}
	}
	return errors.Join(errs...)
}

// Set implements controlplane.Dataplane.
func (d *Dataplane) Set(ctx context.Context, desired *controlplane.State) ([]controlplane.Change, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("ebpf: set: %w", err)
	}
	if err := desired.Validate(); err != nil {
		return nil, fmt.Errorf("ebpf: set: %w", err)
	}
	if err := CheckPaths(desired, d.cfg.Cleartext); err != nil {
		return nil, fmt.Errorf("ebpf: set: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, ErrClosed
	}
	d.desired = xfrm.CloneState(desired)
	return d.setLocked(desired)
}

func (d *Dataplane) setLocked(desired *controlplane.State) ([]controlplane.Change, error) {
	// Resolve our IPv4 source towards each peer. A peer without a route
	// keeps whatever the maps have for it (it is not deleted) and its error
	// is reported with the others.
	want := map[netip.Addr]peerEntry{}
	keep := map[netip.Addr]bool{}
	var srcErrs []error
	for _, p := range desired.Peers {
		if !p.Outer.IsValid() {
			// Reached only by a tunnel device (an IPv6-only peer): no map
			// entry, an old one goes.
			continue
		}
		keep[p.ULA] = true
		src := desired.Local.Outer
		if !src.IsValid() || src.IsUnspecified() || loopbackOuter(p.Outer) {
			var err error
			if src, err = d.sourceFor(p.Outer.Addr()); err != nil {
				srcErrs = append(srcErrs, fmt.Errorf("peer %q: %w", p.Name, err))
				continue
			}
		}
		want[p.ULA] = peerEntry{outer: p.Outer, local: src}
	}
	var changes []controlplane.Change
	errs := srcErrs
	note := func(op, obj, what string) {
		changes = append(changes, controlplane.Change{Op: op, Object: obj, What: what})
	}

	// 0. The programs on the device that carries the traffic now: attach
	// to a new one before anything points at it; the old attachment goes
	// at the end, once the routes have moved.
	left, c, err := d.setDevice(desired.Local.Device)
	changes = append(changes, c...)
	if err != nil {
		errs = append(errs, err)
	}
	if d.attach.dev == nil {
		return changes, fmt.Errorf("ebpf: set: programs not attached: %w", errors.Join(errs...))
	}

	// 1. Program configuration (one array entry).
	mode := uint8(modeSecure)
	if d.cfg.Cleartext {
		mode = modeCleartext
	}
	cfgWant := btmmBtmmConfig{LocalUla: desired.Local.ULA.As16(), Port: desired.Local.Port, Mode: mode}
	var cfgHave btmmBtmmConfig
	if err := d.objs.Config.Lookup(uint32(0), &cfgHave); err != nil {
		return nil, fmt.Errorf("ebpf: set: read config: %w", err)
	}
	if cfgHave != cfgWant {
		if err := d.objs.Config.Put(uint32(0), cfgWant); err != nil {
			return nil, fmt.Errorf("ebpf: set: write config: %w", err)
		}
		note("update", "map", fmt.Sprintf("config local %v port %d mode %s", desired.Local.ULA, desired.Local.Port, d.modeName()))
	}

	have, err := d.readPeers()
	if err != nil {
		return changes, fmt.Errorf("ebpf: set: %w", err)
	}

	// 2. XFRM first (secure mode): SAs and policies before a packet can be sent.
	if !d.cfg.Cleartext {
		c, err := d.setXfrm(desired)
		changes = append(changes, c...)
		if err != nil {
			errs = append(errs, err)
		}
	}

	// 3. Maps: counters, then reverse lookup, then forward (adds before deletes).
	for _, p := range desired.Peers {
		d.names[p.ULA] = p.Name
		w, resolved := want[p.ULA]
		if !resolved {
			continue
		}
		h, ok := have[p.ULA]
		if ok && h == w {
			continue
		}
		k := ulaKey(p.ULA)
		if !ok {
			zero := make([]btmmCounters, ebpf.MustPossibleCPU())
			if err := d.objs.PeerStats.Update(k, zero, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
				errs = append(errs, fmt.Errorf("peer %q: counters: %w", p.Name, err))
				continue
			}
		}
		if err := d.objs.PeerByOuter.Put(outerKey(w.outer), k); err != nil {
			errs = append(errs, fmt.Errorf("peer %q: peer_by_outer: %w", p.Name, err))
			continue
		}
		v := btmmPeer{OuterAddr: w.outer.Addr().As4(), LocalAddr: w.local.As4(), OuterPort: w.outer.Port()}
		if err := d.objs.PeerByUla.Put(k, v); err != nil {
			errs = append(errs, fmt.Errorf("peer %q: peer_by_ula: %w", p.Name, err))
			continue
		}
		if ok {
			if h.outer != w.outer {
				d.deleteOuter(h.outer, p.ULA)
			}
			if h.outer != w.outer {
				d.moved[p.ULA] = d.now()
				note("move", "map", fmt.Sprintf("peer %s %v outer %v -> %v (local %v)", p.Name, p.ULA, h.outer, w.outer, w.local))
			} else {
				note("update", "map", fmt.Sprintf("peer %s %v local source %v -> %v", p.Name, p.ULA, h.local, w.local))
			}
		} else {
			note("add", "map", fmt.Sprintf("peer %s %v outer %v (local %v)", p.Name, p.ULA, w.outer, w.local))
		}
	}

	// 3b. The ingress program on lo while a peer is reached through the
	// relay-tcp bridge (a loopback outer address).
	bridged := false
	for _, w := range want {
		bridged = bridged || loopbackOuter(w.outer)
	}
	if c, err := d.setLoopback(bridged); err != nil {
		errs = append(errs, err)
	} else {
		changes = append(changes, c...)
	}

	// 3c. Tunnel devices (secure mode) before a route points into them.
	var viaDev map[netip.Addr]int
	var tunDevs map[int]bool
	if d.tun != nil {
		var c []controlplane.Change
		c, viaDev, tunDevs, err = d.setTunnels(desired)
		changes = append(changes, c...)
		if err != nil {
			errs = append(errs, err)
		}
	}

	// 4. Routes and neighbours to the peers' ULAs, only for peers the maps
	// know (a route without a map entry would bypass the tunnel) or whose
	// path is a tunnel device.
	routed := &controlplane.State{Local: desired.Local}
	for _, p := range desired.Peers {
		if _, ok := want[p.ULA]; ok {
			routed.Peers = append(routed.Peers, p)
		} else if _, ok := have[p.ULA]; ok {
			routed.Peers = append(routed.Peers, p)
		} else if p.Via != controlplane.PathESPInUDP {
			routed.Peers = append(routed.Peers, p)
		}
	}
	// The routes carry our ULA as their source, so it must be assigned.
	if c, err := d.setLocalULA(desired.Local.ULA); err != nil {
		errs = append(errs, err)
	} else {
		changes = append(changes, c...)
	}
	c, err = d.setRoutes(routed, viaDev)
	changes = append(changes, c...)
	if err != nil {
		errs = append(errs, err)
	}

	d.wmu.Lock()
	d.watching = watchInfo{ula: desired.Local.ULA, ifindex: d.attach.index(), lo: d.lo.index(), tunnels: tunDevs}
	d.wmu.Unlock()

	// 5. Deletes: the device we left, peers no longer desired.
	if left.dev != nil {
		c, err := d.leave(left)
		changes = append(changes, c...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	if d.tun != nil {
		c, err := d.oldTunnels(desired)
		changes = append(changes, c...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	for ula, h := range have {
		if keep[ula] {
			continue
		}
		k := ulaKey(ula)
		if err := d.objs.PeerByUla.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("delete peer %v: %w", ula, err))
			continue
		}
		d.deleteOuter(h.outer, ula)
		d.objs.PeerStats.Delete(k)
		note("delete", "map", fmt.Sprintf("peer %s %v outer %v", d.names[ula], ula, h.outer))
		delete(d.names, ula)
		delete(d.moved, ula)
	}
	if err := errors.Join(errs...); err != nil {
		return changes, fmt.Errorf("ebpf: set: %w", err)
	}
	return changes, nil
}

// deleteOuter removes the reverse entry for outer if it still names ula.
func (d *Dataplane) deleteOuter(outer netip.AddrPort, ula netip.Addr) {
	k := outerKey(outer)
	var v btmmUla
	if d.objs.PeerByOuter.Lookup(k, &v) == nil && netip.AddrFrom16(v.Addr) == ula {
		d.objs.PeerByOuter.Delete(k)
	}
}

// sourceFor asks the kernel which IPv4 source it would use towards dst.
func (d *Dataplane) sourceFor(dst netip.Addr) (netip.Addr, error) {
	rs, err := d.nl.RouteGet(dst.AsSlice())
	if err != nil {
		return netip.Addr{}, fmt.Errorf("route to outer %v: %w", dst, err)
	}
	for _, r := range rs {
		if a, ok := netip.AddrFromSlice(r.Src); ok && a.Unmap().Is4() {
			return a.Unmap(), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("route to outer %v has no IPv4 source", dst)
}

func (d *Dataplane) routeMTU(dev netlink.Link) int {
	if d.cfg.Cleartext {
		return dev.Attrs().MTU - outerOverhead - 40
	}
	// XFRM sizes ESP for an outer IPv6 header (40 bytes) that the program
	// replaces with IPv4+UDP (28): the device MTU is the outer budget.
	return dev.Attrs().MTU
}

// setDevice puts the programs on the device that carries the traffic now
// (see wantDevice), or back on it when someone detached them. It returns
// the attachment it moved away from, for leave once the routes point at
// the new device.
func (d *Dataplane) setDevice(local string) (attachment, []controlplane.Change, error) {
	cur := d.attach
	dev, err := d.wantDevice(local)
	if err != nil {
		if cur.dev != nil && local == "" && d.cfg.Device == "" {
			// No default route just now (offline): stay where we are;
			// routes and maps keep what they have.
			d.log.Debug("no default route; programs stay", "device", cur.name(), "err", err)
			return attachment{}, nil, nil
		}
		return attachment{}, nil, err
	}
	name := dev.Attrs().Name
	if cur.name() == name && cur.index() == dev.Attrs().Index && d.intact(cur) {
		d.attach.dev = dev // fresh MTU and hardware address
		return attachment{}, nil, nil
	}
	var left attachment
	what := fmt.Sprintf("programs on %s", name)
	op := "add"
	switch {
	case cur.dev == nil:
	case cur.name() == name:
		// Someone detached a program, deleted our filter or qdisc, or
		// the device was made again: drop our handles and attach anew
		// (attachTCX replaces links that no longer hang on the device).
		for _, l := range cur.tcx {
			l.Close()
		}
		what += " (restored)"
	default:
		left = cur
		op, what = "move", fmt.Sprintf("programs %s -> %s", cur.name(), name)
	}
	var a attachment
	if err := d.inNS(func() (err error) { a, err = d.attachTo(dev); return err }); err != nil {
		if left.dev == nil && cur.dev != nil {
			// Handles closed above: the next Set (or repair) tries again.
			d.attach = attachment{dev: cur.dev, clsact: cur.clsact}
		}
		return attachment{}, nil, err
	}
	d.attach = a
	d.log.Info("ebpf programs attached", "device", name, "attach", a.kind(), "from", cur.name())
	return left, []controlplane.Change{{Op: op, Object: "attach", What: what + " via " + a.kind()}}, nil
}

// leave detaches the programs from the device the traffic moved away from
// and removes our neighbour entries there (the routes moved already).
func (d *Dataplane) leave(left attachment) ([]controlplane.Change, error) {
	var errs []error
	var changes []controlplane.Change
	if left.index() == d.attach.index() {
		// The same device under a new name: the new attachment replaced
		// the filters; only the old TCX links go.
		left.clsact = false
	}
	if err := d.inNS(func() error { return d.detach(left) }); err != nil {
		errs = append(errs, err)
	} else {
		changes = append(changes, controlplane.Change{Op: "delete", Object: "attach", What: "programs on " + left.name()})
	}
	if left.index() != d.attach.index() {
		neighs, err := nldump.Retry(func() ([]netlink.Neigh, error) { return d.nl.NeighList(left.index(), netlink.FAMILY_V6) })
		if err == nil {
			for _, n := range neighs {
				if !d.ourNeigh(n, left.dev) {
					continue
				}
				if err := d.nl.NeighDel(&n); err != nil && !errors.Is(err, unix.ENOENT) {
					errs = append(errs, fmt.Errorf("delete neighbour %v on %s: %w", n.IP, left.name(), err))
					continue
				}
				changes = append(changes, controlplane.Change{Op: "delete", Object: "neigh", What: fmt.Sprintf("%v dev %s", n.IP, left.name())})
			}
		}
	}
	return changes, errors.Join(errs...)
}

// ourNeigh: a permanent entry for a ULA whose link-layer address is the
// device's own, as setRoutes makes them.
func (d *Dataplane) ourNeigh(n netlink.Neigh, dev netlink.Link) bool {
	a, ok := netip.AddrFromSlice(n.IP)
	return ok && n.State&netlink.NUD_PERMANENT != 0 && identity.IsULA(a) &&
		len(n.HardwareAddr) > 0 && bytes.Equal(n.HardwareAddr, dev.Attrs().HardwareAddr)
}

// setRoutes makes a /128 route and a permanent neighbour entry for each
// peer on the device the programs are on, moving routes from any other
// device, and deletes our routes (and their neighbour entries) to peers no
// longer desired. A peer on a tunnel path (Via) is routed into its tunnel
// device instead, viaDev's ifindex (absent: the device could not be made
// just now, its route stays as it is).
func (d *Dataplane) setRoutes(desired *controlplane.State, viaDev map[netip.Addr]int) ([]controlplane.Change, error) {
	var changes []controlplane.Change
	var errs []error
	have := map[netip.Addr]netlink.Route{}
	rs, err := nldump.Retry(func() ([]netlink.Route, error) {
		return d.nl.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Protocol: routeProtocol, Table: unix.RT_TABLE_MAIN},
			netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	for _, r := range rs {
		if r.Dst == nil {
			continue
		}
		if a, ok := netip.AddrFromSlice(r.Dst.IP); ok {
			have[a] = r
		}
	}
	want := map[netip.Addr]bool{}
	dev := d.attach.dev
	if dev != nil && len(desired.Peers) > 0 {
		idx := dev.Attrs().Index
		neighs, err := nldump.Retry(func() ([]netlink.Neigh, error) { return d.nl.NeighList(idx, netlink.FAMILY_V6) })
		if err != nil {
			return nil, fmt.Errorf("list neighbours: %w", err)
		}
		hasNeigh := map[netip.Addr]bool{}
		for _, n := range neighs {
			if a, ok := netip.AddrFromSlice(n.IP); ok && n.State&netlink.NUD_PERMANENT != 0 {
				hasNeigh[a] = true
			}
		}
		mtu := d.routeMTU(dev)
		lladdr := dev.Attrs().HardwareAddr
		for _, p := range desired.Peers {
			want[p.ULA] = true
			if len(lladdr) > 0 && !hasNeigh[p.ULA] {
				// The program rewrites both MAC addresses; this entry only keeps
				// IPv6 neighbour discovery from holding the packet back.
				n := &netlink.Neigh{LinkIndex: idx, Family: netlink.FAMILY_V6, State: netlink.NUD_PERMANENT, IP: p.ULA.AsSlice(), HardwareAddr: lladdr}
				if err := d.nl.NeighSet(n); err != nil {
					errs = append(errs, fmt.Errorf("neighbour %v: %w", p.ULA, err))
				} else {
					changes = append(changes, controlplane.Change{Op: "add", Object: "neigh", What: fmt.Sprintf("%v dev %s permanent", p.ULA, dev.Attrs().Name)})
				}
			}
			r := &netlink.Route{
				LinkIndex: idx, Dst: &net.IPNet{IP: p.ULA.AsSlice(), Mask: net.CIDRMask(128, 128)},
				Src: desired.Local.ULA.AsSlice(), MTU: mtu, Protocol: routeProtocol, Table: unix.RT_TABLE_MAIN,
			}
			devName := dev.Attrs().Name
			if p.Via != controlplane.PathESPInUDP {
				// Into the tunnel device: the programs never see the
				// peer's packets, transport-mode ESP protects them.
				tidx, ok := viaDev[p.ULA]
				if !ok {
					continue
				}
				r.LinkIndex, r.MTU = tidx, xfrm.TransportMTU(dev.Attrs().MTU, p.Via, p.Out.Cipher)
				devName = controlplane.TunnelDevice(p.Via, p.ULA)
			}
			h, ok := have[p.ULA]
			if ok && h.LinkIndex == r.LinkIndex && h.MTU == r.MTU && h.Src.Equal(r.Src) {
				continue
			}
			if err := d.nl.RouteReplace(r); err != nil {
				errs = append(errs, fmt.Errorf("route %v: %w", p.ULA, err))
				continue
			}
			op := "add"
			if ok {
				op = "update"
			}
			changes = append(changes, controlplane.Change{Op: op, Object: "route", What: fmt.Sprintf("%v/128 dev %s src %v mtu %d", p.ULA, devName, desired.Local.ULA, r.MTU)})
		}
	}
	for a, r := range have {
		if want[a] {
			continue
		}
		if err := d.nl.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete route %v: %w", a, err))
			continue
		}
		devName := fmt.Sprintf("if%d", r.LinkIndex)
		if l, err := d.nl.LinkByIndex(r.LinkIndex); err == nil {
			devName = l.Attrs().Name
		}
		// Our neighbour entry is on the route's device, or on the
		// programs' device for a peer routed into a tunnel device.
		for _, i := range slices.Compact([]int{r.LinkIndex, d.attach.index()}) {
			l, err := d.nl.LinkByIndex(i)
			if i == 0 || err != nil {
				continue
			}
			if ns, err := nldump.Retry(func() ([]netlink.Neigh, error) { return d.nl.NeighList(i, netlink.FAMILY_V6) }); err == nil {
				for _, x := range ns {
					if x.IP.Equal(a.AsSlice()) && d.ourNeigh(x, l) {
						if d.nl.NeighDel(&x) == nil {
							changes = append(changes, controlplane.Change{Op: "delete", Object: "neigh", What: fmt.Sprintf("%v dev %s", a, l.Attrs().Name)})
						}
					}
				}
			}
		}
		changes = append(changes, controlplane.Change{Op: "delete", Object: "route", What: fmt.Sprintf("%v/128 dev %s", a, devName)})
	}
	return changes, errors.Join(errs...)
}

// Stats implements controlplane.Dataplane: per-peer counters summed over
// CPUs, plus in secure mode what went through the peer's tunnel devices
// (its transport-mode SAs' counters: the programs never see that traffic).
func (d *Dataplane) Stats(ctx context.Context) ([]controlplane.PeerStats, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, ErrClosed
	}
	out, err := d.programStats()
	if err != nil || d.cfg.Cleartext || d.desired == nil {
		return out, err
	}
	peers := map[netip.Addr]bool{}
	for _, p := range d.desired.Peers {
		peers[p.ULA] = len(p.Tunnels) > 0
	}
	ss, err := nldump.Retry(func() ([]netlink.XfrmState, error) { return d.nl.XfrmStateList(netlink.FAMILY_V6) })
	if err != nil {
		return nil, fmt.Errorf("ebpf: stats: %w", err)
	}
	byULA := map[netip.Addr]int{}
	for i, s := range out {
		byULA[s.ULA] = i
	}
	local := d.desired.Local.ULA
	for _, x := range ss {
		if x.Reqid != reqid || x.Mode != netlink.XFRM_MODE_TRANSPORT {
			continue
		}
		src, _ := netip.AddrFromSlice(x.Src)
		dst, _ := netip.AddrFromSlice(x.Dst)
		peer, tx := dst.Unmap(), true
		if dst.Unmap() == local {
			peer, tx = src.Unmap(), false
		}
		if !peers[peer] {
			continue
		}
		i, ok := byULA[peer]
		if !ok {
			// No map entry (an IPv6-only peer): device traffic only.
			out = append(out, controlplane.PeerStats{ULA: peer})
			i = len(out) - 1
			byULA[peer] = i
		}
		if tx {
			out[i].TxPackets += x.Statistics.Packets
			out[i].TxBytes += x.Statistics.Bytes
		} else {
			out[i].RxPackets += x.Statistics.Packets
			out[i].RxBytes += x.Statistics.Bytes
		}
		out[i].Drops += uint64(x.Statistics.ReplayWindow) + uint64(x.Statistics.Replay) + uint64(x.Statistics.Failed)
	}
	slices.SortFunc(out, func(a, b controlplane.PeerStats) int { return a.ULA.Compare(b.ULA) })
	return out, nil
}

// programStats are the programs' per-peer counters (ESP-in-UDP or IPv6 in
// UDP), summed over CPUs.
func (d *Dataplane) programStats() ([]controlplane.PeerStats, error) {
	var out []controlplane.PeerStats
	var k btmmUla
	var per []btmmCounters
	it := d.objs.PeerStats.Iterate()
	for it.Next(&k, &per) {
		ula := netip.AddrFrom16(k.Addr)
		s := controlplane.PeerStats{ULA: ula, LastOuterChange: d.moved[ula]}
		for _, c := range per {
			s.TxPackets += c.TxPackets
			s.TxBytes += c.TxBytes
			s.RxPackets += c.RxPackets
			s.RxBytes += c.RxBytes
			s.Drops += c.Drops
		}
		out = append(out, s)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("ebpf: stats: %w", err)
	}
	slices.SortFunc(out, func(a, b controlplane.PeerStats) int { return a.ULA.Compare(b.ULA) })
	return out, nil
}

// Drops returns the programs' drop counters by reason, summed over CPUs.
func (d *Dataplane) Drops() (map[DropReason]uint64, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, ErrClosed
	}
	return readDrops(d.objs.Drops)
}

func readDrops(m *ebpf.Map) (map[DropReason]uint64, error) {
	out := map[DropReason]uint64{}
	for r := DropReason(0); r < numDropReasons; r++ {
		var per []uint64
		if err := m.Lookup(uint32(r), &per); err != nil {
			return nil, fmt.Errorf("ebpf: drops[%s]: %w", r, err)
		}
		for _, n := range per {
			out[r] += n
		}
	}
	return out, nil
}

// Close detaches the programs and removes every route, neighbour entry,
// XFRM state and policy, and pin this dataplane made.
func (d *Dataplane) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	if d.stopRep != nil {
		// The loop's apply waits for d.mu: let it see closed and end.
		d.mu.Unlock()
		d.stopRep()
		d.mu.Lock()
	}
	var errs []error
	if _, err := d.setRoutes(&controlplane.State{}, nil); err != nil {
		errs = append(errs, err)
	}
	if !d.cfg.Cleartext {
		if _, err := d.setXfrm(&controlplane.State{}); err != nil {
			errs = append(errs, err)
		}
	}
	if _, err := d.setLocalULA(netip.Addr{}); err != nil {
		errs = append(errs, err)
	}
	if d.tun != nil {
		// Ours only: devices with our tag and name, our GUE listener.
		if err := d.tun.RemoveAll(); err != nil {
			errs = append(errs, err)
		}
		if err := d.tun.CloseFou(); err != nil {
			errs = append(errs, err)
		}
		d.tun.Close()
	}
	if err := d.inNS(func() error { return d.detach(d.attach) }); err != nil {
		errs = append(errs, err)
	}
	if err := d.inNS(d.detachLoopback); err != nil {
		errs = append(errs, err)
	}
	for _, m := range []*ebpf.Map{d.objs.Config, d.objs.Drops, d.objs.PeerByOuter, d.objs.PeerByUla, d.objs.PeerStats} {
		if err := m.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin map: %w", err))
		}
	}
	for _, p := range []*ebpf.Program{d.objs.BtmmEgress, d.objs.BtmmIngress} {
		if err := p.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin program: %w", err))
		}
	}
	d.objs.Close()
	if err := os.Remove(d.cfg.PinRoot); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove pin root: %w", err))
	}
	d.nl.Close()
	d.ns.Close()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("ebpf: close: %w", err)
	}
	return nil
}

// checkBPFFS refuses a pin root that is not on a bpffs (pins there fail
// with a confusing error, or land in a tmpfs and vanish).
func checkBPFFS(root string) error {
	dir := root
	for {
		if _, err := os.Stat(dir); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			break
		}
		dir = parent
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("ebpf: pin root %s: %w", root, err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("ebpf: pin root %s is not on a bpffs (%s is not; mount one: mount -t bpf bpf /sys/fs/bpf)", root, dir)
	}
	return nil
}

// Pinned lists what is pinned under root (for status and tests).
func Pinned(root string) ([]string, error) {
	ents, err := os.ReadDir(root)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names, nil
}

// ours reports whether a is a local ULA as the dataplanes add it (on lo,
// /128, nodad), which nobody else does with this boot's random ULA: one a
// btmmd that crashed left behind, adopted so that Close removes it.
func ours(a netlink.Addr, lo int) bool {
	ones, bits := a.Mask.Size()
	return a.LinkIndex == lo && ones == 128 && bits == 128 && a.Flags&unix.IFA_F_NODAD != 0
}

// setLocalULA makes ula (if valid) an address of lo, where the kernel finds
// it as the source of the routes to the peers, and removes the ULA this
// dataplane added before if it differs. An address that was already there
// is left alone, now and at Close.
func (d *Dataplane) setLocalULA(ula netip.Addr) ([]controlplane.Change, error) {
	var changes []controlplane.Change
	lo, err := d.nl.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("local ULA: %w", err)
	}
	if d.loULA.IsValid() && d.loULA != ula {
		a := &netlink.Addr{IPNet: &net.IPNet{IP: d.loULA.AsSlice(), Mask: net.CIDRMask(128, 128)}}
		if err := d.nl.AddrDel(lo, a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return nil, fmt.Errorf("remove local ULA %v: %w", d.loULA, err)
		}
		changes = append(changes, controlplane.Change{Op: "delete", Object: "address", What: fmt.Sprintf("%v/128 dev lo", d.loULA)})
		d.loULA = netip.Addr{}
	}
	if !ula.IsValid() {
		return changes, nil
	}
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return d.nl.AddrList(nil, netlink.FAMILY_V6) })
	if err != nil {
		return changes, fmt.Errorf("local ULA: %w", err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == ula {
			if ours(a, lo.Attrs().Index) {
				// Left by a btmmd that crashed: ours, removed at Close.
				d.loULA = ula
			}
			return changes, nil // else assigned by someone else
		}
	}
	a := &netlink.Addr{IPNet: &net.IPNet{IP: ula.AsSlice(), Mask: net.CIDRMask(128, 128)}, Flags: unix.IFA_F_NODAD}
	if err := d.nl.AddrAdd(lo, a); err != nil {
		return changes, fmt.Errorf("add local ULA %v to lo: %w", ula, err)
	}
	d.loULA = ula
	return append(changes, controlplane.Change{Op: "add", Object: "address", What: fmt.Sprintf("%v/128 dev lo", ula)}), nil
}
