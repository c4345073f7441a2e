package path

import (
	"context"
	"net/netip"
	"sync"
	"testing"
)

// simNet is an in-memory IPv4 internet with NATs and a relay, for the
// selector's state machine under testing/synctest. NATs filter like Linux
// masquerade (only replies from an address:port the inside host sent to)
// and never hairpin; a symmetric NAT takes a new port per destination.
type simNet struct {
	t      testing.TB
	mu     sync.Mutex
	hosts  []*simHost
	relay  netip.Addr
	allocs map[netip.AddrPort]*simHost
	binds  map[[2]netip.AddrPort]*simHost // (alloc, source seen there) -> sender
	cut    func(from, to netip.AddrPort) bool
	ctx    context.Context
}

type simNAT struct {
	pub       netip.Addr
	symmetric bool
	next      uint16
	out       map[[2]netip.AddrPort]uint16 // (inside, destination or zero) -> port
	static    map[netip.AddrPort]uint16
	in        map[uint16]*natEntry
}

type natEntry struct {
	inside  netip.AddrPort
	allowed map[netip.AddrPort]bool
}

type simHost struct {
	name  string
	ula   netip.Addr
	addr  netip.AddrPort // inside address (== outside for public hosts)
	nat   *simNAT
	key   *Key
	sel   *Selector
	net   *simNet
	inbox chan simPkt
	alloc netip.AddrPort // relay allocation
	// pcp: the NAT has a static mapping of our port (published as direct)
	pcp netip.AddrPort
}

type simPkt struct {
	b    []byte
	from netip.AddrPort
}

func newSimNet(t testing.TB, ctx context.Context) *simNet {
	return &simNet{t: t, ctx: ctx, relay: netip.MustParseAddr("11.0.0.1"),
		allocs: map[netip.AddrPort]*simHost{}, binds: map[[2]netip.AddrPort]*simHost{}}
}

func newNAT(pub string, symmetric bool) *simNAT {
	return &simNAT{pub: netip.MustParseAddr(pub), symmetric: symmetric, next: 20000,
		out: map[[2]netip.AddrPort]uint16{}, in: map[uint16]*natEntry{}, static: map[netip.AddrPort]uint16{}}
}

// mapOut returns the outside source for a packet from inside to dst.
func (n *simNAT) mapOut(inside, dst netip.AddrPort) netip.AddrPort {
	k := [2]netip.AddrPort{inside, {}}
	if port, ok := n.static[inside]; ok { // a PCP mapping serves every destination
		return netip.AddrPortFrom(n.pub, port)
	}
	if n.symmetric {
		k[1] = dst
	}
	port, ok := n.out[k]
	if !ok {
		n.next++
		port = n.next
		n.out[k] = port
		n.in[port] = &natEntry{inside: inside, allowed: map[netip.AddrPort]bool{}}
	}
	if e := n.in[port]; e.allowed != nil {
		e.allowed[dst] = true
	}
	return netip.AddrPortFrom(n.pub, port)
}

// staticMap is a PCP mapping: inside port open to everyone at the same port.
func (n *simNAT) staticMap(inside netip.AddrPort) netip.AddrPort {
	n.in[inside.Port()] = &natEntry{inside: inside}
	n.static[inside] = inside.Port()
	return netip.AddrPortFrom(n.pub, inside.Port())
}

func (s *simNet) addHost(t testing.TB, name, ula, addr string, nat *simNAT) *simHost {
	k, err := NewKey()
	if err != nil {
		t.Fatal(err)
	}
	h := &simHost{name: name, ula: netip.MustParseAddr(ula), addr: netip.MustParseAddrPort(addr), nat: nat, key: k,
		net: s, inbox: make(chan simPkt, 256)}
	h.sel, err = New(Config{Key: k, Send: h.send})
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	h.alloc = netip.AddrPortFrom(s.relay, uint16(40000+len(s.hosts)))
	s.allocs[h.alloc] = h
	s.hosts = append(s.hosts, h)
	s.mu.Unlock()
	go h.sel.Run(s.ctx)
	go func() {
		for {
			select {
			case <-s.ctx.Done():
				return
			case p := <-h.inbox:
				h.sel.HandleProbe(p.b, p.from)
			}
		}
	}()
	return h
}

