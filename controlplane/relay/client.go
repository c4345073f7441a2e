package relay

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/pion/stun/v3"
)

// Client speaks to relays and STUN responders from the host's tunnel
// socket. Send writes on the keying channel (the transport adds the
// non-ESP marker); the STUN answers that arrive there are handed to Handle
// (path.Mux's STUN handler).
type Client struct {
	Send func(b []byte, to netip.AddrPort) error
	Cred Credential
	Host string // this host's domain name, e.g. "laptop.alice.btmm.example."
	// Retransmit schedule (RFC 8489 §6.2.1 style): first after RTO,
	// doubling, Tries transmissions (default 250 ms, 5).
	RTO   time.Duration
	Tries int
	// BlockedAfter: DetectNAT calls UDP blocked when no responder has
	// answered this long after its first requests (default 2 s: the first
	// three transmissions to each, 250+500+1000 ms), instead of waiting out
	// every retransmission (7.75 s per responder).
	BlockedAfter time.Duration

	mu      sync.Mutex
	pending map[[stun.TransactionIDSize]byte]chan *stun.Message
}

// Handle takes a STUN message that arrived on the keying channel.
func (c *Client) Handle(b []byte, _ netip.AddrPort) {
	m, err := decode(b)
	if err != nil || m.Type.Class == stun.ClassRequest || m.Type.Class == stun.ClassIndication {
		return
	}
	c.mu.Lock()
	ch := c.pending[m.TransactionID]
	delete(c.pending, m.TransactionID)
	c.mu.Unlock()
	if ch != nil {
		ch <- m
	}
}

// exchange sends b (transaction id) to 'to' until an answer arrives.
func (c *Client) exchange(ctx context.Context, txid [stun.TransactionIDSize]byte, b []byte, to netip.AddrPort) (*stun.Message, error) {
	ch := make(chan *stun.Message, 1)
	c.mu.Lock()
	if c.pending == nil {
		c.pending = map[[stun.TransactionIDSize]byte]chan *stun.Message{}
	}
	c.pending[txid] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, txid)
		c.mu.Unlock()
	}()
	rto, tries := c.RTO, c.Tries
	if rto <= 0 {
		rto = 250 * time.Millisecond
	}
	if tries <= 0 {
		tries = 5
	}
	for i := 0; i < tries; i++ {
		if err := c.Send(b, to); err != nil {
			return nil, fmt.Errorf("relay: send to %v: %w", to, err)
		}
		t := time.NewTimer(rto)
		select {
		case m := <-ch:
			t.Stop()
			return m, nil
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
		rto *= 2
	}
	return nil, fmt.Errorf("%w from %v", ErrNoAnswer, to)
}

// Binding asks a STUN responder for our reflexive endpoint.
func (c *Client) Binding(ctx context.Context, server netip.AddrPort) (netip.AddrPort, error) {
	m, err := stun.Build(stun.TransactionID, stun.BindingRequest, stun.Fingerprint)
	if err != nil {
		return netip.AddrPort{}, err
	}
	resp, err := c.exchange(ctx, m.TransactionID, m.Raw, server)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if resp.Type != stun.BindingSuccess {
		return netip.AddrPort{}, fmt.Errorf("relay: binding to %v: answer %v", server, resp.Type)
	}
	return getAddr(resp, stun.AttrXORMappedAddress)
}

// signed runs one authenticated transaction and checks the answer's
// signature (an unsigned error answer is reported as ErrNoAnswer-like noise).
func (c *Client) signed(ctx context.Context, r request, to netip.AddrPort) (*stun.Message, error) {
	r.txid, r.host, r.time = stun.NewTransactionID(), c.Host, time.Now()
	b, err := buildRequest(c.Cred, r)
	if err != nil {
		return nil, err
	}
	resp, err := c.exchange(ctx, r.txid, b, to)
	if err != nil {
		return nil, err
	}
	if resp.Type.Class == stun.ClassErrorResponse {
		var ec stun.ErrorCodeAttribute
		if err := ec.GetFrom(resp); err != nil {
			return nil, fmt.Errorf("%w: error answer without a code", ErrBadRequest)
		}
		if ec.Code != stun.CodeUnauthorized && checkIntegrity(resp, c.Cred.macKey()) != nil {
			return nil, fmt.Errorf("relay: %v: unsigned error answer %d %s (ignored)", r.method, ec.Code, ec.Reason)
		}
		return nil, fmt.Errorf("%v: %w: %s", r.method, codeErr(ec.Code), ec.Reason)
	}
	if err := checkIntegrity(resp, c.Cred.macKey()); err != nil {
		return nil, fmt.Errorf("relay: %v answer: %w", r.method, err)
	}
	return resp, nil
}

// Allocation is a relay port this host holds.
type Allocation struct {
	Relayed  netip.AddrPort // where peers send to reach us
	Mapped   netip.AddrPort // our tunnel socket as the relay saw it
	Lifetime time.Duration
	Server   netip.AddrPort
}

