package agent

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/btmm/btmm/controlplane"
)

// Per-peer liveness, after tailscale's health "warnables": each peer has a
// named state with a reason, kept by the activity sampler (follow.go) and
// shown by btmmctl status/peers/watch and the metrics; a peer going stale
// is a state change (logged once), never a log line per check.
//
// What is known of a peer: its outer address, its keys (the last handshake:
// when the current SA pair was installed), whether the SAs are in the kernel,
// and the kernel's per-peer packet counters, sampled a few times per
// keepalive interval (LastTx, LastRx). ESP carries no acknowledgements of
// its own, so silence is judged only while we send: a peer we have sent to
// for StaleAfter without a packet back is stale, and after UnreachableAfter
// unreachable. While a peer looks stale the agent sends an ICMPv6 echo
// through the tunnel (LivenessProbe) every few seconds, so one-way traffic
// (a download the peer only receives) is told apart from a dead path by the
// echo's answer. An idle tunnel (nothing sent, nothing received) is ok:
// nothing is known against it, and no probe is sent (it would keep NAT
// mappings open that the keepalive setting says to let go).

// Health states.
const (
	HealthOK          = "ok"
	HealthStale       = "stale"
	HealthUnreachable = "unreachable"
)

// Liveness thresholds (of the time since we first sent with nothing
// received after it).
const (
	StaleAfter       = 15 * time.Second
	UnreachableAfter = 90 * time.Second
	// livenessEvery is the interval of the ICMPv6 echoes sent to a peer
	// that looks stale.
	livenessEvery = 5 * time.Second
)

// PeerHealth is a peer's liveness as btmmctl shows it.
type PeerHealth struct {
	State  string    `json:"state"`            // ok, stale or unreachable
	Reason string    `json:"reason,omitempty"` // why not ok (one line)
	Since  time.Time `json:"since,omitzero"`   // when State began
	// LastHandshake is when the current SA pair was installed (zero: not keyed).
	LastHandshake time.Time `json:"last_handshake,omitzero"`
	// LastReceived is the last time the kernel counted a packet from the
	// peer (sampled: up to a quarter keepalive interval late), or the last
	// handshake if that is later.
	LastReceived time.Time `json:"last_received,omitzero"`
	LastSent     time.Time `json:"last_sent,omitzero"`
}

// healthInput is what a peer's health is judged on.
type healthInput struct {
	noFamily   string // why the peer cannot be reached at all (tunnels.go noCommonFamily), "" none
	outerKnown bool
	keyed      bool
	inKernel   bool
	keyingErr  string // the last keying error ("" none)
	dataErr    string // the dataplane's last error ("" none)
	handshake  time.Time
	lastTx     time.Time // last sample with more packets sent
	lastRx     time.Time // last sample with more packets received
	// sendingSince is the first sample after lastRx (or after the
	// handshake) with more packets sent: we have been sending since then
	// with nothing back. Zero: nothing sent since the last packet received.
	sendingSince time.Time
	probes       int // liveness echoes sent since sendingSince
}

// judge returns a peer's state and reason at now.
func judge(in healthInput, now time.Time) (state, reason string) {
	switch {
	case in.noFamily != "":
		return HealthUnreachable, in.noFamily
	case !in.outerKnown:
		return HealthUnreachable, "no outer address known (the peer published none yet)"
	case !in.keyed && in.keyingErr != "":
		return HealthUnreachable, "not keyed: " + oneLine(in.keyingErr)
	case !in.keyed:
		return HealthUnreachable, "not keyed yet (keying in progress)"
	case !in.inKernel && in.dataErr != "":
		return HealthUnreachable, "keyed, but the SAs are not in the kernel: " + oneLine(in.dataErr)
	case !in.inKernel:
		return HealthUnreachable, "keyed, but the SAs are not in the kernel yet"
	case in.sendingSince.IsZero():
		return HealthOK, ""
	}
	waited := now.Sub(in.sendingSince)
	if waited < StaleAfter {
		return HealthOK, ""
	}
	last := "nothing received since keyed"
	if r := latest(in.lastRx, in.handshake); !r.IsZero() {
		last = "last packet received " + ago(now, r)
	}
	echo := ""
	if in.probes > 0 {
		echo = fmt.Sprintf("; %d echoes through the tunnel unanswered", in.probes)
	}
	if waited >= UnreachableAfter {
		return HealthUnreachable, fmt.Sprintf("sending for %s with no packet back (%s%s)", secs(waited), last, echo)
	}
	return HealthStale, fmt.Sprintf("sending for %s with no packet back (%s%s)", secs(waited), last, echo)
}

