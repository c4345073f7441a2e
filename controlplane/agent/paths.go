package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/keying"
	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/controlplane/relay"
	"github.com/btmm/btmm/dns/register"
)

// Connectivity everywhere (issue 14, docs/paths.md).
//
// With Config.Paths set the agent publishes endpoint candidates with its
// records (TXT pk=, nat=, c-lan, c-rfx, c-relay), learns its reflexive
// endpoint and its NAT's mapping behaviour from STUN responders (the
// btmm-relays) through the tunnel socket, holds an allocation on the first
// relay, and runs a path.Selector: every peer that publishes a probe key is
// probed on all its candidates, and the best answering path becomes the
// peer's outer address in the dataplane (no rekey) and for keying. Peers
// that publish only today's records keep today's behaviour (their SRV/A).

// PathsConfig turns on path selection.
type PathsConfig struct {
	// Servers returns the btmm-relay/STUN servers (static, or SRV
	// _btmm-relay._udp.<domain>): all answer STUN, the first also
	// allocates. Two addresses tell an endpoint-independent NAT from a
	// symmetric one.
	Servers func(ctx context.Context) ([]netip.AddrPort, error)
	// Cred signs relay allocations (the user's or host's TSIG key).
	Cred relay.Credential
	// Preference ranks path kinds (default path.DefaultPreference).
	Preference []path.Kind
	// LocalAddrs lists this host's IPv4 addresses (LAN candidates);
	// default: the addresses of the up, non-loopback interfaces.
	LocalAddrs func() []netip.Addr
	// Refresh is how often the NAT behaviour and reflexive endpoint are
	// measured again and binds renewed (60 s).
	Refresh time.Duration
	// Recheck is how often one STUN Binding checks between full
	// measurements that our NAT still maps us where it did (15 s;
	// natwatch.go).
	Recheck time.Duration
	// StreamServers returns the relays' TLS stream ports (static, or SRV
	// _btmm-relay._tcp.<domain>), used only when UDP is blocked
	// (relay-tcp, relaytcp.go). Nil: none.
	StreamServers func(ctx context.Context) ([]StreamServer, error)
	// StreamRoots verify the relay's certificate (nil: the system's).
	StreamRoots *x509.CertPool
	// Cleartext: the dataplane sends whole IPv6 packets in UDP (ebpf
	// cleartext), which the relay-tcp bridge completes as a card would.
	Cleartext bool
}

type paths struct {
	a    *Agent
	cfg  PathsConfig
	mux  *path.Mux
	sel  *path.Selector
	key  *path.Key
	rc   *relay.Client
	base register.Capabilities
	kick chan struct{}
	// The NAT recheck between full measurements (natwatch.go): its own
	// client (fewer tries), state, and the selector's trigger.
	wc         *relay.Client
	watch      natWatch
	recheckNow chan struct{}

	mu      sync.Mutex
	nat     relay.NAT
	seen    []netip.AddrPort
	lastRfx netip.AddrPort // the last reflexive endpoint measured (kept across failed measurements)
	alloc   relay.Allocation
	servers []netip.AddrPort
	lastErr string
	cands   []register.Candidate
	// peerTunnels are each peer's tunnel endpoints as given to the
	// dataplane (tunnels.go).
	peerTunnels map[netip.Addr][]controlplane.Tunnel
	// relay-tcp (relaytcp.go): the bridge while UDP is blocked, whether
	// alloc was made over it, and whether the next refresh may skip NAT
	// detection (the stream just came up: allocate at once).
	bt         *bridgeTransport
	bs         *bridgeState
	allocTCP   bool
	skipDetect bool
	// cancelRefresh stops the measurement under way when our network
	// changes (Kick): what it measured is about the old one.
	cancelRefresh context.CancelCauseFunc
}

// errMoved cancels a measurement that our own network change made stale.
var errMoved = errors.New("our network changed during the measurement")

