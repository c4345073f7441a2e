package main

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/names"
	"github.com/btmm/btmm/controlplane/nldump"
)

// Defaults of the [names] section.
const (
	defaultStubAddr  = "127.0.0.77:53"
	defaultHostsFile = "/etc/hosts"
)

// How often runNames tries the system bus again when it could not connect.
const busRetry = 10 * time.Second

// runNames keeps this host and its peers resolvable by name (package
// names) until ctx ends. The stub answers from the peer table; the system
// resolver is pointed at it by a per-link DNS route in systemd-resolved
// where resolved runs (names.mode auto or resolved), else by a managed
// block in the hosts file that lists the same names. At the end the route
// or block is removed and the stub closed; done is closed after that.
func runNames(ctx context.Context, cfg *Config, a *agent.Agent, log *slog.Logger) (done <-chan struct{}) {
	ch := make(chan struct{})
	if cfg.Names.Mode == "off" {
		close(ch)
		return ch
	}
	n := &namesRunner{cfg: cfg, a: a, log: log, table: names.NewTable(cfg.Domain),
		self: cfg.Host + "." + strings.TrimSuffix(cfg.Domain, "."), hostsOn: true}
	if cfg.Names.Mode != "hosts" {
		var err error
		if n.nl, err = netlink.NewHandle(unix.NETLINK_ROUTE); err != nil {
			log.Warn("names: no rtnetlink handle; names resolve through the hosts file only", "err", err)
		}
	}
	if ap, err := netip.ParseAddrPort(cfg.Names.Listen); err == nil {
		if n.stub, err = names.ListenStub(ap, n.table, n.upstream, log); err != nil {
			log.Warn("name stub not started; names resolve through the hosts file only", "err", err)
		} else {
			log.Info("name stub", "listen", n.stub.Addr, "domain", n.table.Domain())
		}
	}
	go func() {
		defer close(ch)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			n.step(ctx)
			select {
			case <-ctx.Done():
				n.stop()
				return
			case <-tick.C:
			}
		}
	}()
	return ch
}

// namesRunner is runNames' state; only its goroutine uses it.
type namesRunner struct {
	cfg   *Config
	a     *agent.Agent
	log   *slog.Logger
	table *names.Table
	self  string
	stub  *names.Stub

	nl       *netlink.Handle // in btmmd's own network namespace
	server   atomic.Value    // string: the zone's server for the stub's forwards ("" none)
	bus      *names.Resolved // nil: not connected
	busTried time.Time
	why      string // the last reason resolved is not used

	// The resolved route in place (link 0: none).
	link      int
	linkName  string
	owner     string     // resolved's unique bus name when it was set
	stubOn    netip.Addr // the stub's loopback address added to link (invalid: none)
	hostsOn   bool       // our block is (or may be: a crashed btmmd's) in the hosts file
	hostsFail bool
	lastErr   string
	status    agent.NamesStatus
}

func (n *namesRunner) step(ctx context.Context) {
	st := n.a.Status(ctx)
	hosts := []names.Host{{Name: n.cfg.Host, ULA: st.ULA}}
	for _, p := range st.Peers {
		hosts = append(hosts, names.Host{Name: p.Name, ULA: p.ULA})
	}
	changed := n.table.Set(hosts)
	if !n.cfg.DNS.TLS { // the stub forwards in clear only: not where the server is reached over TLS
		n.server.Store(st.Register.Server)
	}

	var ns agent.NamesStatus
	if n.cfg.Names.Mode != "hosts" {
		owner, link, why := n.resolvedTarget(st.ULA)
		n.why = why
		if link != nil {
			ns = n.useResolved(owner, link)
			n.report(ns)
			return
		}
		if n.cfg.Names.Mode == "resolved" {
			n.dropResolved()
			n.report(agent.NamesStatus{Mechanism: "none", Detail: "names.mode resolved", Error: why})
			return
		}
		ns.Why = why
	}
	n.dropResolved()
	if changed || !n.hostsOn || n.hostsFail {
		err := names.WriteHosts(n.cfg.Names.HostsFile, n.self, n.cfg.Domain, n.table.Hosts())
		if err != nil && !n.hostsFail {
			n.log.Warn("hosts file not updated", "file", n.cfg.Names.HostsFile, "err", err)
		}
		n.hostsOn, n.hostsFail = true, err != nil
		if err != nil {
			ns.Error = err.Error()
		}
	}
	ns.Mechanism, ns.Detail = "hosts", "block in "+n.cfg.Names.HostsFile
	if n.stub != nil {
		ns.Detail += "; stub " + n.stub.Addr.String()
	}
	if n.hostsFail && ns.Error == "" {
		ns.Error = n.status.Error
	}
	n.report(ns)
}

