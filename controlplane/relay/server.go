package relay

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"github.com/pion/stun/v3"

	"github.com/btmm/btmm/dns/server"
)

// Flow is what a forwarder matches: a datagram arriving at relay port
// InPort from From.
type Flow struct {
	InPort uint16
	From   netip.AddrPort
}

// Rewrite is what a forwarder does with a matching ESP datagram: send it
// from relay port OutPort to To, unless Limit bytes were already forwarded.
// With ToStack it passes the datagram up to the relay's socket instead:
// the destination host is attached by a stream (relay-tcp), which only Go
// writes to (To is then zero).
type Rewrite struct {
	OutPort uint16
	To      netip.AddrPort
	Limit   uint64 // 0: unlimited
	ToStack bool
}

// Counters are what a forwarder counted for one flow.
type Counters struct {
	Packets, Bytes, Dropped uint64
}

// Forwarder carries ESP between bound flows without Go (package
// ebpf/relay). The relay's Go side keeps handling control messages and
// non-ESP datagrams (keying, probes) on its sockets.
type Forwarder interface {
	// Set makes the forwarding table exactly flows (level-triggered).
	Set(flows map[Flow]Rewrite) error
	// Stats returns the counters of the flows in the table.
	Stats() (map[Flow]Counters, error)
	// Close removes every kernel object the forwarder made.
	Close() error
}

// KeyFunc returns the TSIG key with this canonical name.
type KeyFunc func(name string) (Credential, bool)

// DirKeys reads keys from btmm-dnsd's key directory (data_dir/keys): user
// keys ("<user>.key", named "<user>.<zone>") and host keys
// ("<user>/<host>.key", named "<host>.<user>.<zone>"), in the layout and
// with the parser of package dns/server. Answers are cached for ttl (a
// removed user or host is refused after at most ttl).
func DirKeys(dir, zone string, ttl time.Duration) KeyFunc {
	users := &server.Users{Dir: dir, Zone: strings.ToLower(dns.CanonicalName(zone))}
	type entry struct {
		c   Credential
		ok  bool
		exp time.Time
	}
	var mu sync.Mutex
	cache := map[string]entry{}
	return func(name string) (Credential, bool) {
		name = strings.ToLower(dns.CanonicalName(name))
		mu.Lock()
		defer mu.Unlock()
		if e, hit := cache[name]; hit && time.Now().Before(e.exp) {
			return e.c, e.ok
		}
		if len(cache) > 10000 {
			clear(cache)
		}
		var e entry
		if k, err := users.Load(name); err == nil && strings.EqualFold(dns.CanonicalName(k.Name), name) {
			e.c, e.ok = Credential{Name: name, Secret: k.Secret}, true
		}
		e.exp = time.Now().Add(ttl)
		cache[name] = e
		return e.c, e.ok
	}
}

// Config configures a Server. Zero values take the defaults shown.
type Config struct {
	// Listen are the STUN/control addresses; the first is the primary.
	// A second address (another IP) lets hosts detect symmetric NATs.
	Listen []netip.AddrPort
	// Public is the address allocations are reported on (default: the
	// first Listen address; it must be a concrete address).
	Public netip.Addr
	// PortMin..PortMax are the allocation ports (40000..40999).
	PortMin, PortMax uint16
	Keys             KeyFunc // required
	// MaxPerUser bounds a user's allocations (8); MaxTotal all (4096).
	MaxPerUser, MaxTotal int
	// MaxLifetime caps (and is the default of) an allocation's lifetime (10 min).
	MaxLifetime time.Duration
	// ByteLimit bounds the bytes forwarded into one allocation over its
	// whole life (0: unlimited).
	ByteLimit uint64
	// ControlRate is the control messages per second accepted from one
	// source address (20, burst 2x), checked before any key lookup.
	ControlRate float64
	// Forwarder is the kernel path; nil: Go forwards everything.
	Forwarder Forwarder
	// ListenPacket opens the UDP sockets (default net.ListenUDP; tests
	// open them inside a network namespace).
	ListenPacket func(addr netip.AddrPort) (*net.UDPConn, error)
	// StreamListen are the TLS stream addresses for hosts whose UDP is
	// blocked (relay-tcp, stream.go; usually port 443). Empty: none.
	StreamListen []netip.AddrPort
	// TLS configures the stream ports (certificate); required with
	// StreamListen. Its NextProtos is replaced by StreamALPN.
	TLS *tls.Config
	// ListenStream opens a stream listener (default net.Listen "tcp4").
	ListenStream func(addr netip.AddrPort) (net.Listener, error)
	// MaxStreams bounds the open streams (default MaxTotal); StreamQueue
	// the datagrams waiting to be written to one stream (256; more are
	// dropped, as a full socket buffer drops UDP).
	MaxStreams, StreamQueue int
	Logger                  *slog.Logger
}