func newPaths(a *Agent, cfg PathsConfig, base register.Capabilities) (*paths, error) {
	if cfg.Servers == nil {
		return nil, fmt.Errorf("agent: paths: no relay/STUN servers")
	}
	if cfg.Refresh <= 0 {
		cfg.Refresh = time.Minute
	}
	if cfg.Recheck <= 0 {
		cfg.Recheck = 15 * time.Second
	}
	if cfg.LocalAddrs == nil {
		cfg.LocalAddrs = interfaceAddrs
	}
	key, err := path.NewKey()
	if err != nil {
		return nil, err
	}
	p := &paths{a: a, cfg: cfg, key: key, base: base, kick: make(chan struct{}, 1), recheckNow: make(chan struct{}, 1), nat: relay.NATUnknown}
	p.bt = newBridgeTransport(a.cfg.Transport, p)
	p.mux = path.NewMux(p.bt)
	// NAT detection and allocations made over UDP always use UDP; the
	// bridge's client (relaytcp.go) speaks over the stream.
	p.rc = &relay.Client{Send: a.cfg.Transport.WriteKeying, Cred: cfg.Cred,
		Host: dns.Fqdn(a.cfg.Host + "." + strings.TrimSuffix(a.cfg.Domain, "."))}
	// The recheck gives up sooner than a measurement (3 tries, 1.75 s):
	// no answer only makes the full measurement run.
	p.wc = &relay.Client{Send: a.cfg.Transport.WriteKeying, Tries: 3}
	p.sel, err = path.New(path.Config{Key: key, Send: p.mux.WriteKeying, OnChange: p.onPath,
		OnSeenChange: p.onSeenChange, Preference: cfg.Preference, Logger: a.log.With("part", "paths")})
	if err != nil {
		return nil, err
	}
	p.mux.HandleProbes(func(b []byte, from netip.AddrPort) { p.sel.HandleProbe(b, from) })
	p.mux.HandleSTUN(func(b []byte, from netip.AddrPort) {
		p.rc.Handle(b, from)
		p.wc.Handle(b, from)
		if rc := p.client(); rc != p.rc {
			rc.Handle(b, from)
		}
	})
	return p, nil
}

// pathInstaller is keying's Installer when paths are selected: the outer
// address keying learnt from a message's source (which may have come the
// way the peer chose, e.g. through the relay) gives way to the path our
// probes chose.
type pathInstaller struct{ a *Agent }

// An address that is none of the peer's candidates is news (an
// authenticated MOVED from a network it just joined): it is followed at
// once, and the probes look again.
func (pi pathInstaller) Install(ctx context.Context, p controlplane.Peer) error {
	c := pi.a.paths.current(p.ULA)
	if c.IsValid() && !c.Kind.Tunnel() && p.Outer.IsValid() && p.Outer != c.Remote {
		if pi.a.paths.sel.Known(p.ULA, p.Outer) {
			p.Outer = c.Remote
		} else {
			pi.a.paths.sel.Kick()
		}
	}
	if c.Kind == path.KindRelayTCP && p.Outer == c.Remote {
		// Keying speaks to the peer's relay port (over the stream); the
		// dataplane sends to the peer's bridge socket.
		if o, err := pi.a.paths.bridgeOuter(p.ULA, c); err == nil {
			p.Outer = o
		}
	}
	return pi.a.rec.Install(ctx, p)
}

func (pi pathInstaller) Remove(ctx context.Context, ula netip.Addr) error {
	return pi.a.rec.Remove(ctx, ula)
}

// transport is what keying reads and writes: the keying channel minus
// probes and STUN.
func (p *paths) transport() keying.Transport { return p.mux }

// interfaceAddrs returns the IPv4 addresses of the up, non-loopback interfaces.
func interfaceAddrs() []netip.Addr { return upAddrs(netip.Addr.Is4) }

