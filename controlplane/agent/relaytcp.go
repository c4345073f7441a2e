package agent

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/miekg/dns"

	"github.com/btmm/btmm/controlplane/kernelprobe"
	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/controlplane/relay"
	"github.com/btmm/btmm/dns/zone"
)

// relay-tcp (issue 14 item 5, docs/paths.md): when no STUN responder
// answers over UDP (NAT "blocked") btmmd reaches the relay over one TLS
// stream. RFC 8229 ESP in TCP would keep the path in the kernel; where the
// kernel has it (kernelprobe.ESPInTCP) btmmd says so, but does not use it
// yet. Everywhere else (Debian 6.1, this project's test kernels) a
// relay.Bridge carries the datagrams: each peer reached this way has a
// loopback bridge socket as its outer address in the dataplane, and
// keying, probes and relay control for the relay's addresses go over the
// stream. A host whose UDP works never starts the bridge; one whose UDP
// comes back stops it at its next measurement.

// StreamServer is a relay's TLS stream port: Name is what its certificate
// must carry (the SRV _btmm-relay._tcp target), Addr where to connect.
type StreamServer struct {
	Name string
	Addr string // host:port
}

// RelayTCPStatus is what btmmctl shows about the relay-tcp path.
type RelayTCPStatus struct {
	Server   StreamServer       `json:"server"`
	Bridge   relay.BridgeStatus `json:"bridge"`
	Peers    map[string]uint16  `json:"peers,omitempty"` // peer ULA -> its relay port on the stream
	ESPInTCP string             `json:"espintcp"`        // the kernel's RFC 8229 support, as probed
	Carrier  string             `json:"carrier"`         // "go" (the bridge): who carries the data
	Relay    netip.Addr         `json:"relay_addr,omitzero"`
	_        struct{}           `json:"-"`
}

// bridgeState is the running bridge (nil fields: not running).
type bridgeState struct {
	br     *relay.Bridge
	server StreamServer
	cancel context.CancelFunc
	done   chan struct{}
	rc     *relay.Client // relay control over the stream
	addrs  []netip.Addr  // the relay's addresses (control and allocations): sent over the stream
	peers  map[netip.Addr]uint16
}

// bridgeTransport is the keying channel as the mux sees it: the tunnel
// socket, plus what the bridge delivers; writes to the relay's addresses
// go over the stream while the bridge runs.
type bridgeTransport struct {
	under path.Transport
	p     *paths
	start sync.Once
	rx    chan datagramOrErr
	in    chan datagramOrErr
}

type datagramOrErr struct {
	b    []byte
	from netip.AddrPort
	err  error
}

func newBridgeTransport(under path.Transport, p *paths) *bridgeTransport {
	return &bridgeTransport{under: under, p: p, rx: make(chan datagramOrErr, 64), in: make(chan datagramOrErr, 256)}
}

func (t *bridgeTransport) ReadKeying(b []byte) (int, netip.AddrPort, error) {
	t.start.Do(func() {
		go func() {
			buf := make([]byte, 65536)
			for {
				n, from, err := t.under.ReadKeying(buf)
				t.rx <- datagramOrErr{bytes.Clone(buf[:n]), from, err}
				if err != nil {
					return
				}
			}
		}()
	})
	var d datagramOrErr
	select {
	case d = <-t.rx:
	case d = <-t.in:
	}
	if d.err != nil {
		return 0, netip.AddrPort{}, d.err
	}
	return copy(b, d.b), d.from, nil
}

func (t *bridgeTransport) WriteKeying(b []byte, to netip.AddrPort) error {
	if br := t.p.viaBridge(to); br != nil {
		return br.Send(to.Port(), append(bytes.Clone(relay.NonESPMarker), b...))
	}
	return t.under.WriteKeying(b, to)
}

// deliver takes what the bridge hands up (never blocks: a full channel
// drops, like a full socket buffer).
func (t *bridgeTransport) deliver(from netip.AddrPort, b []byte) {
	select {
	case t.in <- datagramOrErr{b: b, from: from}:
	default:
	}
}

// viaBridge is the bridge to send to 'to' through, or nil (UDP).
func (p *paths) viaBridge(to netip.AddrPort) *relay.Bridge {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bs == nil || !slices.Contains(p.bs.addrs, to.Addr()) {
		return nil
	}
	return p.bs.br
}