// Server is a running relay.
type Server struct {
	cfg  Config
	log  *slog.Logger
	main []*net.UDPConn
	lns  []net.Listener

	mu      sync.Mutex
	allocs  map[uint16]*allocation
	binds   map[Flow]*allocation // (port, source) -> the sender's allocation
	seen    map[[stun.TransactionIDSize]byte]time.Time
	buckets map[netip.Addr]*bucket
	flows   map[Flow]Rewrite
	streams map[netip.AddrPort]*stream
	nstream uint64
	stats   Stats
	wg      sync.WaitGroup
	closed  bool
	// ctx ends when the server closes: it bounds stream handshakes, so
	// a client that stalls its handshake does not hold Serve's return.
	ctx    context.Context
	cancel context.CancelFunc
	// nhandshake counts stream TLS handshakes in progress.
	nhandshake atomic.Int64
}

type allocation struct {
	port    uint16
	host    string // canonical FQDN
	key     string
	from    netip.AddrPort // source of the Allocate (the host's mapping towards the relay)
	expires time.Time
	conn    *net.UDPConn
	goBytes uint64 // bytes Go forwarded into it
}

// Stats are the relay's counters (btmm-relay logs them; tests read them).
type Stats struct {
	Allocations     int    `json:"allocations"`
	Flows           int    `json:"flows"`
	Refused         uint64 `json:"refused"`          // control requests answered with an error
	Dropped         uint64 `json:"dropped"`          // unbound, rate-limited or malformed datagrams
	GoForwarded     uint64 `json:"go_forwarded"`     // datagrams Go forwarded (non-ESP, or all without a kernel forwarder)
	GoForwardedESP  uint64 `json:"go_forwarded_esp"` // of those, ESP
	OverQuota       uint64 `json:"over_quota"`
	KernelForwarded uint64 `json:"kernel_forwarded"`
	Streams         int    `json:"streams"`        // open relay-tcp streams
	StreamFrames    uint64 `json:"stream_frames"`  // datagrams written to streams
	StreamDropped   uint64 `json:"stream_dropped"` // datagrams for a stream whose queue was full
}

// Stats returns a snapshot (with the kernel forwarder's counters).
func (s *Server) Stats() Stats {
	s.mu.Lock()
	st := s.stats
	st.Allocations, st.Flows, st.Streams = len(s.allocs), len(s.flows), len(s.streams)
	s.mu.Unlock()
	if s.cfg.Forwarder != nil {
		if fs, err := s.cfg.Forwarder.Stats(); err == nil {
			for _, c := range fs {
				st.KernelForwarded += c.Packets
			}
		}
	}
	return st
}

type bucket struct {
	tokens float64
	at     time.Time
}

