// Package agent composes btmmd, the host agent of RFC 6281: this boot's ULA
// identity (§6.3), the tunnel port's NAT mapping (§4), leased registration of
// AAAA/SRV/A/TXT/PTR records (§3, §5.2), LLQ-driven tracking of the user's
// other hosts (§5.3), Kerberos-authenticated keying (§7.1, §7.3.1), and a
// kernel dataplane (package xfrm or ebpf) that the reconciler reprograms only
// when an address or a key changes.
//
// The NAT mapping and the peer tracker plug in as functions (NATFunc,
// PeersFunc) so the agent does not depend on how they are built, and tests
// can drive it without a gateway or a DNS server.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/identity"
	"github.com/btmm/btmm/controlplane/keying"
	"github.com/btmm/btmm/controlplane/netmon"
	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/dns/llqclient"
	"github.com/btmm/btmm/dns/register"
)

// NATReport is what the NAT mapping side tells the agent.
type NATReport struct {
	// External is where peers reach our tunnel port: the gateway's public
	// address and mapped port, or our own address when there is no NAT.
	// Invalid while unknown or unusable (double NAT).
	External netip.AddrPort
	Status   string // human readable: "mapped by PCP", "no gateway: public network", "double NAT: ..."
	// BehindNAT: our tunnel port is behind a NAT (mapped, or a private
	// address with no gateway to ask), so NAT keepalives are needed.
	BehindNAT bool `json:"behind_nat"`
	// FOU is where peers reach our GUE port (TunnelsConfig.FOUPort) when
	// the gateway maps it too; invalid otherwise.
	FOU netip.AddrPort `json:"fou,omitzero"`
}

// NATFunc runs until ctx ends, keeping the tunnel port mapped and calling
// report whenever the external address or the status changes. It deletes
// its mappings before it returns.
type NATFunc func(ctx context.Context, internalPort uint16, report func(NATReport)) error

// PeerEvent is one change of the user's other hosts.
type PeerEvent struct {
	Removed      bool
	Name         string // host name in the user's domain
	ULA          netip.Addr
	Outer        netip.AddrPort // invalid while unknown
	Capabilities register.Capabilities
}

// PeersFunc runs until ctx ends, calling report for every change of the
// user's other hosts (this host excluded).
type PeersFunc func(ctx context.Context, report func(PeerEvent)) error

// Config is a composed agent.
type Config struct {
	Identity      identity.Identity
	Host          string // this host's label in the user's domain
	Domain        string // the user's domain
	TunnelPort    uint16
	Dataplane     controlplane.Dataplane
	DataplaneName string // for status and TXT ("xfrm", "ebpf", "ebpf-cleartext")
	// Transport carries keying messages on the tunnel port (an xfrm.Conn).
	Transport keying.Transport
	Auth      keying.Auth
	Principal string // this host's Kerberos principal, published in TXT (informational: peers ignore it)
	// PrincipalFor is the Kerberos principal a peer named host must
	// authenticate as; default keying.DefaultPrincipal(host, Domain, "").
	// It must come from local configuration, never from DNS.
	PrincipalFor func(host string) string
	// Keying tunes the key exchange: SALifetime, HardLifetime, ReplayFile
	// and the handshake limits are used (the rest is the agent's).
	Keying keying.Config
	// Register is the registrar config minus Outer/ULA/Label/Capabilities,
	// which the agent fills in.
	Register register.Config
	NAT      NATFunc        // nil: no NAT handling, External must be set
	External netip.AddrPort // static external address when NAT is nil
	Peers    PeersFunc
	// Rebind is called when our external address changes, after the new
	// address is published: the peer tracker's LLQs must be set up again
	// from it (the server sends events to where it last heard from us).
	Rebind func()
	// LLQStatus reports the peer tracker's LLQ client (false before it
	// exists), for Status; nil: not shown.
	LLQStatus func() (llqclient.Status, bool)
	// KernelEvents are the dataplane's notifications (xfrm.Dataplane.Events
	// adapted): NAT mapping changes seen in ESP traffic, and SAs reaching
	// their soft lifetime; nil if the dataplane has none.
	KernelEvents <-chan KernelEvent
	// NetMon follows the host's own network (package netmon); the agent
	// runs it. nil: the agent does not follow the host (static setups,
	// tests).
	NetMon *netmon.Monitor
	// Rediscover makes the NAT side look for the gateway again at once
	// (natpmp.Client.Rediscover); called on a major network change.
	Rediscover func()
	// Device is the configured tunnel device (controlplane.Local.Device);
	// empty: the default route's, looked up again at every change.
	Device string
	// Keepalive is the NAT keepalive interval (RFC 3948 §2.3): zero means
	// DefaultKeepalive, negative turns keepalives off.
	Keepalive time.Duration
	// KeepaliveSender sends them; nil: the Transport, if it can (xfrm.Conn).
	KeepaliveSender KeepaliveSender
	// Paths turns on endpoint candidates, connectivity checks and the
	// relay (issue 14, paths.go); nil: peers are reached at their SRV/A.
	Paths *PathsConfig
	// Tunnels turns on tunnel paths (ipv6, sit, fou; issue 15, tunnels.go);
	// it needs Paths. nil: ESP-in-UDP only.
	Tunnels *TunnelsConfig
	Logger  *slog.Logger
}