// bridged reports whether the bridge runs (UDP blocked).
func (p *paths) bridged() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.bs != nil
}

// client is the relay client to use now: over the stream while bridged.
func (p *paths) client() *relay.Client {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bs != nil {
		return p.bs.rc
	}
	return p.rc
}

// startBridge starts the bridge to the first stream server (UDP blocked).
func (p *paths) startBridge(ctx context.Context, servers []netip.AddrPort) error {
	if p.cfg.StreamServers == nil {
		return fmt.Errorf("UDP blocked and no relay stream port configured ([paths] tls_servers or SRV _btmm-relay._tcp)")
	}
	ss, err := p.cfg.StreamServers(ctx)
	if err != nil || len(ss) == 0 {
		return fmt.Errorf("UDP blocked and no relay stream port: %v", err)
	}
	bs := &bridgeState{server: ss[0], peers: map[netip.Addr]uint16{}}
	for _, s := range servers {
		bs.addrs = append(bs.addrs, s.Addr())
	}
	control := servers[0]
	bs.rc = &relay.Client{Cred: p.cfg.Cred, Host: p.rc.Host,
		Send: func(b []byte, to netip.AddrPort) error {
			return bs.br.Send(to.Port(), append(bytes.Clone(relay.NonESPMarker), b...))
		}}
	bs.br = relay.NewBridge(relay.BridgeConfig{
		Dial:      relay.DialStream(bs.server.Addr, bs.server.Name, p.cfg.StreamRoots),
		Tunnel:    netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), p.a.cfg.TunnelPort),
		Cleartext: p.cfg.Cleartext,
		Deliver: func(b []byte, port uint16) {
			p.mu.Lock()
			from := netip.AddrPortFrom(control.Addr(), port)
			if p.alloc.Relayed.IsValid() && p.allocTCP {
				from = netip.AddrPortFrom(p.alloc.Relayed.Addr(), port)
			}
			p.mu.Unlock()
			p.bt.deliver(from, b)
		},
		OnUp: func() {
			// A new stream: the relay forgot our binds and the old
			// allocation's source; allocate and bind again.
			p.mu.Lock()
			p.alloc, p.skipDetect = relay.Allocation{}, true
			p.mu.Unlock()
			p.republish()
		},
		Logger: p.a.log.With("part", "relay-tcp"),
	})
	bctx, cancel := context.WithCancel(p.a.ctx)
	bs.cancel, bs.done = cancel, make(chan struct{})
	go func() { defer close(bs.done); bs.br.Run(bctx) }()
	p.mu.Lock()
	p.bs = bs
	p.alloc, p.allocTCP = relay.Allocation{}, true
	p.mu.Unlock()
	p.a.log.Warn("UDP blocked: reaching peers through the relay's TLS stream (relay-tcp, carried by btmmd)",
		"relay", bs.server.Name, "addr", bs.server.Addr, "espintcp", espInTCP())
	p.refeed()
	return nil
}

// stopBridge stops it (UDP works again, or btmmd stops): stream closed,
// sockets removed; peers go back to their UDP candidates.
func (p *paths) stopBridge() {
	p.mu.Lock()
	bs := p.bs
	p.bs = nil
	if p.allocTCP {
		p.alloc, p.allocTCP = relay.Allocation{}, false
	}
	p.mu.Unlock()
	if bs == nil {
		return
	}
	bs.cancel()
	<-bs.done
	p.a.log.Info("relay-tcp: bridge stopped")
	if p.a.ctx.Err() == nil {
		p.refeed()
	}
}

// refeed gives the selector every peer's candidates again (their kinds
// depend on whether the bridge runs).
func (p *paths) refeed() {
	p.a.mu.Lock()
	evs := make([]PeerEvent, 0, len(p.a.peers))
	for _, ev := range p.a.peers {
		evs = append(evs, ev)
	}
	p.a.mu.Unlock()
	for _, ev := range evs {
		p.onPeerEvent(ev)
	}
}