// Listen opens the control sockets and returns a Server; Serve runs it.
func Listen(cfg Config) (*Server, error) {
	if len(cfg.Listen) == 0 || cfg.Keys == nil {
		return nil, errors.New("relay: Config needs Listen and Keys")
	}
	if cfg.PortMin == 0 {
		cfg.PortMin, cfg.PortMax = 40000, 40999
	}
	if cfg.PortMax < cfg.PortMin {
		return nil, fmt.Errorf("relay: port range %d-%d is empty", cfg.PortMin, cfg.PortMax)
	}
	if !cfg.Public.IsValid() {
		cfg.Public = cfg.Listen[0].Addr()
	}
	if !cfg.Public.Is4() || cfg.Public.IsUnspecified() {
		return nil, fmt.Errorf("relay: public address %v must be a concrete IPv4 address", cfg.Public)
	}
	if cfg.MaxPerUser <= 0 {
		cfg.MaxPerUser = 8
	}
	if cfg.MaxTotal <= 0 {
		cfg.MaxTotal = 4096
	}
	if cfg.MaxLifetime <= 0 {
		cfg.MaxLifetime = 10 * time.Minute
	}
	if cfg.ControlRate <= 0 {
		cfg.ControlRate = 20
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.ListenPacket == nil {
		cfg.ListenPacket = func(a netip.AddrPort) (*net.UDPConn, error) {
			return net.ListenUDP("udp4", net.UDPAddrFromAddrPort(a))
		}
	}
	if len(cfg.StreamListen) > 0 && (cfg.TLS == nil || len(cfg.TLS.Certificates) == 0 && cfg.TLS.GetCertificate == nil) {
		return nil, errors.New("relay: StreamListen needs a TLS configuration with a certificate")
	}
	if cfg.ListenStream == nil {
		cfg.ListenStream = func(a netip.AddrPort) (net.Listener, error) { return net.Listen("tcp4", a.String()) }
	}
	if cfg.MaxStreams <= 0 {
		cfg.MaxStreams = cfg.MaxTotal
	}
	if cfg.StreamQueue <= 0 {
		cfg.StreamQueue = 256
	}
	s := &Server{cfg: cfg, log: cfg.Logger, allocs: map[uint16]*allocation{}, binds: map[Flow]*allocation{},
		seen: map[[stun.TransactionIDSize]byte]time.Time{}, buckets: map[netip.Addr]*bucket{}, flows: map[Flow]Rewrite{},
		streams: map[netip.AddrPort]*stream{}}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	for _, a := range cfg.Listen {
		c, err := cfg.ListenPacket(a)
		if err != nil {
			s.closeAll()
			return nil, fmt.Errorf("relay: listen %v: %w", a, err)
		}
		s.main = append(s.main, c)
	}
	for _, a := range cfg.StreamListen {
		l, err := cfg.ListenStream(a)
		if err != nil {
			s.closeAll()
			return nil, fmt.Errorf("relay: listen %v (stream): %w", a, err)
		}
		s.lns = append(s.lns, l)
	}
	return s, nil
}

// StreamAddrs are the bound stream (TLS) addresses.
func (s *Server) StreamAddrs() []netip.AddrPort {
	var out []netip.AddrPort
	for _, l := range s.lns {
		out = append(out, l.Addr().(*net.TCPAddr).AddrPort())
	}
	return out
}

// Addrs are the bound control addresses.
func (s *Server) Addrs() []netip.AddrPort {
	var out []netip.AddrPort
	for _, c := range s.main {
		out = append(out, c.LocalAddr().(*net.UDPAddr).AddrPort())
	}
	return out
}

// Serve runs until ctx ends, then deletes every allocation and returns.
func (s *Server) Serve(ctx context.Context) error {
	for _, c := range s.main {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.readLoop(c, 0)
		}()
	}
	for _, l := range s.lns {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.acceptLoop(l)
		}()
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			s.closeAll()
			s.wg.Wait()
			return nil
		case now := <-t.C:
			s.expire(now)
		}
	}
}

func (s *Server) closeAll() {
	s.cancel()
	s.mu.Lock()
	s.closed = true
	for _, c := range s.main {
		c.Close()
	}
	for _, l := range s.lns {
		l.Close()
	}
	for _, st := range s.streams {
		st.conn.Close()
	}
	for p, a := range s.allocs {
		a.conn.Close()
		delete(s.allocs, p)
	}
	clear(s.binds)
	s.mu.Unlock()
	s.syncFlows()
}

