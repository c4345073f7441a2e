package controlplane

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// Reconciler folds what the agent learns — peers' current outer addresses
// (from DNS, LLQ pushes, the kernel's NAT-mapping events) and their keys (from
// keying) — into one desired State and applies it with Dataplane.Set.
//
// A peer enters the dataplane only once it has both keys and an outer address.
// For the outer address the most recent report wins, whoever made it: a
// keying message or an ESP packet from a new source is fresher news than a DNS
// record that has not caught up yet, and the other way round.
//
// Every change is applied at once and synchronously: when Install returns nil
// the new SAs are in the kernel, which keying's make-before-break relies on.
// A failed apply is retried by Run with backoff until it succeeds.
//
// Locking: mu guards the reconciler's own state and is never held across a
// kernel call, so Status, Desired and new reports never wait for a slow
// Dataplane.Set. applyMu serializes the Set calls; each one takes a fresh
// snapshot of the desired state after it holds applyMu, so a change made
// while another Set runs is in the kernel when its own call returns.
type Reconciler struct {
	dp  Dataplane
	log *slog.Logger
	now func() time.Time

	applyMu sync.Mutex

	mu      sync.Mutex
	local   Local
	peers   map[netip.Addr]*peerState
	applied []Change
	lastErr error // of the last apply; non-nil means Run retries
	kick    chan struct{}
}

type peerState struct {
	name    string
	via     PathKind // how traffic is sent (SetPeerPath)
	tunnels []Tunnel // the peer's tunnel endpoints (SetPeerPath)
	outer   netip.AddrPort
	outerAt time.Time
	outerBy string
	prev    netip.AddrPort // the outer address before the last move
	// backSince is the first kernel mapping event back to prev since the
	// last move (before outerAt: none yet).
	backSince time.Time
	keys      *Peer // nil until keyed
	keyedAt   time.Time
}

// NewReconciler returns a Reconciler for dp with this host's side of the tunnels.
func NewReconciler(dp Dataplane, local Local, log *slog.Logger) *Reconciler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Reconciler{dp: dp, log: log, now: time.Now, local: local, peers: map[netip.Addr]*peerState{}, kick: make(chan struct{}, 1)}
}

// SetLocal changes this host's side and applies it. It always applies, even
// an unchanged Local: that is how the agent says "we moved" when Outer and
// Device are zero (looked up again by the dataplane at every Set).
func (r *Reconciler) SetLocal(ctx context.Context, l Local) error {
	r.mu.Lock()
	r.local = l
	r.mu.Unlock()
	return r.apply(ctx)
}

// Local returns this host's side as last set.
func (r *Reconciler) Local() Local {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.local
}

// Sources of a peer's outer address, for SetPeerOuter.
const (
	SourceDNS    = "dns"    // the peer's published SRV + A (LLQ push)
	SourceKeying = "keying" // an authenticated keying message
	SourceKernel = "kernel" // XFRM_MSG_MAPPING: ESP arrived from a new address
	SourcePath   = "path"   // the path selector's choice (package path: probes answered there)
)

// StaleMappingWindow is how long after a move a kernel mapping event that
// points back to the previous address may be taken for a late packet and
// ignored; LateBurst bounds how long such late packets keep coming.
const StaleMappingWindow = 30 * time.Second

// LateBurst is how long mapping events back to the previous address are
// ignored after the first of them: packets sent before a move arrive late in
// one burst, while ESP that keeps arriving from there for longer is sent from
// there now and is followed. (A NAT may move a peer's packets to a
// transient port and back, e.g. when a conntrack race after its mappings
// were flushed makes it remap the source port of the first ones: ignoring
// the way back for the whole window black-holed our traffic for 30 s.)
const LateBurst = time.Second

