package path

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// Config configures a Selector. Zero durations take the defaults shown.
type Config struct {
	Key *Key // this host's probe key (required)
	// Send writes one probe on the keying channel (the transport adds the
	// non-ESP marker). Required.
	Send func(b []byte, to netip.AddrPort) error
	// OnChange is called (from the Selector's goroutines, never with its
	// lock held) when the path chosen for a peer changes; an invalid Path
	// means none works.
	OnChange func(ula netip.Addr, p Path)
	// Preference ranks kinds, best first (default DefaultPreference).
	// Kinds not listed are never chosen.
	Preference []Kind
	// Burst is when probes go to every candidate after a peer appears or
	// changes, or after Kick: offsets from that moment (default 0, 100 ms,
	// 300 ms, 700 ms, 1.5 s, 3 s). Both sides start within milliseconds
	// (LLQ push), so their first probes open each other's NAT mappings and
	// a later one gets through.
	Burst []time.Duration
	// Active is the interval at which the chosen path, and worse ones that
	// still answer (standbys, e.g. the relay), are probed (5 s);
	// it is dead, and the next best takes over, when nothing answered for
	// DeadAfter (2.5 x Active).
	Active, DeadAfter time.Duration
	// Upgrade is the interval at which candidates better than the chosen
	// path are probed (30 s), so a relayed peer moves to a direct path
	// when one opens.
	Upgrade time.Duration
	// MaxLearnt bounds peer-reflexive candidates kept per peer (8).
	MaxLearnt int
	// MoveGrace is how long, after Moved, answers received before the
	// move still count (1 s): a path that answers a probe sent from the
	// new network within it stays without a gap; one that does not is
	// given up then instead of DeadAfter after its last answer.
	MoveGrace time.Duration
	// OnSeenChange is called (never with the Selector's lock held) when a
	// peer tells, in a PONG, another source for our PINGs to one of its
	// candidates than its previous PONG did (Probe.Seen, as Tailscale's
	// disco pong): our NAT maps us elsewhere towards it. Through a relay
	// the source seen is the relay's, which does not change.
	OnSeenChange func(remote, old, seen netip.AddrPort)
	Logger       *slog.Logger
}

