// Package peers follows the user's other hosts through DNS (RFC 6281 §5.3,
// Figure 3) and turns what it learns into a stream of typed events for the
// control plane.
//
// A Tracker keeps one LLQ (package llqclient) on the user's DNS-SD browse name
// _autotunnel._udp.<domain> (PTR), so hosts are discovered without
// configuration. For every host found there it keeps LLQs on the host's AAAA
// (its ULA, step 1 of Figure 3), on the SRV and TXT of
// _autotunnel._udp.<host>.<domain> (external port and capabilities, step 3)
// and on the A of the SRV's target (the NAT's public address, step 5). When a
// host has a ULA, an SRV and an IPv4 address for the target it is a Peer:
//
//	Peer{Name, ULA, Outer: <target A>:<SRV port>, Capabilities: <TXT>}
//
// A host without SRV or A (an IPv6-only host: it has no IPv4 endpoint) is a
// Peer with an invalid Outer when its TXT carries a global IPv6 endpoint
// (c-v6=[2001:db8::2]:4500, docs/tunnels.md); without one it is not a peer.
//
// Events say Added, Changed (outer address, port or capabilities) or Removed
// (the browse PTR went away, or the AAAA, SRV or A did, e.g. at lease expiry
// or clean shutdown) and always carry the full Peer. A host whose ULA changes
// (it rebooted) is Removed with its old ULA and Added with the new one, so a
// consumer may key everything by ULA. They are delivered in order on Events(), a
// channel the control plane reads; the Tracker never drops or merges events
// that would leave the reader with a wrong final state (consecutive changes
// of one peer may be merged into the latest one: the records of one DNS
// update arrive on several LLQs and are given Config.Settle to come in).
//
//	t := peers.New(peers.Config{Domain: "alice.btmm.example.", Self: "laptop.alice.btmm.example."}, llqClient, logger)
//	go t.Run(ctx)
//	for ev := range t.Events() { ... } // closed when Run returns
//
// or, as one call that also runs the LLQ client, Follow(ctx, llqClient, cfg,
// logger, func(peers.Event) { ... }).
//
// Records of this host (Config.Self) are ignored. Malformed records (an AAAA
// outside fc00::/7, a TXT that does not parse) are logged; a bad TXT gives
// empty Capabilities rather than hiding the peer.
package peers

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/btmm/btmm/controlplane/identity"
	"github.com/btmm/btmm/dns/register"
	"github.com/miekg/dns"
)

// Peer is one of the user's other hosts as DNS describes it now.
type Peer struct {
	Name         string // host name, e.g. "desktop.alice.btmm.example."
	ULA          netip.Addr
	Outer        netip.AddrPort // SRV target's A : SRV port; invalid for an IPv6-only host (c-v6 only)
	Capabilities register.Capabilities
}

// Equal reports whether two peers are the same in every field.
func (p Peer) Equal(o Peer) bool {
	return p.Name == o.Name && p.ULA == o.ULA && p.Outer == o.Outer && p.Capabilities.Equal(o.Capabilities)
}

func (p Peer) String() string {
	return fmt.Sprintf("%s ula=%v outer=%v dp=%s", p.Name, p.ULA, p.Outer, strings.Join(p.Capabilities.Dataplanes, ","))
}

// Kind of an event.
type Kind int

// Event kinds.
const (
	Added Kind = iota + 1
	Changed
	Removed
)