// SetPeerOuter records where a peer is reachable now; source (SourceDNS,
// SourceKeying, SourceKernel) says who said so.
func (r *Reconciler) SetPeerOuter(ctx context.Context, name string, ula netip.Addr, outer netip.AddrPort, source string) error {
	if !outer.IsValid() {
		return fmt.Errorf("peer %s: invalid outer address", name)
	}
	if !outer.Addr().Unmap().Is4() {
		// ESP-in-UDP runs over IPv4; a peer's IPv6 endpoints are tunnels
		// (SetPeerPath).
		return fmt.Errorf("peer %s: outer address %v is not IPv4", name, outer)
	}
	outer = netip.AddrPortFrom(outer.Addr().Unmap(), outer.Port())
	r.mu.Lock()
	p := r.peer(ula)
	if name != "" {
		p.name = name
	}
	if p.outer == outer {
		r.mu.Unlock()
		return nil
	}
	if now := r.now(); source == SourceKernel && outer == p.prev && now.Sub(p.outerAt) < StaleMappingWindow {
		// ESP from the address we just moved away from: packets sent
		// before the move, delivered late, would pull our traffic back
		// to an address the peer has left. They come in one burst;
		// past LateBurst after the first one it is the peer's traffic.
		log := r.log.Debug // one event per packet: Info for the first only
		if p.backSince.Before(p.outerAt) {
			p.backSince, log = now, r.log.Info
		}
		if now.Sub(p.backSince) < LateBurst {
			log("ignoring stale NAT mapping event", "peer", p.name, "outer", outer, "current", p.outer)
			r.mu.Unlock()
			return nil
		}
		r.log.Info("ESP keeps arriving from the previous address: following it", "peer", p.name, "outer", outer,
			"current", p.outer, "since", now.Sub(p.backSince).Round(time.Millisecond))
	}
	p.prev = p.outer
	p.outer, p.outerAt, p.outerBy = outer, r.now(), source
	keyed := p.keys != nil
	r.mu.Unlock()
	if !keyed {
		return nil
	}
	return r.apply(ctx)
}

// SetPeerPath records the peer's tunnel endpoints (Peer.Tunnels) and the
// path its traffic is sent on (Peer.Via), and applies them if the peer is
// keyed. Changing only via moves the traffic with no rekey. A via that names
// no listed tunnel is refused.
func (r *Reconciler) SetPeerPath(ctx context.Context, ula netip.Addr, via PathKind, tunnels []Tunnel) error {
	probe := Peer{ULA: ula, Via: via, Tunnels: tunnels}
	if _, ok := probe.Tunnel(via); via != PathESPInUDP && !ok {
		return fmt.Errorf("peer %v: path %v but no %v tunnel", ula, via, via)
	}
	r.mu.Lock()
	p := r.peer(ula)
	if p.via == via && slices.Equal(p.tunnels, tunnels) {
		r.mu.Unlock()
		return nil
	}
	p.via, p.tunnels = via, slices.Clone(tunnels)
	keyed := p.keys != nil
	r.mu.Unlock()
	if !keyed {
		return nil
	}
	return r.apply(ctx)
}

// RemovePeer forgets a peer (it left the user's hosts): its SAs go.
func (r *Reconciler) RemovePeer(ctx context.Context, ula netip.Addr) error {
	r.mu.Lock()
	if _, ok := r.peers[ula]; !ok {
		r.mu.Unlock()
		return nil
	}
	delete(r.peers, ula)
	r.mu.Unlock()
	return r.apply(ctx)
}