func (c *Config) setDefaults() error {
	if c.Key == nil || c.Send == nil {
		return errors.New("path: Config needs Key and Send")
	}
	if len(c.Preference) == 0 {
		c.Preference = DefaultPreference
	}
	if len(c.Burst) == 0 {
		c.Burst = []time.Duration{0, 100 * time.Millisecond, 300 * time.Millisecond, 700 * time.Millisecond,
			1500 * time.Millisecond, 3 * time.Second}
	}
	if c.Active <= 0 {
		c.Active = 5 * time.Second
	}
	if c.DeadAfter <= 0 {
		c.DeadAfter = c.Active * 5 / 2
	}
	if c.Upgrade <= 0 {
		c.Upgrade = 30 * time.Second
	}
	if c.MaxLearnt <= 0 {
		c.MaxLearnt = 8
	}
	if c.MoveGrace <= 0 {
		c.MoveGrace = time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// triggerGap bounds the triggered checks a known candidate's PINGs cause.
const triggerGap = 20 * time.Millisecond

// Selector runs the connectivity checks of every peer and chooses each
// one's path. Its methods may be called from any goroutine.
type Selector struct {
	cfg  Config
	rank map[Kind]int
	kick chan struct{}

	mu    sync.Mutex
	peers map[netip.Addr]*peerState
	byKey map[[keyLen]byte]*peerState
	txids map[[txidLen]byte]txRef
	// Reflexive is our endpoint as peers see it (PONG's Seen), newest first.
	seen []netip.AddrPort
	// movedAt is the last Moved: answers from before it count only
	// until MoveGrace after it.
	movedAt time.Time
}

type txRef struct {
	peer *peerState
	cand *candState
	sent time.Time
}

type peerState struct {
	name    string
	ula     netip.Addr
	pub     [keyLen]byte
	pairKey []byte
	cands   []*candState
	burstAt time.Time // start of the current burst (zero: none)
	burstN  int       // burst probes sent
	cur     Path
	changed time.Time
}

type candState struct {
	Candidate
	lastPing, lastPong, learnt time.Time
	rtt                        time.Duration
	pongs, pings               int
	seen                       netip.AddrPort // our source as the peer saw it (last PONG)
}

// New checks cfg and returns a Selector; Run drives its timers.
func New(cfg Config) (*Selector, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	s := &Selector{cfg: cfg, rank: map[Kind]int{}, kick: make(chan struct{}, 1),
		peers: map[netip.Addr]*peerState{}, byKey: map[[keyLen]byte]*peerState{}, txids: map[[txidLen]byte]txRef{}}
	for i, k := range cfg.Preference {
		if _, dup := s.rank[k]; dup || k == KindNone || k >= numKinds {
			return nil, fmt.Errorf("path: preference lists %v twice or is not a path kind", k)
		}
		s.rank[k] = i
	}
	return s, nil
}

// SetPeer adds or updates a peer: its public probe key (32 bytes, from
// TXT pk=) and its published candidates. A new peer, a new key or a changed
// candidate set starts a probe burst. Peer-reflexive candidates learnt
// earlier are kept.
func (s *Selector) SetPeer(ula netip.Addr, name string, pub []byte, cands []Candidate) error {
	pk, err := s.cfg.Key.PairKey(pub)
	if err != nil {
		return fmt.Errorf("path: peer %s: %w", name, err)
	}
	s.mu.Lock()
	p := s.peers[ula]
	if p == nil {
		p = &peerState{ula: ula}
		s.peers[ula] = p
	}
	p.name = name
	newKey := p.pub != [keyLen]byte(pub)
	if newKey {
		delete(s.byKey, p.pub)
		p.pub, p.pairKey = [keyLen]byte(pub), pk
	}
	s.byKey[p.pub] = p
	var next []*candState
	changed := newKey
	for _, c := range cands {
		if !c.Addr.IsValid() {
			continue
		}
		if i := slices.IndexFunc(p.cands, func(o *candState) bool { return o.Addr == c.Addr }); i >= 0 {
			o := p.cands[i]
			if o.Kind != c.Kind || o.Probe != c.Probe || o.Source == "prflx" {
				changed = true
			}
			o.Candidate = c
			next = append(next, o)
			continue
		}
		changed = true
		next = append(next, &candState{Candidate: c})
	}
	for _, o := range p.cands {
		if o.Source == "prflx" && !slices.ContainsFunc(next, func(n *candState) bool { return n.Addr == o.Addr }) {
			next = append(next, o)
		} else if !slices.Contains(next, o) {
			changed = true
		}
	}
	p.cands = next
	if changed {
		s.startBurst(p, time.Now())
	}
	s.mu.Unlock()
	s.reselect(ula)
	s.poke()
	return nil
}

// RemovePeer forgets a peer.
func (s *Selector) RemovePeer(ula netip.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p := s.peers[ula]; p != nil {
		delete(s.byKey, p.pub)
		delete(s.peers, ula)
		for id, r := range s.txids {
			if r.peer == p {
				delete(s.txids, id)
			}
		}
	}
}

// Kick starts a probe burst to every peer: our network changed (new
// address, new NAT), so every path must be checked again.
func (s *Selector) Kick() {
	s.mu.Lock()
	now := time.Now()
	for _, p := range s.peers {
		s.startBurst(p, now)
	}
	s.mu.Unlock()
	s.poke()
}

// Moved is Kick after our own network changed (another address, another
// network): an answer received before it says nothing about the paths
// from here, so a path that does not answer the burst within MoveGrace is
// given up then (and the best one that does answer chosen) instead of
// DeadAfter after its last answer. A path that does answer stays: no gap.
func (s *Selector) Moved() {
	s.mu.Lock()
	s.movedAt = time.Now()
	for _, p := range s.peers {
		for _, c := range p.cands {
			c.seen = netip.AddrPort{} // of course the peers see us elsewhere now
		}
	}
	s.mu.Unlock()
	s.Kick()
}

func (s *Selector) startBurst(p *peerState, now time.Time) {
	p.burstAt, p.burstN = now, 0
}

func (s *Selector) poke() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// Run sends the probes that are due until ctx ends.
func (s *Selector) Run(ctx context.Context) error {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
		case <-t.C:
		}
		next := s.tick(time.Now())
		t.Reset(max(time.Until(next), time.Millisecond))
	}
}