// upAddrs returns the addresses of the up, non-loopback interfaces that keep
// accepts (IPv4-mapped ones as IPv4): interfaceAddrs, interfaceAddrs6.
func upAddrs(keep func(netip.Addr) bool) []netip.Addr {
	var out []netip.Addr
	ifs, _ := net.Interfaces()
	for _, i := range ifs {
		if i.Flags&net.FlagUp == 0 || i.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, _ := i.Addrs()
		for _, a := range addrs {
			if pn, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(pn.IP); ok && keep(ip.Unmap()) {
					out = append(out, ip.Unmap())
				}
			}
		}
	}
	return out
}

// run drives the keying channel and the selector, and keeps the candidates
// (NAT behaviour, reflexive endpoint, relay allocation) fresh.
func (p *paths) run(ctx context.Context) error {
	// The mux reads the tunnel socket until btmmd closes it after Run:
	// like keying's reader it is not waited for here.
	errc := make(chan error, 1)
	go func() { errc <- p.mux.Run(ctx) }()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); p.sel.Run(ctx) }()
	defer wg.Wait()
	t := time.NewTimer(0)
	defer t.Stop()
	rt := time.NewTimer(p.recheckEvery())
	defer rt.Stop()
	for {
		full := true
		select {
		case <-ctx.Done():
			p.release()
			p.stopBridge()
			return nil
		case err := <-errc:
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("keying channel: %w", err)
		case <-p.kick:
		case <-t.C:
		case <-rt.C:
			full = p.recheck(ctx)
		case <-p.recheckNow:
			full = p.recheck(ctx)
		}
		if full {
			t.Reset(p.refresh(ctx))
		}
		rt.Reset(p.recheckEvery())
	}
}

// Kick re-measures and re-probes at once: our network changed. A
// measurement under way is abandoned (it is about the old network), and
// the paths that answered before must answer again (path.Selector.Moved).
func (p *paths) Kick() {
	p.mu.Lock()
	if p.cancelRefresh != nil {
		p.cancelRefresh(errMoved)
	}
	p.mu.Unlock()
	select {
	case p.kick <- struct{}{}:
	default:
	}
	p.sel.Moved()
}

