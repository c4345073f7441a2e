package agent

import (
	"context"
	"net/netip"
	"slices"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/identity"
	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/dns/register"
)

// Tunnel paths (issue 15, docs/tunnels.md).
//
// With Config.Tunnels set (and path selection on) the agent publishes its
// tunnel endpoints with its candidates — c-v6 (its global IPv6 addresses,
// keying port), c-sit (its public IPv4 address when no NAT is in front of
// it), c-fou (its GUE port as its NAT maps it through PCP/NAT-PMP, or its
// own address) — and for every peer that publishes some: the dataplane gets
// a tunnel device per usable kind (Peer.Tunnels), the path selector checks
// each through its device, and the chosen kind becomes Peer.Via (one
// Reconciler.SetPeerPath: the route moves, no key is touched). ESP-in-UDP
// stays the fallback; keying runs over IPv6 too (xfrm.Dual).

// TunnelsConfig turns on tunnel paths; it needs Config.Paths.
type TunnelsConfig struct {
	IPv6 bool // ip6tnl between global IPv6 addresses (c-v6)
	Sit  bool // sit, protocol 41, between public IPv4 addresses (c-sit)
	// FOUPort is the local GUE port (Linux fou) for sit over GUE through
	// NATs (c-fou); 0: none. The NAT side maps it like the tunnel port
	// (NATReport.FOU).
	FOUPort uint16
	// LocalAddrs6 lists this host's global IPv6 addresses; default: those
	// of the up, non-loopback interfaces.
	LocalAddrs6 func() []netip.Addr
}

func globalIPv6(a netip.Addr) bool {
	return a.Is6() && !a.Is4In6() && a.IsGlobalUnicast() && !identity.IsULA(a) && a.Zone() == ""
}

// interfaceAddrs6 returns the global IPv6 addresses of the up, non-loopback interfaces.
func interfaceAddrs6() []netip.Addr { return upAddrs(globalIPv6) }

func (p *paths) tunnels() *TunnelsConfig { return p.a.cfg.Tunnels }

// publicIPv4 is our own public IPv4 address when no NAT is in front of our
// tunnel port (invalid otherwise).
func (p *paths) publicIPv4(local []netip.Addr) netip.Addr {
	if p.a.behindNAT() {
		return netip.Addr{}
	}
	p.a.mu.Lock()
	ext := p.a.nat.External
	p.a.mu.Unlock()
	if p.a.cfg.NAT == nil {
		ext = p.a.cfg.External
	}
	if ext.IsValid() && slices.Contains(local, ext.Addr()) {
		return ext.Addr()
	}
	for _, l := range local {
		if publicAddr(l) {
			return l
		}
	}
	return netip.Addr{}
}

// publicAddr: a global unicast IPv4 address that is neither private nor
// shared (CGNAT).
func publicAddr(a netip.Addr) bool {
	return a.Is4() && a.IsGlobalUnicast() && !a.IsPrivate() && !cgnat.Contains(a)
}

// tunnelCandidates are our tunnel endpoints for TXT.
func (p *paths) tunnelCandidates(local []netip.Addr) []register.Candidate {
	tc := p.tunnels()
	if tc == nil {
		return nil
	}
	var out []register.Candidate
	if tc.IPv6 {
		for _, a := range p.addrs6() {
			if len(out) == 2 {
				break
			}
			out = append(out, register.Candidate{Kind: path.TXTKind(path.KindIPv6), Addr: netip.AddrPortFrom(a, p.a.cfg.TunnelPort)})
		}
	}
	pub := p.publicIPv4(local)
	if tc.Sit && pub.IsValid() {
		out = append(out, register.Candidate{Kind: path.TXTKind(path.KindSit), Addr: netip.AddrPortFrom(pub, p.a.cfg.TunnelPort)})
	}
	if tc.FOUPort != 0 {
		p.a.mu.Lock()
		fou := p.a.nat.FOU
		p.a.mu.Unlock()
		// A gateway that never answered PCP/NAT-PMP leaves the NAT side
		// "treating the network as public" with our private address as
		// the mapping: nobody outside reaches a GUE port there.
		if fou.IsValid() && !publicAddr(fou.Addr()) {
			fou = netip.AddrPort{}
		}
		if !fou.IsValid() && pub.IsValid() {
			fou = netip.AddrPortFrom(pub, tc.FOUPort)
		}
		if fou.IsValid() {
			out = append(out, register.Candidate{Kind: path.TXTKind(path.KindFOU), Addr: fou})
		}
	}
	return out
}