func (s *Server) expire(now time.Time) {
	s.mu.Lock()
	changed := false
	for p, a := range s.allocs {
		if now.After(a.expires) {
			s.log.Info("allocation expired", "port", p, "host", a.host)
			s.dropLocked(a)
			changed = true
		}
	}
	for id, t := range s.seen {
		if now.Sub(t) > 5*time.Minute {
			delete(s.seen, id)
		}
	}
	for ip, b := range s.buckets {
		if now.Sub(b.at) > time.Minute {
			delete(s.buckets, ip)
		}
	}
	for src, st := range s.streams {
		if now.Sub(st.opened) > streamIdle && !s.streamUsedLocked(src) {
			s.log.Info("stream closed: no allocation or bind", "remote", st.remote)
			st.conn.Close()
		}
	}
	s.mu.Unlock()
	if changed {
		s.syncFlows()
	}
}

func (s *Server) dropLocked(a *allocation) {
	a.conn.Close()
	delete(s.allocs, a.port)
	for f, x := range s.binds {
		if x == a || f.InPort == a.port {
			delete(s.binds, f)
		}
	}
}

// allow is the per-source token bucket for control messages.
func (s *Server) allow(ip netip.Addr, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.buckets[ip]
	if b == nil {
		if len(s.buckets) > 100000 {
			return false
		}
		b = &bucket{tokens: 2 * s.cfg.ControlRate, at: now}
		s.buckets[ip] = b
	}
	b.tokens = min(2*s.cfg.ControlRate, b.tokens+now.Sub(b.at).Seconds()*s.cfg.ControlRate)
	b.at = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// readLoop serves one socket: a control socket (port 0) or an allocation's.
func (s *Server) readLoop(c *net.UDPConn, port uint16) {
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		s.handle(port, buf[:n], from, from.Addr(), func(resp []byte) { c.WriteToUDPAddrPort(resp, from) })
	}
}

// handle takes one datagram that arrived at port (0: control) from a UDP
// source or a stream: control requests are answered through reply (rate
// limited per rateKey, the sender's IP address), everything else is
// forwarded between bound flows.
func (s *Server) handle(port uint16, b []byte, from netip.AddrPort, rateKey netip.Addr, reply func([]byte)) {
	marker := len(b) >= 4 && bytes.Equal(b[:4], NonESPMarker)
	body := b
	if marker {
		body = b[4:]
	}
	if stun.IsMessage(body) {
		if !s.allow(rateKey, time.Now()) {
			s.count(func(st *Stats) { st.Dropped++ })
			return
		}
		if resp := s.control(port, body, from); resp != nil {
			if marker {
				resp = append(append([]byte(nil), NonESPMarker...), resp...)
			}
			reply(resp)
		}
		return
	}
	if port == 0 {
		s.count(func(st *Stats) { st.Dropped++ })
		return
	}
	s.forward(port, b, from, !marker && len(b) > 4)
}

func (s *Server) count(f func(*Stats)) {
	s.mu.Lock()
	f(&s.stats)
	s.mu.Unlock()
}

// forward is the Go path: keying and probes always, ESP only where the
// kernel forwarder is absent (or did not take the packet, e.g. a fragment).
func (s *Server) forward(port uint16, b []byte, from netip.AddrPort, esp bool) {
	s.mu.Lock()
	rw, ok := s.flows[Flow{port, from}]
	var out *net.UDPConn
	var dst *allocation
	var st *stream
	if ok {
		if a := s.allocs[rw.OutPort]; a != nil {
			out = a.conn
		}
		dst = s.allocs[port]
		if isStream(rw.To) {
			if st = s.streams[rw.To]; st == nil {
				out = nil
			}
		}
	}
	if out == nil || dst == nil {
		s.stats.Dropped++
		s.mu.Unlock()
		return
	}
	if s.cfg.ByteLimit > 0 && dst.goBytes+uint64(len(b)) > s.cfg.ByteLimit {
		s.stats.OverQuota++
		s.mu.Unlock()
		return
	}
	dst.goBytes += uint64(len(b))
	s.stats.GoForwarded++
	if esp {
		s.stats.GoForwardedESP++
	}
	s.mu.Unlock()
	if st != nil {
		st.send(s, rw.OutPort, b)
		return
	}
	out.WriteToUDPAddrPort(b, rw.To)
}