// refresh measures the NAT, keeps the allocation, publishes the candidates
// and renews binds; it returns when to run again.
func (p *paths) refresh(ctx context.Context) time.Duration {
	mctx, stop := context.WithCancelCause(ctx)
	p.mu.Lock()
	p.cancelRefresh = stop
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.cancelRefresh = nil
		p.mu.Unlock()
		stop(nil)
	}()
	// moved: Kick abandoned this measurement; its kick runs the next one
	// at once.
	moved := func() bool { return errors.Is(context.Cause(mctx), errMoved) }
	ctx, cancel := context.WithTimeout(mctx, 20*time.Second)
	defer cancel()
	local := p.cfg.LocalAddrs()
	servers, err := p.cfg.Servers(ctx)
	if moved() {
		return p.cfg.Refresh
	}
	if err != nil || len(servers) == 0 {
		// Without a relay we still probe: LAN and published candidates
		// (paths are on by default; a domain without a btmm-relay is
		// normal, not an error).
		if err != nil {
			p.setErr(fmt.Sprintf("no relay/STUN servers: %v", err))
		} else {
			p.setNote("no btmm-relay published (SRV _btmm-relay._udp): no reflexive endpoint or relay; LAN and direct paths only")
		}
		p.mu.Lock()
		p.servers, p.nat, p.seen = nil, relay.NATUnknown, nil
		p.mu.Unlock()
		p.publish(local)
		return p.cfg.Refresh
	}
	p.mu.Lock()
	skip := p.skipDetect && p.nat == relay.NATBlocked && p.bs != nil
	p.skipDetect = false
	nat, seen := p.nat, p.seen
	p.mu.Unlock()
	if !skip {
		nat, seen = p.rc.DetectNAT(ctx, servers, local)
		if moved() {
			return p.cfg.Refresh
		}
		p.watch.measured(nat, servers, seen)
	}
	if nat != relay.NATBlocked {
		p.stopBridge() // UDP works (again): never relay-tcp
	}
	rc := p.rc
	if nat == relay.NATBlocked && !p.bridged() {
		// No UDP: the relay's TLS stream (relaytcp.go).
		if err := p.startBridge(ctx, servers); err != nil {
			p.setErr(err.Error())
		}
	}
	if nat == relay.NATBlocked {
		rc = p.client()
	}
	p.mu.Lock()
	p.servers, p.nat, p.seen = servers, nat, seen
	alloc := p.alloc
	streamDown := nat == relay.NATBlocked && (p.bs == nil || !p.bs.br.Up())
	// Our NAT now maps the tunnel socket elsewhere (replaced, rebooted,
	// its mappings flushed): the LLQ's own UDP mapping has most likely
	// gone with it, and the server's pushes (the peers' new candidates
	// included) would be lost until the LLQ's next refresh, minutes away.
	var remapped bool
	if len(seen) > 0 {
		remapped = p.lastRfx.IsValid() && p.lastRfx != seen[0]
		p.lastRfx = seen[0]
	}
	p.mu.Unlock()
	if remapped {
		p.a.log.Info("paths: our NAT maps us elsewhere now; setting the LLQs up again, looking for a PCP/NAT-PMP gateway again", "reflexive", seen[0])
		if p.a.cfg.Rebind != nil {
			p.a.cfg.Rebind()
		}
		// Another gateway may speak PCP where the old one did not (or
		// no longer): natpmp would otherwise look again only minutes
		// later.
		if p.a.cfg.Rediscover != nil {
			p.a.cfg.Rediscover()
		}
	}
	next := p.cfg.Refresh
	switch {
	case streamDown:
		// UDP blocked and no stream yet: nothing to allocate over (the
		// stream coming up kicks a refresh).
		alloc, next = relay.Allocation{}, 10*time.Second
	case !alloc.Relayed.IsValid() || !slices.Contains(servers, alloc.Server):
		a, err := rc.Allocate(ctx, servers[0], 0)
		if err != nil {
			p.setErr("relay allocation: " + err.Error())
			next = 10 * time.Second
		} else {
			alloc = a
			p.a.log.Info("relay allocation", "relayed", a.Relayed, "server", a.Server, "lifetime", a.Lifetime)
		}
	default:
		if _, err := rc.Refresh(ctx, alloc, max(alloc.Lifetime, time.Minute)); err != nil { // 0 would delete it
			p.setErr("relay refresh: " + err.Error())
			alloc, next = relay.Allocation{}, time.Second
		}
	}
	if moved() {
		// An Allocate or Refresh cut short by the move proves nothing:
		// keep the allocation (dropping it would unpublish c-relay for
		// the moment until the next measurement allocates again).
		return p.cfg.Refresh
	}
	if alloc.Lifetime > 0 {
		next = min(next, alloc.Lifetime/2)
	}
	p.mu.Lock()
	p.alloc = alloc
	p.mu.Unlock()
	p.publish(local)
	p.bindAll(ctx)
	return next
}

// setErr records the last problem; a repeat of the same one is not logged again.
func (p *paths) setErr(s string) {
	if p.record(s) {
		p.a.log.Warn("paths", "err", s)
	}
}

// setNote is setErr for a state that is no fault (logged at Info).
func (p *paths) setNote(s string) {
	if p.record(s) {
		p.a.log.Info("paths: " + s)
	}
}

func (p *paths) record(s string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	same := p.lastErr == s
	p.lastErr = s
	return !same
}