type outMsg struct {
	b  []byte
	to netip.AddrPort
}

// tick sends due probes, expires dead paths and returns the next due time.
func (s *Selector) tick(now time.Time) time.Time {
	var out []outMsg
	var dirty []netip.Addr
	next := now.Add(time.Hour)
	s.mu.Lock()
	for id, r := range s.txids {
		if now.Sub(r.sent) > s.cfg.DeadAfter {
			delete(s.txids, id)
		}
	}
	if graceEnd := s.movedAt.Add(s.cfg.MoveGrace); !s.movedAt.IsZero() && now.Before(graceEnd) {
		next = graceEnd // then the paths that did not answer since go
	}
	for _, p := range s.peers {
		// Burst: every candidate at each offset.
		if !p.burstAt.IsZero() {
			for p.burstN < len(s.cfg.Burst) && !now.Before(p.burstAt.Add(s.cfg.Burst[p.burstN])) {
				for _, c := range p.cands {
					out = append(out, s.pingLocked(p, c, now))
				}
				p.burstN++
			}
			if p.burstN < len(s.cfg.Burst) {
				next = earliest(next, p.burstAt.Add(s.cfg.Burst[p.burstN]))
			} else {
				p.burstAt = time.Time{}
			}
		}
		// The chosen path: is it still answering?
		if p.cur.IsValid() {
			if c := p.cand(p.cur.Remote); c == nil || !s.alive(c, now) {
				dirty = append(dirty, p.ula)
			}
		}
		// Steady probing: the chosen path often, better ones now and then.
		curRank := s.rankOf(p.cur.Kind)
		for _, c := range p.cands {
			r, ok := s.rank[c.Kind]
			var every time.Duration
			switch {
			case !ok:
				continue
			case p.cur.IsValid() && c.Addr == p.cur.Remote:
				every = s.cfg.Active
			case !p.cur.IsValid():
				every = s.cfg.Active // no path at all: keep looking briskly
			case r < curRank:
				every = s.cfg.Upgrade
			case s.alive(c, now):
				every = s.cfg.Active // a warm standby for when the chosen path dies
			default:
				continue
			}
			due := c.lastPing.Add(every)
			if !now.Before(due) {
				out = append(out, s.pingLocked(p, c, now))
				due = now.Add(every)
			}
			next = earliest(next, due)
			if s.alive(c, now) {
				next = earliest(next, c.lastPong.Add(s.cfg.DeadAfter+time.Millisecond))
			}
		}
	}
	s.mu.Unlock()
	for _, m := range out {
		if err := s.cfg.Send(m.b, m.to); err != nil {
			s.cfg.Logger.Debug("probe not sent", "to", m.to, "err", err)
		}
	}
	for _, u := range dirty {
		s.reselect(u)
	}
	return next
}

func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func (p *peerState) cand(a netip.AddrPort) *candState {
	for _, c := range p.cands {
		if c.Addr == a {
			return c
		}
	}
	return nil
}

func (s *Selector) rankOf(k Kind) int {
	if r, ok := s.rank[k]; ok {
		return r
	}
	return len(s.rank)
}

func (s *Selector) alive(c *candState, now time.Time) bool {
	if c.lastPong.IsZero() || now.Sub(c.lastPong) > s.cfg.DeadAfter {
		return false
	}
	// Since a move only answers to probes from the new network count
	// (after MoveGrace).
	return !c.lastPong.Before(s.movedAt) || now.Before(s.movedAt.Add(s.cfg.MoveGrace))
}