// Allocate asks the relay at server for a port (lifetime 0: the relay's maximum).
func (c *Client) Allocate(ctx context.Context, server netip.AddrPort, lifetime time.Duration) (Allocation, error) {
	resp, err := c.signed(ctx, request{method: stun.MethodAllocate, lifetime: lifetime, hasLife: lifetime > 0}, server)
	if err != nil {
		return Allocation{}, err
	}
	a := Allocation{Server: server}
	if a.Relayed, err = getAddr(resp, stun.AttrXORRelayedAddress); err != nil {
		return a, fmt.Errorf("relay: allocate answer: %w", err)
	}
	a.Mapped, _ = getAddr(resp, stun.AttrXORMappedAddress)
	if l, err := resp.Get(stun.AttrLifetime); err == nil && len(l) == 4 {
		a.Lifetime = time.Duration(binary.BigEndian.Uint32(l)) * time.Second
	}
	return a, nil
}

// Refresh extends an allocation; lifetime 0 deletes it.
func (c *Client) Refresh(ctx context.Context, a Allocation, lifetime time.Duration) (time.Duration, error) {
	resp, err := c.signed(ctx, request{method: stun.MethodRefresh, lifetime: lifetime, hasLife: true, alloc: a.Relayed}, a.Server)
	if err != nil {
		return 0, err
	}
	if l, err := resp.Get(stun.AttrLifetime); err == nil && len(l) == 4 {
		return time.Duration(binary.BigEndian.Uint32(l)) * time.Second, nil
	}
	return 0, errors.New("relay: refresh answer without LIFETIME")
}

// Bind tells the relay that our tunnel socket's datagrams at the peer's
// relay port are ours (own is our allocation). Both hosts bind at each
// other's port; then the relay forwards between them.
func (c *Client) Bind(ctx context.Context, peer netip.AddrPort, own Allocation) error {
	_, err := c.signed(ctx, request{method: MethodBind, alloc: own.Relayed}, peer)
	return err
}

// NAT is the mapping behaviour seen from two STUN responders.
type NAT string

// Mapping behaviours (btmmctl status, TXT nat=).
const (
	NATNone        NAT = "none"      // the reflexive address is one of ours
	NATIndependent NAT = "eim"       // endpoint-independent mapping: hole punching works
	NATSymmetric   NAT = "symmetric" // a new mapping per destination: relay (or a public peer)
	NATBlocked     NAT = "blocked"   // no responder answered: UDP blocked
	NATUnknown     NAT = "unknown"   // only one responder answered
)

// Describe is the phrase btmmctl prints.
func (n NAT) Describe() string {
	switch n {
	case NATNone:
		return "none (public address)"
	case NATIndependent:
		return "endpoint-independent"
	case NATSymmetric:
		return "symmetric"
	case NATBlocked:
		return "UDP blocked"
	}
	return "unknown (one STUN responder)"
}

// DetectNAT asks two responders (different IP addresses) for our reflexive
// endpoint: the same endpoint from both is an endpoint-independent mapping,
// different ones a symmetric NAT; one of our own addresses means no NAT.
//
// The responders are asked at once. When none has answered BlockedAfter
// after the first requests, UDP is blocked (the agent then reaches for the
// relay's TLS stream at once; its next measurement tells if UDP works
// after all). Once one has answered, the others get their full
// retransmission schedule. seen is in the order of servers.
func (c *Client) DetectNAT(ctx context.Context, servers []netip.AddrPort, local []netip.Addr) (NAT, []netip.AddrPort) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		i int
		m netip.AddrPort
	}
	results := make(chan result, len(servers))
	for i, s := range servers {
		go func() {
			m, err := c.Binding(ctx, s)
			if err != nil {
				m = netip.AddrPort{}
			}
			results <- result{i, m}
		}()
	}
	blockedAfter := c.BlockedAfter
	if blockedAfter <= 0 {
		blockedAfter = 2 * time.Second
	}
	timer := time.NewTimer(blockedAfter)
	defer timer.Stop()
	mapped := make([]netip.AddrPort, len(servers))
	answered := false
	for n := 0; n < len(servers); {
		select {
		case r := <-results:
			n++
			mapped[r.i] = r.m
			answered = answered || r.m.IsValid()
		case <-timer.C:
			if !answered {
				return NATBlocked, nil // the Bindings end with ctx
			}
		}
	}
	var seen []netip.AddrPort
	for _, m := range mapped {
		if m.IsValid() {
			seen = append(seen, m)
		}
	}
	if len(seen) == 0 {
		return NATBlocked, nil
	}
	for _, l := range local {
		if seen[0].Addr() == l {
			return NATNone, seen
		}
	}
	switch {
	case len(seen) < 2:
		return NATUnknown, seen
	case seen[0] == seen[1]:
		return NATIndependent, seen
	}
	return NATSymmetric, seen
}