// KernelEvent is what the kernel reports about a peer's SAs: either ESP
// arrived from a new outer address (New is valid), or an SA reached its soft
// lifetime (Rekey).
type KernelEvent struct {
	Peer  netip.Addr
	New   netip.AddrPort
	Rekey bool
}

// Agent is a running btmmd.
type Agent struct {
	cfg   Config
	log   *slog.Logger
	rec   *controlplane.Reconciler
	reg   *register.Registrar
	keyer *keying.Agent
	paths *paths // nil without Config.Paths

	// ctx is Run's context: work started by callbacks (peer events, network
	// changes) ends with it. Set before any part starts.
	ctx       context.Context
	statsBusy atomic.Bool

	keepaliveSender KeepaliveSender
	followKick      chan struct{}
	// keyingAgain asks keyingPeersAgain to hand keying the peers again: the
	// last SetPeers failed (keying's goroutine was busy past the deadline).
	keyingAgain chan struct{}
	// echo sends one ICMPv6 echo request to a peer's ULA through the
	// tunnel (ping.go; tests replace it).
	echo func(ula netip.Addr)

	mu             sync.Mutex
	nat            NATReport
	peers          map[netip.Addr]PeerEvent // the peers keyed: ULAs exactly one name holds (derived from book)
	book           peerBook                 // the user's other hosts by name (identity.go)
	conflicts      []Conflict
	names          *NamesStatus // set by SetNames
	started        time.Time
	pendingNet     *netmon.Change // latest major change not yet followed
	pendingNATMove bool           // our NAT's external address changed: tell peers
	netStatus      NetworkStatus
	activity       map[netip.Addr]*activity
	health         map[netip.Addr]*healthTrack // health.go
	keyingErrs     map[netip.Addr]string       // health.go: the last keying errors read
	unreach        map[netip.Addr]string       // peers not keyed: no common address family (tunnels.go)
}

// New checks cfg and builds the agent's parts; Run starts them.
func New(cfg Config) (*Agent, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Dataplane == nil || cfg.Transport == nil || cfg.Auth == nil || cfg.Peers == nil {
		return nil, errors.New("agent: Config needs Dataplane, Transport, Auth and Peers")
	}
	if cfg.NAT == nil && !cfg.External.IsValid() {
		return nil, errors.New("agent: no NAT function and no static external address")
	}
	if cfg.Tunnels != nil && cfg.Paths == nil {
		return nil, errors.New("agent: tunnel paths need path selection (Config.Paths)")
	}
	if cfg.Keepalive == 0 {
		cfg.Keepalive = DefaultKeepalive
	}
	a := &Agent{cfg: cfg, log: cfg.Logger, peers: map[netip.Addr]PeerEvent{}, started: time.Now(),
		followKick: make(chan struct{}, 1), keyingAgain: make(chan struct{}, 1), activity: map[netip.Addr]*activity{},
		health: map[netip.Addr]*healthTrack{}, keyingErrs: map[netip.Addr]string{}}
	a.echo = a.sendEcho
	a.keepaliveSender = cfg.KeepaliveSender
	if ks, ok := cfg.Transport.(KeepaliveSender); ok && a.keepaliveSender == nil {
		a.keepaliveSender = ks
	}
	a.rec = controlplane.NewReconciler(cfg.Dataplane, a.local(), cfg.Logger.With("part", "reconciler"))

	rc := cfg.Register
	rc.Host, rc.Domain = cfg.Host, cfg.Domain
	rc.ULA, rc.Label = cfg.Identity.ULA, cfg.Identity.Label()
	rc.Outer = cfg.External
	rc.Capabilities = register.Capabilities{
		Version:    register.ProtocolVersion,
		Device:     "linux btmmd",
		Dataplanes: []string{cfg.DataplaneName},
		KeyingPort: cfg.TunnelPort,
		Principal:  cfg.Principal,
	}
	var err error
	if a.reg, err = register.New(rc, cfg.Logger.With("part", "register")); err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	transport := cfg.Transport
	var installer keying.Installer = a.rec
	if cfg.Paths != nil {
		installer = pathInstaller{a}
		if a.paths, err = newPaths(a, *cfg.Paths, rc.Capabilities); err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		transport = a.paths.transport()
	}
	kc := cfg.Keying
	kc.ULA, kc.Auth, kc.Transport, kc.Installer = cfg.Identity.ULA, cfg.Auth, transport, installer
	kc.Logger = cfg.Logger.With("part", "keying")
	a.keyer, err = keying.New(kc)
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	return a, nil
}

