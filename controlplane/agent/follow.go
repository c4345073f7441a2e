package agent

import (
	"context"
	"net/netip"
	"slices"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/netmon"
)

// Following the host itself (RFC 6281 §5.1–5.2; issue 12).
//
// A major change of this host's network (package netmon: a new default
// route, device or outer address, a link that went down and up, or coming
// back online) triggers, in this order and each at once:
//
//  1. NAT gateway rediscovery (Config.Rediscover, natpmp.Client.Rediscover);
//     on a public address it reports "no gateway" and our own address;
//  2. re-registration of our records (register.Registrar.Republish), without
//     waiting for the lease refresh; the NAT's new external address follows
//     through onNAT as soon as the gateway answers;
//  3. the LLQs set up again from the new address (Config.Rebind);
//  4. the dataplane follows the new local address and device
//     (Reconciler.SetLocal: the SAs, BPF attachment and map entries move; no
//     rekey);
//  5. an authenticated MOVED to every keyed peer from the tunnel socket
//     (keying.Agent.Moved), so they retarget at once without waiting for DNS.
//
// Losing every route (offline) changes nothing: SAs, identity and records
// stay, and coming back is a major change like any other. A change of the
// NAT's external address that the host cannot see itself (the gateway's
// public address changed) sends MOVED too.

// DefaultKeepalive is the NAT keepalive interval (RFC 3948 §2.3 leaves it
// to the implementation; 20 s is what most IPsec stacks use).
const DefaultKeepalive = 20 * time.Second

// KeepaliveSender sends RFC 3948 §2.3 NAT-keepalives (one 0xFF byte) from
// the tunnel socket; xfrm.Conn implements it.
type KeepaliveSender interface {
	SendKeepalive(to netip.AddrPort) error
}

// NetworkStatus is what btmmctl shows about the host's own network.
type NetworkStatus struct {
	Following bool      `json:"following"` // a network monitor is running
	Online    bool      `json:"online"`
	State     string    `json:"state,omitempty"` // default route, links, addresses
	Changes   int       `json:"major_changes"`
	Last      time.Time `json:"last_change,omitzero"` // first notification of the last major change
	Reasons   []string  `json:"last_reasons,omitempty"`
	// Took is how long the last major change took from its first
	// notification to the MOVED sent to the peers (debounce included).
	Took string `json:"last_took,omitempty"`
	// Keepalive is the NAT keepalive interval ("off" when disabled).
	Keepalive string `json:"keepalive"`
	BehindNAT bool   `json:"behind_nat"`
}

// PeerActivity is when the dataplane last carried traffic for a peer, as
// seen by the keepalive scheduler (its resolution is a quarter of the
// keepalive interval). Zero times: not seen yet.
type PeerActivity struct {
	ULA           netip.Addr `json:"ula"`
	LastTx        time.Time  `json:"last_tx,omitzero"`
	LastRx        time.Time  `json:"last_rx,omitzero"`
	LastKeepalive time.Time  `json:"last_keepalive,omitzero"`
	Keepalives    uint64     `json:"keepalives"`
}

type activity struct {
	PeerActivity
	tx, rx uint64
	seen   bool
	// Liveness (health.go): since when we send with nothing received,
	// and the echoes sent since then.
	sendingSince, lastProbe time.Time
	probes                  int
}

// onNetChange is the network monitor's callback: it hands major changes to
// the follow goroutine (latest wins) and never blocks.
func (a *Agent) onNetChange(c netmon.Change) {
	if !c.Major {
		return
	}
	a.mu.Lock()
	a.pendingNet = &c
	a.mu.Unlock()
	a.wakeFollow()
}

func (a *Agent) wakeFollow() {
	select {
	case a.followKick <- struct{}{}:
	default:
	}
}

// follow runs what network and NAT changes trigger, one at a time, until
// ctx ends; every step takes ctx, so shutdown cancels it.
func (a *Agent) follow(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-a.followKick:
		}
		a.mu.Lock()
		c, natMoved := a.pendingNet, a.pendingNATMove
		a.pendingNet, a.pendingNATMove = nil, false
		a.mu.Unlock()
		switch {
		case c != nil:
			a.followNetwork(ctx, *c)
		case natMoved:
			if err := a.keyer.Moved(ctx); err != nil && ctx.Err() == nil {
				a.log.Warn("telling peers about our new external address", "err", err)
			}
		}
	}
}

func (a *Agent) followNetwork(ctx context.Context, c netmon.Change) {
	online := c.New.Online()
	a.mu.Lock()
	a.netStatus.Changes++
	a.netStatus.Last, a.netStatus.Reasons, a.netStatus.Took = c.First, c.Reasons, ""
	a.mu.Unlock()
	if !online {
		a.log.Warn("offline: keeping SAs, identity and records until the network is back", "reasons", c.Reasons)
		return
	}
	a.log.Info("network changed: following it", "reasons", c.Reasons, "default", c.New.Default4.String())
	if a.cfg.Rediscover != nil {
		a.cfg.Rediscover()
	}
	a.reg.Republish()
	if a.cfg.Rebind != nil {
		a.cfg.Rebind()
	}
	if err := a.rec.SetLocal(ctx, a.local()); err != nil && ctx.Err() == nil {
		a.log.Warn("dataplane did not follow the move (retried)", "err", err)
	}
	if err := a.keyer.Moved(ctx); err != nil && ctx.Err() == nil {
		a.log.Warn("telling peers we moved", "err", err)
	}
	if a.paths != nil {
		a.paths.Kick() // new NAT, new candidates: measure and probe again (issue 14)
	}
	took := time.Since(c.First)
	a.mu.Lock()
	a.netStatus.Took = took.Round(time.Millisecond).String()
	a.mu.Unlock()
	a.log.Info("followed the network change", "took", took.Round(time.Millisecond))
}