// bridgeCandidates turns a peer's relay allocation on our relay into a
// relay-tcp candidate while the bridge runs.
func (p *paths) bridgeCandidates(cands []path.Candidate) []path.Candidate {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bs == nil {
		return cands
	}
	for i, c := range cands {
		if c.Kind == path.KindRelayUDP && slices.Contains(p.bs.addrs, c.Addr.Addr()) {
			cands[i].Kind = path.KindRelayTCP
		}
	}
	return cands
}

// bridgeOuter is the dataplane's outer address for a peer on relay-tcp
// path np: its bridge socket (opened now if needed). Invalid: no bridge.
func (p *paths) bridgeOuter(ula netip.Addr, np path.Path) (netip.AddrPort, error) {
	p.mu.Lock()
	bs := p.bs
	p.mu.Unlock()
	if bs == nil {
		return netip.AddrPort{}, fmt.Errorf("relay-tcp path without a bridge")
	}
	sock, err := bs.br.Socket(np.Remote.Port())
	if err != nil {
		return netip.AddrPort{}, err
	}
	p.mu.Lock()
	old, had := bs.peers[ula]
	bs.peers[ula] = np.Remote.Port()
	p.mu.Unlock()
	if had && old != np.Remote.Port() {
		p.releasePort(bs, old)
	}
	return sock, nil
}

// leftBridge notes that a peer's path is no longer relay-tcp.
func (p *paths) leftBridge(ula netip.Addr) {
	p.mu.Lock()
	bs := p.bs
	var port uint16
	var had bool
	if bs != nil {
		port, had = bs.peers[ula]
		delete(bs.peers, ula)
	}
	p.mu.Unlock()
	if had {
		p.releasePort(bs, port)
	}
}

// releasePort closes a port's socket once no peer uses it.
func (p *paths) releasePort(bs *bridgeState, port uint16) {
	p.mu.Lock()
	for _, q := range bs.peers {
		if q == port {
			p.mu.Unlock()
			return
		}
	}
	p.mu.Unlock()
	bs.br.Release(port)
}

// relayTCPStatus is the bridge's part of PathsStatus (nil: not running).
func (p *paths) relayTCPStatus() *RelayTCPStatus {
	p.mu.Lock()
	bs := p.bs
	p.mu.Unlock()
	if bs == nil {
		return nil
	}
	st := &RelayTCPStatus{Server: bs.server, Bridge: bs.br.Status(), ESPInTCP: espInTCP(), Carrier: "go"}
	p.mu.Lock()
	if len(bs.peers) > 0 {
		st.Peers = map[string]uint16{}
		for u, port := range bs.peers {
			st.Peers[u.String()] = port
		}
	}
	p.mu.Unlock()
	return st
}

var (
	espInTCPOnce   sync.Once
	espInTCPResult string
)

// espInTCP is the kernel's RFC 8229 support, probed once: "yes (not used
// yet)" or why not.
func espInTCP() string {
	espInTCPOnce.Do(func() {
		if err := kernelprobe.Probe(kernelprobe.ESPInTCP); err != nil {
			espInTCPResult = "no (" + err.Error() + ")"
		} else {
			espInTCPResult = "yes (not used yet: the bridge carries relay-tcp)"
		}
	})
	return espInTCPResult
}

// SRVStreamServers looks up SRV _btmm-relay._tcp.<domain> through resolver:
// each target's addresses at its port, with the target's name to verify
// its certificate by (lowest priority first).
func SRVStreamServers(resolver, domain string) func(ctx context.Context) ([]StreamServer, error) {
	return func(ctx context.Context) ([]StreamServer, error) {
		r, srvs, err := lookupSRV(ctx, resolver, zone.RelayStreamService+dns.Fqdn(domain))
		if err != nil {
			return nil, fmt.Errorf("relay stream discovery: %w", err)
		}
		var out []StreamServer
		for _, s := range srvs {
			addrs := targetAddrs(ctx, resolver, r, s.Target)
			for _, a := range addrs {
				out = append(out, StreamServer{Name: strings.TrimSuffix(s.Target, "."),
					Addr: netip.AddrPortFrom(a, s.Port).String()})
			}
		}
		if len(out) == 0 {
			return nil, fmt.Errorf("relay stream discovery: no %s%s", zone.RelayStreamService, dns.Fqdn(domain))
		}
		return out, nil
	}
}