func (k Kind) String() string {
	switch k {
	case Added:
		return "added"
	case Changed:
		return "changed"
	case Removed:
		return "removed"
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// Event is one change to the peer set. Removed carries the peer as it was.
type Event struct {
	Kind Kind
	Peer Peer
}

// Watcher is what the Tracker needs from an LLQ client (*llqclient.Client
// implements it): fn gets the complete answer whenever it changes, on a
// goroutine of the watcher's; stop ends the watch.
type Watcher interface {
	Watch(name string, qtype uint16, fn func([]dns.RR)) (stop func())
}

// Config configures a Tracker.
type Config struct {
	Domain string // the user's domain
	Self   string // this host's name (host.<domain>), ignored in the browse set
	Buffer int    // Events() buffer; default 64
	// Settle is how long to wait after an answer changes for the other
	// answers of the same DNS update (which arrive on other LLQs) before
	// emitting events, so one update gives one Changed event, not one per
	// record. Default 20 ms; negative disables it.
	Settle time.Duration
}

// Tracker turns DNS answers into peer events. See the package comment.
type Tracker struct {
	cfg    Config
	w      Watcher
	log    *slog.Logger
	events chan Event
	dirty  chan struct{}

	mu      sync.Mutex
	answers map[key][]dns.RR
	watches map[key]*watch
	seq     int
	peers   map[string]Peer // emitted
}

type key struct {
	name  string
	qtype uint16
}

type watch struct {
	token int
	stop  func()
}

// New returns a Tracker reading through w.
func New(cfg Config, w Watcher, log *slog.Logger) *Tracker {
	cfg.Domain = dns.CanonicalName(cfg.Domain)
	if cfg.Self != "" {
		cfg.Self = dns.CanonicalName(cfg.Self)
	}
	if cfg.Settle == 0 {
		cfg.Settle = 20 * time.Millisecond
	}
	if cfg.Buffer == 0 {
		cfg.Buffer = 64
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Tracker{
		cfg:     cfg,
		w:       w,
		log:     log,
		events:  make(chan Event, cfg.Buffer),
		dirty:   make(chan struct{}, 1),
		answers: map[key][]dns.RR{},
		watches: map[key]*watch{},
		peers:   map[string]Peer{},
	}
}

// Events is the peer stream; it is closed when Run returns.
func (t *Tracker) Events() <-chan Event { return t.events }

// Peers returns the current peers (as last emitted), sorted by name.
func (t *Tracker) Peers() []Peer {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]Peer, 0, len(t.peers))
	for _, p := range t.peers {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Run tracks peers until ctx ends, then stops its watches and closes
// Events(). It returns nil.
func (t *Tracker) Run(ctx context.Context) error {
	defer close(t.events)
	defer t.stopAll()
	t.reconcileWatches()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.dirty:
		}
		if t.cfg.Settle > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(t.cfg.Settle):
			}
			select {
			case <-t.dirty:
			default:
			}
		}
		t.reconcileWatches()
		for _, ev := range t.diff() {
			select {
			case t.events <- ev:
			case <-ctx.Done():
				return nil
			}
		}
	}
}

func (t *Tracker) stopAll() {
	t.mu.Lock()
	ws := t.watches
	t.watches = map[key]*watch{}
	t.mu.Unlock()
	for _, w := range ws {
		w.stop()
	}
}

// reconcileWatches starts and stops LLQs so they match the names the
// current answers lead to. Watch is called without holding t.mu.
func (t *Tracker) reconcileWatches() {
	t.mu.Lock()
	want := t.wantedLocked()
	var start []key
	var stops []func()
	for k, w := range t.watches {
		if !want[k] {
			stops = append(stops, w.stop)
			delete(t.watches, k)
			delete(t.answers, k)
		}
	}
	for k := range want {
		if _, ok := t.watches[k]; !ok {
			start = append(start, k)
		}
	}
	t.mu.Unlock()
	for _, stop := range stops {
		stop()
	}
	for _, k := range start {
		t.mu.Lock()
		t.seq++
		token := t.seq
		w := &watch{token: token}
		t.watches[k] = w
		t.mu.Unlock()
		stop := t.w.Watch(k.name, k.qtype, func(rrs []dns.RR) { t.update(k, token, rrs) })
		t.mu.Lock()
		if cur, ok := t.watches[k]; ok && cur.token == token {
			cur.stop = stop
		} else {
			t.mu.Unlock()
			stop()
			continue
		}
		t.mu.Unlock()
	}
}

func (t *Tracker) update(k key, token int, rrs []dns.RR) {
	t.mu.Lock()
	if w, ok := t.watches[k]; !ok || w.token != token {
		t.mu.Unlock()
		return // a late answer for a watch we stopped
	}
	t.answers[k] = rrs
	t.mu.Unlock()
	select {
	case t.dirty <- struct{}{}:
	default:
	}
}

func (t *Tracker) browse() key {
	return key{register.BrowseName(t.cfg.Domain), dns.TypePTR}
}

// hosts returns host name -> instance name from the browse answer.
func (t *Tracker) hostsLocked() map[string]string {
	hosts := map[string]string{}
	for _, rr := range t.answers[t.browse()] {
		ptr, ok := rr.(*dns.PTR)
		if !ok {
			continue
		}
		h, ok := register.HostFromInstance(ptr.Ptr, t.cfg.Domain)
		if !ok || h == t.cfg.Self {
			continue
		}
		hosts[h] = dns.CanonicalName(ptr.Ptr)
	}
	return hosts
}

func (t *Tracker) wantedLocked() map[key]bool {
	want := map[key]bool{t.browse(): true}
	for h, inst := range t.hostsLocked() {
		want[key{h, dns.TypeAAAA}] = true
		want[key{inst, dns.TypeSRV}] = true
		want[key{inst, dns.TypeTXT}] = true
		if srv := firstSRV(t.answers[key{inst, dns.TypeSRV}]); srv != nil {
			want[key{dns.CanonicalName(srv.Target), dns.TypeA}] = true
		}
	}
	return want
}

func firstSRV(rrs []dns.RR) *dns.SRV {
	var best *dns.SRV
	for _, rr := range rrs {
		if s, ok := rr.(*dns.SRV); ok && s.Port != 0 && s.Target != "." {
			if best == nil || s.Priority < best.Priority || (s.Priority == best.Priority && s.Target < best.Target) {
				best = s
			}
		}
	}
	return best
}

