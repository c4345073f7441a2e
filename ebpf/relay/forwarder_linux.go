package relay

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane/nldump"
	ctlrelay "github.com/btmm/btmm/controlplane/relay"
)

// Config configures a Forwarder.
type Config struct {
	Device           string     // the relay's interface (its public address is on it)
	Addr             netip.Addr // the relay's IPv4 address
	PortMin, PortMax uint16     // allocation ports
	ForceClsact      bool       // attach with clsact even where TCX exists (tests)
	Logger           *slog.Logger
}

// Forwarder is the attached program and its maps. Create it in the
// network namespace of Device (the netlink handle and the attach use the
// calling thread's namespace).
type Forwarder struct {
	cfg  Config
	log  *slog.Logger
	objs relayObjects
	nl   *netlink.Handle
	dev  netlink.Link
	tcx  link.Link

	mu     sync.Mutex
	flows  map[relayFlowKey]relayRewrite
	closed bool
}

const (
	filterHandle = 0xb7e1
	filterPrio   = 0xb7e1
)

// New loads the program, writes its config and attaches it to Device's ingress.
func New(cfg Config) (*Forwarder, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if !cfg.Addr.Is4() || cfg.PortMin == 0 || cfg.PortMax < cfg.PortMin {
		return nil, fmt.Errorf("ebpf/relay: need an IPv4 address and a port range (got %v, %d-%d)", cfg.Addr, cfg.PortMin, cfg.PortMax)
	}
	f := &Forwarder{cfg: cfg, log: cfg.Logger, flows: map[relayFlowKey]relayRewrite{}}
	if err := loadRelayObjects(&f.objs, nil); err != nil {
		return nil, fmt.Errorf("ebpf/relay: load: %w", err)
	}
	c := relayRelayConfig{Addr: cfg.Addr.As4(), PortMin: cfg.PortMin, PortMax: cfg.PortMax}
	if err := f.objs.Config.Put(uint32(0), c); err != nil {
		f.objs.Close()
		return nil, fmt.Errorf("ebpf/relay: config: %w", err)
	}
	var err error
	if f.nl, err = netlink.NewHandle(); err != nil {
		f.objs.Close()
		return nil, fmt.Errorf("ebpf/relay: netlink: %w", err)
	}
	if f.dev, err = f.nl.LinkByName(cfg.Device); err != nil {
		f.Close()
		return nil, fmt.Errorf("ebpf/relay: device %q: %w", cfg.Device, err)
	}
	if err := f.attach(); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// Attachment says how the program hangs on the device ("tcx" or "clsact").
func (f *Forwarder) Attachment() string {
	if f.tcx != nil {
		return "tcx"
	}
	return "clsact"
}

func (f *Forwarder) filter() *netlink.BpfFilter {
	return &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: f.dev.Attrs().Index, Parent: netlink.HANDLE_MIN_INGRESS,
			Handle: filterHandle, Protocol: unix.ETH_P_ALL, Priority: filterPrio},
		Name: "btmm_relay", DirectAction: true, Fd: f.objs.RelayIngress.FD(),
	}
}

func (f *Forwarder) attach() error {
	if !f.cfg.ForceClsact {
		l, err := link.AttachTCX(link.TCXOptions{Interface: f.dev.Attrs().Index, Program: f.objs.RelayIngress, Attach: ebpf.AttachTCXIngress})
		if err == nil {
			f.tcx = l
			f.nl.FilterDel(f.filter()) // a clsact leftover of an older run
			return nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("ebpf/relay: attach tcx on %s: %w", f.cfg.Device, err)
		}
		f.log.Info("no TCX on this kernel; attaching with clsact", "err", err)
	}
	q := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: f.dev.Attrs().Index,
		Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
	if err := f.nl.QdiscAdd(q); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("ebpf/relay: clsact on %s: %w", f.cfg.Device, err)
	}
	if err := f.nl.FilterReplace(f.filter()); err != nil {
		return fmt.Errorf("ebpf/relay: cls_bpf filter on %s: %w", f.cfg.Device, err)
	}
	return nil
}

func key(fl ctlrelay.Flow) relayFlowKey {
	return relayFlowKey{FromAddr: fl.From.Addr().As4(), FromPort: fl.From.Port(), InPort: fl.InPort}
}