// control answers one STUN message; nil means no answer (not a request).
func (s *Server) control(port uint16, b []byte, from netip.AddrPort) []byte {
	m, err := decode(b)
	if err != nil || m.Type.Class != stun.ClassRequest {
		s.count(func(st *Stats) { st.Dropped++ })
		return nil
	}
	switch m.Type.Method {
	case stun.MethodBinding:
		resp := stun.New()
		resp.TransactionID = m.TransactionID
		resp.SetType(stun.BindingSuccess)
		resp.WriteHeader()
		addAddr(resp, stun.AttrXORMappedAddress, s.mapped(from))
		stun.Fingerprint.AddTo(resp)
		return resp.Raw
	case stun.MethodAllocate, stun.MethodRefresh, MethodBind:
	default:
		return s.refuse(m, nil, stun.CodeBadRequest, "unknown method")
	}
	r, keyName, err := parseRequest(m)
	if err != nil {
		return s.refuse(m, nil, stun.CodeBadRequest, err.Error())
	}
	cred, ok := s.cfg.Keys(keyName)
	if !ok || checkIntegrity(m, cred.macKey()) != nil {
		s.log.Debug("unauthenticated request", "from", from, "key", keyName)
		return s.refuse(m, nil, stun.CodeUnauthorized, "unknown key or bad signature")
	}
	now := time.Now()
	if d := now.Sub(r.time); d > 2*time.Minute || d < -2*time.Minute {
		return s.refuse(m, &cred, stun.CodeStaleNonce, "BTMM-TIME outside the window")
	}
	s.mu.Lock()
	_, replay := s.seen[r.txid]
	if !replay {
		s.seen[r.txid] = now
	}
	s.mu.Unlock()
	if replay {
		s.count(func(st *Stats) { st.Dropped++ })
		return nil // a retransmission or a replay: the first answer stands
	}
	if !dns.IsSubDomain(cred.Name, r.host) {
		return s.refuse(m, &cred, stun.CodeForbidden, "key "+cred.Name+" may not act for "+r.host)
	}
	switch r.method {
	case stun.MethodAllocate:
		return s.allocate(m, cred, r, from, now)
	case stun.MethodRefresh:
		return s.refresh(m, cred, r, now)
	default:
		return s.bind(m, cred, r, port, from)
	}
}

func (s *Server) refuse(m *stun.Message, cred *Credential, code stun.ErrorCode, reason string) []byte {
	s.count(func(st *Stats) { st.Refused++ })
	resp := stun.New()
	resp.TransactionID = m.TransactionID
	resp.SetType(stun.NewType(m.Type.Method, stun.ClassErrorResponse))
	resp.WriteHeader()
	stun.ErrorCodeAttribute{Code: code, Reason: []byte(reason)}.AddTo(resp)
	if cred != nil {
		addIntegrity(resp, cred.macKey())
	}
	return resp.Raw
}

func (s *Server) success(m *stun.Message, cred Credential, add func(*stun.Message)) []byte {
	resp := stun.New()
	resp.TransactionID = m.TransactionID
	resp.SetType(stun.NewType(m.Type.Method, stun.ClassSuccessResponse))
	resp.WriteHeader()
	add(resp)
	addIntegrity(resp, cred.macKey())
	return resp.Raw
}

func userOf(host string) string {
	_, parent, _ := strings.Cut(host, ".")
	return parent
}