// publish puts our candidates into the TXT record, and, while the NAT side
// has no usable external address (no PCP/NAT-PMP), the best of them into
// SRV/A so that peers running older btmmd have something to try.
func (p *paths) publish(local []netip.Addr) {
	port := p.a.cfg.TunnelPort
	p.mu.Lock()
	var cands []register.Candidate
	for _, l := range local {
		// Only private and shared (CGNAT) addresses: a public one is the
		// SRV/A endpoint, not a LAN path.
		if len(cands) < 4 && (l.IsPrivate() || cgnat.Contains(l)) {
			cands = append(cands, register.Candidate{Kind: path.TXTKind(path.KindLAN), Addr: netip.AddrPortFrom(l, port)})
		}
	}
	p.a.mu.Lock()
	external := p.a.nat.External
	p.a.mu.Unlock()
	var rfx netip.AddrPort
	// A reflexive endpoint equal to the PCP mapping is the mapping (direct).
	if len(p.seen) > 0 && p.nat != relay.NATNone && p.seen[0] != external {
		rfx = p.seen[0]
		cands = append(cands, register.Candidate{Kind: path.TXTKind(path.KindPunched), Addr: rfx})
	}
	if p.alloc.Relayed.IsValid() {
		cands = append(cands, register.Candidate{Kind: path.TXTKind(path.KindRelayUDP), Addr: p.alloc.Relayed})
	}
	cands = append(cands, p.tunnelCandidates(local)...) // issue 15 (tunnels.go)
	// Our own candidates changed (a NAT that now maps differently, a new
	// allocation): the peers learn it by LLQ within milliseconds and
	// probe at once; probing them at once too makes the checks
	// simultaneous from both sides, which is what opens two NATs.
	changed := !slices.Equal(p.cands, cands)
	kick := p.cands != nil && changed
	p.cands = cands
	caps := p.base
	pub := p.key.Public()
	caps.ProbeKey, caps.NAT, caps.Candidates = pub[:], string(p.nat), cands
	alloc, nat := p.alloc, p.nat
	p.mu.Unlock()
	if err := p.a.reg.SetCapabilities(caps); err != nil {
		p.a.log.Warn("publishing candidates", "err", err)
	}
	if kick {
		p.a.log.Info("paths: our candidates changed; checking every peer", "nat", nat, "candidates", cands)
		p.sel.Kick()
	}
	if changed && p.tunnels() != nil {
		// Which of a peer's tunnel kinds we can use follows our own
		// situation (sit: no NAT in front of us; ipv6: a global IPv6
		// address), which our candidates carry too: a move to a public
		// address makes sit usable with nothing new from the peer.
		p.refeed()
	}
	// A private or shared address is no mapping: natpmp reports our own
	// address when no gateway answers ("treated as a public network"),
	// and behind a NAT that is unreachable from outside.
	p.a.mu.Lock()
	ext := p.a.nat.External
	mapped := p.a.cfg.NAT == nil || ext.IsValid() && !ext.Addr().IsPrivate() && !cgnat.Contains(ext.Addr())
	p.a.mu.Unlock()
	if mapped {
		return
	}
	var outer netip.AddrPort
	switch {
	case nat == relay.NATNone && len(local) > 0:
		outer = netip.AddrPortFrom(local[0], port)
	case nat == relay.NATIndependent && rfx.IsValid():
		outer = rfx
	case alloc.Relayed.IsValid():
		outer = alloc.Relayed
	}
	if outer.IsValid() {
		if err := p.a.reg.SetOuter(outer); err != nil {
			p.a.log.Warn("publishing SRV/A", "err", err)
		}
	}
}

// bindAll binds our allocation at every peer's relay port, so the relay
// forwards between us (both sides bind; each bind lasts as long as our
// allocation).
func (p *paths) bindAll(ctx context.Context) {
	p.mu.Lock()
	alloc := p.alloc
	p.mu.Unlock()
	if !alloc.Relayed.IsValid() {
		return
	}
	p.a.mu.Lock()
	var targets []netip.AddrPort
	for _, ev := range p.a.peers {
		for _, c := range path.CandidatesFrom(ev.Outer, ev.Capabilities) {
			if c.Kind == path.KindRelayUDP {
				targets = append(targets, c.Addr)
			}
		}
	}
	p.a.mu.Unlock()
	var wg sync.WaitGroup
	rc := p.client()
	for _, t := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := rc.Bind(ctx, t, alloc); err != nil {
				p.a.log.Info("relay bind", "peer_relay", t, "err", err)
			}
		}()
	}
	wg.Wait()
}