// Set makes the flow table exactly flows: new and changed entries first,
// then removals. Entries that are not IPv4 are refused before anything changes.
func (f *Forwarder) Set(flows map[ctlrelay.Flow]ctlrelay.Rewrite) error {
	want := map[relayFlowKey]relayRewrite{}
	for fl, rw := range flows {
		if rw.ToStack {
			// Port 0: the program passes the datagram to the relay's socket.
			if !fl.From.Addr().Is4() {
				return fmt.Errorf("ebpf/relay: flow %v is not IPv4", fl.From)
			}
			want[key(fl)] = relayRewrite{OutPort: rw.OutPort}
			continue
		}
		if !fl.From.Addr().Is4() || !rw.To.Addr().Is4() || rw.To.Port() == 0 {
			return fmt.Errorf("ebpf/relay: flow %v -> %v is not IPv4 with a port", fl.From, rw.To)
		}
		want[key(fl)] = relayRewrite{ToAddr: rw.To.Addr().As4(), ToPort: rw.To.Port(), OutPort: rw.OutPort, Limit: rw.Limit}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var errs []error
	for k, v := range want {
		if old, ok := f.flows[k]; ok && old == v {
			continue
		}
		if _, ok := f.flows[k]; !ok {
			if err := f.objs.FlowCounters.Put(k, relayFlowStats{}); err != nil {
				errs = append(errs, fmt.Errorf("counters: %w", err))
				continue
			}
		}
		if err := f.objs.Flows.Put(k, v); err != nil {
			errs = append(errs, fmt.Errorf("flow: %w", err))
			continue
		}
		f.flows[k] = v
	}
	for k := range f.flows {
		if _, ok := want[k]; ok {
			continue
		}
		if err := f.objs.Flows.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("delete flow: %w", err))
			continue
		}
		f.objs.FlowCounters.Delete(k)
		delete(f.flows, k)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("ebpf/relay: set: %w", err)
	}
	return nil
}

// Stats reads the per-flow counters.
func (f *Forwarder) Stats() (map[ctlrelay.Flow]ctlrelay.Counters, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[ctlrelay.Flow]ctlrelay.Counters{}
	for k := range f.flows {
		var st relayFlowStats
		if err := f.objs.FlowCounters.Lookup(k, &st); err != nil {
			continue
		}
		fl := ctlrelay.Flow{InPort: k.InPort, From: netip.AddrPortFrom(netip.AddrFrom4(k.FromAddr), k.FromPort)}
		out[fl] = ctlrelay.Counters{Packets: st.Packets, Bytes: st.Bytes, Dropped: st.Dropped}
	}
	return out, nil
}

// Verdicts are the program's counters by outcome.
type Verdicts struct {
	Forwarded, Unbound, OverQuota, NoRoute, ToStack uint64
}

// Verdicts sums the per-CPU outcome counters.
func (f *Forwarder) Verdicts() (Verdicts, error) {
	var v Verdicts
	for i, dst := range []*uint64{&v.Forwarded, &v.Unbound, &v.OverQuota, &v.NoRoute, &v.ToStack} {
		var per []uint64
		if err := f.objs.Verdicts.Lookup(uint32(i), &per); err != nil {
			return v, fmt.Errorf("ebpf/relay: verdicts: %w", err)
		}
		for _, n := range per {
			*dst += n
		}
	}
	return v, nil
}

// Close detaches the program and releases the maps.
func (f *Forwarder) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil
	}
	f.closed = true
	var errs []error
	if f.tcx != nil {
		errs = append(errs, f.tcx.Close())
		f.tcx = nil
	} else if f.nl != nil && f.dev != nil {
		if err := f.nl.FilterDel(f.filter()); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("ebpf/relay: delete filter: %w", err))
		}
		if fs, err := nldump.Retry(func() ([]netlink.Filter, error) { return f.nl.FilterList(f.dev, netlink.HANDLE_MIN_INGRESS) }); err == nil && len(fs) == 0 {
			if eg, err := nldump.Retry(func() ([]netlink.Filter, error) { return f.nl.FilterList(f.dev, netlink.HANDLE_MIN_EGRESS) }); err == nil && len(eg) == 0 {
				f.nl.QdiscDel(&netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: f.dev.Attrs().Index,
					Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"})
			}
		}
	}
	if f.nl != nil {
		f.nl.Close()
	}
	errs = append(errs, f.objs.Close())
	return errors.Join(errs...)
}

var _ ctlrelay.Forwarder = (*Forwarder)(nil)