func (s *Server) lifetime(r request) time.Duration {
	if !r.hasLife || r.lifetime > s.cfg.MaxLifetime {
		return s.cfg.MaxLifetime
	}
	return max(r.lifetime, 30*time.Second)
}

func (s *Server) allocate(m *stun.Message, cred Credential, r request, from netip.AddrPort, now time.Time) []byte {
	life := s.lifetime(r)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	// One allocation per host: a new Allocate from the same host renews
	// its allocation in place (same port: what it published stays true;
	// it restarted or moved, so its binds are gone).
	n := 0
	for _, a := range s.allocs {
		if a.host == r.host {
			for f, x := range s.binds {
				if x == a {
					delete(s.binds, f)
				}
			}
			a.key, a.from, a.expires = cred.Name, from, now.Add(life)
			s.mu.Unlock()
			s.syncFlows()
			s.log.Info("re-allocated", "host", r.host, "port", a.port, "from", from, "lifetime", life)
			return s.allocated(m, cred, a, from, life)
		}
		if userOf(a.host) == userOf(r.host) {
			n++
		}
	}
	if n >= s.cfg.MaxPerUser || len(s.allocs) >= s.cfg.MaxTotal {
		s.mu.Unlock()
		return s.refuse(m, &cred, stun.CodeAllocQuotaReached, "allocation quota reached")
	}
	var conn *net.UDPConn
	var port uint16
	for p := int(s.cfg.PortMin); p <= int(s.cfg.PortMax) && conn == nil; p++ {
		if s.allocs[uint16(p)] != nil {
			continue
		}
		c, err := s.cfg.ListenPacket(netip.AddrPortFrom(s.listenAddr(), uint16(p)))
		if err == nil {
			conn, port = c, uint16(p)
		}
	}
	if conn == nil {
		s.mu.Unlock()
		return s.refuse(m, &cred, stun.CodeInsufficientCapacity, "no free relay port")
	}
	a := &allocation{port: port, host: r.host, key: cred.Name, from: from, expires: now.Add(life), conn: conn}
	s.allocs[port] = a
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.readLoop(conn, port)
	}()
	s.mu.Unlock()
	s.log.Info("allocated", "host", r.host, "port", port, "from", from, "lifetime", life)
	return s.allocated(m, cred, a, from, life)
}

func (s *Server) allocated(m *stun.Message, cred Credential, a *allocation, from netip.AddrPort, life time.Duration) []byte {
	relayed := netip.AddrPortFrom(s.cfg.Public, a.port)
	return s.success(m, cred, func(resp *stun.Message) {
		addAddr(resp, stun.AttrXORRelayedAddress, relayed)
		addAddr(resp, stun.AttrXORMappedAddress, s.mapped(from))
		resp.Add(stun.AttrLifetime, binary.BigEndian.AppendUint32(nil, uint32(life/time.Second)))
	})
}

// listenAddr is where allocation sockets bind: the primary's address.
func (s *Server) listenAddr() netip.Addr { return s.cfg.Listen[0].Addr() }

func (s *Server) refresh(m *stun.Message, cred Credential, r request, now time.Time) []byte {
	s.mu.Lock()
	a := s.allocs[r.alloc.Port()]
	if a == nil || a.host != r.host || r.alloc.Addr() != s.cfg.Public {
		s.mu.Unlock()
		return s.refuse(m, &cred, stun.CodeAllocMismatch, "no such allocation for this host")
	}
	life := s.lifetime(r)
	if r.hasLife && r.lifetime == 0 {
		s.dropLocked(a)
		s.mu.Unlock()
		s.syncFlows()
		s.log.Info("allocation deleted", "host", r.host, "port", a.port)
		return s.success(m, cred, func(resp *stun.Message) {
			resp.Add(stun.AttrLifetime, []byte{0, 0, 0, 0})
		})
	}
	a.expires = now.Add(life)
	s.mu.Unlock()
	return s.success(m, cred, func(resp *stun.Message) {
		resp.Add(stun.AttrLifetime, binary.BigEndian.AppendUint32(nil, uint32(life/time.Second)))
	})
}