// Install implements keying's Installer: p becomes the peer's key set, and
// its Outer counts as the freshest report of where the peer is.
func (r *Reconciler) Install(ctx context.Context, p Peer) error {
	r.mu.Lock()
	ps := r.peer(p.ULA)
	saved := *ps
	if p.Name != "" {
		ps.name = p.Name
	}
	// A keying message that came over IPv6 says nothing about the
	// ESP-in-UDP (IPv4) endpoint.
	if p.Outer.IsValid() && p.Outer.Addr().Is4() && p.Outer != ps.outer {
		ps.prev = ps.outer
		ps.outer, ps.outerAt, ps.outerBy = p.Outer, r.now(), SourceKeying
	}
	k := p
	k.PrevIn = slices.Clone(p.PrevIn)
	ps.keys, ps.keyedAt = &k, r.now()
	movedTo := ps.outer
	r.mu.Unlock()
	if err := r.apply(ctx); err != nil {
		// Keying counts a failed install as a failed exchange: keep the
		// keys the kernel (and the peer) still have, so a later retry
		// cannot push keys the peer never agreed to. Whatever others
		// reported meanwhile stays.
		r.mu.Lock()
		if cur := r.peers[p.ULA]; cur != nil && cur.keys == &k {
			cur.keys, cur.keyedAt = saved.keys, saved.keyedAt
			if cur.outer == movedTo && movedTo != saved.outer {
				cur.outer, cur.prev, cur.outerAt, cur.outerBy = saved.outer, saved.prev, saved.outerAt, saved.outerBy
			}
		}
		r.mu.Unlock()
		return err
	}
	return nil
}

// Remove implements keying's Installer: the peer's SAs go, what is known of
// its address stays.
func (r *Reconciler) Remove(ctx context.Context, ula netip.Addr) error {
	r.mu.Lock()
	ps, ok := r.peers[ula]
	if !ok || ps.keys == nil {
		r.mu.Unlock()
		return nil
	}
	ps.keys = nil
	r.mu.Unlock()
	return r.apply(ctx)
}

func (r *Reconciler) peer(ula netip.Addr) *peerState {
	p, ok := r.peers[ula]
	if !ok {
		p = &peerState{}
		r.peers[ula] = p
	}
	return p
}

// Desired returns the State the reconciler wants the kernel to have now.
func (r *Reconciler) Desired() *State {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.desiredLocked()
}

func (r *Reconciler) desiredLocked() *State {
	s := &State{Local: r.local}
	for ula, p := range r.peers {
		if p.keys == nil {
			continue
		}
		dp := *p.keys
		dp.ULA, dp.Outer = ula, p.outer
		if dp.Name == "" {
			dp.Name = p.name
		}
		dp.PrevIn = slices.Clone(p.keys.PrevIn)
		dp.Via, dp.Tunnels = p.via, slices.Clone(p.tunnels)
		s.Peers = append(s.Peers, dp)
	}
	slices.SortFunc(s.Peers, func(a, b Peer) int { return a.ULA.Compare(b.ULA) })
	// What this host cannot carry, and tunnels two peers would share (a
	// device is found by its remote address: two peers behind one NAT), are
	// left out: the peer keeps its other paths.
	remotes := map[netip.Addr]bool{}
	out := s.Peers[:0]
	for _, dp := range s.Peers {
		var keep []Tunnel
		for _, t := range dp.Tunnels {
			if t.Kind == PathFOU && s.Local.FOUPort == 0 || remotes[t.Remote.Addr()] {
				continue
			}
			remotes[t.Remote.Addr()] = true
			keep = append(keep, t)
		}
		dp.Tunnels = keep
		if _, ok := dp.Tunnel(dp.Via); !ok {
			dp.Via = PathESPInUDP
		}
		if dp.Via == PathESPInUDP && !dp.Outer.IsValid() && len(dp.Tunnels) > 0 {
			// No IPv4 endpoint (an IPv6-only peer keyed over IPv6): its
			// first tunnel is the only way, until the checks choose.
			dp.Via = dp.Tunnels[0].Kind
		}
		if dp.Via == PathESPInUDP && !dp.Outer.IsValid() {
			continue // nowhere to send it yet
		}
		out = append(out, dp)
	}
	s.Peers = out
	return s
}

