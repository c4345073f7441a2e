package xfrm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/nldump"
	"github.com/btmm/btmm/controlplane/nsthread"
	"github.com/btmm/btmm/controlplane/repair"
)

// DefaultTag is the default reqid and if_id marking btmm's XFRM objects.
const DefaultTag = 0x6281

// DefaultRouteProtocol marks btmm's routes (rtnetlink protocol number, shown
// by `ip -6 route` as "proto 98").
const DefaultRouteProtocol netlink.RouteProtocol = 98

// Lifetime are the kernel lifetimes set on every SA. A soft limit makes the
// kernel send a SoftExpire event (time to rekey); a hard limit deletes the
// SA. Zero means no limit.
type Lifetime struct {
	SoftBytes, HardBytes     uint64
	SoftPackets, HardPackets uint64
	SoftAdd, HardAdd         time.Duration
}

// Config tunes a Dataplane. The zero value is usable.
type Config struct {
	// Interface is the name of the xfrm interface carrying the ULA (default "btmm0").
	Interface string
	// Reqid tags every SA and policy template (default DefaultTag).
	Reqid uint32
	// IfID is the xfrm interface id set on the interface, SAs and
	// policies when the kernel has xfrm interfaces (default DefaultTag).
	IfID uint32
	// RouteProtocol tags the /128 routes (default DefaultRouteProtocol).
	RouteProtocol netlink.RouteProtocol
	// LinkMTU is the outer path MTU the route MTUs are derived from (default 1500).
	LinkMTU int
	// ReplayWindow is the anti-replay window in packets (default 32, the
	// most the non-ESN replay state holds).
	ReplayWindow int
	// Lifetime limits set on every SA.
	Lifetime Lifetime
	// NoXfrmInterface forces the fallback: the ULA on lo and routes via the
	// outer device, policies without if_id.
	NoXfrmInterface bool
	// OutboundGrace is how long an outbound SA replaced by a new key (a
	// rekey) stays in the kernel. The kernel sends with the newest SA at
	// once, but packets that already picked the old one are dropped if it
	// goes first (XfrmOutStateInvalid). Default 2 s; negative deletes at once.
	OutboundGrace time.Duration
	// Repair tunes the loop that puts back our kernel objects when someone
	// else removes or changes them (New starts it; see docs/xfrm.md).
	Repair repair.Config
	Logger *slog.Logger
	Now    func() time.Time
}