func (s *Selector) pingLocked(p *peerState, c *candState, now time.Time) outMsg {
	var id [txidLen]byte
	rand.Read(id[:])
	s.txids[id] = txRef{peer: p, cand: c, sent: now}
	c.lastPing = now
	c.pings++
	pr := Probe{Type: Ping, Sender: s.cfg.Key.Public(), TxID: id}
	to := c.Addr
	if c.Probe.IsValid() {
		to = c.Probe // through the tunnel device
	}
	return outMsg{pr.Seal(p.pairKey), to}
}

// HandleProbe takes a datagram of ClassProbe that arrived from 'from' on the
// keying channel: a PING from a known key is answered with a PONG to its
// source (and an unknown source becomes a peer-reflexive candidate, probed
// at once); a PONG to one of our PINGs marks that candidate alive. Anything
// else is dropped and reported as an error (for counters; never logged per
// packet).
func (s *Selector) HandleProbe(b []byte, from netip.AddrPort) error {
	from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	s.mu.Lock()
	pr, err := Open(b, func(sender [keyLen]byte) []byte {
		if p := s.byKey[sender]; p != nil {
			return p.pairKey
		}
		return nil
	})
	if err != nil {
		s.mu.Unlock()
		return err
	}
	p := s.byKey[pr.Sender]
	now := time.Now()
	var out []outMsg
	var seenChange func()
	switch pr.Type {
	case Ping:
		pong := Probe{Type: Pong, Sender: s.cfg.Key.Public(), TxID: pr.TxID, Seen: from}
		out = append(out, outMsg{pong.Seal(p.pairKey), from})
		if c := p.cand(from); c != nil {
			// A known candidate that does not answer us yet: check it at
			// once (triggered check, RFC 8445 §7.3.1.4) instead of at
			// the next burst offset or interval; the peer's PING just
			// opened the way back. At most one per triggerGap.
			if !s.alive(c, now) && now.Sub(c.lastPing) >= triggerGap {
				out = append(out, s.pingLocked(p, c, now))
			}
		} else if from.Addr().Is4() {
			c := &candState{Candidate: Candidate{Kind: KindPunched, Addr: from, Source: "prflx"}, learnt: now}
			p.cands = append(p.cands, c)
			s.trimLearnt(p)
			if slices.Contains(p.cands, c) {
				out = append(out, s.pingLocked(p, c, now)) // triggered check (RFC 8445 §7.3.1.4)
			}
		}
	case Pong:
		ref, ok := s.txids[pr.TxID]
		if !ok || ref.peer != p {
			s.mu.Unlock()
			return fmt.Errorf("path: PONG for no PING of ours from %v", from)
		}
		delete(s.txids, pr.TxID)
		c := ref.cand
		c.lastPong, c.rtt = now, now.Sub(ref.sent)
		c.pongs++
		if pr.Seen.IsValid() && pr.Seen != c.seen {
			if c.seen.IsValid() && s.cfg.OnSeenChange != nil {
				remote, old, seen := c.Addr, c.seen, pr.Seen
				seenChange = func() { s.cfg.OnSeenChange(remote, old, seen) }
			}
			c.seen = pr.Seen
		}
		if pr.Seen.IsValid() {
			s.seen = append([]netip.AddrPort{pr.Seen}, slices.DeleteFunc(s.seen, func(a netip.AddrPort) bool { return a == pr.Seen })...)
			if len(s.seen) > 8 {
				s.seen = s.seen[:8]
			}
		}
	}
	ula := p.ula
	s.mu.Unlock()
	for _, m := range out {
		if err := s.cfg.Send(m.b, m.to); err != nil {
			s.cfg.Logger.Debug("probe not sent", "to", m.to, "err", err)
		}
	}
	if seenChange != nil {
		seenChange()
	}
	if pr.Type == Pong {
		s.reselect(ula)
	} else {
		s.poke()
	}
	return nil
}