// local is this host's side of the tunnels: Outer zero (the kernel's choice
// per peer, looked up again at every Set) and the configured device or none
// (the default route's).
func (a *Agent) local() controlplane.Local {
	l := controlplane.Local{ULA: a.cfg.Identity.ULA, Port: a.cfg.TunnelPort, Device: a.cfg.Device}
	if a.cfg.Tunnels != nil {
		l.FOUPort = a.cfg.Tunnels.FOUPort // issue 15: the GUE listener
	}
	return l
}

// behindNAT reports whether this host's tunnel port is behind a NAT.
func (a *Agent) behindNAT() bool {
	if a.cfg.NAT != nil {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.nat.BehindNAT
	}
	// Static external address (a port forward, or our own address).
	if a.cfg.NetMon != nil {
		if out := a.cfg.NetMon.State().Default4.Outer; out.IsValid() {
			return out != a.cfg.External.Addr()
		}
	}
	return true
}

// keepalives sends RFC 3948 §2.3 NAT-keepalives from the tunnel socket to
// every peer with which we or they are behind a NAT, when no ESP was sent to
// it for a whole interval. It polls the dataplane's counters four times per
// interval, so a keepalive follows the last ESP packet within 1.25
// intervals (25 s by default: inside the common 30 s UDP NAT timeout).
// With keepalives off it still polls (at the default interval) for the
// peers' liveness (health.go), and sends nothing.
func (a *Agent) keepalives(ctx context.Context) error {
	every := a.cfg.Keepalive
	if !a.keepalivesOn() {
		every = DefaultKeepalive
	}
	t := time.NewTicker(max(every/4, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			a.keepaliveTick(ctx, every)
		}
	}
}

func (a *Agent) keepaliveTick(ctx context.Context, every time.Duration) {
	sctx, cancel := context.WithTimeout(ctx, every/4)
	stats, err := a.cfg.Dataplane.Stats(sctx)
	cancel()
	if err != nil {
		a.log.Debug("keepalive: no dataplane counters this round", "err", err)
		return
	}
	byULA := map[netip.Addr]controlplane.PeerStats{}
	for _, s := range stats {
		byULA[s.ULA] = s
	}
	now := time.Now()
	desired := a.rec.Desired()
	weNAT := a.behindNAT()
	type send struct {
		ula netip.Addr
		to  netip.AddrPort
	}
	var sends []send
	a.mu.Lock()
	keep := map[netip.Addr]bool{}
	for _, p := range desired.Peers {
		keep[p.ULA] = true
		act := a.activity[p.ULA]
		if act == nil {
			act = &activity{PeerActivity: PeerActivity{ULA: p.ULA}}
			a.activity[p.ULA] = act
		}
		s := byULA[p.ULA]
		if act.seen && s.TxPackets != act.tx {
			act.LastTx = now
		}
		if act.seen && s.RxPackets != act.rx {
			act.LastRx = now
			act.sendingSince, act.probes = time.Time{}, 0
		} else if act.seen && s.TxPackets != act.tx && act.sendingSince.IsZero() {
			act.sendingSince = now
		}
		act.tx, act.rx, act.seen = s.TxPackets, s.RxPackets, true
		if !a.keepalivesOn() {
			continue
		}
		// Only where we or they are behind a NAT. A peer that says it
		// has none (TXT nat=none) has none; one that says nothing is
		// assumed to have one, as most do.
		if !weNAT && a.peers[p.ULA].Capabilities.NAT == "none" {
			continue
		}
		last := act.LastTx
		if act.LastKeepalive.After(last) {
			last = act.LastKeepalive
		}
		if now.Sub(last) >= every {
			sends = append(sends, send{p.ULA, p.Outer})
			act.LastKeepalive = now
			act.Keepalives++
		}
	}
	for ula := range a.activity {
		if !keep[ula] {
			delete(a.activity, ula)
		}
	}
	a.mu.Unlock()
	for _, s := range sends {
		if err := a.keepaliveSender.SendKeepalive(s.to); err != nil {
			a.log.Debug("keepalive", "peer", s.ula, "to", s.to, "err", err)
		}
	}
	a.updateHealth(ctx, now)
}

func (a *Agent) keepalivesOn() bool { return a.cfg.Keepalive > 0 && a.keepaliveSender != nil }

// PeerActivity returns when each peer's tunnel last carried traffic, in
// ULA order.
func (a *Agent) PeerActivity() []PeerActivity {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]PeerActivity, 0, len(a.activity))
	for _, act := range a.activity {
		out = append(out, act.PeerActivity)
	}
	slices.SortFunc(out, func(x, y PeerActivity) int { return x.ULA.Compare(y.ULA) })
	return out
}

// Network returns what the agent knows of the host's own network.
func (a *Agent) Network() NetworkStatus {
	a.mu.Lock()
	st := a.netStatus
	st.Reasons = slices.Clone(st.Reasons)
	a.mu.Unlock()
	st.Keepalive = "off"
	if a.keepalivesOn() {
		st.Keepalive = a.cfg.Keepalive.String()
	}
	if a.cfg.NetMon != nil {
		ns := a.cfg.NetMon.State()
		st.Following, st.Online, st.State = true, ns.Online(), ns.String()
	}
	st.BehindNAT = a.behindNAT()
	return st
}