// peerLocked assembles host's Peer from the answers. ok is false when the
// host is not (or no longer) a usable peer; pending is true when an answer
// it needs has not arrived yet (a watch just started), in which case the
// last emitted state stands rather than flapping through Removed.
func (t *Tracker) peerLocked(host, inst string) (p Peer, ok, pending bool) {
	p = Peer{Name: host}
	var srvTarget string
	if srv := firstSRV(t.answers[key{inst, dns.TypeSRV}]); srv != nil {
		srvTarget = dns.CanonicalName(srv.Target)
	}
	for _, k := range []key{{host, dns.TypeAAAA}, {inst, dns.TypeSRV}, {inst, dns.TypeTXT}, {srvTarget, dns.TypeA}} {
		if _, delivered := t.answers[k]; !delivered && k.name != "" {
			return p, false, true
		}
	}
	p, ok = t.assembleLocked(host, inst)
	return p, ok, false
}

func (t *Tracker) assembleLocked(host, inst string) (Peer, bool) {
	p := Peer{Name: host}
	var ulas []netip.Addr
	for _, rr := range t.answers[key{host, dns.TypeAAAA}] {
		if a, ok := rr.(*dns.AAAA); ok {
			if ip, ok := netip.AddrFromSlice(a.AAAA); ok && identity.IsULA(ip) {
				ulas = append(ulas, ip)
			}
		}
	}
	if len(ulas) == 0 {
		return p, false
	}
	slices.SortFunc(ulas, netip.Addr.Compare)
	p.ULA = ulas[0]
	for _, rr := range t.answers[key{inst, dns.TypeTXT}] {
		if txt, ok := rr.(*dns.TXT); ok {
			caps, err := register.ParseCapabilities(txt.Txt)
			if err != nil {
				t.log.Warn("peer TXT does not parse; assuming no capabilities", "peer", host, "err", err)
			}
			p.Capabilities = caps
			break
		}
	}
	if srv := firstSRV(t.answers[key{inst, dns.TypeSRV}]); srv != nil {
		var v4s []netip.Addr
		for _, rr := range t.answers[key{dns.CanonicalName(srv.Target), dns.TypeA}] {
			if a, ok := rr.(*dns.A); ok {
				if ip, ok := netip.AddrFromSlice(a.A.To4()); ok {
					v4s = append(v4s, ip)
				}
			}
		}
		if len(v4s) > 0 {
			slices.SortFunc(v4s, netip.Addr.Compare)
			p.Outer = netip.AddrPortFrom(v4s[0], srv.Port)
			return p, true
		}
	}
	// No IPv4 endpoint (SRV + A): an IPv6-only host is still a peer when
	// it publishes a global IPv6 endpoint (c-v6, docs/tunnels.md), reached
	// over an ip6tnl device; Outer stays invalid.
	return p, HasIPv6Endpoint(p.Capabilities)
}

// HasIPv6Endpoint reports whether caps carry a c-v6 candidate with a global
// IPv6 address (not a ULA, not link-local): an IPv6-only host's only
// endpoint.
func HasIPv6Endpoint(caps register.Capabilities) bool {
	for _, c := range caps.Candidates {
		a := c.Addr.Addr()
		if c.Kind == CandidateIPv6 && a.Is6() && !a.Is4In6() && a.IsGlobalUnicast() && !identity.IsULA(a) && a.Zone() == "" && c.Addr.Port() != 0 {
			return true
		}
	}
	return false
}

// CandidateIPv6 is the TXT candidate kind of a global IPv6 endpoint
// (c-v6=[addr]:port, path.KindIPv6).
const CandidateIPv6 = "v6"

// diff computes the current peers, records them as emitted and returns the
// events that lead there.
func (t *Tracker) diff() []Event {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := map[string]Peer{}
	for h, inst := range t.hostsLocked() {
		p, ok, pending := t.peerLocked(h, inst)
		switch {
		case ok:
			now[h] = p
		case pending:
			if old, ok := t.peers[h]; ok {
				now[h] = old
			}
		}
	}
	var evs []Event
	for h, p := range now {
		old, ok := t.peers[h]
		switch {
		case !ok:
			evs = append(evs, Event{Added, p})
		case old.ULA != p.ULA:
			// A new ULA is a new identity (the peer rebooted, RFC 6281
			// §6.3): consumers key tunnels and SAs by ULA.
			evs = append(evs, Event{Removed, old}, Event{Added, p})
		case !old.Equal(p):
			evs = append(evs, Event{Changed, p})
		}
	}
	for h, p := range t.peers {
		if _, ok := now[h]; !ok {
			evs = append(evs, Event{Removed, p})
		}
	}
	sort.SliceStable(evs, func(i, j int) bool { return evs[i].Peer.Name < evs[j].Peer.Name })
	t.peers = now
	for _, ev := range evs {
		t.log.Info("peer "+ev.Kind.String(), "peer", ev.Peer.String())
	}
	return evs
}