// trimLearnt keeps the newest MaxLearnt peer-reflexive candidates.
func (s *Selector) trimLearnt(p *peerState) {
	var learnt []*candState
	for _, c := range p.cands {
		if c.Source == "prflx" {
			learnt = append(learnt, c)
		}
	}
	if len(learnt) <= s.cfg.MaxLearnt {
		return
	}
	slices.SortFunc(learnt, func(a, b *candState) int { return a.learnt.Compare(b.learnt) })
	drop := learnt[:len(learnt)-s.cfg.MaxLearnt]
	p.cands = slices.DeleteFunc(p.cands, func(c *candState) bool {
		return slices.Contains(drop, c) && c.Addr != p.cur.Remote
	})
}

// reselect chooses the peer's path: the best-ranked alive candidate; among
// equals the current one stays (no flapping on round-trip noise), else the
// fastest. A change is reported through OnChange.
func (s *Selector) reselect(ula netip.Addr) {
	s.mu.Lock()
	p := s.peers[ula]
	if p == nil {
		s.mu.Unlock()
		return
	}
	now := time.Now()
	var best *candState
	for _, c := range p.cands {
		if _, ok := s.rank[c.Kind]; !ok || !s.alive(c, now) {
			continue
		}
		switch {
		case best == nil:
			best = c
		case s.rankOf(c.Kind) != s.rankOf(best.Kind):
			if s.rankOf(c.Kind) < s.rankOf(best.Kind) {
				best = c
			}
		case best.Addr == p.cur.Remote:
		case c.Addr == p.cur.Remote || c.rtt < best.rtt:
			best = c
		}
	}
	var np Path
	if best != nil {
		np = Path{Kind: best.Kind, Remote: best.Addr}
	}
	if np == p.cur {
		s.mu.Unlock()
		return
	}
	old := p.cur
	p.cur, p.changed = np, now
	if !np.IsValid() {
		s.startBurst(p, now) // lost every path: look again at once
	}
	name := p.name
	s.mu.Unlock()
	s.cfg.Logger.Info("path", "peer", name, "from", old.String(), "to", np.String())
	if s.cfg.OnChange != nil {
		s.cfg.OnChange(ula, np)
	}
	s.poke()
}

// Reflexive returns our endpoints as peers last saw them (PONG Seen), newest first.
func (s *Selector) Reflexive() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.seen)
}

// Known reports whether addr is one of the peer's candidates (published or
// learnt).
func (s *Selector) Known(ula netip.Addr, addr netip.AddrPort) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.peers[ula]
	return p != nil && p.cand(addr) != nil
}

// Current returns the path chosen for a peer (invalid if none).
func (s *Selector) Current(ula netip.Addr) Path {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p := s.peers[ula]; p != nil {
		return p.cur
	}
	return Path{}
}

// CandidateStatus is one candidate as btmmctl shows it.
type CandidateStatus struct {
	Candidate
	Alive    bool          `json:"alive"`
	RTT      time.Duration `json:"rtt,omitempty"`
	LastPong time.Time     `json:"last_pong,omitzero"`
	Pings    int           `json:"pings"`
	Pongs    int           `json:"pongs"`
}

// PeerStatus is a peer's chosen path and candidates.
type PeerStatus struct {
	Name       string            `json:"name"`
	ULA        netip.Addr        `json:"ula"`
	Path       Path              `json:"path"`
	Since      time.Time         `json:"since,omitzero"`
	Candidates []CandidateStatus `json:"candidates"`
}

// Status reports every peer.
func (s *Selector) Status() []PeerStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	var out []PeerStatus
	for _, p := range s.peers {
		ps := PeerStatus{Name: p.name, ULA: p.ula, Path: p.cur, Since: p.changed}
		for _, c := range p.cands {
			ps.Candidates = append(ps.Candidates, CandidateStatus{Candidate: c.Candidate, Alive: s.alive(c, now),
				RTT: c.rtt, LastPong: c.lastPong, Pings: c.pings, Pongs: c.pongs})
		}
		out = append(out, ps)
	}
	slices.SortFunc(out, func(a, b PeerStatus) int { return a.ULA.Compare(b.ULA) })
	return out
}