// rfx is the host's reflexive endpoint as a STUN server at 11.0.0.2:3478 saw it.
func (h *simHost) rfx() netip.AddrPort {
	if h.nat == nil {
		return h.addr
	}
	h.net.mu.Lock()
	defer h.net.mu.Unlock()
	return h.nat.mapOut(h.addr, netip.MustParseAddrPort("11.0.0.2:3478"))
}

func (h *simHost) send(b []byte, to netip.AddrPort) error {
	s := h.net
	s.mu.Lock()
	defer s.mu.Unlock()
	src := h.addr
	if h.nat != nil {
		for _, o := range s.hosts { // same LAN: straight there
			if o.nat == h.nat && o.addr == to {
				s.deliver(o, b, h.addr, to)
				return nil
			}
		}
		if to.Addr().IsPrivate() || to.Addr() == h.nat.pub {
			return nil // another LAN's address, or hairpin: lost
		}
		src = h.nat.mapOut(h.addr, to)
	}
	s.route(h, b, src, to)
	return nil
}

// route carries a packet from src (outside address) to dst on the internet.
func (s *simNet) route(sender *simHost, b []byte, src, dst netip.AddrPort) {
	if s.cut != nil && s.cut(src, dst) {
		return
	}
	if owner, ok := s.allocs[dst]; ok { // the relay
		// One source per (sender, port), as btmm-relay's Bind: a sender
		// whose NAT mapping changed is bound at its new source only.
		for k, v := range s.binds {
			if k[0] == dst && v == sender && k[1] != src {
				delete(s.binds, k)
			}
		}
		s.binds[[2]netip.AddrPort{dst, src}] = sender
		for k, v := range s.binds {
			if k[0] == sender.alloc && v == owner {
				s.route(nil, b, sender.alloc, k[1])
				return
			}
		}
		return // the owner has not bound towards the sender yet
	}
	for _, o := range s.hosts {
		switch {
		case o.nat == nil && o.addr == dst:
			s.deliver(o, b, src, dst)
			return
		case o.nat != nil && o.nat.pub == dst.Addr():
			e := o.nat.in[dst.Port()]
			if e == nil || (e.allowed != nil && !e.allowed[src]) {
				return // filtered
			}
			for _, in := range s.hosts {
				if in.addr == e.inside && in.nat == o.nat {
					s.deliver(in, b, src, dst)
				}
			}
			return
		}
	}
}

func (s *simNet) deliver(h *simHost, b []byte, from, _ netip.AddrPort) {
	select {
	case h.inbox <- simPkt{append([]byte(nil), b...), from}:
	default:
	}
}

// candidates is what h publishes: SRV/A (PCP mapping, public address or
// reflexive), LAN address, reflexive and relay allocation.
func (h *simHost) candidates() []Candidate {
	var out []Candidate
	switch {
	case h.nat == nil:
		out = append(out, Candidate{Kind: KindDirect, Addr: h.addr, Source: "srv"})
	case h.pcp.IsValid():
		out = append(out, Candidate{Kind: KindDirect, Addr: h.pcp, Source: "srv"})
	}
	if h.nat != nil {
		out = append(out, Candidate{Kind: KindLAN, Addr: h.addr, Source: "txt"}, Candidate{Kind: KindPunched, Addr: h.rfx(), Source: "txt"})
	}
	return append(out, Candidate{Kind: KindRelayUDP, Addr: h.alloc, Source: "txt"})
}

// meet tells a and b about each other (the LLQ push).
func meet(t testing.TB, a, b *simHost) {
	pa, pb := a.key.Public(), b.key.Public()
	if err := a.sel.SetPeer(b.ula, b.name, pb[:], b.candidates()); err != nil {
		t.Fatal(err)
	}
	if err := b.sel.SetPeer(a.ula, a.name, pa[:], a.candidates()); err != nil {
		t.Fatal(err)
	}
}