var cgnat = netip.MustParsePrefix("100.64.0.0/10")

// onPeerEvent feeds the selector (peers with a probe key only).
func (p *paths) onPeerEvent(ev PeerEvent) {
	if ev.Removed || len(ev.Capabilities.ProbeKey) == 0 {
		p.sel.RemovePeer(ev.ULA)
		p.mu.Lock()
		delete(p.peerTunnels, ev.ULA)
		p.mu.Unlock()
		return
	}
	cands := p.bridgeCandidates(p.peerCandidates(ev))
	if err := p.sel.SetPeer(ev.ULA, ev.Name, ev.Capabilities.ProbeKey, cands); err != nil {
		p.a.log.Warn("paths: peer", "peer", ev.Name, "err", err)
		return
	}
	if p.tunnels() != nil {
		ctx, cancel := context.WithTimeout(p.a.ctx, 10*time.Second)
		p.setTunnels(ctx, ev.ULA, cands)
		cancel()
	}
	// A new relay candidate wants our bind before probes through it work.
	go func() {
		ctx, cancel := context.WithTimeout(p.a.ctx, 10*time.Second)
		defer cancel()
		p.bindAll(ctx)
	}()
}

// onPath moves the peer to its new path: dataplane and keying, no rekey.
func (p *paths) onPath(ula netip.Addr, np path.Path) {
	if !np.IsValid() {
		return // keep the last outer address: a path may come back
	}
	p.udpAnswers(np) // natwatch.go
	ctx, cancel := context.WithTimeout(p.a.ctx, 10*time.Second)
	defer cancel()
	p.a.mu.Lock()
	name := p.a.peers[ula].Name
	p.a.mu.Unlock()
	// A tunnel kind moves the route only (its outer endpoint is the
	// device's); the ESP-in-UDP endpoint stays what DNS and keying say.
	if !np.Kind.Tunnel() {
		outer := np.Remote
		if np.Kind == path.KindRelayTCP {
			// The dataplane sends to the peer's bridge socket (relaytcp.go).
			o, err := p.bridgeOuter(ula, np)
			if err != nil {
				p.a.log.Warn("paths: relay-tcp", "peer", name, "err", err)
				return
			}
			outer = o
		} else {
			p.leftBridge(ula)
		}
		if err := p.a.rec.SetPeerOuter(ctx, name, ula, outer, controlplane.SourcePath); err != nil {
			p.a.log.Warn("paths: moving peer", "peer", name, "err", err)
		}
	}
	if p.tunnels() != nil {
		if err := p.setVia(ctx, ula, np); err != nil {
			p.a.log.Warn("paths: path kind", "peer", name, "path", np, "err", err)
		}
	}
	p.a.updateKeyingPeers(ctx)
	// The path answers now: a keying exchange still waiting for its
	// next retransmission (its INIT went out before the path worked)
	// goes again at once.
	if err := p.a.keyer.Retry(ctx, ula); err != nil {
		p.a.log.Debug("paths: keying retry", "peer", name, "err", err)
	}
}