func latest(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func secs(d time.Duration) string { return d.Round(time.Second).String() }

func ago(now, t time.Time) string { return secs(now.Sub(t)) + " ago" }

// oneLine folds an error's text onto one line (tables stay tables).
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// healthTrack is the sampler's record of one peer's state.
type healthTrack struct {
	state, reason string
	since         time.Time
}

// updateHealth judges every peer after a counter sample (keepaliveTick),
// logs state changes once, and sends liveness echoes to peers we have been
// sending to with nothing back.
func (a *Agent) updateHealth(ctx context.Context, now time.Time) {
	peers, _, dataErr := a.rec.Status()
	kctx, cancel := context.WithTimeout(ctx, statusWait)
	ks, err := a.keyer.Status(kctx)
	cancel()
	type change struct {
		name, from, to, reason string
	}
	var changes []change
	var echoes []netip.Addr
	a.mu.Lock()
	if err == nil { // else: keying is busy; keep the errors read last time
		clear(a.keyingErrs)
		for _, k := range ks {
			if k.LastError != nil {
				a.keyingErrs[k.ULA] = k.LastError.Error()
			}
		}
	}
	keep := map[netip.Addr]bool{}
	for _, p := range peers {
		keep[p.ULA] = true
		act := a.activity[p.ULA]
		if act != nil && !p.KeyedAt.IsZero() && p.KeyedAt.After(act.sendingSince) && !act.sendingSince.IsZero() {
			act.sendingSince, act.probes = time.Time{}, 0 // a handshake since: the peer answered
		}
		in := a.healthInputLocked(p, dataErr)
		state, reason := judge(in, now)
		h := a.health[p.ULA]
		if h == nil {
			h = &healthTrack{}
			a.health[p.ULA] = h
		}
		if h.state != state {
			changes = append(changes, change{p.Name, h.state, state, reason})
			h.state, h.since = state, now
		}
		h.reason = reason
		if act != nil && !act.sendingSince.IsZero() && now.Sub(act.sendingSince) >= livenessEvery &&
			now.Sub(act.lastProbe) >= livenessEvery && p.Keyed && p.InKernel {
			act.lastProbe = now
			act.probes++
			echoes = append(echoes, p.ULA)
		}
	}
	for ula := range a.health {
		if !keep[ula] {
			delete(a.health, ula)
		}
	}
	a.mu.Unlock()
	for _, c := range changes {
		switch {
		case c.from == "" && c.to == HealthOK:
		case c.to == HealthOK:
			a.log.Info("peer health", "peer", c.name, "from", c.from, "to", c.to)
		default:
			a.log.Warn("peer health", "peer", c.name, "from", c.from, "to", c.to, "reason", c.reason)
		}
	}
	for _, ula := range echoes {
		go a.echo(ula)
	}
}

// healthInputLocked gathers what a peer is judged on. a.mu is held.
func (a *Agent) healthInputLocked(p controlplane.PeerStatus, dataErr error) healthInput {
	// A tunnel is an outer address too (an IPv6-only peer has no IPv4 one).
	in := healthInput{noFamily: a.unreach[p.ULA], outerKnown: p.Outer.IsValid() || len(p.Tunnels) > 0, keyed: p.Keyed,
		inKernel: p.InKernel, keyingErr: a.keyingErrs[p.ULA], handshake: p.KeyedAt}
	if dataErr != nil {
		in.dataErr = dataErr.Error()
	}
	if act := a.activity[p.ULA]; act != nil && p.Keyed {
		in.lastTx, in.lastRx, in.sendingSince, in.probes = act.LastTx, act.LastRx, act.sendingSince, act.probes
	}
	return in
}

// peerHealth is a peer's health for Status: judged now on the latest
// samples, with the time its state began as the sampler saw it.
func (a *Agent) peerHealthLocked(p controlplane.PeerStatus, dataErr error, now time.Time) PeerHealth {
	in := a.healthInputLocked(p, dataErr)
	state, reason := judge(in, now)
	h := PeerHealth{State: state, Reason: reason, LastSent: in.lastTx}
	if p.Keyed {
		h.LastHandshake = p.KeyedAt
		h.LastReceived = latest(in.lastRx, p.KeyedAt)
	}
	if t := a.health[p.ULA]; t != nil && t.state == state {
		h.Since = t.since
	}
	return h
}
