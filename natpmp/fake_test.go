package natpmp

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync"
	"time"
)

// fakeGateway is an in-memory NAT-PMP/PCP server behind a Conn, for the
// state-machine tests (the real one is miniupnpd, see netns_test.go). Use
// it inside a synctest bubble: its clock is the bubble's.
type fakeGateway struct {
	mu       sync.Mutex
	pcp      bool // speaks PCP (else answers version 2 with UNSUPPORTED_VERSION)
	silent   bool
	dropPCP  bool       // a NAT-PMP gateway that ignores version 2 instead of refusing it
	refuse   ResultCode // non-zero: refuse mappings (NAT-PMP code; PCP gets NO_RESOURCES)
	external netip.Addr
	start    time.Time
	taken    map[uint16]bool // external ports in use by someone else
	maps     map[fakeKey]fakeMapping
	log      []fakeReq
	dials    int
	// forge, if set, returns answers an on-path attacker gets in ahead of
	// the gateway's own answer to request b.
	forge func(b []byte) [][]byte
}

// fakeConn is one client socket to the fake gateway.
type fakeConn struct {
	g      *fakeGateway
	resp   chan []byte
	closed chan struct{}
	once   sync.Once
}

func (g *fakeGateway) dial() *fakeConn {
	g.mu.Lock()
	g.dials++
	g.mu.Unlock()
	return &fakeConn{g: g, resp: make(chan []byte, 16), closed: make(chan struct{})}
}

type fakeKey struct {
	proto    Protocol
	internal uint16
}

type fakeMapping struct {
	ext     uint16
	nonce   [12]byte
	expires time.Time
}

type fakeReq struct {
	at       time.Time
	version  uint8
	op       uint8
	internal uint16
	suggest  uint16
	lifetime uint32
	nonce    [12]byte
}

func newFakeGateway(pcp bool) *fakeGateway {
	return &fakeGateway{pcp: pcp, external: netip.MustParseAddr("11.0.0.1"), start: time.Now(),
		taken: map[uint16]bool{}, maps: map[fakeKey]fakeMapping{}}
}

func (g *fakeConn) Read(b []byte) (int, error) {
	select {
	case r := <-g.resp:
		return copy(b, r), nil
	case <-g.closed:
		return 0, net.ErrClosed
	}
}

func (g *fakeConn) LocalAddr() net.Addr {
	return &net.UDPAddr{IP: net.IPv4(192, 168, 1, 2), Port: 40000}
}

func (g *fakeConn) Close() error {
	g.once.Do(func() { close(g.closed) })
	return nil
}

// answer makes a silent gateway answer again.
func (g *fakeGateway) answer() {
	g.mu.Lock()
	g.silent = false
	g.mu.Unlock()
}

func (g *fakeGateway) epoch() uint32 { return uint32(time.Since(g.start) / time.Second) }

// reboot loses every mapping and restarts the epoch.
func (g *fakeGateway) reboot() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.start = time.Now()
	for _, m := range g.maps {
		delete(g.taken, m.ext)
	}
	g.maps = map[fakeKey]fakeMapping{}
}

func (g *fakeGateway) requests() []fakeReq {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]fakeReq(nil), g.log...)
}

func (g *fakeGateway) mapping(p Protocol, internal uint16) (fakeMapping, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	m, ok := g.maps[fakeKey{p, internal}]
	return m, ok && m.expires.After(time.Now())
}

func (c *fakeConn) Write(b []byte) (int, error) {
	select {
	case <-c.closed:
		return 0, net.ErrClosed
	default:
	}
	c.g.mu.Lock()
	forge := c.g.forge
	c.g.mu.Unlock()
	if forge != nil {
		for _, f := range forge(b) {
			c.resp <- f
		}
	}
	if out := c.g.handle(b); out != nil {
		c.resp <- out
	}
	return len(b), nil
}