func (p *paths) addrs6() []netip.Addr {
	tc := p.tunnels()
	if tc == nil || !tc.IPv6 {
		return nil
	}
	f := tc.LocalAddrs6
	if f == nil {
		f = interfaceAddrs6
	}
	return f()
}

// usable reports whether this host can use a peer's tunnel of kind k now.
func (p *paths) usable(k path.Kind) bool {
	tc := p.tunnels()
	if tc == nil {
		return false
	}
	switch k {
	case path.KindIPv6:
		return tc.IPv6 && len(p.addrs6()) > 0
	case path.KindSit:
		return tc.Sit && !p.a.behindNAT() && !p.ipv6Only()
	case path.KindFOU:
		return tc.FOUPort != 0 && !p.ipv6Only()
	}
	return false
}

func (p *paths) rank(k path.Kind) int {
	pref := p.cfg.Preference
	if len(pref) == 0 {
		pref = path.DefaultPreference
	}
	if i := slices.Index(pref, k); i >= 0 {
		return i
	}
	return len(pref)
}

// peerCandidates are the candidates of a peer to check: its published ones,
// the tunnel kinds this host can use checked through their devices (an
// IPv6-only host checks none of the IPv4 ones: it cannot send there).
func (p *paths) peerCandidates(ev PeerEvent) []path.Candidate {
	cands := path.CandidatesFrom(ev.Outer, ev.Capabilities)
	if p.ipv6Only() {
		cands = slices.DeleteFunc(cands, func(c path.Candidate) bool { return c.Addr.Addr().Is4() })
	}
	port := ev.Capabilities.KeyingPort
	if port == 0 {
		port = p.a.cfg.TunnelPort
	}
	return path.WithTunnelProbes(ev.ULA, port, cands, p.usable, p.rank)
}

// setTunnels gives the dataplane a peer's tunnel endpoints (their devices
// exist whatever the path, so checks and the peer's traffic get through)
// and keeps the path kind the selector chose, if it is still one of them.
func (p *paths) setTunnels(ctx context.Context, ula netip.Addr, cands []path.Candidate) {
	ts := path.Tunnels(cands)
	p.mu.Lock()
	if p.peerTunnels == nil {
		p.peerTunnels = map[netip.Addr][]controlplane.Tunnel{}
	}
	same := slices.Equal(p.peerTunnels[ula], ts)
	if len(ts) == 0 {
		delete(p.peerTunnels, ula)
	} else {
		p.peerTunnels[ula] = ts
	}
	p.mu.Unlock()
	if same {
		return
	}
	via := p.sel.Current(ula).Kind.PathKind()
	if !slices.ContainsFunc(ts, func(t controlplane.Tunnel) bool { return t.Kind == via }) {
		via = controlplane.PathESPInUDP
	}
	if err := p.a.rec.SetPeerPath(ctx, ula, via, ts); err != nil {
		p.a.log.Warn("paths: tunnels", "peer", ula, "err", err)
	}
}

// setVia moves the peer's traffic to path np's kind (no rekey).
func (p *paths) setVia(ctx context.Context, ula netip.Addr, np path.Path) error {
	p.mu.Lock()
	ts := p.peerTunnels[ula]
	p.mu.Unlock()
	via := np.Kind.PathKind()
	if !slices.ContainsFunc(ts, func(t controlplane.Tunnel) bool { return t.Kind == via }) {
		via = controlplane.PathESPInUDP
	}
	return p.a.rec.SetPeerPath(ctx, ula, via, ts)
}

// keyingOuter is where keying messages for a peer go while path np is
// chosen: its IPv6 tunnel endpoint (keying over IPv6), its sit address at
// the keying port, the ESP-in-UDP endpoint otherwise (FOU: the peer's
// tunnel port as its NAT maps it, def).
func keyingOuter(np path.Path, keyingPort uint16, def netip.AddrPort) netip.AddrPort {
	switch np.Kind {
	case path.KindIPv6:
		return np.Remote
	case path.KindSit:
		return netip.AddrPortFrom(np.Remote.Addr(), keyingPort)
	case path.KindFOU:
		return def
	}
	if np.IsValid() {
		return np.Remote
	}
	return def
}

