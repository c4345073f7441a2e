package agent

import (
	"net/netip"
	"slices"

	"github.com/btmm/btmm/controlplane/keying"
)

// Identity binding (RFC 6281 §7.1 with the threat model of docs/keying.md):
// a peer is known by its DNS host name; the Kerberos principal it must
// authenticate as follows from that name (host/<host>.<user domain>@REALM,
// or local configuration, never from anything the peer publishes: its TXT
// krb= is ignored), and its ULA is keyed only while exactly one name holds
// it. A ULA claimed by two names is keyed with neither (a host publishing
// another's ULA under its own name cannot draw that host's traffic) and is
// reported as a conflict by btmmctl status.

// Conflict is a ULA that several of the user's host names claim.
type Conflict struct {
	ULA   netip.Addr `json:"ula"`
	Names []string   `json:"names"`
}

// peerBook is the user's other hosts by name, as DNS reports them.
type peerBook struct {
	byName map[string]PeerEvent
}

func (b *peerBook) apply(ev PeerEvent) {
	if b.byName == nil {
		b.byName = map[string]PeerEvent{}
	}
	if ev.Removed {
		// The tracker removes a name with the ULA it had; a newer event
		// for the same name (a reboot: new ULA) may have come first.
		if cur, ok := b.byName[ev.Name]; ok && cur.ULA == ev.ULA {
			delete(b.byName, ev.Name)
		}
		return
	}
	b.byName[ev.Name] = ev
}

// claims maps each ULA to the names that hold it, names sorted.
func (b *peerBook) claims() map[netip.Addr][]string {
	c := map[netip.Addr][]string{}
	for name, p := range b.byName {
		c[p.ULA] = append(c[p.ULA], name)
	}
	for _, names := range c {
		slices.Sort(names)
	}
	return c
}

// holder returns the one name holding ula, if exactly one does.
func (b *peerBook) holder(ula netip.Addr) (PeerEvent, bool) {
	names := b.claims()[ula]
	if len(names) != 1 {
		return PeerEvent{}, false
	}
	return b.byName[names[0]], true
}

// keying returns the peers to key (each ULA held by one name, with an
// outer address, the principal principalFor derives from the name) and the
// ULAs in conflict, both sorted.
func (b *peerBook) keying(principalFor func(host string) string) ([]keying.PeerConfig, []Conflict) {
	var kp []keying.PeerConfig
	var conflicts []Conflict
	for ula, names := range b.claims() {
		if len(names) > 1 {
			conflicts = append(conflicts, Conflict{ULA: ula, Names: names})
			continue
		}
		p := b.byName[names[0]]
		if !p.Outer.IsValid() {
			continue
		}
		kp = append(kp, keying.PeerConfig{Name: p.Name, ULA: p.ULA, Outer: p.Outer, Principal: principalFor(p.Name)})
	}
	slices.SortFunc(kp, func(x, y keying.PeerConfig) int { return x.ULA.Compare(y.ULA) })
	slices.SortFunc(conflicts, func(x, y Conflict) int { return x.ULA.Compare(y.ULA) })
	return kp, conflicts
}

// applyPeerEvent files ev by name and returns the peers to key, the one
// name holding ev's ULA (if exactly one does) and whether one does. It
// keeps a.peers (ULA -> event of the single holder) and a.conflicts in
// step. Called with a.mu held.
func (a *Agent) applyPeerEvent(ev PeerEvent) ([]keying.PeerConfig, PeerEvent, bool) {
	a.book.apply(ev)
	kp, conflicts := a.book.keying(a.principalFor)
	for _, c := range conflicts {
		if c.ULA == ev.ULA {
			a.log.Warn("ULA claimed by several hosts: keyed with none of them", "ula", c.ULA, "names", c.Names)
		}
	}
	a.conflicts = conflicts
	a.peers = map[netip.Addr]PeerEvent{}
	for ula := range a.book.claims() {
		if p, ok := a.book.holder(ula); ok {
			a.peers[ula] = p
		}
	}
	holder, held := a.book.holder(ev.ULA)
	return kp, holder, held
}

// principalFor is the principal a peer named host must authenticate as.
func (a *Agent) principalFor(host string) string {
	if a.cfg.PrincipalFor != nil {
		return a.cfg.PrincipalFor(host)
	}
	return keying.DefaultPrincipal(host, a.cfg.Domain, "")
}