// Run runs every part until ctx ends, then shuts down in order: keying sends
// DELETE, the registrar deletes our records, the NAT mapping is removed, and
// the dataplane removes every kernel object it made.
func (a *Agent) Run(ctx context.Context) error {
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	a.ctx = runCtx
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	start := func(name string, f func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(runCtx); err != nil && runCtx.Err() == nil {
				a.log.Error("part failed", "part", name, "err", err)
				select { // the first failure ends the run; later ones are logged above
				case errc <- fmt.Errorf("%s: %w", name, err):
				default:
				}
				cancel()
			}
		}()
	}
	start("reconciler", a.rec.Run)
	start("keying", a.keyer.Run)
	start("keying-peers", a.keyingPeersAgain)
	start("register", a.reg.Run)
	if a.cfg.NAT != nil {
		start("nat", func(ctx context.Context) error { return a.cfg.NAT(ctx, a.cfg.TunnelPort, a.onNAT) })
	}
	start("peers", func(ctx context.Context) error { return a.cfg.Peers(ctx, a.onPeer) })
	if a.paths != nil {
		start("paths", a.paths.run)
	}
	if a.cfg.KernelEvents != nil {
		start("kernel-events", a.kernelEvents)
	}
	start("follow", a.follow)
	if a.cfg.NetMon != nil {
		unregister := a.cfg.NetMon.RegisterChangeCallback(a.onNetChange)
		defer unregister()
		start("netmon", a.cfg.NetMon.Run)
	}
	start("keepalive", a.keepalives) // and the peers' liveness (health.go)
	<-runCtx.Done()
	wg.Wait()
	close(errc)
	var errs []error
	for err := range errc {
		errs = append(errs, err)
	}
	if err := a.cfg.Dataplane.Close(); err != nil {
		errs = append(errs, fmt.Errorf("dataplane close: %w", err))
	}
	return errors.Join(errs...)
}

func (a *Agent) onNAT(r NATReport) {
	a.mu.Lock()
	changed := r.External != a.nat.External
	fouChanged := r.FOU != a.nat.FOU
	// Our NAT's public side moved under us (the host itself may not have
	// changed at all): tell the peers from the new address at once.
	if changed && r.External.IsValid() && a.nat.External.IsValid() {
		a.pendingNATMove = true
	}
	a.nat = r
	a.mu.Unlock()
	a.log.Info("nat", "external", r.External, "status", r.Status, "behind_nat", r.BehindNAT, "fou", r.FOU)
	a.wakeFollow()
	if fouChanged && a.paths != nil {
		a.paths.republish() // c-fou
	}
	if changed && r.External.IsValid() {
		if err := a.reg.SetOuter(r.External); err != nil {
			a.log.Warn("publishing new external address", "err", err)
		}
		if a.cfg.Rebind != nil {
			a.cfg.Rebind()
		}
		if a.paths != nil {
			// Measure and publish our candidates again: a new mapping,
			// or none usable (a private address) and SRV/A must say
			// the reflexive endpoint or the relay again.
			a.paths.republish()
		}
	}
}