// upstream is the stub's server for names in the domain that are not
// host names (SRV discovery), see names.Handler.
func (n *namesRunner) upstream() string {
	s, _ := n.server.Load().(string)
	return s
}

// report logs a change of mechanism and hands the status to the agent.
func (n *namesRunner) report(ns agent.NamesStatus) {
	if ns.Mechanism != n.status.Mechanism || ns.Detail != n.status.Detail {
		n.log.Info("names resolve through "+ns.Mechanism, "detail", ns.Detail, "why", ns.Why)
	}
	if ns.Error != "" && ns.Error != n.status.Error {
		n.log.Warn("names", "mechanism", ns.Mechanism, "err", ns.Error)
	}
	n.status = ns
	n.a.SetNames(ns)
}

// resolvedTarget returns resolved's bus name and the link to route on
// when resolved runs and the ULA sits on a link of btmm's own that it
// accepts (not loopback); else why not.
func (n *namesRunner) resolvedTarget(ula netip.Addr) (owner string, link netlink.Link, why string) {
	if n.stub == nil {
		return "", nil, "the name stub did not start"
	}
	if n.nl == nil {
		return "", nil, "no rtnetlink handle"
	}
	if n.bus == nil {
		if !n.busTried.IsZero() && time.Since(n.busTried) < busRetry {
			return "", nil, n.why
		}
		n.busTried = time.Now()
		b, err := names.DialResolved()
		if err != nil {
			return "", nil, "systemd-resolved not reachable: " + err.Error()
		}
		n.bus = b
	}
	owner, err := n.bus.Owner()
	if err != nil {
		n.bus.Close()
		n.bus, n.owner = nil, ""
		return "", nil, err.Error()
	}
	if owner == "" {
		return "", nil, "systemd-resolved is not running"
	}
	l, err := ulaLink(n.nl, ula)
	if err != nil {
		return "", nil, err.Error()
	}
	if !initNetnsHas(ula, l.Attrs().Index, l.Attrs().Name) {
		return "", nil, "btmmd runs in another network namespace than the system's (and its systemd-resolved)"
	}
	if l.Attrs().Flags&net.FlagLoopback != 0 {
		return "", nil, fmt.Sprintf("the ULA is on %s, and systemd-resolved takes no DNS route on a loopback link (the xfrm dataplane without xfrm interfaces, or the eBPF dataplane)", l.Attrs().Name)
	}
	return owner, l, ""
}

// useResolved puts (or keeps) the route to the stub on link.
func (n *namesRunner) useResolved(owner string, link netlink.Link) agent.NamesStatus {
	idx := link.Attrs().Index
	domains := names.Domains(n.cfg.Domain, *n.cfg.Names.Search)
	ns := agent.NamesStatus{Mechanism: "resolved",
		Detail: fmt.Sprintf("systemd-resolved, link %s: DNS %s, domain %s, not default route", link.Attrs().Name, n.stub.Addr, domains[0])}
	if n.link != 0 && n.link != idx {
		n.dropResolved() // the link was replaced (e.g. repaired): the new one gets the route
	}
	stubOK := n.stubOn.IsValid() && hasAddr(n.nl, link, n.stubOn)
	if n.link == idx && n.owner == owner && (stubOK || !needsStubAddr(n.stub.Addr.Addr())) {
		ns.Error = n.lastErr
		return ns
	}
	// resolved queries a link's DNS servers from sockets bound to that link
	// (IP_UNICAST_IF): a loopback stub address must be on the link too.
	if a := n.stub.Addr.Addr(); needsStubAddr(a) && !stubOK {
		if err := addStubAddr(n.nl, link, a); err != nil {
			n.lastErr = err.Error()
			ns.Error = n.lastErr
			return ns
		}
		n.stubOn = a
	}
	if err := n.bus.SetLink(idx, n.stub.Addr, domains); err != nil {
		n.lastErr = err.Error()
		ns.Error = n.lastErr
		return ns
	}
	n.link, n.linkName, n.owner, n.lastErr = idx, link.Attrs().Name, owner, ""
	if n.hostsOn {
		// Switched from the hosts file (or a crash left a block): one answer only.
		if err := names.WriteHosts(n.cfg.Names.HostsFile, n.self, n.cfg.Domain, nil); err != nil {
			n.log.Warn("removing our block from the hosts file", "file", n.cfg.Names.HostsFile, "err", err)
		}
		n.hostsOn = false
	}
	return ns
}

