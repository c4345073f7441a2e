package agent

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"
	"time"

	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/controlplane/relay"
)

// Noticing that our NAT changed under us (issue 14: "a better path found
// later, e.g. after a NAT change, replaces the relay").
//
// The full measurement (refresh: NAT behaviour towards every STUN
// responder, the allocation, binds, the candidates published) runs every
// [paths] refresh (60 s), on peer changes and when our own network changes
// (netmon). A gateway that is replaced, rebooted or flushes its mappings
// changes nothing this host can see locally, yet it moves our reflexive
// endpoint, breaks our relay binds (the relay knows our old mapping) and
// may bring PCP with it. Two cheap signals between full measurements,
// as Tailscale's periodic re-STUN and disco pong source do:
//
//   - recheck: one STUN Binding request from the tunnel socket to the first
//     responder every [paths] recheck (15 s, 5 s while UDP counts as
//     blocked, less up to a quarter at random), 20 bytes each way (plus the
//     answer's address), compared with what the last measurement saw there;
//   - a peer's PONG that reports our PINGs to one of its candidates coming
//     from another source than its previous PONG did
//     (path.Config.OnSeenChange), or, while UDP counts as blocked, a path
//     over UDP that answers: the recheck runs at once (at most once a
//     second), and its answer decides.
//
// A recheck whose answer differs, the first answer after "UDP blocked", or
// no answer at all (3 tries, 1.75 s) while UDP worked, runs the full
// measurement at once. When it finds our reflexive endpoint moved, the
// NAT gateway is looked for again too (natpmp.Client.Rediscover: the new
// gateway may speak PCP) and the LLQs set up again.

// natWatch is the recheck's state machine (no I/O; paths drives it).
type natWatch struct {
	mu       sync.Mutex
	base     netip.AddrPort // our endpoint as the first responder saw it (zero: not known)
	blocked  bool           // the last measurement had no STUN answer
	lastTrig time.Time      // the last recheck a PONG triggered
}

// measured resets the watch after a full measurement: seen are the
// answers of DetectNAT in the order of servers; only when every server
// answered is seen[0] known to be servers[0]'s (else the next recheck's
// answer becomes the base).
func (w *natWatch) measured(nat relay.NAT, servers, seen []netip.AddrPort) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.blocked = nat == relay.NATBlocked
	w.base = netip.AddrPort{}
	if len(seen) > 0 && len(seen) == len(servers) {
		w.base = seen[0]
	}
}

// checked takes a recheck's answer (ok false: none came) and says whether
// the full measurement must run now, and why.
func (w *natWatch) checked(got netip.AddrPort, ok bool) (full bool, why string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case ok && w.blocked:
		return true, "a STUN answer again after UDP was blocked"
	case ok && !w.base.IsValid():
		w.base = got
		return false, ""
	case ok && got != w.base:
		return true, fmt.Sprintf("our NAT maps the tunnel socket to %v now, was %v", got, w.base)
	case ok, w.blocked:
		return false, ""
	}
	return true, "no STUN answer (UDP worked at the last measurement)"
}

// seenChanged reports whether news from the selector (a PONG saying our
// source is seen elsewhere, a UDP path while blocked) should trigger a
// recheck now: at most one a second, however many peers tell.
func (w *natWatch) seenChanged(now time.Time) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if now.Sub(w.lastTrig) < time.Second {
		return false
	}
	w.lastTrig = now
	return true
}

// recheckEvery is the next recheck interval: [paths] recheck, a third of
// it while UDP counts as blocked (Go carries the data then: leave soon),
// less up to a quarter at random, so that a network of hosts does not ask
// in step.
func (p *paths) recheckEvery() time.Duration {
	d := p.cfg.Recheck
	p.mu.Lock()
	if p.nat == relay.NATBlocked {
		d /= 3
	}
	p.mu.Unlock()
	return d - rand.N(d/4+1)
}

// recheck sends one Binding request to the first STUN responder of the last
// measurement and reports whether the full measurement must run now.
func (p *paths) recheck(ctx context.Context) bool {
	p.mu.Lock()
	var server netip.AddrPort
	if len(p.servers) > 0 {
		server = p.servers[0]
	}
	p.mu.Unlock()
	if !server.IsValid() {
		return false // no responder: the refresh looks for one
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	got, err := p.wc.Binding(ctx, server)
	full, why := p.watch.checked(got, err == nil)
	if full {
		p.a.log.Info("paths: NAT recheck: measuring again", "why", why, "server", server)
	} else {
		p.a.log.Debug("paths: NAT recheck", "server", server, "reflexive", got, "err", err)
	}
	return full
}

// onSeenChange is the selector's news that a peer sees our PINGs come from
// elsewhere: recheck now.
func (p *paths) onSeenChange(remote, old, seen netip.AddrPort) {
	p.triggerRecheck("a peer sees us from another source; rechecking our NAT", "peer_candidate", remote, "was", old, "now", seen)
}

// udpAnswers is onPath's news that a path over UDP (not relay-tcp) was
// chosen: while UDP counts as blocked, that says it may not be any more.
func (p *paths) udpAnswers(np path.Path) {
	p.mu.Lock()
	blocked := p.nat == relay.NATBlocked
	p.mu.Unlock()
	if blocked && np.IsValid() && np.Kind != path.KindRelayTCP && !np.Kind.Tunnel() {
		p.triggerRecheck("a path over UDP answers while UDP counted as blocked; rechecking", "path", np.String())
	}
}

// triggerRecheck runs the recheck now (at most once a second).
func (p *paths) triggerRecheck(msg string, args ...any) {
	if !p.watch.seenChanged(time.Now()) {
		return
	}
	p.a.log.Info("paths: "+msg, args...)
	select {
	case p.recheckNow <- struct{}{}:
	default:
	}
}