// handle answers one request (nil: no answer).
func (g *fakeGateway) handle(b []byte) []byte {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(b) < 2 {
		return nil
	}
	rq := fakeReq{at: time.Now(), version: b[0], op: b[1]}
	var out []byte
	switch {
	case b[0] == VersionNATPMP && b[1] == OpExternalAddress:
		out, _ = Response{Op: 128, Epoch: g.epoch(), External: g.external}.MarshalBinary()
	case b[0] == VersionNATPMP && len(b) == 12:
		rq.internal = binary.BigEndian.Uint16(b[4:])
		rq.suggest = binary.BigEndian.Uint16(b[6:])
		rq.lifetime = binary.BigEndian.Uint32(b[8:])
		proto := UDP
		if b[1] == OpMapTCP {
			proto = TCP
		}
		r := Response{Op: b[1] | 0x80, Epoch: g.epoch(), InternalPort: rq.internal}
		if g.refuse != 0 {
			r.Result = g.refuse
		} else if rq.lifetime == 0 {
			delete(g.maps, fakeKey{proto, rq.internal})
		} else {
			m := g.assign(fakeKey{proto, rq.internal}, rq.suggest)
			m.expires = time.Now().Add(time.Duration(rq.lifetime) * time.Second)
			g.maps[fakeKey{proto, rq.internal}] = m
			r.ExternalPort, r.Lifetime = m.ext, rq.lifetime
		}
		out, _ = r.MarshalBinary()
	case b[0] == VersionPCP && g.dropPCP:
	case b[0] == VersionPCP && !g.pcp:
		out, _ = Response{Op: b[1] | 0x80, Result: ResultUnsupportedVersion, Epoch: g.epoch()}.MarshalBinary()
	case b[0] == VersionPCP && b[1] == PCPOpAnnounce:
		out, _ = PCPResponse{Opcode: PCPOpAnnounce, Epoch: g.epoch()}.MarshalBinary()
	case b[0] == VersionPCP && b[1] == PCPOpMap && len(b) == 60:
		rq.lifetime = binary.BigEndian.Uint32(b[4:])
		copy(rq.nonce[:], b[24:36])
		rq.internal = binary.BigEndian.Uint16(b[40:])
		rq.suggest = binary.BigEndian.Uint16(b[42:])
		k := fakeKey{Protocol(b[36]), rq.internal}
		r := PCPResponse{Opcode: PCPOpMap, Epoch: g.epoch(), Lifetime: rq.lifetime,
			Map: PCPMap{Nonce: rq.nonce, Protocol: k.proto, InternalPort: rq.internal}}
		old, exists := g.maps[k]
		switch {
		case g.refuse != 0:
			r.Result, r.Lifetime = PCPNoResources, 0
		case exists && old.nonce != rq.nonce:
			r.Result, r.Lifetime = PCPNotAuthorized, 0 // RFC 6887 §11.3: nonce must match
		case rq.lifetime == 0:
			delete(g.maps, k)
		default:
			m := g.assign(k, rq.suggest)
			m.nonce = rq.nonce
			m.expires = time.Now().Add(time.Duration(rq.lifetime) * time.Second)
			g.maps[k] = m
			r.Map.ExternalPort, r.Map.External = m.ext, g.external
		}
		out, _ = r.MarshalBinary()
	}
	g.log = append(g.log, rq)
	if g.silent {
		return nil
	}
	return out
}

func (g *fakeGateway) assign(k fakeKey, suggest uint16) fakeMapping {
	if m, ok := g.maps[k]; ok {
		return m
	}
	p := suggest
	if p == 0 {
		p = k.internal
	}
	for g.taken[p] {
		p++
	}
	g.taken[p] = true
	return fakeMapping{ext: p}
}

// fakeAnnouncer delivers announcements to the client's listener.
type fakeAnnouncer struct {
	c      chan []byte
	closed chan struct{}
	once   sync.Once
}

func newFakeAnnouncer() *fakeAnnouncer {
	return &fakeAnnouncer{c: make(chan []byte), closed: make(chan struct{})}
}

func (a *fakeAnnouncer) ReadFrom(b []byte) (int, net.Addr, error) {
	select {
	case p := <-a.c:
		return copy(b, p), &net.UDPAddr{IP: net.IPv4(192, 168, 1, 1), Port: ServerPort}, nil
	case <-a.closed:
		return 0, nil, net.ErrClosed
	}
}

func (a *fakeAnnouncer) Close() error {
	a.once.Do(func() { close(a.closed) })
	return nil
}