// bind: host X (r.host, allocation r.alloc) says that from is its source at
// port (another host's allocation, of the same user).
func (s *Server) bind(m *stun.Message, cred Credential, r request, port uint16, from netip.AddrPort) []byte {
	s.mu.Lock()
	owner := s.allocs[port]
	x := s.allocs[r.alloc.Port()]
	switch {
	case port == 0 || owner == nil:
		s.mu.Unlock()
		return s.refuse(m, &cred, stun.CodeBadRequest, "Bind goes to the peer's relay port")
	case x == nil || x.host != r.host || r.alloc.Addr() != s.cfg.Public:
		s.mu.Unlock()
		return s.refuse(m, &cred, stun.CodeAllocMismatch, "the named allocation is not this host's")
	case userOf(owner.host) != userOf(x.host) || owner == x:
		s.mu.Unlock()
		return s.refuse(m, &cred, stun.CodeForbidden, "a relay joins two hosts of one user")
	}
	// One source per (host, peer port): a host whose NAT mapping changed
	// binds again from its new source, and the old one must not stay a
	// destination (the flow table would pick either).
	for f, y := range s.binds {
		if f.InPort == port && y == x && f.From != from {
			delete(s.binds, f)
		}
	}
	s.binds[Flow{port, from}] = x
	s.mu.Unlock()
	s.syncFlows()
	return s.success(m, cred, func(resp *stun.Message) {
		addAddr(resp, stun.AttrXORMappedAddress, s.mapped(from))
	})
}

// syncFlows recomputes the forwarding table from the bindings and hands it
// to the kernel: ESP from B's source at A's port leaves from B's port to
// A's source at B's port, once both have bound.
func (s *Server) syncFlows() {
	s.mu.Lock()
	flows := map[Flow]Rewrite{}
	for f, x := range s.binds {
		owner := s.allocs[f.InPort]
		if owner == nil || s.allocs[x.port] != x {
			continue
		}
		for g, y := range s.binds {
			if g.InPort == x.port && y == owner {
				flows[f] = Rewrite{OutPort: x.port, To: g.From, Limit: s.cfg.ByteLimit}
			}
		}
	}
	same := len(flows) == len(s.flows)
	for f, r := range flows {
		if s.flows[f] != r {
			same = false
		}
	}
	s.flows = flows
	s.mu.Unlock()
	if same || s.cfg.Forwarder == nil {
		return
	}
	// The kernel sees UDP only: flows from a stream are Go's, and ESP for
	// a stream-attached host is passed up for Go to write to its stream.
	kflows := map[Flow]Rewrite{}
	for f, r := range flows {
		switch {
		case isStream(f.From):
			continue
		case isStream(r.To):
			r = Rewrite{OutPort: r.OutPort, ToStack: true}
		}
		kflows[f] = r
	}
	if err := s.cfg.Forwarder.Set(kflows); err != nil {
		s.log.Warn("kernel forwarder refused the table; Go forwards", "err", err)
	}
}

// AllocationStatus is one allocation as the operator sees it.
type AllocationStatus struct {
	Port    uint16         `json:"port"`
	Host    string         `json:"host"`
	From    netip.AddrPort `json:"from"`
	Expires time.Time      `json:"expires"`
	Peers   []string       `json:"peers"` // hosts bound at this port
}

// Allocations lists the current allocations.
func (s *Server) Allocations() []AllocationStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []AllocationStatus
	for _, a := range s.allocs {
		al := AllocationStatus{Port: a.port, Host: a.host, From: a.from, Expires: a.expires}
		for f, x := range s.binds {
			if f.InPort == a.port {
				al.Peers = append(al.Peers, x.host)
			}
		}
		slices.Sort(al.Peers)
		out = append(out, al)
	}
	slices.SortFunc(out, func(a, b AllocationStatus) int { return int(a.Port) - int(b.Port) })
	return out
}
