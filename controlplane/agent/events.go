package agent

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/btmm/btmm/dns/llqclient"
)

// Event is one change btmmctl watch shows. Events are derived by comparing
// successive status snapshots (Watch), so every change btmmctl status can
// show is reported the same way, whichever part made it.
type Event struct {
	Time time.Time `json:"time"`
	// Type: peer_added, peer_removed, peer_moved, peer_keyed,
	// peer_rekeyed, peer_keying_failed, peer_health, nat, network,
	// registration, llq, dataplane_error, repair, conflict.
	Type string `json:"type"`
	Peer string `json:"peer,omitempty"`
	// From and To are the old and new value of what changed (an outer
	// endpoint, a health state, an external address), when it has one.
	From   string `json:"from,omitempty"`
	To     string `json:"to,omitempty"`
	Reason string `json:"reason,omitempty"`
}

func (e Event) String() string {
	var b strings.Builder
	b.WriteString(e.Type)
	if e.Peer != "" {
		b.WriteString(" " + e.Peer)
	}
	switch {
	case e.From != "" && e.To != "":
		fmt.Fprintf(&b, ": %s -> %s", e.From, e.To)
	case e.To != "":
		b.WriteString(": " + e.To)
	}
	if e.Reason != "" {
		b.WriteString(" (" + e.Reason + ")")
	}
	return b.String()
}

// WatchEvery is how often Watch compares snapshots.
const WatchEvery = 500 * time.Millisecond

// Watch calls f with every change until ctx ends or f returns an error
// (the watcher went away).
func (a *Agent) Watch(ctx context.Context, f func(Event) error) error {
	prev := a.Status(ctx)
	t := time.NewTicker(WatchEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		cur := a.Status(ctx)
		for _, e := range Diff(&prev, &cur, time.Now()) {
			if err := f(e); err != nil {
				return err
			}
		}
		prev = cur
	}
}

// Diff lists the changes from old to cur as events at now.
func Diff(old, cur *Status, now time.Time) []Event {
	var out []Event
	add := func(e Event) {
		e.Time = now
		out = append(out, e)
	}
	ap := func(a netip.AddrPort) string {
		if !a.IsValid() {
			return "none"
		}
		return a.String()
	}
	before := map[netip.Addr]PeerStatus{}
	for _, p := range old.Peers {
		before[p.ULA] = p
	}
	seen := map[netip.Addr]bool{}
	for _, p := range cur.Peers {
		seen[p.ULA] = true
		o, had := before[p.ULA]
		if !had {
			add(Event{Type: "peer_added", Peer: p.Name, To: p.ULA.String() + " at " + ap(p.Outer)})
			o = PeerStatus{Health: PeerHealth{State: HealthOK}}
			o.Name = p.Name
		} else if p.Outer != o.Outer {
			add(Event{Type: "peer_moved", Peer: p.Name, From: ap(o.Outer), To: ap(p.Outer), Reason: "learnt from " + p.OuterBy})
		}
		switch {
		case p.Keyed && !o.Keyed:
			add(Event{Type: "peer_keyed", Peer: p.Name, To: fmt.Sprintf("out 0x%08x in 0x%08x", p.OutSPI, p.InSPI)})
		case p.Keyed && (p.OutSPI != o.OutSPI || p.InSPI != o.InSPI):
			add(Event{Type: "peer_rekeyed", Peer: p.Name, From: fmt.Sprintf("out 0x%08x", o.OutSPI), To: fmt.Sprintf("out 0x%08x", p.OutSPI)})
		}
		if p.KeyingError != "" && p.KeyingError != o.KeyingError {
			add(Event{Type: "peer_keying_failed", Peer: p.Name, Reason: oneLine(p.KeyingError)})
		}
		if p.Health.State != o.Health.State && (had || p.Health.State != HealthUnreachable || p.Health.Reason != "not keyed yet (keying in progress)") {
			add(Event{Type: "peer_health", Peer: p.Name, From: o.Health.State, To: p.Health.State, Reason: p.Health.Reason})
		}
	}
	for _, o := range old.Peers {
		if !seen[o.ULA] {
			add(Event{Type: "peer_removed", Peer: o.Name, From: o.ULA.String()})
		}
	}
	if old.NAT.External != cur.NAT.External || old.NAT.Status != cur.NAT.Status {
		add(Event{Type: "nat", From: ap(old.NAT.External), To: ap(cur.NAT.External), Reason: cur.NAT.Status})
	}
	if n := cur.Network; n.Changes != old.Network.Changes || n.Online != old.Network.Online {
		state := "offline"
		if n.Online {
			state = "online"
		}
		add(Event{Type: "network", To: state, Reason: strings.Join(n.Reasons, "; ")})
	}
	if r, o := cur.Register, old.Register; r.Published != o.Published || r.Server != o.Server ||
		(r.LastError != "" && (r.LastError != o.LastError || r.Failures > o.Failures)) {
		to := "not published"
		if r.Published {
			to = "published on " + r.Server
		}
		reason := ""
		if r.LastError != "" {
			reason = fmt.Sprintf("%d failures, last: %s", r.Failures, oneLine(r.LastError))
		}
		add(Event{Type: "registration", To: to, Reason: reason})
	}
	if m, o := LLQMode(cur), LLQMode(old); m.Mode != o.Mode || m.Reason != o.Reason {
		add(Event{Type: "llq", From: o.Mode, To: m.Mode, Reason: m.Reason})
	}
	if cur.LastError != old.LastError && cur.LastError != "" {
		add(Event{Type: "dataplane_error", Reason: oneLine(cur.LastError)})
	}
	if r := cur.Repair; r != nil && (old.Repair == nil || r.Count != old.Repair.Count) {
		add(Event{Type: "repair", To: fmt.Sprintf("repair %d", r.Count), Reason: strings.Join(r.What, "; ")})
	}
	if len(cur.Conflicts) != len(old.Conflicts) {
		for _, c := range cur.Conflicts {
			add(Event{Type: "conflict", To: c.ULA.String(), Reason: "claimed by " + strings.Join(c.Names, ", ")})
		}
	}
	return out
}