func (p *paths) release() {
	p.mu.Lock()
	alloc, overStream := p.alloc, p.allocTCP
	p.mu.Unlock()
	if !alloc.Relayed.IsValid() || overStream {
		return // an allocation made over the stream expires with it
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	p.rc.Refresh(ctx, alloc, 0) // best effort, bounded by ctx: it expires anyway
}

// PathsStatus is what btmmctl shows about paths.
type PathsStatus struct {
	NAT        string               `json:"nat"`      // relay.NAT
	NATText    string               `json:"nat_text"` // "endpoint-independent", ...
	Reflexive  []netip.AddrPort     `json:"reflexive,omitempty"`
	Relay      netip.AddrPort       `json:"relay_allocation,omitzero"`
	Servers    []netip.AddrPort     `json:"servers,omitempty"`
	Candidates []register.Candidate `json:"candidates,omitempty"`
	LastError  string               `json:"last_error,omitempty"`
	Peers      []path.PeerStatus    `json:"peers,omitempty"`
	// RelayTCP is the relay-tcp bridge while UDP is blocked (nil: not running).
	RelayTCP *RelayTCPStatus `json:"relay_tcp,omitempty"`
}

func (p *paths) status() *PathsStatus {
	rt := p.relayTCPStatus()
	p.mu.Lock()
	defer p.mu.Unlock()
	return &PathsStatus{RelayTCP: rt, NAT: string(p.nat), NATText: p.nat.Describe(), Reflexive: slices.Clone(p.seen),
		Relay: p.alloc.Relayed, Servers: slices.Clone(p.servers), Candidates: slices.Clone(p.cands),
		LastError: p.lastErr, Peers: p.sel.Status()}
}

// current is the selected path of a peer (invalid: none or not probed).
func (p *paths) current(ula netip.Addr) path.Path {
	if p == nil {
		return path.Path{}
	}
	return p.sel.Current(ula)
}

// lookupSRV asks resolver for name's SRV records and returns the answer
// (its additional section holds the targets' addresses) and the SRVs,
// lowest priority first.
func lookupSRV(ctx context.Context, resolver, name string) (*dns.Msg, []*dns.SRV, error) {
	c := &dns.Client{Timeout: 3 * time.Second}
	m := new(dns.Msg)
	m.SetQuestion(name, dns.TypeSRV)
	r, _, err := c.ExchangeContext(ctx, m, resolver)
	if err != nil {
		return nil, nil, err
	}
	var srvs []*dns.SRV
	for _, rr := range r.Answer {
		if s, ok := rr.(*dns.SRV); ok {
			srvs = append(srvs, s)
		}
	}
	slices.SortStableFunc(srvs, func(a, b *dns.SRV) int { return int(a.Priority) - int(b.Priority) })
	return r, srvs, nil
}

// targetAddrs returns an SRV target's IPv4 addresses, sorted: from the
// answer's additional section, else from an A query to resolver.
func targetAddrs(ctx context.Context, resolver string, r *dns.Msg, target string) []netip.Addr {
	addrs := addrsIn(r.Extra, target)
	if len(addrs) == 0 {
		q := new(dns.Msg)
		q.SetQuestion(target, dns.TypeA)
		if ra, _, err := (&dns.Client{Timeout: 3 * time.Second}).ExchangeContext(ctx, q, resolver); err == nil {
			addrs = addrsIn(ra.Answer, target)
		}
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	return addrs
}

// SRVServers looks up SRV _btmm-relay._udp.<domain> through resolver and
// returns every address of every target, lowest priority first.
func SRVServers(resolver, domain string) func(ctx context.Context) ([]netip.AddrPort, error) {
	return func(ctx context.Context) ([]netip.AddrPort, error) {
		r, srvs, err := lookupSRV(ctx, resolver, "_btmm-relay._udp."+dns.Fqdn(domain))
		if err != nil {
			return nil, fmt.Errorf("relay discovery: %w", err)
		}
		var out []netip.AddrPort
		for _, s := range srvs {
			addrs := targetAddrs(ctx, resolver, r, s.Target) // sorted: a stable first server (allocations live there)
			for _, a := range addrs {
				out = append(out, netip.AddrPortFrom(a, s.Port))
			}
		}
		// None published is no error (paths are on by default): the
		// caller says so once and keeps to LAN and direct paths.
		return out, nil
	}
}

func addrsIn(rrs []dns.RR, name string) []netip.Addr {
	var out []netip.Addr
	for _, rr := range rrs {
		if a, ok := rr.(*dns.A); ok && strings.EqualFold(a.Hdr.Name, name) {
			if ip, ok := netip.AddrFromSlice(a.A.To4()); ok {
				out = append(out, ip)
			}
		}
	}
	return out
}