// dropResolved removes the route and the stub address, if set.
func (n *namesRunner) dropResolved() {
	if n.link == 0 {
		return
	}
	if n.bus != nil {
		if err := n.bus.RevertLink(n.link); err != nil && linkExists(n.nl, n.link) {
			n.log.Warn("names: removing the DNS route from systemd-resolved", "link", n.linkName, "err", err)
		}
	}
	if n.stubOn.IsValid() {
		if l, err := n.nl.LinkByIndex(n.link); err == nil {
			delStubAddr(n.nl, l, n.stubOn)
		}
	}
	n.link, n.linkName, n.owner, n.stubOn = 0, "", "", netip.Addr{}
}

func (n *namesRunner) stop() {
	n.dropResolved()
	if n.bus != nil {
		n.bus.Close()
	}
	// Also when the block was never ours this run: a crashed btmmd's stays otherwise.
	if err := names.WriteHosts(n.cfg.Names.HostsFile, n.self, n.cfg.Domain, nil); err != nil && n.hostsOn {
		n.log.Warn("removing our block from the hosts file", "file", n.cfg.Names.HostsFile, "err", err)
	}
	if n.stub != nil {
		n.stub.Close()
	}
	if n.nl != nil {
		n.nl.Close()
	}
}

// ulaLink is the link that holds the ULA.
func ulaLink(h *netlink.Handle, ula netip.Addr) (netlink.Link, error) {
	as, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(nil, netlink.FAMILY_V6) })
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range as {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip == ula {
			l, err := h.LinkByIndex(a.LinkIndex)
			if err != nil {
				return nil, fmt.Errorf("the ULA's link: %w", err)
			}
			return l, nil
		}
	}
	return nil, fmt.Errorf("the ULA %s is on no link yet", ula)
}

func linkExists(h *netlink.Handle, idx int) bool {
	_, err := h.LinkByIndex(idx)
	return err == nil
}

// needsStubAddr: resolved reaches a loopback stub from a link-bound socket
// only when the address is on that link too (IPv4; on IPv6 a loopback
// address cannot be put on another link).
func needsStubAddr(a netip.Addr) bool { return a.Is4() && a.IsLoopback() }

func stubNet(a netip.Addr) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(32, 32)}, Scope: unix.RT_SCOPE_HOST}
}

// addStubAddr puts a/32 on link with host scope: it is never a source
// address, and resolved does not count it as a reason to use the link.
func addStubAddr(h *netlink.Handle, link netlink.Link, a netip.Addr) error {
	if err := h.AddrAdd(link, stubNet(a)); err != nil && !errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("add the stub's address %s to %s: %w", a, link.Attrs().Name, err)
	}
	return nil
}

func delStubAddr(h *netlink.Handle, link netlink.Link, a netip.Addr) {
	h.AddrDel(link, stubNet(a))
}

func hasAddr(h *netlink.Handle, link netlink.Link, a netip.Addr) bool {
	as, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(link, netlink.FAMILY_V4) })
	if err != nil {
		return false
	}
	for _, x := range as {
		if ip, ok := netip.AddrFromSlice(x.IP); ok && ip.Unmap() == a {
			return true
		}
	}
	return false
}

// initNetnsHas reports whether the network namespace of PID 1 (the
// system's, where systemd-resolved runs) has the ULA on the link idx named
// name, i.e. whether btmmd runs in that namespace: resolved knows links by
// index, and one of another namespace must never get a DNS route there
// (tests run btmmd in namespaces of a machine whose resolved runs).
// /proc/1/net needs no ptrace access to PID 1, unlike /proc/1/ns/net.
func initNetnsHas(ula netip.Addr, idx int, name string) bool {
	b, err := os.ReadFile("/proc/1/net/if_inet6")
	if err != nil {
		return false
	}
	want := hex.EncodeToString(ula.AsSlice())
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) == 6 && f[0] == want && f[5] == name {
			if i, err := strconv.ParseInt(f[1], 16, 32); err == nil && int(i) == idx {
				return true
			}
		}
	}
	return false
}