func (c *Config) setDefaults() {
	if c.Interface == "" {
		c.Interface = "btmm0"
	}
	if c.Reqid == 0 {
		c.Reqid = DefaultTag
	}
	if c.IfID == 0 {
		c.IfID = DefaultTag
	}
	if c.RouteProtocol == 0 {
		c.RouteProtocol = DefaultRouteProtocol
	}
	if c.LinkMTU == 0 {
		c.LinkMTU = 1500
	}
	if c.ReplayWindow == 0 {
		c.ReplayWindow = 32
	}
	if c.OutboundGrace == 0 {
		c.OutboundGrace = 2 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// handle is the part of *netlink.Handle the Dataplane uses: the seam unit
// tests fill with a fake kernel.
type handle interface {
	XfrmStateList(family int) ([]netlink.XfrmState, error)
	XfrmStateAdd(*netlink.XfrmState) error
	XfrmStateUpdate(*netlink.XfrmState) error
	XfrmStateDel(*netlink.XfrmState) error
	XfrmPolicyList(family int) ([]netlink.XfrmPolicy, error)
	XfrmPolicyAdd(*netlink.XfrmPolicy) error
	XfrmPolicyUpdate(*netlink.XfrmPolicy) error
	XfrmPolicyDel(*netlink.XfrmPolicy) error
	LinkByName(name string) (netlink.Link, error)
	LinkByIndex(index int) (netlink.Link, error)
	LinkList() ([]netlink.Link, error)
	LinkAdd(netlink.Link) error
	LinkDel(netlink.Link) error
	LinkSetUp(netlink.Link) error
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
	AddrAdd(link netlink.Link, addr *netlink.Addr) error
	AddrDel(link netlink.Link, addr *netlink.Addr) error
	RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error)
	RouteAdd(*netlink.Route) error
	RouteReplace(*netlink.Route) error
	RouteDel(*netlink.Route) error
	RouteGet(dst net.IP) ([]netlink.Route, error)
	// Tunnel devices and the GUE listener (tunnel_linux.go).
	LinkModify(netlink.Link) error
	LinkSetAlias(link netlink.Link, alias string) error
	LinkSetIP6AddrGenMode(link netlink.Link, mode int) error
	NoRouterDiscovery(dev string) error
	FouAdd(netlink.Fou) error
	FouDel(netlink.Fou) error
	FouList(family int) ([]netlink.Fou, error)
}

// nsHandle is the namespace's netlink handle with fou changes sent by our
// own generic netlink code (netlink_linux.go), and the namespace itself
// (our own copy of the handle) for the sysctls netlink cannot set.
type nsHandle struct {
	*netlink.Handle
	fou *fouConn
	ns  netns.NsHandle
}

// newNSHandle wraps h and fc with a duplicate of ns, which close closes.
func newNSHandle(ns netns.NsHandle, h *netlink.Handle, fc *fouConn) (nsHandle, func() error, error) {
	fd, err := unix.FcntlInt(uintptr(ns), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nsHandle{}, nil, fmt.Errorf("duplicate the namespace handle: %w", err)
	}
	own := netns.NsHandle(fd)
	return nsHandle{h, fc, own}, own.Close, nil
}

// NoRouterDiscovery turns IPv6 router discovery off on dev (accept_ra and
// router_solicitations 0, /proc/sys in the handle's namespace): a tunnel
// device to one peer has no router to find, and the kernel would send
// router solicitations through the tunnel when the device comes up.
func (h nsHandle) NoRouterDiscovery(dev string) error {
	return nsthread.In(h.ns, func() error {
		for _, k := range []string{"accept_ra", "router_solicitations"} {
			if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+dev+"/"+k, []byte("0"), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
}

func (h nsHandle) FouAdd(f netlink.Fou) error {
	if f.EncapType != netlink.FOU_ENCAP_GUE || f.Family != netlink.FAMILY_V4 {
		return fmt.Errorf("fou add: only IPv4 GUE listeners are made here")
	}
	return h.fou.addGUE(uint16(f.Port))
}

func (h nsHandle) FouDel(f netlink.Fou) error { return h.fou.del(uint16(f.Port)) }

// migrator sends XFRM_MSG_MIGRATE.
type migrator interface {
	migrate(m migration) error
}

// Dataplane is the XFRM backend of controlplane.Dataplane.
type Dataplane struct {
	h   handle
	mig migrator // nil: move SAs by re-adding them
	cfg Config
	log *slog.Logger

	closers []func() error
	events  chan Event
	wg      sync.WaitGroup

	mu       sync.Mutex
	closed   bool
	xfrmi    bool       // the xfrm interface exists
	loAddr   netip.Addr // ULA we added on lo (fallback mode)
	tun      *Tunnels   // tunnel devices and the GUE listener (tunnel_linux.go)
	spiPeer  map[uint32]netip.Addr
	outerOf  map[netip.Addr]netip.AddrPort
	lastMove map[netip.Addr]time.Time
	// prevOut maps the outbound SPIs of the last Set to their peers;
	// retiring holds replaced outbound SAs until their deadline.
	prevOut  map[uint32]netip.Addr
	retiring map[stateKey]retiree
	reaper   *time.Timer
	// desired is the last valid desired state, which a repair re-applies.
	desired *controlplane.State
	// guard keeps sequence numbers of SAs that are put back.
	guard SeqGuard
	// expired are SPIs the kernel deleted at their hard lifetime: they are
	// not put back (new keys must replace them).
	expired map[uint32]bool

	repair *repair.Loop // nil without watchers (unit tests)
	wmu    sync.Mutex   // guards watch, read by the watchers
	watch  watchInfo
}

// watchInfo is what the watchers need to tell our objects' notifications.
type watchInfo struct {
	ula     netip.Addr
	ifindex int          // of the xfrm interface
	tunnels map[int]bool // ifindexes of our tunnel devices
}

// retiree is an outbound SA replaced by a rekey, kept until deadline.
type retiree struct {
	peer     netip.Addr
	deadline time.Time
}

var _ controlplane.Dataplane = (*Dataplane)(nil)

// New makes a Dataplane programming the network namespace ns (netns.Get()
// for the caller's own). It removes leftovers of an earlier run with the same
// tags, creates the xfrm interface (or falls back to lo) and starts the event
// monitor. Close undoes all of it.
func New(ns netns.NsHandle, cfg Config) (*Dataplane, error) {
	// NETLINK_GENERIC for fou: a request on a protocol the handle has no
	// socket for would go to the caller's namespace.
	h, err := netlink.NewHandleAt(ns, syscall.NETLINK_XFRM, syscall.NETLINK_ROUTE, syscall.NETLINK_GENERIC)
	if err != nil {
		return nil, fmt.Errorf("xfrm: netlink handle: %w", err)
	}
	mc, err := dialMigrate(int(ns))
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("xfrm: netlink xfrm socket: %w", err)
	}
	fc, err := dialFou(int(ns))
	if err != nil {
		mc.Close()
		h.Close()
		return nil, fmt.Errorf("xfrm: generic netlink socket: %w", err)
	}
	nh, closeNS, err := newNSHandle(ns, h, fc)
	if err != nil {
		fc.Close()
		mc.Close()
		h.Close()
		return nil, fmt.Errorf("xfrm: %w", err)
	}
	d, err := newDataplane(nh, mc, cfg)
	if err != nil {
		closeNS()
		fc.Close()
		mc.Close()
		h.Close()
		return nil, err
	}
	d.closers = append(d.closers, mc.Close, fc.Close, closeNS, func() error { h.Close(); return nil })
	mon, err := dialMonitor(int(ns))
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("xfrm: event monitor: %w", err)
	}
	d.closers = append([]func() error{mon.Close}, d.closers...)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		d.monitor(mon)
	}()
	if err := d.startRepair(int(ns)); err != nil {
		d.Close()
		return nil, fmt.Errorf("xfrm: %w", err)
	}
	return d, nil
}

// newDataplane is the constructor seam: h and mig may be fakes.
func newDataplane(h handle, mig migrator, cfg Config) (*Dataplane, error) {
	cfg.setDefaults()
	d := &Dataplane{h: h, mig: mig, cfg: cfg, log: cfg.Logger,
		events:   make(chan Event, 64),
		spiPeer:  map[uint32]netip.Addr{},
		outerOf:  map[netip.Addr]netip.AddrPort{},
		lastMove: map[netip.Addr]time.Time{}, prevOut: map[uint32]netip.Addr{}, retiring: map[stateKey]retiree{},
		expired: map[uint32]bool{}}
	d.tun = newTunnels(h, cfg.IfID, cfg.Logger)
	if err := d.removeLeftovers(); err != nil {
		return nil, fmt.Errorf("xfrm: remove leftovers: %w", err)
	}
	if !cfg.NoXfrmInterface {
		if err := d.makeInterface(); err != nil {
			d.log.Info("no xfrm interface, ULA goes on lo", "err", err)
		} else {
			d.xfrmi = true
		}
	}
	return d, nil
}

// Events delivers soft/hard expire and NAT mapping notifications. The
// channel is closed by Close. Events are dropped (and logged) when the
// reader falls 64 behind.
func (d *Dataplane) Events() <-chan Event { return d.events }

// XfrmInterface reports whether the ULA lives on an xfrm interface (true) or
// the lo fallback.
func (d *Dataplane) XfrmInterface() bool { return d.xfrmi }

func (d *Dataplane) makeInterface() error {
	lo, err := d.h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	x := &netlink.Xfrmi{LinkAttrs: netlink.LinkAttrs{Name: d.cfg.Interface, ParentIndex: lo.Attrs().Index}, Ifid: d.cfg.IfID}
	if err := d.h.LinkAdd(x); err != nil {
		return fmt.Errorf("add xfrm interface %s: %w", d.cfg.Interface, err)
	}
	l, err := d.h.LinkByName(d.cfg.Interface)
	if err == nil {
		err = d.h.LinkSetUp(l)
	}
	if err != nil {
		d.h.LinkDel(x)
		return fmt.Errorf("bring up %s: %w", d.cfg.Interface, err)
	}
	return nil
}

// --- ownership -------------------------------------------------------------

func (d *Dataplane) ourState(s *netlink.XfrmState) bool { return uint32(s.Reqid) == d.cfg.Reqid }

func (d *Dataplane) ourPolicy(p *netlink.XfrmPolicy) bool {
	for _, t := range p.Tmpls {
		if uint32(t.Reqid) == d.cfg.Reqid {
			return true
		}
	}
	return false
}

func (d *Dataplane) ifid() int {
	if d.xfrmi {
		return int(d.cfg.IfID)
	}
	return 0
}

func (d *Dataplane) states() ([]netlink.XfrmState, error) {
	all, err := nldump.Retry(func() ([]netlink.XfrmState, error) { return d.h.XfrmStateList(netlink.FAMILY_ALL) })
	if err != nil {
		return nil, fmt.Errorf("list xfrm states: %w", err)
	}
	var ours []netlink.XfrmState
	for _, s := range all {
		if d.ourState(&s) {
			ours = append(ours, s)
		}
	}
	return ours, nil
}

func (d *Dataplane) policies() ([]netlink.XfrmPolicy, error) {
	all, err := nldump.Retry(func() ([]netlink.XfrmPolicy, error) { return d.h.XfrmPolicyList(netlink.FAMILY_ALL) })
	if err != nil {
		return nil, fmt.Errorf("list xfrm policies: %w", err)
	}
	var ours []netlink.XfrmPolicy
	for _, p := range all {
		if d.ourPolicy(&p) {
			ours = append(ours, p)
		}
	}
	return ours, nil
}

func (d *Dataplane) routes() ([]netlink.Route, error) {
	rs, err := nldump.Retry(func() ([]netlink.Route, error) {
		return d.h.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Protocol: d.cfg.RouteProtocol, Table: syscall.RT_TABLE_MAIN},
			netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	return rs, nil
}

func absent(err error) bool {
	return errors.Is(err, syscall.ESRCH) || errors.Is(err, syscall.ENOENT)
}

// removeLeftovers deletes every object carrying our tags: routes, policies,
// states and the xfrm interface of our name and if_id.
func (d *Dataplane) removeLeftovers() error {
	var errs []error
	rs, err := d.routes()
	errs = append(errs, err)
	for _, r := range rs {
		if err := d.h.RouteDel(&r); err != nil && !absent(err) {
			errs = append(errs, fmt.Errorf("delete route %v: %w", r.Dst, err))
		}
	}
	ps, err := d.policies()
	errs = append(errs, err)
	for _, p := range ps {
		if err := d.h.XfrmPolicyDel(&p); err != nil && !absent(err) {
			errs = append(errs, fmt.Errorf("delete policy %s: %w", policyWhat(&p), err))
		}
	}
	ss, err := d.states()
	errs = append(errs, err)
	for _, s := range ss {
		if err := d.h.XfrmStateDel(&s); err != nil && !absent(err) {
			errs = append(errs, fmt.Errorf("delete state spi 0x%08x: %w", uint32(s.Spi), err))
		}
	}
	errs = append(errs, d.tun.RemoveAll())
	if l, err := d.h.LinkByName(d.cfg.Interface); err == nil {
		x, ok := l.(*netlink.Xfrmi)
		if !ok || x.Ifid != d.cfg.IfID {
			errs = append(errs, fmt.Errorf("interface %s exists and is not ours (type %s)", d.cfg.Interface, l.Type()))
		} else if err := d.h.LinkDel(l); err != nil {
			errs = append(errs, fmt.Errorf("delete interface %s: %w", d.cfg.Interface, err))
		}
	}
	return errors.Join(errs...)
}

// --- desired objects ----------------------------------------------------------

type peerPlan struct {
	peer  controlplane.Peer
	local netip.Addr // local outer IPv4 address of the ESP-in-UDP SAs
	dev   int        // route device (the xfrm interface's index is set later)
	// ESP-in-UDP: tunnel-mode SAs (Out, In, PrevIn...) and their policies
	// (if_id: only via the xfrm interface).
	states   []netlink.XfrmState
	policies []netlink.XfrmPolicy
	// Tunnel devices: transport-mode SAs between the ULAs (Out, In,
	// PrevIn...), their policies (no if_id: what a route sends into a
	// device), and the devices.
	tstates   []netlink.XfrmState
	tpolicies []netlink.XfrmPolicy
	links     []netlink.Link
	route     netlink.Route
	viaDev    string // the route's tunnel device; "" for ESP-in-UDP
	// What could not be planned just now (no route to an outer address)
	// keeps what the kernel has: a transient lookup failure must not tear
	// a working path down.
	keepESP   bool
	keepLinks []string
	keepRoute bool
}

func prefix128(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
}

// transportState is an SA of the tunnel devices' transport-mode ESP between
// the ULAs: same SPI and keys as the ESP-in-UDP one, its own counters; the
// kernel finds it by (our ULA, SPI) on the way in.
func (d *Dataplane) transportState(sa controlplane.SA, src, dst netip.Addr) netlink.XfrmState {
	s := d.stateFor(sa, netip.AddrPortFrom(src, 0), netip.AddrPortFrom(dst, 0), src, dst)
	s.Mode, s.Encap, s.Ifid = netlink.XFRM_MODE_TRANSPORT, nil, 0
	return s
}

func (d *Dataplane) stateFor(sa controlplane.SA, src, dst netip.AddrPort, selSrc, selDst netip.Addr) netlink.XfrmState {
	s := netlink.XfrmState{
		Src: src.Addr().AsSlice(), Dst: dst.Addr().AsSlice(),
		Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL,
		Spi: int(sa.SPI), Reqid: int(d.cfg.Reqid), ReplayWindow: d.cfg.ReplayWindow, Ifid: d.ifid(),
		Encap:    &netlink.XfrmStateEncap{Type: netlink.XFRM_ENCAP_ESPINUDP, SrcPort: int(src.Port()), DstPort: int(dst.Port()), OriginalAddress: net.IPv4zero},
		Selector: &netlink.XfrmPolicy{Src: prefix128(selSrc), Dst: prefix128(selDst)},
		Limits: netlink.XfrmStateLimits{
			ByteSoft: d.cfg.Lifetime.SoftBytes, ByteHard: d.cfg.Lifetime.HardBytes,
			PacketSoft: d.cfg.Lifetime.SoftPackets, PacketHard: d.cfg.Lifetime.HardPackets,
			TimeSoft: uint64(d.cfg.Lifetime.SoftAdd / time.Second), TimeHard: uint64(d.cfg.Lifetime.HardAdd / time.Second),
		},
	}
	key := bytes.Clone(sa.Key)
	switch sa.Cipher {
	case controlplane.CipherAESGCM:
		s.Aead = &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: key, ICVLen: 128}
	case controlplane.CipherAESCBCHMAC:
		n := len(key) - 32
		s.Crypt = &netlink.XfrmStateAlgo{Name: "cbc(aes)", Key: key[:n]}
		s.Auth = &netlink.XfrmStateAlgo{Name: "hmac(sha256)", Key: key[n:], TruncateLen: 128}
	}
	return s
}

func (d *Dataplane) plan(ctx context.Context, st *controlplane.State) ([]peerPlan, error) {
	var plans []peerPlan
	var errs []error
	for _, p := range st.Peers {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		pp := peerPlan{peer: p}
		me, them := st.Local.ULA, p.ULA
		if p.Outer.IsValid() {
			if err := d.planESP(st, &pp); err != nil {
				errs = append(errs, err)
				pp.keepESP = true
			}
		}
		switch {
		case len(p.Tunnels) > 0 && !d.xfrmi:
			errs = append(errs, fmt.Errorf("peer %q: tunnel paths need xfrm interfaces, which this kernel lacks", p.Name))
		case len(p.Tunnels) > 0:
			pp.tstates = append(pp.tstates, d.transportState(p.Out, me, them))
			for _, in := range append([]controlplane.SA{p.In}, p.PrevIn...) {
				pp.tstates = append(pp.tstates, d.transportState(in, them, me))
			}
			tmpl := func(src, dst netip.Addr) []netlink.XfrmPolicyTmpl {
				return []netlink.XfrmPolicyTmpl{{Src: src.AsSlice(), Dst: dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
					Mode: netlink.XFRM_MODE_TRANSPORT, Reqid: int(d.cfg.Reqid)}}
			}
			// The outbound policy exists only while the peer's traffic
			// goes by a device: every route's packets meet policies without
			// if_id before they reach a device, so with it in place the
			// xfrm interface's would be wrapped twice.
			if p.Via != controlplane.PathESPInUDP {
				pp.tpolicies = append(pp.tpolicies, netlink.XfrmPolicy{Dir: netlink.XFRM_DIR_OUT, Src: prefix128(me), Dst: prefix128(them), Tmpls: tmpl(me, them)})
			}
			pp.tpolicies = append(pp.tpolicies, netlink.XfrmPolicy{Dir: netlink.XFRM_DIR_IN, Src: prefix128(them), Dst: prefix128(me), Tmpls: tmpl(them, me)})
			for _, t := range p.Tunnels {
				l, err := d.tun.Link(st.Local, p, t)
				if err != nil {
					errs = append(errs, err)
					pp.keepLinks = append(pp.keepLinks, controlplane.TunnelDevice(t.Kind, p.ULA))
					continue
				}
				pp.links = append(pp.links, l)
			}
		}
		mtu := InnerMTU(d.cfg.LinkMTU, p.Out.Cipher)
		if p.Via != controlplane.PathESPInUDP {
			pp.viaDev = controlplane.TunnelDevice(p.Via, p.ULA)
			mtu = TransportMTU(d.cfg.LinkMTU, p.Via, p.Out.Cipher)
			pp.keepRoute = !slices.ContainsFunc(pp.links, func(l netlink.Link) bool { return l.Attrs().Name == pp.viaDev })
		} else {
			pp.keepRoute = pp.keepESP
		}
		pp.route = netlink.Route{Dst: prefix128(them), Src: me.AsSlice(), LinkIndex: pp.dev,
			MTU: mtu, Protocol: d.cfg.RouteProtocol, Table: syscall.RT_TABLE_MAIN, Family: netlink.FAMILY_V6}
		plans = append(plans, pp)
	}
	return plans, errors.Join(errs...)
}

// planESP plans the ESP-in-UDP part: the local IPv4 address (Local.Outer or
// the route's source), tunnel-mode SAs and policies.
func (d *Dataplane) planESP(st *controlplane.State, pp *peerPlan) error {
	p := pp.peer
	if p.Outer.Addr().Unmap().IsLoopback() {
		return d.planLoopbackESP(st, pp)
	}
	pp.local = st.Local.Outer
	if !pp.local.IsValid() || st.Local.Device == "" && !d.xfrmi {
		rs, err := d.h.RouteGet(p.Outer.Addr().AsSlice())
		if err != nil || len(rs) == 0 {
			return fmt.Errorf("peer %q: no route to %v: %v", p.Name, p.Outer.Addr(), err)
		}
		if !pp.local.IsValid() {
			a, ok := netip.AddrFromSlice(rs[0].Src)
			if !ok {
				return fmt.Errorf("peer %q: route to %v has no source address", p.Name, p.Outer.Addr())
			}
			pp.local = a.Unmap()
		}
		pp.dev = rs[0].LinkIndex
	}
	if !d.xfrmi && st.Local.Device != "" {
		l, err := d.h.LinkByName(st.Local.Device)
		if err != nil {
			return fmt.Errorf("local device %q: %w", st.Local.Device, err)
		}
		pp.dev = l.Attrs().Index
	}
	if !pp.local.Is4() {
		return fmt.Errorf("peer %q: local outer address %v is not IPv4", p.Name, pp.local)
	}
	d.planESPObjects(st, pp)
	return nil
}

// planLoopbackESP plans a peer whose outer address is a loopback socket:
// btmmd's relay-tcp bridge (docs/paths.md). The bridge takes datagrams only
// from our tunnel port on a loopback address and writes the peer's to our
// tunnel port on its own (loopback) address, where the inbound SA must be
// found: the SAs run between that address and the socket, whatever
// Local.Outer and Local.Device say. The ULA route must not go via lo:
// IPv6 makes any route on a loopback device a reject route (fib6_is_reject),
// so without the xfrm interface it goes via the IPv4 default route's device
// (the configured device if any); the policy takes the packet before that
// device does, and the ESP-in-UDP leaves by the route to 127.0.0.0/8 (lo).
func (d *Dataplane) planLoopbackESP(st *controlplane.State, pp *peerPlan) error {
	p := pp.peer
	pp.local = p.Outer.Addr().Unmap()
	if !pp.local.Is4() {
		return fmt.Errorf("peer %q: loopback outer address %v is not IPv4", p.Name, p.Outer)
	}
	if !d.xfrmi {
		dev, err := d.routeDevice(st.Local.Device)
		if err != nil {
			return fmt.Errorf("peer %q (relay-tcp bridge at %v): %w", p.Name, p.Outer, err)
		}
		pp.dev = dev
	}
	d.planESPObjects(st, pp)
	return nil
}

// routeDevice is a device for a route whose packets an xfrm policy takes
// (not lo): the named one, else the IPv4 default route's, else the first
// other device that is up.
func (d *Dataplane) routeDevice(name string) (int, error) {
	if name != "" {
		l, err := d.h.LinkByName(name)
		if err != nil {
			return 0, fmt.Errorf("local device %q: %w", name, err)
		}
		return l.Attrs().Index, nil
	}
	rs, err := nldump.Retry(func() ([]netlink.Route, error) {
		return d.h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: syscall.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return 0, fmt.Errorf("list IPv4 routes: %w", err)
	}
	for _, r := range rs {
		if ones, _ := maskOnes(r.Dst); ones == 0 && r.LinkIndex > 0 {
			return r.LinkIndex, nil
		}
	}
	ls, err := nldump.Retry(d.h.LinkList)
	if err != nil {
		return 0, fmt.Errorf("list links: %w", err)
	}
	for _, l := range ls {
		if a := l.Attrs(); a.Flags&net.FlagLoopback == 0 && a.Flags&net.FlagUp != 0 && a.Name != "lo" {
			return a.Index, nil
		}
	}
	return 0, errors.New("no device up but lo to route the ULA by (IPv6 rejects routes on lo)")
}

// maskOnes is a route destination's prefix length (a default route: nil or /0).
func maskOnes(n *net.IPNet) (int, int) {
	if n == nil {
		return 0, 0
	}
	return n.Mask.Size()
}

// planESPObjects fills in the tunnel-mode SAs and policies between
// pp.local and the peer's outer address.
func (d *Dataplane) planESPObjects(st *controlplane.State, pp *peerPlan) {
	p := pp.peer
	local := netip.AddrPortFrom(pp.local, st.Local.Port)
	me, them := st.Local.ULA, p.ULA
	pp.states = append(pp.states, d.stateFor(p.Out, local, p.Outer, me, them))
	for _, in := range append([]controlplane.SA{p.In}, p.PrevIn...) {
		pp.states = append(pp.states, d.stateFor(in, p.Outer, local, them, me))
	}
	tmpl := func(src, dst netip.Addr) []netlink.XfrmPolicyTmpl {
		return []netlink.XfrmPolicyTmpl{{Src: src.AsSlice(), Dst: dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
			Mode: netlink.XFRM_MODE_TUNNEL, Reqid: int(d.cfg.Reqid)}}
	}
	pp.policies = []netlink.XfrmPolicy{
		{Dir: netlink.XFRM_DIR_OUT, Src: prefix128(me), Dst: prefix128(them), Ifid: d.ifid(), Tmpls: tmpl(pp.local, p.Outer.Addr())},
		{Dir: netlink.XFRM_DIR_IN, Src: prefix128(them), Dst: prefix128(me), Ifid: d.ifid(), Tmpls: tmpl(p.Outer.Addr(), pp.local)},
		{Dir: netlink.XFRM_DIR_FWD, Src: prefix128(them), Dst: prefix128(me), Ifid: d.ifid(), Tmpls: tmpl(p.Outer.Addr(), pp.local)},
	}
}

// --- Set -------------------------------------------------------------------

// Set makes the kernel match desired; see controlplane.Dataplane.
func (d *Dataplane) Set(ctx context.Context, desired *controlplane.State) ([]controlplane.Change, error) {
	if desired == nil {
		return nil, errors.New("xfrm: set: nil state")
	}
	if err := desired.Validate(); err != nil {
		return nil, fmt.Errorf("xfrm: set: invalid state: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, errors.New("xfrm: set: dataplane closed")
	}
	d.desired = CloneState(desired)
	return d.setLocked(ctx, d.desired)
}

// setLocked applies desired (valid); d.mu is held.
func (d *Dataplane) setLocked(ctx context.Context, desired *controlplane.State) ([]controlplane.Change, error) {
	var link netlink.Link
	if d.xfrmi {
		l, err := d.h.LinkByName(d.cfg.Interface)
		if err != nil {
			// Someone deleted our interface (and with it our routes and
			// address): make it again; the diff below restores the rest.
			d.log.Warn("xfrm interface gone, recreating it", "interface", d.cfg.Interface, "err", err)
			if err := d.makeInterface(); err != nil {
				return nil, fmt.Errorf("xfrm: set: %w", err)
			}
			if l, err = d.h.LinkByName(d.cfg.Interface); err != nil {
				return nil, fmt.Errorf("xfrm: set: interface %s: %w", d.cfg.Interface, err)
			}
		}
		if l.Attrs().Flags&net.FlagUp == 0 && l.Attrs().RawFlags&syscall.IFF_UP == 0 {
			if err := d.h.LinkSetUp(l); err != nil {
				return nil, fmt.Errorf("xfrm: set: bring %s up: %w", d.cfg.Interface, err)
			}
			d.log.Warn("xfrm interface was down, brought it up", "interface", d.cfg.Interface)
		}
		link = l
	}
	plans, planErr := d.plan(ctx, desired)
	if ctx.Err() != nil {
		return nil, fmt.Errorf("xfrm: set: %w", ctx.Err())
	}
	a := &applier{d: d}
	a.errs = append(a.errs, planErr)

	a.address(link, desired.Local.ULA)
	// Tunnel devices (and the GUE listener they receive on) before any
	// route points into them.
	d.tun.Fou(a, desired.Local.FOUPort)
	klinks, err := d.tun.Links()
	if err != nil {
		return nil, fmt.Errorf("xfrm: set: %w", err)
	}
	haveLinks := map[string]netlink.Link{}
	for _, l := range klinks {
		haveLinks[l.Attrs().Name] = l
	}
	wantLinks := map[string]bool{}
	var links []netlink.Link
	for _, pp := range plans {
		for _, l := range pp.links {
			links = append(links, l)
			wantLinks[l.Attrs().Name] = true
		}
		for _, n := range pp.keepLinks {
			wantLinks[n] = true
		}
	}
	linkIdx := d.tun.Apply(a, links, haveLinks, desired.Local.ULA)
	for i := range plans {
		pp := &plans[i]
		switch {
		case pp.viaDev != "":
			if idx, ok := linkIdx[pp.viaDev]; ok {
				pp.route.LinkIndex = idx
			} else {
				pp.keepRoute = true
			}
		case link != nil:
			pp.route.LinkIndex = link.Attrs().Index
		}
	}
	// Transmit counters before the state dump: SeqGuard's bound.
	if links, err := nldump.Retry(d.h.LinkList); err == nil {
		a.tx = TxCounters(links)
	}
	kstates, err := d.states()
	if err != nil {
		return nil, fmt.Errorf("xfrm: set: %w", err)
	}
	d.guard.Observe(a.tx, kstates)
	kpols, err := d.policies()
	if err != nil {
		return nil, fmt.Errorf("xfrm: set: %w", err)
	}
	krts, err := d.routes()
	if err != nil {
		return nil, fmt.Errorf("xfrm: set: %w", err)
	}
	wantStates := map[stateKey]bool{}
	wantPols := map[string]bool{}
	wantRoutes := map[string]bool{}
	for _, pp := range plans {
		p := pp.peer
		if pp.keepESP {
			// No route to the peer's outer address just now: its
			// ESP-in-UDP SAs and policies stay as the kernel has them.
			for _, sa := range append([]controlplane.SA{p.Out, p.In}, p.PrevIn...) {
				wantStates[stateKey{sa.SPI, netlink.XFRM_MODE_TUNNEL}] = true
			}
			for _, dir := range []netlink.Dir{netlink.XFRM_DIR_OUT, netlink.XFRM_DIR_IN, netlink.XFRM_DIR_FWD} {
				src, dst := p.ULA, desired.Local.ULA
				if dir == netlink.XFRM_DIR_OUT {
					src, dst = dst, src
				}
				wantPols[policyKey(&netlink.XfrmPolicy{Dir: dir, Src: prefix128(src), Dst: prefix128(dst), Ifid: d.ifid()})] = true
			}
		}
		moved := a.states(pp, byMode(kstates, netlink.XFRM_MODE_TUNNEL), kpols)
		if moved {
			d.lastMove[p.ULA] = d.cfg.Now()
		}
		a.tstates(pp, byMode(kstates, netlink.XFRM_MODE_TRANSPORT))
		for _, s := range append(slices.Clone(pp.states), pp.tstates...) {
			wantStates[keyOfState(&s)] = true
		}
		if moved {
			// Migration rewrote policy templates: look again.
			if kp, err := d.policies(); err == nil {
				kpols = kp
			}
		}
		pols := append(slices.Clone(pp.policies), pp.tpolicies...)
		polOK := a.policies(pols, kpols)
		for _, pl := range pols {
			wantPols[policyKey(&pl)] = true
		}
		wantRoutes[pp.route.Dst.String()] = true
		switch {
		case pp.keepRoute:
		case polOK:
			a.route(pp, krts)
		default:
			a.errs = append(a.errs, fmt.Errorf("peer %q: route to %v withheld: its policies are not in place", p.Name, p.ULA))
		}
	}
	// Deletes, after every add.
	for _, r := range krts {
		if !wantRoutes[r.Dst.String()] {
			a.do("delete", "route", routeWhat(&r), d.h.RouteDel(&r))
		}
	}
	for _, p := range kpols {
		if !wantPols[policyKey(&p)] {
			a.do("delete", "policy", policyWhat(&p), d.h.XfrmPolicyDel(&p))
		}
	}
	if kstates, err = d.states(); err != nil {
		a.errs = append(a.errs, err)
	}
	stillPeer := map[netip.Addr]bool{}
	curOut := map[uint32]bool{}
	for _, p := range desired.Peers {
		stillPeer[p.ULA] = true
		curOut[p.Out.SPI] = true
	}
	now := d.cfg.Now()
	present := map[stateKey]bool{}
	for _, s := range kstates {
		spi, k := uint32(s.Spi), keyOfState(&s)
		present[k] = true
		if wantStates[k] {
			delete(d.retiring, k)
			continue
		}
		// An outbound SA replaced by a rekey of a peer we keep: retire it
		// after a grace period instead of pulling it from under packets
		// that already picked it.
		if ula, ok := d.prevOut[spi]; ok && stillPeer[ula] && !curOut[spi] && d.cfg.OutboundGrace > 0 {
			if _, ok := d.retiring[k]; !ok {
				d.retiring[k] = retiree{peer: ula, deadline: now.Add(d.cfg.OutboundGrace)}
			}
		}
		if r, ok := d.retiring[k]; ok && stillPeer[r.peer] && now.Before(r.deadline) {
			continue
		}
		delete(d.retiring, k)
		a.do("delete", "state", stateWhat(&s), d.h.XfrmStateDel(&s))
	}
	for k := range d.retiring {
		if !present[k] {
			delete(d.retiring, k)
		}
	}
	d.prevOut = map[uint32]netip.Addr{}
	for _, p := range desired.Peers {
		d.prevOut[p.Out.SPI] = p.ULA
	}
	d.scheduleReapLocked()
	for _, l := range klinks {
		if !wantLinks[l.Attrs().Name] {
			a.do("delete", "link", linkWhat(l), d.h.LinkDel(l))
		}
	}
	d.tun.OldFou(a, desired.Local.FOUPort)
	a.oldAddress(link, desired.Local.ULA)

	d.spiPeer = map[uint32]netip.Addr{}
	d.outerOf = map[netip.Addr]netip.AddrPort{}
	for _, p := range desired.Peers {
		d.outerOf[p.ULA] = p.Outer
		for _, sa := range append([]controlplane.SA{p.Out, p.In}, p.PrevIn...) {
			d.spiPeer[sa.SPI] = p.ULA
		}
	}
	for ula := range d.lastMove {
		if _, ok := d.outerOf[ula]; !ok {
			delete(d.lastMove, ula)
		}
	}
	d.guard.Keep(func(spi uint32) bool { _, ok := d.spiPeer[spi]; return ok })
	for spi := range d.expired {
		if _, ok := d.spiPeer[spi]; !ok {
			delete(d.expired, spi)
		}
	}
	w := watchInfo{ula: desired.Local.ULA, tunnels: map[int]bool{}}
	if link != nil {
		w.ifindex = link.Attrs().Index
	}
	for _, i := range linkIdx {
		w.tunnels[i] = true
	}
	d.wmu.Lock()
	d.watch = w
	d.wmu.Unlock()
	err = errors.Join(a.errs...)
	if err != nil {
		err = fmt.Errorf("xfrm: set: %w", err)
	}
	return a.changes, err
}

// stateKey tells apart our SAs of one SPI: the ESP-in-UDP one (tunnel mode)
// and the tunnel devices' one (transport mode).
type stateKey struct {
	spi  uint32
	mode netlink.Mode
}

func keyOfState(s *netlink.XfrmState) stateKey { return stateKey{uint32(s.Spi), s.Mode} }

func byMode(ss []netlink.XfrmState, m netlink.Mode) []netlink.XfrmState {
	var out []netlink.XfrmState
	for _, s := range ss {
		if s.Mode == m {
			out = append(out, s)
		}
	}
	return out
}

type applier struct {
	d       *Dataplane
	prevLo  netip.Addr     // our earlier ULA on lo, replaced in this Set
	tx      map[int]uint64 // links' transmit counters before the state dump
	changes []controlplane.Change
	errs    []error
}

// Do and Fail make the applier the tunnel devices' Recorder.
func (a *applier) Do(op, obj, what string, err error) bool { return a.do(op, obj, what, err) }
func (a *applier) Fail(err error)                          { a.errs = append(a.errs, err) }

// do records op on success, the error otherwise; it reports success.
func (a *applier) do(op, obj, what string, err error) bool {
	if err != nil {
		if op == "delete" && absent(err) {
			return true
		}
		a.errs = append(a.errs, fmt.Errorf("%s %s %s: %w", op, obj, what, err))
		return false
	}
	c := controlplane.Change{Op: op, Object: obj, What: what}
	a.d.log.Debug("xfrm change", "change", c.String())
	a.changes = append(a.changes, c)
	return true
}

func (a *applier) address(link netlink.Link, ula netip.Addr) {
	d := a.d
	want := &netlink.Addr{IPNet: prefix128(ula), Flags: syscall.IFA_F_NODAD}
	if link == nil {
		lo, err := d.h.LinkByName("lo")
		if err != nil {
			a.errs = append(a.errs, fmt.Errorf("find lo: %w", err))
			return
		}
		have, err := nldump.Retry(func() ([]netlink.Addr, error) { return d.h.AddrList(lo, netlink.FAMILY_V6) })
		if err != nil {
			a.errs = append(a.errs, fmt.Errorf("list addresses on lo: %w", err))
			return
		}
		for _, h := range have {
			if h.IP.Equal(want.IP) {
				if ones, _ := h.Mask.Size(); ones == 128 && h.Flags&syscall.IFA_F_NODAD != 0 && d.loAddr != ula {
					// /128 nodad, as we add it: left by a btmmd that
					// crashed (this boot's random ULA); ours to remove.
					a.prevLo, d.loAddr = d.loAddr, ula
				}
				return // ours already, or someone else's: not ours to remove
			}
		}
		if a.do("add", "address", ula.String()+"/128 dev lo", d.h.AddrAdd(lo, want)) && d.loAddr != ula {
			a.prevLo, d.loAddr = d.loAddr, ula
		}
		return
	}
	have, err := nldump.Retry(func() ([]netlink.Addr, error) { return d.h.AddrList(link, netlink.FAMILY_V6) })
	if err != nil {
		a.errs = append(a.errs, fmt.Errorf("list addresses on %s: %w", d.cfg.Interface, err))
		return
	}
	for _, h := range have {
		if h.IP.Equal(want.IP) {
			return
		}
	}
	a.do("add", "address", ula.String()+"/128 dev "+d.cfg.Interface, d.h.AddrAdd(link, want))
}

// oldAddress removes a ULA we added earlier that is no longer desired.
func (a *applier) oldAddress(link netlink.Link, ula netip.Addr) {
	d := a.d
	if link == nil {
		old := a.prevLo
		if !old.IsValid() || old == ula {
			return
		}
		if lo, err := d.h.LinkByName("lo"); err == nil {
			a.do("delete", "address", old.String()+"/128 dev lo", d.h.AddrDel(lo, &netlink.Addr{IPNet: prefix128(old)}))
		}
		return
	}
	have, err := nldump.Retry(func() ([]netlink.Addr, error) { return d.h.AddrList(link, netlink.FAMILY_V6) })
	if err != nil {
		a.errs = append(a.errs, fmt.Errorf("list addresses on %s: %w", d.cfg.Interface, err))
		return
	}
	for _, h := range have {
		ip, _ := netip.AddrFromSlice(h.IP)
		if ip == ula || ip.IsLinkLocalUnicast() {
			continue
		}
		a.do("delete", "address", ip.String()+"/128 dev "+d.cfg.Interface, d.h.AddrDel(link, &h))
	}
}

// states adds, replaces or moves the peer's SAs; it reports whether any moved.
func (a *applier) states(pp peerPlan, kstates []netlink.XfrmState, kpols []netlink.XfrmPolicy) bool {
	d := a.d
	bySPI := map[uint32]*netlink.XfrmState{}
	for i := range kstates {
		if _, dup := bySPI[uint32(kstates[i].Spi)]; !dup {
			bySPI[uint32(kstates[i].Spi)] = &kstates[i]
		}
	}
	moved := false
	for i, want := range pp.states {
		have := bySPI[uint32(want.Spi)]
		switch {
		case have == nil && d.expired[uint32(want.Spi)]:
			// The kernel deleted it at its hard lifetime: new keys must
			// replace it, putting it back would defeat the lifetime.
			d.log.Debug("not re-adding a hard-expired SA", "spi", fmt.Sprintf("0x%08x", uint32(want.Spi)))
		case have == nil:
			what := stateWhat(&want)
			if d.guard.Restore(&want, i == 0, a.tx) {
				if i == 0 {
					what += fmt.Sprintf(" (put back: sequence numbers continue from %d)", want.Replay.OSeq)
				} else {
					what += fmt.Sprintf(" (put back: replays up to %d refused)", want.Replay.Seq)
				}
			}
			a.do("add", "state", what, d.h.XfrmStateAdd(&want))
		case sameSA(have, &want) && sameOuter(have, &want):
			// in place
		case sameSA(have, &want):
			// Only the outer addresses or ports differ: move it, keeping
			// keys and sequence numbers. i==0 is Out, i==1 is In; earlier
			// inbound SAs (PrevIn) share In's addresses and are re-added.
			if a.move(pp, i, have, &want, kpols) {
				moved = true
			}
		default:
			// Same SPI, different keys or selector: the kernel cannot
			// change those in place.
			if a.do("delete", "state", stateWhat(have), d.h.XfrmStateDel(have)) {
				a.do("add", "state", stateWhat(&want), d.h.XfrmStateAdd(&want))
			}
		}
	}
	return moved
}

// tstates adds or replaces the peer's transport-mode SAs (they never move:
// their addresses are the ULAs).
func (a *applier) tstates(pp peerPlan, kstates []netlink.XfrmState) {
	d := a.d
	bySPI := map[uint32]*netlink.XfrmState{}
	for i := range kstates {
		bySPI[uint32(kstates[i].Spi)] = &kstates[i]
	}
	for i, want := range pp.tstates {
		have := bySPI[uint32(want.Spi)]
		switch {
		case have == nil && d.expired[uint32(want.Spi)]:
			d.log.Debug("not re-adding a hard-expired SA", "spi", fmt.Sprintf("0x%08x", uint32(want.Spi)))
		case have == nil:
			what := stateWhat(&want)
			if d.guard.Restore(&want, i == 0, a.tx) {
				what += " (put back)"
			}
			a.do("add", "state", what, d.h.XfrmStateAdd(&want))
		case !sameSA(have, &want) || !have.Src.Equal(want.Src) || !have.Dst.Equal(want.Dst):
			if a.do("delete", "state", stateWhat(have), d.h.XfrmStateDel(have)) {
				a.do("add", "state", stateWhat(&want), d.h.XfrmStateAdd(&want))
			}
		}
	}
}

func (a *applier) move(pp peerPlan, i int, have, want *netlink.XfrmState, kpols []netlink.XfrmPolicy) bool {
	d := a.d
	what := fmt.Sprintf("%s -> %s", stateWhat(have), outerWhat(want))
	if d.mig != nil && i < 2 && d.uniqueOuter(have) {
		dir := netlink.XFRM_DIR_OUT
		if i == 1 {
			dir = netlink.XFRM_DIR_IN
		}
		if pol := findPolicy(kpols, dir, want); pol != nil && len(pol.Tmpls) == 1 &&
			pol.Tmpls[0].Src.Equal(have.Src) && pol.Tmpls[0].Dst.Equal(have.Dst) {
			m := migration{Dir: uint8(dir),
				SelSrc: ipnetPrefix(want.Selector.Src), SelDst: ipnetPrefix(want.Selector.Dst),
				OldSrc: ipAddr(have.Src), OldDst: ipAddr(have.Dst), NewSrc: ipAddr(want.Src), NewDst: ipAddr(want.Dst),
				Reqid: d.cfg.Reqid, IfID: uint32(want.Ifid),
				EncapSport: uint16(want.Encap.SrcPort), EncapDport: uint16(want.Encap.DstPort)}
			err := d.mig.migrate(m)
			if err == nil {
				if got := d.findState(want); got != nil && sameOuter(got, want) {
					return a.do("move", "state", what+" (migrate)", nil)
				}
				err = errors.New("kernel ignored part of the migration")
			}
			d.log.Info("xfrm migrate failed, re-adding the SA with its replay state", "spi", fmt.Sprintf("0x%08x", uint32(want.Spi)), "err", err)
			if cur := d.findStateSPI(uint32(want.Spi)); cur != nil {
				have = cur
			} else {
				a.errs = append(a.errs, fmt.Errorf("move state %s: lost after migrate: %w", what, err))
				return false
			}
		}
	}
	// Fallback, as strongSwan does without MIGRATE: keep the replay state.
	fresh := d.findStateSPI(uint32(want.Spi))
	if fresh == nil {
		fresh = have
	}
	re := *want
	if fresh.Replay != nil {
		r := *fresh.Replay
		// Packets may still leave on the old SA between the dump and the
		// delete: skip ahead so no sequence number is used twice.
		if i == 0 {
			r.OSeq += 128
		}
		re.Replay = &r
	}
	// The steps of a move are reported as one change: "move".
	step := func(op string, s *netlink.XfrmState, err error) bool {
		if err != nil && !(op == "delete" && absent(err)) {
			a.errs = append(a.errs, fmt.Errorf("move state %s: %s %s: %w", what, op, stateWhat(s), err))
			return false
		}
		return true
	}
	switch {
	case !fresh.Dst.Equal(want.Dst):
		// Different (daddr, spi): add the new one first, then drop the old.
		if step("add", &re, d.h.XfrmStateAdd(&re)) {
			step("delete", fresh, d.h.XfrmStateDel(fresh))
			return a.do("move", "state", what+" (re-added with replay state)", nil)
		}
	case fresh.Src.Equal(want.Src):
		// Only ports changed: XFRM_MSG_UPDSA rewrites the encapsulation in place.
		upd := *fresh
		upd.Encap = want.Encap
		upd.Replay = nil
		if step("update", &upd, d.h.XfrmStateUpdate(&upd)) {
			return a.do("move", "state", what+" (encap updated)", nil)
		}
	default:
		if step("delete", fresh, d.h.XfrmStateDel(fresh)) && step("add", &re, d.h.XfrmStateAdd(&re)) {
			return a.do("move", "state", what+" (re-added with replay state)", nil)
		}
	}
	return false
}

// uniqueOuter reports whether s is the only SA of ours between its outer
// addresses. XFRM_MSG_MIGRATE moves the first SA it finds with the policy's
// reqid and old addresses, so it is only precise then; otherwise (two peers
// behind one NAT address, or an earlier inbound SA kept during a rekey) the
// SA is moved by re-adding it.
func (d *Dataplane) uniqueOuter(s *netlink.XfrmState) bool {
	ss, err := d.states()
	if err != nil {
		return false
	}
	for _, o := range ss {
		if o.Spi != s.Spi && o.Src.Equal(s.Src) && o.Dst.Equal(s.Dst) {
			return false
		}
	}
	return true
}

func (d *Dataplane) findStateSPI(spi uint32) *netlink.XfrmState {
	ss, err := d.states()
	if err != nil {
		return nil
	}
	for i := range ss {
		if uint32(ss[i].Spi) == spi && ss[i].Mode == netlink.XFRM_MODE_TUNNEL {
			return &ss[i]
		}
	}
	return nil
}

func (d *Dataplane) findState(want *netlink.XfrmState) *netlink.XfrmState {
	ss, err := d.states()
	if err != nil {
		return nil
	}
	for i := range ss {
		if ss[i].Spi == want.Spi && ss[i].Dst.Equal(want.Dst) && ss[i].Mode == want.Mode {
			return &ss[i]
		}
	}
	return nil
}

func findPolicy(ps []netlink.XfrmPolicy, dir netlink.Dir, sa *netlink.XfrmState) *netlink.XfrmPolicy {
	key := policyKey(&netlink.XfrmPolicy{Dir: dir, Src: sa.Selector.Src, Dst: sa.Selector.Dst, Ifid: sa.Ifid})
	for i := range ps {
		if policyKey(&ps[i]) == key {
			return &ps[i]
		}
	}
	return nil
}

// policies adds or updates the peer's policies; it reports whether all three
// are in place.
func (a *applier) policies(want []netlink.XfrmPolicy, kpols []netlink.XfrmPolicy) bool {
	d := a.d
	ok := true
	for _, want := range want {
		var have *netlink.XfrmPolicy
		for i := range kpols {
			if policyKey(&kpols[i]) == policyKey(&want) {
				have = &kpols[i]
			}
		}
		switch {
		case have == nil:
			ok = a.do("add", "policy", policyWhat(&want), d.h.XfrmPolicyAdd(&want)) && ok
		case !samePolicy(have, &want):
			ok = a.do("update", "policy", policyWhat(&want), d.h.XfrmPolicyUpdate(&want)) && ok
		}
	}
	return ok
}

func (a *applier) route(pp peerPlan, krts []netlink.Route) {
	d := a.d
	want := pp.route
	for _, have := range krts {
		if have.Dst.String() != want.Dst.String() {
			continue
		}
		if have.LinkIndex == want.LinkIndex && have.Src.Equal(want.Src) && have.MTU == want.MTU {
			return
		}
		a.do("update", "route", routeWhat(&want), d.h.RouteReplace(&want))
		return
	}
	a.do("add", "route", routeWhat(&want), d.h.RouteAdd(&want))
}

// --- comparisons and descriptions (never print keys) ---------------------------

func algoEqual(a, b *netlink.XfrmStateAlgo) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Name == b.Name && bytes.Equal(a.Key, b.Key) && a.ICVLen == b.ICVLen && a.TruncateLen == b.TruncateLen
}

// sameSA: same keys, selector and tags (what a move keeps).
func sameSA(a, b *netlink.XfrmState) bool {
	return a.Spi == b.Spi && a.Reqid == b.Reqid && a.Ifid == b.Ifid && a.Mode == b.Mode &&
		algoEqual(a.Aead, b.Aead) && algoEqual(a.Crypt, b.Crypt) && algoEqual(a.Auth, b.Auth) &&
		a.Selector != nil && b.Selector != nil &&
		a.Selector.Src.String() == b.Selector.Src.String() && a.Selector.Dst.String() == b.Selector.Dst.String()
}

// sameOuter: same outer addresses and UDP ports (what a move changes).
func sameOuter(a, b *netlink.XfrmState) bool {
	return a.Src.Equal(b.Src) && a.Dst.Equal(b.Dst) && a.Encap != nil && b.Encap != nil &&
		a.Encap.SrcPort == b.Encap.SrcPort && a.Encap.DstPort == b.Encap.DstPort
}

func samePolicy(a, b *netlink.XfrmPolicy) bool {
	if len(a.Tmpls) != len(b.Tmpls) || a.Ifid != b.Ifid {
		return false
	}
	for i := range a.Tmpls {
		x, y := a.Tmpls[i], b.Tmpls[i]
		if !x.Src.Equal(y.Src) || !x.Dst.Equal(y.Dst) || x.Reqid != y.Reqid || x.Proto != y.Proto || x.Mode != y.Mode {
			return false
		}
	}
	return true
}

func policyKey(p *netlink.XfrmPolicy) string {
	return fmt.Sprintf("%s %v %v %d", p.Dir, p.Src, p.Dst, p.Ifid)
}

func ipAddr(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

func ipnetPrefix(n *net.IPNet) netip.Prefix {
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(ipAddr(n.IP), ones)
}

func outerWhat(s *netlink.XfrmState) string {
	var sp, dp int
	if s.Encap != nil {
		sp, dp = s.Encap.SrcPort, s.Encap.DstPort
	}
	return fmt.Sprintf("%v -> %v", netip.AddrPortFrom(ipAddr(s.Src), uint16(sp)), netip.AddrPortFrom(ipAddr(s.Dst), uint16(dp)))
}

func cipherName(s *netlink.XfrmState) string {
	switch {
	case s.Aead != nil:
		return s.Aead.Name
	case s.Crypt != nil && s.Auth != nil:
		return s.Crypt.Name + "+" + s.Auth.Name
	}
	return "none"
}

func stateWhat(s *netlink.XfrmState) string {
	sel := ""
	if s.Selector != nil {
		sel = fmt.Sprintf(" sel %v -> %v", s.Selector.Src, s.Selector.Dst)
	}
	return fmt.Sprintf("spi 0x%08x %s %s%s", uint32(s.Spi), outerWhat(s), cipherName(s), sel)
}

func policyWhat(p *netlink.XfrmPolicy) string {
	s := fmt.Sprintf("%s %v -> %v", p.Dir, p.Src, p.Dst)
	for _, t := range p.Tmpls {
		s += fmt.Sprintf(" tmpl %v -> %v reqid %d", t.Src, t.Dst, t.Reqid)
	}
	return s
}

func routeWhat(r *netlink.Route) string {
	return fmt.Sprintf("%v src %v mtu %d", r.Dst, r.Src, r.MTU)
}

// --- Stats, events, Close ------------------------------------------------------

// Stats returns per-peer SA counters: Tx from the outbound SA, Rx from the
// inbound ones, Drops from replay and integrity failures.
func (d *Dataplane) Stats(ctx context.Context) ([]controlplane.PeerStats, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var tx map[int]uint64
	if links, err := nldump.Retry(d.h.LinkList); err == nil {
		tx = TxCounters(links)
	}
	ss, err := d.states()
	if err != nil {
		return nil, fmt.Errorf("xfrm: stats: %w", err)
	}
	d.guard.Observe(tx, ss)
	byPeer := map[netip.Addr]*controlplane.PeerStats{}
	for ula := range d.outerOf {
		byPeer[ula] = &controlplane.PeerStats{ULA: ula, LastOuterChange: d.lastMove[ula]}
	}
	for _, s := range ss {
		ula, ok := d.spiPeer[uint32(s.Spi)]
		ps := byPeer[ula]
		if !ok || ps == nil {
			continue
		}
		if s.Selector != nil && ipAddr(s.Selector.Dst.IP) == ula {
			ps.TxPackets += s.Statistics.Packets
			ps.TxBytes += s.Statistics.Bytes
		} else {
			ps.RxPackets += s.Statistics.Packets
			ps.RxBytes += s.Statistics.Bytes
		}
		ps.Drops += uint64(s.Statistics.ReplayWindow) + uint64(s.Statistics.Replay) + uint64(s.Statistics.Failed)
	}
	out := make([]controlplane.PeerStats, 0, len(byPeer))
	for _, ps := range byPeer {
		out = append(out, *ps)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ULA.Less(out[j].ULA) })
	return out, nil
}

// deliver annotates a kernel event with its peer and hands it to Events.
func (d *Dataplane) deliver(e Event) {
	d.mu.Lock()
	e.Peer = d.spiPeer[e.SPI]
	closed := d.closed
	d.mu.Unlock()
	if closed {
		return
	}
	select {
	case d.events <- e:
	default:
		d.log.Warn("xfrm event dropped: reader too slow", "event", e.String())
	}
}

// scheduleReapLocked arms a timer for the earliest retiring deadline.
func (d *Dataplane) scheduleReapLocked() {
	if d.reaper != nil {
		d.reaper.Stop()
		d.reaper = nil
	}
	var first time.Time
	for _, r := range d.retiring {
		if first.IsZero() || r.deadline.Before(first) {
			first = r.deadline
		}
	}
	if first.IsZero() {
		return
	}
	d.reaper = time.AfterFunc(max(first.Sub(d.cfg.Now()), 0)+10*time.Millisecond, d.reap)
}

// reap deletes retired outbound SAs whose grace period is over.
func (d *Dataplane) reap() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return
	}
	kstates, err := d.states()
	if err != nil {
		d.log.Warn("xfrm: listing states to retire old outbound SAs", "err", err)
		d.scheduleReapLocked()
		return
	}
	now := d.cfg.Now()
	for _, s := range kstates {
		spi, k := uint32(s.Spi), keyOfState(&s)
		if r, ok := d.retiring[k]; ok && !now.Before(r.deadline) {
			if err := d.h.XfrmStateDel(&s); err != nil && !absent(err) {
				d.log.Warn("xfrm: deleting retired outbound SA", "spi", fmt.Sprintf("0x%08x", spi), "mode", s.Mode, "err", err)
				continue
			}
			d.log.Info("xfrm: retired outbound SA deleted", "spi", fmt.Sprintf("0x%08x", spi), "mode", s.Mode)
			delete(d.retiring, k)
		}
	}
	d.scheduleReapLocked()
}

// Close removes every kernel object of ours (routes, policies, states, the
// address and the xfrm interface), stops the event monitor and closes
// Events.
func (d *Dataplane) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	if d.reaper != nil {
		d.reaper.Stop()
	}
	var errs []error
	errs = append(errs, d.removeLeftovers())
	errs = append(errs, d.tun.CloseFou())
	if d.loAddr.IsValid() {
		if lo, err := d.h.LinkByName("lo"); err == nil {
			if err := d.h.AddrDel(lo, &netlink.Addr{IPNet: prefix128(d.loAddr)}); err != nil && !absent(err) && !errors.Is(err, syscall.EADDRNOTAVAIL) {
				errs = append(errs, fmt.Errorf("delete %v from lo: %w", d.loAddr, err))
			}
		}
		d.loAddr = netip.Addr{}
	}
	d.mu.Unlock()
	for _, c := range d.closers {
		errs = append(errs, c())
	}
	d.wg.Wait()
	close(d.events)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("xfrm: close: %w", err)
	}
	return nil
}