// apply makes the kernel match the desired state as it is once no other
// Set runs. mu is not held across Dataplane.Set.
func (r *Reconciler) apply(ctx context.Context) error {
	r.applyMu.Lock()
	defer r.applyMu.Unlock()
	r.mu.Lock()
	s := r.desiredLocked()
	r.mu.Unlock()
	changes, err := r.dp.Set(ctx, s)
	for _, c := range changes {
		r.log.Info("dataplane", "change", c.String())
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(changes) > 0 {
		r.applied = append(r.applied, changes...)
		if n := len(r.applied); n > 100 {
			r.applied = slices.Clone(r.applied[n-100:])
		}
	}
	r.lastErr = err
	if err != nil {
		r.log.Warn("dataplane set failed; will retry", "err", err)
		select {
		case r.kick <- struct{}{}:
		default:
		}
		return fmt.Errorf("dataplane set: %w", err)
	}
	return nil
}

// Run retries failed applies with backoff (1 s doubling to 1 min) until ctx
// is done. It does not close the dataplane: the owner does that.
func (r *Reconciler) Run(ctx context.Context) error {
	backoff := time.Second
	var timer <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.kick:
			if timer == nil {
				timer = time.After(backoff)
			}
		case <-timer:
			timer = nil
			r.mu.Lock()
			failed := r.lastErr != nil
			r.mu.Unlock()
			var err error
			if failed {
				err = r.apply(ctx)
			}
			if err == nil {
				backoff = time.Second
			} else {
				backoff = min(2*backoff, time.Minute)
				timer = time.After(backoff)
			}
		}
	}
}

// PeerStatus is what the reconciler knows of one peer; no key material.
type PeerStatus struct {
	Name     string         `json:"name"`
	ULA      netip.Addr     `json:"ula"`
	Outer    netip.AddrPort `json:"outer"`
	OuterBy  string         `json:"outer_source"`
	OuterAt  time.Time      `json:"outer_since"`
	Keyed    bool           `json:"keyed"`
	OutSPI   uint32         `json:"out_spi,omitempty"`
	InSPI    uint32         `json:"in_spi,omitempty"`
	Cipher   Cipher         `json:"cipher,omitempty"`
	KeyedAt  time.Time      `json:"keyed_since"`
	InKernel bool           `json:"in_dataplane"`
	// Via is the path traffic is sent on, Device its tunnel device (empty
	// for ESP-in-UDP), Tunnels the peer's tunnel endpoints.
	Via     PathKind `json:"via"`
	Device  string   `json:"device,omitempty"`
	Tunnels []Tunnel `json:"tunnels,omitempty"`
}

// Status reports every known peer, the last changes applied and the last error.
func (r *Reconciler) Status() (peers []PeerStatus, recent []Change, lastErr error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	eff := map[netip.Addr]Peer{}
	for _, p := range r.desiredLocked().Peers {
		eff[p.ULA] = p
	}
	for ula, p := range r.peers {
		if e, ok := eff[ula]; ok {
			p = &peerState{name: p.name, via: e.Via, tunnels: e.Tunnels, outer: p.outer, outerAt: p.outerAt,
				outerBy: p.outerBy, keys: p.keys, keyedAt: p.keyedAt}
		}
		st := PeerStatus{Name: p.name, ULA: ula, Outer: p.outer, OuterBy: p.outerBy, OuterAt: p.outerAt, KeyedAt: p.keyedAt,
			Via: p.via, Device: TunnelDevice(p.via, ula), Tunnels: slices.Clone(p.tunnels)}
		if p.keys != nil {
			st.Keyed, st.OutSPI, st.InSPI, st.Cipher = true, p.keys.Out.SPI, p.keys.In.SPI, p.keys.Out.Cipher
			st.InKernel = (p.outer.IsValid() || p.via != PathESPInUDP) && r.lastErr == nil
		}
		peers = append(peers, st)
	}
	slices.SortFunc(peers, func(a, b PeerStatus) int { return a.ULA.Compare(b.ULA) })
	return peers, slices.Clone(r.applied), r.lastErr
}