// keyingFallback is where to key a peer with no ESP-in-UDP endpoint and no
// chosen path (an IPv6-only host): its first published IPv6 endpoint.
func (p *paths) keyingFallback(ev PeerEvent) netip.AddrPort {
	if p == nil || p.tunnels() == nil || !p.usable(path.KindIPv6) {
		return netip.AddrPort{}
	}
	for _, c := range path.CandidatesFrom(ev.Outer, ev.Capabilities) {
		if c.Kind == path.KindIPv6 {
			return c.Addr
		}
	}
	return netip.AddrPort{}
}

// republish runs the candidates' refresh soon (a mapping changed).
func (p *paths) republish() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// ipv6Only reports whether this host has global IPv6 addresses and no IPv4
// address (an IPv6-only network; docs/tunnels.md): it reaches peers only at
// their c-v6 endpoints. A host with no address at all (between networks)
// is not taken for one.
func (p *paths) ipv6Only() bool {
	if p == nil {
		return false
	}
	if slices.ContainsFunc(p.cfg.LocalAddrs(), func(a netip.Addr) bool { return a.Is4() && a.IsGlobalUnicast() }) {
		return false
	}
	f := interfaceAddrs6
	if tc := p.tunnels(); tc != nil && tc.LocalAddrs6 != nil {
		f = tc.LocalAddrs6
	}
	return len(f()) > 0
}

// keyingAt is where keying messages for a peer go: the chosen path's
// endpoint (keyingOuter), else its SRV/A, else (an IPv6-only peer, or this
// host IPv6-only) its first IPv6 endpoint; invalid when there is none this
// host can reach.
func (p *paths) keyingAt(ev PeerEvent, port uint16, def netip.AddrPort) netip.AddrPort {
	out := keyingOuter(p.current(ev.ULA), port, def)
	if !out.IsValid() || out.Addr().Is4() && p.ipv6Only() {
		out = p.keyingFallback(ev)
	}
	return out
}

// noCommonFamily says why this host and a peer cannot reach each other at
// all ("" when they may): one is IPv6-only and the other has no IPv6
// endpoint it can use. Such a peer is not keyed (no exchange could get
// through, so none is tried again and again), and btmmctl peers shows it
// unreachable with this reason.
func (p *paths) noCommonFamily(ev PeerEvent) string {
	if p == nil || ev.Removed {
		return ""
	}
	if p.keyingFallback(ev).IsValid() {
		return "" // its IPv6 endpoint, which we can use
	}
	published6 := slices.ContainsFunc(path.CandidatesFrom(ev.Outer, ev.Capabilities), func(c path.Candidate) bool { return c.Kind == path.KindIPv6 })
	why6 := "this host has no global IPv6 address"
	if tc := p.tunnels(); tc == nil || !tc.IPv6 {
		why6 = "ipv6 tunnels are off on this host ([tunnels])"
	}
	if p.ipv6Only() {
		if published6 {
			return "no common address family: this host is IPv6-only and " + why6
		}
		return "no common address family: this host is IPv6-only (no IPv4 address) and " + ev.Name + " publishes no IPv6 endpoint (c-v6)"
	}
	v4 := ev.Outer.IsValid() || slices.ContainsFunc(path.CandidatesFrom(ev.Outer, ev.Capabilities), func(c path.Candidate) bool { return c.Addr.Addr().Is4() })
	if !v4 && published6 {
		return "no common address family: " + ev.Name + " is IPv6-only (publishes only c-v6) and " + why6
	}
	return ""
}

// appendUnreachable adds to ps the peers with no common address family that
// the dataplane does not know (an IPv6-only peer of an IPv4-only host has
// neither an outer address nor a tunnel there), so btmmctl peers lists them
// with the reason.
func (a *Agent) appendUnreachable(ps []PeerStatus, caps map[netip.Addr]register.Capabilities) []PeerStatus {
	a.mu.Lock()
	defer a.mu.Unlock()
	added := false
	for ula, why := range a.unreach {
		if slices.ContainsFunc(ps, func(p PeerStatus) bool { return p.ULA == ula }) {
			continue
		}
		ps = append(ps, PeerStatus{PeerStatus: controlplane.PeerStatus{Name: a.peers[ula].Name, ULA: ula},
			Capabilities: caps[ula], Health: PeerHealth{State: HealthUnreachable, Reason: why}})
		added = true
	}
	if added {
		slices.SortFunc(ps, func(x, y PeerStatus) int { return x.ULA.Compare(y.ULA) })
	}
	return ps
}