func (a *Agent) onPeer(ev PeerEvent) {
	ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
	defer cancel()
	if ev.ULA == a.cfg.Identity.ULA {
		return // ourselves, seen through the browse PTR
	}
	a.mu.Lock()
	_, holder, held := a.applyPeerEvent(ev) // identity.go: by name, conflicts keyed with neither
	a.mu.Unlock()
	a.log.Info("peer", "name", ev.Name, "ula", ev.ULA, "outer", ev.Outer, "removed", ev.Removed)
	if a.paths != nil {
		if held {
			a.paths.onPeerEvent(holder)
		} else {
			a.paths.onPeerEvent(PeerEvent{Removed: true, Name: ev.Name, ULA: ev.ULA})
		}
	}
	switch {
	case !held: // gone, or claimed by several names
		if err := a.rec.RemovePeer(ctx, ev.ULA); err != nil {
			a.log.Warn("removing peer", "peer", ev.Name, "err", err)
		}
	case a.paths.current(holder.ULA).IsValid() && !a.paths.current(holder.ULA).Kind.Tunnel():
		// The path selector decides where this peer is reached.
	case holder.Outer.IsValid() && !a.paths.ipv6Only():
		// (An IPv6-only host cannot send to an IPv4 endpoint: the
		// dataplane would fail to route it. Its peers are reached by
		// their tunnels, tunnels.go.)
		if err := a.rec.SetPeerOuter(ctx, holder.Name, holder.ULA, holder.Outer, controlplane.SourceDNS); err != nil {
			a.log.Warn("moving peer", "peer", holder.Name, "err", err)
		}
	}
	a.updateKeyingPeers(ctx)
}

// updateKeyingPeers hands keying the current peers (identity.go: by name,
// conflicts keyed with neither), each at its chosen path's remote endpoint,
// or its SRV/A until a path is chosen.
func (a *Agent) updateKeyingPeers(ctx context.Context) {
	a.mu.Lock()
	kp, _ := a.book.keying(a.principalFor)
	evs := map[netip.Addr]PeerEvent{}
	for i := range kp {
		evs[kp[i].ULA] = a.peers[kp[i].ULA]
	}
	if a.paths != nil {
		// Peers with no IPv4 endpoint (IPv6-only hosts, reached at their
		// c-v6 endpoint): the book keys only those with one.
		for ula, ev := range a.peers {
			if _, ok := evs[ula]; !ok && !ev.Outer.IsValid() {
				evs[ula] = ev
				kp = append(kp, keying.PeerConfig{Name: ev.Name, ULA: ula, Principal: a.principalFor(ev.Name)})
			}
		}
		slices.SortFunc(kp, func(x, y keying.PeerConfig) int { return x.ULA.Compare(y.ULA) })
	}
	a.mu.Unlock()
	unreach := map[netip.Addr]string{}
	for i := range kp {
		ev := evs[kp[i].ULA]
		port := ev.Capabilities.KeyingPort
		if port == 0 {
			port = a.cfg.TunnelPort
		}
		if a.paths == nil {
			continue
		}
		kp[i].Outer = a.paths.keyingAt(ev, port, kp[i].Outer) // IPv6-only peers and hosts too (tunnels.go)
		if why := a.paths.noCommonFamily(ev); why != "" {
			unreach[kp[i].ULA] = why
		}
	}
	kp = slices.DeleteFunc(kp, func(p keying.PeerConfig) bool { return unreach[p.ULA] != "" || !p.Outer.IsValid() })
	a.mu.Lock()
	a.unreach = unreach
	a.mu.Unlock()
	if err := a.keyer.SetPeers(ctx, kp); err != nil {
		if a.ctx.Err() != nil {
			return // shutting down
		}
		// Keying's goroutine was busy (e.g. in a slow install) past ctx:
		// it still has the previous set. Nothing else may come to hand it
		// this one (a peer that appeared on a settled host: no more peer
		// events or path changes), so it is tried again.
		a.log.Warn("keying peers; trying again", "err", err, "in", keyingAgainAfter)
		select {
		case a.keyingAgain <- struct{}{}:
		default:
		}
	}
}

// keyingAgainAfter is how long after a failed SetPeers the peers are handed
// to keying again.
const keyingAgainAfter = time.Second

// keyingPeersAgain hands keying the current peers again after a failed
// SetPeers (updateKeyingPeers), until one succeeds.
func (a *Agent) keyingPeersAgain(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-a.keyingAgain:
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(keyingAgainAfter):
		}
		uctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		a.updateKeyingPeers(uctx) // signals again if it fails again
		cancel()
	}
}