// LLQSummary is the LLQ client's state in one line: how the user's other
// hosts are followed, and why.
type LLQSummary struct {
	// Mode: "llq" (every question pushed by the server), "polling"
	// (none pushed), "mixed", "setup" (handshakes in progress) or "none"
	// (no LLQ client yet).
	Mode      string `json:"mode"`
	Reason    string `json:"reason,omitempty"`
	Server    string `json:"server,omitempty"`
	Questions int    `json:"questions"`
	Pushed    int    `json:"pushed"`
	Polling   int    `json:"polling"`
}

// LLQMode sums up st's LLQ client.
func LLQMode(st *Status) LLQSummary {
	l := st.LLQ
	if l == nil {
		return LLQSummary{Mode: "none", Reason: "peer tracking not started yet"}
	}
	s := LLQSummary{Server: l.Server, Questions: len(l.Queries)}
	var reasons []string
	setup := 0
	for _, q := range l.Queries {
		switch q.Mode {
		case llqclient.ModeLLQ:
			s.Pushed++
		case llqclient.ModePolling:
			s.Polling++
			if q.Reason != "" && !slices.Contains(reasons, q.Reason) {
				reasons = append(reasons, q.Reason)
			}
		default:
			setup++
		}
	}
	switch {
	case s.Questions == 0:
		s.Mode, s.Reason = "none", "no questions yet"
	case setup > 0:
		s.Mode, s.Reason = "setup", fmt.Sprintf("%d of %d LLQ setups in progress", setup, s.Questions)
	case s.Polling == 0:
		s.Mode, s.Reason = "llq", "the server pushes changes (RFC 8764)"
	case s.Pushed == 0:
		s.Mode = "polling"
	default:
		s.Mode = "mixed"
	}
	if len(reasons) > 0 {
		s.Reason = strings.Join(reasons, "; ")
	}
	if l.LastError != "" && s.Mode != "llq" {
		s.Reason = strings.TrimPrefix(s.Reason+"; last error: "+oneLine(l.LastError), "; ")
	}
	return s
}