func (a *Agent) kernelEvents(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case m, ok := <-a.cfg.KernelEvents:
			if !ok {
				return nil
			}
			if m.Rekey {
				if err := a.keyer.Rekey(ctx, m.Peer); err != nil {
					a.log.Warn("rekey on soft expiry", "peer", m.Peer, "err", err)
				}
				continue
			}
			if a.paths.current(m.Peer).IsValid() {
				a.paths.sel.Kick()
				if a.paths.sel.Known(m.Peer, m.New) {
					// The peer's side sends another known way (e.g. the
					// relay while ours is direct): keep our choice.
					continue
				}
			}
			if err := a.rec.SetPeerOuter(ctx, "", m.Peer, m.New, controlplane.SourceKernel); err != nil {
				a.log.Warn("following NAT mapping change", "peer", m.Peer, "err", err)
			}
		}
	}
}

// Status is what btmmctl shows. It holds no key material.
type Status struct {
	Host       string                   `json:"host"`
	Domain     string                   `json:"domain"`
	ULA        netip.Addr               `json:"ula"`
	Label      string                   `json:"autotunnel_label"`
	IdentityBy string                   `json:"identity_source"`
	Dataplane  string                   `json:"dataplane"`
	TunnelPort uint16                   `json:"tunnel_port"`
	Uptime     string                   `json:"uptime"`
	Started    time.Time                `json:"started"`
	NAT        NATReport                `json:"nat"`
	Register   register.Status          `json:"registration"`
	LLQ        *llqclient.Status        `json:"llq,omitempty"`
	Peers      []PeerStatus             `json:"peers"`
	Recent     []string                 `json:"recent_dataplane_changes"`
	LastError  string                   `json:"dataplane_error,omitempty"`
	Counters   []controlplane.PeerStats `json:"counters,omitempty"`
	// Conflicts are ULAs several of the user's host names claim: keyed
	// with none of them until only one does.
	Conflicts []Conflict `json:"ula_conflicts,omitempty"`
	// KeyingStats counts what keying did with what it received (the
	// handshake DoS defences at work).
	KeyingStats *keying.Stats `json:"keying_stats,omitempty"`
	// Repair is the dataplane's last repair of kernel state someone else
	// removed (nil: none yet, or a dataplane that does not repair).
	Repair *controlplane.Repair `json:"last_repair,omitempty"`
	// CountersError says why Counters is missing (e.g. the dataplane is
	// busy in a slow kernel call).
	CountersError string `json:"counters_error,omitempty"`
	// KeyingError says why per-peer keying errors are missing.
	KeyingError string `json:"keying_error,omitempty"`
	// Network is the host's own network as followed (issue 12).
	Network NetworkStatus `json:"network"`
	// Paths: NAT behaviour, candidates, relay allocation and per-peer
	// paths (nil without path selection).
	Paths *PathsStatus `json:"paths,omitempty"`
	// Names: how this host's and its peers' names reach the system
	// resolver (nil: not reported, e.g. names off).
	Names *NamesStatus `json:"names,omitempty"`
}

// NamesStatus is how names resolve (cmd/btmmd's names part reports it).
type NamesStatus struct {
	// Mechanism: "resolved" (a per-link DNS route in systemd-resolved
	// to the stub), "hosts" (a managed block in the hosts file), or
	// "none" (neither is in place yet, see Error).
	Mechanism string `json:"mechanism"`
	Detail    string `json:"detail"`          // link, stub, domain, or the file
	Why       string `json:"why,omitempty"`   // why this mechanism (names.mode auto)
	Error     string `json:"error,omitempty"` // the last failure to set it up
}

// SetNames records how names resolve, for Status.
func (a *Agent) SetNames(n NamesStatus) {
	a.mu.Lock()
	a.names = &n
	a.mu.Unlock()
}

// PeerStatus joins what DNS, keying and the dataplane know of one peer.
type PeerStatus struct {
	controlplane.PeerStatus
	Capabilities register.Capabilities `json:"capabilities"`
	KeyingError  string                `json:"keying_error,omitempty"`
	Activity     *PeerActivity         `json:"activity,omitempty"`
	// Path is the path chosen by the connectivity checks (kind "none"
	// without path selection or while none answers).
	Path path.Path `json:"path"`
	// Health is the peer's liveness: ok, stale or unreachable with the
	// reason, the last handshake and the last packet received (health.go).
	Health PeerHealth `json:"health"`
}

// Status gathers a snapshot from every part.
func (a *Agent) Status(ctx context.Context) Status {
	a.mu.Lock()
	st := Status{
		Host: a.cfg.Host, Domain: a.cfg.Domain, ULA: a.cfg.Identity.ULA, Label: a.cfg.Identity.Label(),
		IdentityBy: a.cfg.Identity.Source, Dataplane: a.cfg.DataplaneName, TunnelPort: a.cfg.TunnelPort,
		Uptime: time.Since(a.started).Round(time.Second).String(), Started: a.started, NAT: a.nat,
	}
	caps := map[netip.Addr]register.Capabilities{}
	for u, p := range a.peers {
		caps[u] = p.Capabilities
	}
	st.Conflicts = slices.Clone(a.conflicts)
	if a.names != nil {
		n := *a.names
		st.Names = &n
	}
	a.mu.Unlock()
	if a.cfg.NAT == nil {
		st.NAT = NATReport{External: a.cfg.External, Status: "static external address (no NAT handling)"}
	}
	st.Register = a.reg.Status()
	if a.cfg.LLQStatus != nil {
		if ls, ok := a.cfg.LLQStatus(); ok {
			st.LLQ = &ls
		}
	}
	peers, recent, lastErr := a.rec.Status()
	kerr := map[netip.Addr]string{}
	// Keying's goroutine may be inside a slow install: do not wait for it.
	kctx, kcancel := context.WithTimeout(ctx, statusWait)
	ks, err := a.keyer.Status(kctx)
	kcancel()
	if err != nil {
		st.KeyingError = "keying busy or stopped: " + err.Error()
	}
	for _, k := range ks {
		if k.LastError != nil {
			kerr[k.ULA] = k.LastError.Error()
		}
	}
	if err == nil {
		a.mu.Lock()
		a.keyingErrs = kerr
		a.mu.Unlock()
	}
	if err == nil {
		kctx, kcancel := context.WithTimeout(ctx, statusWait)
		if ks, err := a.keyer.Stats(kctx); err == nil {
			st.KeyingStats = &ks
		}
		kcancel()
	}
	acts := map[netip.Addr]PeerActivity{}
	for _, act := range a.PeerActivity() {
		acts[act.ULA] = act
	}
	if a.paths != nil {
		st.Paths = a.paths.status()
	}
	now := time.Now()
	for _, p := range peers {
		ps := PeerStatus{PeerStatus: p, Capabilities: caps[p.ULA], KeyingError: kerr[p.ULA], Path: a.paths.current(p.ULA)}
		if act, ok := acts[p.ULA]; ok {
			ps.Activity = &act
		}
		a.mu.Lock()
		ps.Health = a.peerHealthLocked(p, lastErr, now)
		a.mu.Unlock()
		st.Peers = append(st.Peers, ps)
	}
	st.Peers = a.appendUnreachable(st.Peers, caps)
	st.Network = a.Network()
	for _, c := range recent {
		st.Recent = append(st.Recent, c.String())
	}
	if lastErr != nil {
		st.LastError = lastErr.Error()
	}
	if c, err := a.counters(ctx); err != nil {
		st.CountersError = err.Error()
	} else {
		st.Counters = c
	}
	if r, ok := a.cfg.Dataplane.(controlplane.Repairer); ok {
		if lr := r.LastRepair(); lr.Count > 0 || lr.Err != "" {
			st.Repair = &lr
		}
	}
	return st
}

// statusWait bounds how long Status waits for a busy part.
const statusWait = time.Second

// errStatsBusy: an earlier Stats call has not returned yet.
var errStatsBusy = errors.New("dataplane busy: counters unavailable")

// counters reads the dataplane's counters for Status, giving up after
// statusWait: a dataplane in a slow kernel call must not hang btmmctl. At
// most one such read is outstanding.
func (a *Agent) counters(ctx context.Context) ([]controlplane.PeerStats, error) {
	if !a.statsBusy.CompareAndSwap(false, true) {
		return nil, errStatsBusy
	}
	type result struct {
		st  []controlplane.PeerStats
		err error
	}
	ctx, cancel := context.WithTimeout(ctx, statusWait)
	done := make(chan result, 1)
	go func() {
		defer cancel()
		defer a.statsBusy.Store(false)
		st, err := a.cfg.Dataplane.Stats(ctx)
		done <- result{st, err}
	}()
	select {
	case r := <-done:
		return r.st, r.err
	case <-ctx.Done():
		return nil, errStatsBusy
	}
}
