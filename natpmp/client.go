package natpmp

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Conn is the client's socket to the gateway's port 5351 (a connected UDP
// socket; *net.UDPConn satisfies it). Read returns one datagram; Close
// unblocks a pending Read.
type Conn interface {
	Read(b []byte) (int, error)
	Write(b []byte) (int, error)
	LocalAddr() net.Addr
	Close() error
}

// PacketConn receives announcements on port 5350 (*net.UDPConn satisfies it).
type PacketConn interface {
	ReadFrom(b []byte) (int, net.Addr, error)
	Close() error
}

// Route is the IPv4 default route: the gateway and our address towards it.
type Route struct {
	Gateway netip.Addr
	Local   netip.Addr
}

// MappingRequest names a mapping the client keeps: the internal port of
// this host for one protocol. The client asks for the same external port
// and accepts any other the gateway assigns.
type MappingRequest struct {
	Protocol     Protocol
	InternalPort uint16
}

func (r MappingRequest) String() string { return fmt.Sprintf("%v/%d", r.Protocol, r.InternalPort) }

// Config configures a Client. Zero fields take the defaults noted.
type Config struct {
	Logger *slog.Logger     // default: discard
	Now    func() time.Time // default: time.Now
	// Route finds the gateway and our primary IPv4 address. Default:
	// DefaultRoute(nil).
	Route func() (Route, error)
	// Dial opens the socket to the gateway. Default: DialGateway.
	Dial func(gw netip.AddrPort) (Conn, error)
	// ListenAnnouncements opens the announcement socket; default
	// ListenAnnouncements. NoAnnouncements disables the listener.
	ListenAnnouncements func() (PacketConn, error)
	NoAnnouncements     bool
	// Schedule holds the wait after each try of a request; when the last
	// one passes without an answer there is no gateway. Default: 250 ms
	// doubling, 9 tries (RFC 6886 §3.1), about 128 s in all.
	Schedule []time.Duration
	// Lifetime asked for each mapping; renewed at half of what the gateway
	// grants. Default 3600 s.
	Lifetime time.Duration
	// RetryInterval is how long to wait after "no gateway" or an error
	// before trying again. Default 5 min.
	RetryInterval time.Duration
	// ShutdownTimeout bounds deleting the mappings when Run ends. Default 3 s.
	ShutdownTimeout time.Duration
	// AnnounceDelay is the longest random wait before acting on a
	// gateway's announcement, so that many hosts do not renew at once
	// (RFC 6887 §14.1.1). Default 5 s; negative: act at once.
	AnnounceDelay time.Duration
	// DisablePCP speaks only NAT-PMP.
	DisablePCP bool
	// Mappings to keep from the start (more with Add).
	Mappings []MappingRequest
}

// natpmpProbeAfter is the try of PCP discovery from which a NAT-PMP
// request goes along (1.75 s into the default schedule).
const natpmpProbeAfter = 3

// DefaultSchedule is RFC 6886's retransmission schedule: 250 ms, doubling,
// nine tries.
func DefaultSchedule() []time.Duration {
	s := make([]time.Duration, 9)
	for i := range s {
		s[i] = 250 * time.Millisecond << i
	}
	return s
}

// Client keeps port mappings on the local NAT gateway alive and reports the
// external address and ports. Its methods are safe for concurrent use.
type Client struct {
	cfg Config
	log *slog.Logger
	now func() time.Time

	wake chan struct{}
	ran  atomic.Bool
	// annc carries the gateway announcements to Run (and to a discovery
	// under way: an announcement then sends the next try at once).
	annc chan announcement

	mu         sync.Mutex
	rediscover bool
	want       map[MappingRequest]bool
	status     Status
	published  Status
	subs       map[chan Status]struct{}
	closed     bool
}

// New checks cfg and returns a client; Run starts it.
func New(cfg Config) (*Client, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Route == nil {
		cfg.Route = func() (Route, error) { return DefaultRoute(nil) }
	}
	if cfg.Dial == nil {
		cfg.Dial = DialGateway
	}
	if cfg.ListenAnnouncements == nil {
		cfg.ListenAnnouncements = ListenAnnouncements
	}
	if cfg.Schedule == nil {
		cfg.Schedule = DefaultSchedule()
	}
	if len(cfg.Schedule) == 0 || slices.ContainsFunc(cfg.Schedule, func(d time.Duration) bool { return d <= 0 }) {
		return nil, fmt.Errorf("natpmp: new client: schedule %v needs positive durations", cfg.Schedule)
	}
	if cfg.Lifetime == 0 {
		cfg.Lifetime = time.Hour
	}
	if cfg.Lifetime < 2*time.Second || cfg.Lifetime/time.Second > 1<<31 {
		return nil, fmt.Errorf("natpmp: new client: lifetime %v out of range", cfg.Lifetime)
	}
	if cfg.RetryInterval <= 0 {
		cfg.RetryInterval = 5 * time.Minute
	}
	if cfg.AnnounceDelay == 0 {
		cfg.AnnounceDelay = 5 * time.Second
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = 3 * time.Second
	}
	c := &Client{cfg: cfg, log: cfg.Logger, now: cfg.Now, wake: make(chan struct{}, 1), annc: make(chan announcement, 4),
		want: map[MappingRequest]bool{}, subs: map[chan Status]struct{}{}}
	for _, m := range cfg.Mappings {
		if err := checkRequest(m); err != nil {
			return nil, fmt.Errorf("natpmp: new client: %w", err)
		}
		c.want[m] = true
	}
	c.status = Status{State: StateStarting, Since: cfg.Now()}
	return c, nil
}

func checkRequest(m MappingRequest) error {
	if m.Protocol != UDP && m.Protocol != TCP {
		return fmt.Errorf("mapping %v: protocol must be udp or tcp", m)
	}
	if m.InternalPort == 0 {
		return fmt.Errorf("mapping %v: internal port 0", m)
	}
	return nil
}

// Add asks the client to keep a mapping for m (idempotent).
func (c *Client) Add(m MappingRequest) error {
	if err := checkRequest(m); err != nil {
		return fmt.Errorf("natpmp: add: %w", err)
	}
	c.mu.Lock()
	c.want[m] = true
	c.mu.Unlock()
	c.poke()
	return nil
}

// Remove deletes the mapping for m from the gateway (idempotent).
func (c *Client) Remove(m MappingRequest) {
	c.mu.Lock()
	delete(c.want, m)
	c.mu.Unlock()
	c.poke()
}

// Rediscover makes the client look for the gateway again at once (call it
// when the default route or address changes).
func (c *Client) Rediscover() {
	c.mu.Lock()
	c.rediscover = true
	c.mu.Unlock()
	c.poke()
}

func (c *Client) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// Status returns the current status.
func (c *Client) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.status.clone()
}

// Subscribe returns a channel that receives the status each time the
// published part changes (state, external address, external ports), and a
// function to unsubscribe. The channel holds one value: a slow reader sees
// the latest status, never a stale one, and never blocks the client. It is
// closed when Run returns.
func (c *Client) Subscribe() (<-chan Status, func()) {
	ch := make(chan Status, 1)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		close(ch)
		return ch, func() {}
	}
	c.subs[ch] = struct{}{}
	ch <- c.published.clone()
	return ch, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if _, ok := c.subs[ch]; ok {
			delete(c.subs, ch)
			close(ch)
		}
	}
}

// mapping is the run loop's record of one mapping.
type mapping struct {
	req      MappingRequest
	nonce    [12]byte
	extPort  uint16
	lifetime time.Duration
	expires  time.Time
	renewAt  time.Time
	err      error
}

// session is one conversation with one gateway.
type session struct {
	gw       netip.Addr
	conn     Conn
	local    netip.Addr
	pkts     chan []byte
	quit     chan struct{}
	pcp      bool
	epoch    epochSample
	hasEpoch bool
	resets   int
	external netip.Addr
	maps     map[MappingRequest]*mapping
	// discovering: Rediscover abandons the exchange under way (discovery
	// lasts up to 128 s: the network may have changed long before).
	discovering bool
}

type announcement struct {
	from     netip.Addr
	version  uint8
	epoch    uint32
	external netip.Addr
}

// Run talks to the gateway until ctx ends, then deletes the mappings
// (lifetime 0) and returns ctx's error. It may be called once.
func (c *Client) Run(ctx context.Context) error {
	if c.ran.Swap(true) {
		return ErrClosed
	}
	annc := c.annc
	if !c.cfg.NoAnnouncements {
		pc, err := c.cfg.ListenAnnouncements()
		if err != nil {
			c.log.Warn("natpmp: no announcement listener", "err", err)
		} else {
			stop := make(chan struct{})
			done := make(chan struct{})
			go c.readAnnouncements(pc, annc, stop, done)
			defer func() { close(stop); pc.Close(); <-done }()
		}
	}
	var s *session
	defer func() {
		if s != nil {
			c.shutdown(ctx, s)
		}
		c.mu.Lock()
		c.closed = true
		for ch := range c.subs {
			close(ch)
		}
		c.subs = nil
		c.mu.Unlock()
	}()
	var nextDiscover time.Time // zero: now
	var requeryAt time.Time    // zero: no announcement pending
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		c.mu.Lock()
		if c.rediscover {
			c.rediscover = false
			nextDiscover = time.Time{}
			if s != nil {
				s.close()
				s = nil
			}
		}
		c.mu.Unlock()
		if s != nil && !requeryAt.IsZero() && !c.now().Before(requeryAt) {
			requeryAt = time.Time{}
			if err := c.requery(ctx, s); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				c.lost(s, err)
				s.close()
				s = nil
				nextDiscover = c.now().Add(c.cfg.RetryInterval)
			}
		}
		if s == nil {
			requeryAt = time.Time{}
		}
		if s == nil && !c.now().Before(nextDiscover) {
			s = c.discover(ctx)
			if s == nil {
				nextDiscover = c.now().Add(c.cfg.RetryInterval)
			}
		}
		if s != nil {
			if err := c.reconcile(ctx, s); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				c.lost(s, err)
				s.close()
				s = nil
				nextDiscover = c.now().Add(c.cfg.RetryInterval)
			}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		next := nextDiscover
		if s != nil {
			next = s.nextRenewal(c.now())
			if !requeryAt.IsZero() && requeryAt.Before(next) {
				next = requeryAt
			}
		}
		timer.Reset(max(next.Sub(c.now()), 0))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-timer.C:
		case <-c.wake:
		case a := <-annc:
			if s == nil {
				c.log.Info("natpmp: announcement while no gateway is known; looking again", "from", a.from)
				nextDiscover = time.Time{}
				continue
			}
			if a.from != s.gw {
				c.log.Debug("natpmp: announcement from a host that is not our gateway", "from", a.from, "gateway", s.gw)
				continue
			}
			if requeryAt.IsZero() {
				wait := time.Duration(0)
				if c.cfg.AnnounceDelay > 0 {
					wait = mrand.N(c.cfg.AnnounceDelay + 1)
				}
				requeryAt = c.now().Add(wait)
				c.log.Info("natpmp: gateway announcement; re-querying and renewing", "version", a.version,
					"epoch", a.epoch, "in", wait)
			}
		}
	}
}

func (c *Client) readAnnouncements(pc PacketConn, out chan<- announcement, stop, done chan struct{}) {
	defer close(done)
	buf := make([]byte, pcpMaxLen)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			select {
			case <-stop:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			c.log.Debug("natpmp: announcement read", "err", err)
			continue
		}
		a := announcement{}
		if ua, ok := from.(*net.UDPAddr); ok {
			a.from = ua.AddrPort().Addr().Unmap()
		}
		b := buf[:n]
		switch {
		case n > 0 && b[0] == VersionNATPMP:
			r, err := ParseResponse(b)
			if err != nil || r.Op != OpExternalAddress|opResponse {
				c.log.Debug("natpmp: ignoring datagram on announcement port", "from", from, "err", err)
				continue
			}
			a.version, a.epoch, a.external = VersionNATPMP, r.Epoch, r.External
		case n > 0 && b[0] == VersionPCP:
			r, err := ParsePCPResponse(b)
			if err != nil || r.Opcode != PCPOpAnnounce {
				c.log.Debug("natpmp: ignoring datagram on announcement port", "from", from, "err", err)
				continue
			}
			a.version, a.epoch = VersionPCP, r.Epoch
		default:
			continue
		}
		select {
		case out <- a:
		case <-stop:
			return
		default: // a re-query is already pending
		}
	}
}

// discover finds the gateway and the protocol it speaks. It returns nil
// (with the status set) when there is none to talk to.
func (c *Client) discover(ctx context.Context) *session {
	rt, err := c.cfg.Route()
	if err != nil {
		c.setState(func(st *Status) {
			*st = Status{State: StateFailed, Detail: err.Error()}
		})
		return nil
	}
	if !behindNAT(rt.Local) {
		c.setState(func(st *Status) {
			*st = Status{State: StatePublic, Gateway: rt.Gateway, Local: rt.Local, External: rt.Local}
		})
		return nil
	}
	gw := netip.AddrPortFrom(rt.Gateway, ServerPort)
	conn, err := c.cfg.Dial(gw)
	if err != nil {
		c.setState(func(st *Status) {
			*st = Status{State: StateFailed, Gateway: rt.Gateway, Local: rt.Local, Detail: err.Error()}
		})
		return nil
	}
	s := &session{gw: rt.Gateway, conn: conn, local: rt.Local, pkts: make(chan []byte, 8),
		quit: make(chan struct{}), maps: map[MappingRequest]*mapping{}}
	if la, ok := conn.LocalAddr().(*net.UDPAddr); ok {
		if a := la.AddrPort().Addr().Unmap(); a.IsValid() && !a.IsUnspecified() {
			s.local = a
		}
	}
	go s.read()
	s.discovering = true
	defer func() { s.discovering = false }()
	fail := func(state State, err error) *session {
		s.close()
		c.setState(func(st *Status) {
			*st = Status{State: state, Gateway: rt.Gateway, Local: rt.Local, Detail: err.Error()}
			if state == StateNoGateway {
				st.External = rt.Local // RFC 6281 §4.1: proceed as on a public network
			}
		})
		if state == StateNoGateway {
			c.log.Info("natpmp: no gateway answered; treating the network as public", "gateway", rt.Gateway)
		} else {
			c.log.Warn("natpmp: gateway discovery failed", "gateway", rt.Gateway, "err", err)
		}
		return nil
	}
	if !c.cfg.DisablePCP {
		// PCP ANNOUNCE first; from the natpmpProbeAfter'th try on, a NAT-PMP
		// external address request too, for NAT-PMP gateways that drop
		// PCP silently instead of answering UNSUPPORTED_VERSION.
		announce, ext := BuildPCPAnnounceRequest(s.local), BuildExternalAddressRequest()
		var epoch uint32
		_, err := c.exchangeN(ctx, s, func(try int) [][]byte {
			if try < natpmpProbeAfter {
				return [][]byte{announce}
			}
			return [][]byte{announce, ext}
		}, func(b []byte) bool {
			if len(b) == 0 {
				return false
			}
			switch b[0] {
			case VersionPCP:
				r, err := ParsePCPResponse(b)
				if err == nil && r.Opcode == PCPOpAnnounce {
					// Any PCP answer (even UNSUPP_OPCODE) proves PCP is spoken.
					s.pcp, epoch = true, r.Epoch
					return true
				}
			case VersionNATPMP:
				// UNSUPPORTED_VERSION for the ANNOUNCE, or any answer to the
				// external address request (both opcode 128).
				r, err := ParseResponse(b)
				return err == nil && r.Op == OpExternalAddress|opResponse
			}
			return false
		})
		switch {
		case errors.Is(err, errRediscover):
			s.close() // Run starts again at once
			return nil
		case errors.Is(err, ErrNoGateway):
			return fail(StateNoGateway, fmt.Errorf("pcp: %w", err))
		case err != nil:
			return fail(StateFailed, fmt.Errorf("pcp: %w", err))
		case s.pcp:
			c.epochSeen(s, epoch)
		default:
			c.log.Info("natpmp: gateway does not speak PCP; falling back to NAT-PMP", "gateway", rt.Gateway)
		}
	}
	if !s.pcp {
		if err := c.queryExternal(ctx, s); errors.Is(err, errRediscover) {
			s.close()
			return nil
		} else if errors.Is(err, ErrNoGateway) {
			return fail(StateNoGateway, err)
		} else if err != nil {
			return fail(StateFailed, err)
		}
	}
	c.log.Info("natpmp: gateway found", "gateway", rt.Gateway, "protocol", s.protocol())
	return s // the status follows once reconcile has asked for the mappings
}

func (s *session) protocol() string {
	if s.pcp {
		return "PCP"
	}
	return "NAT-PMP"
}

func (s *session) read() {
	buf := make([]byte, pcpMaxLen+1)
	for {
		n, err := s.conn.Read(buf)
		if err != nil {
			// ICMP port unreachable from a gateway without a server comes
			// back as ECONNREFUSED on the next read: keep waiting, the
			// schedule decides when to give up.
			if errors.Is(err, syscall.ECONNREFUSED) {
				continue
			}
			return
		}
		select {
		case s.pkts <- append([]byte(nil), buf[:n]...):
		case <-s.quit:
			return
		}
	}
}

func (s *session) close() {
	close(s.quit)
	s.conn.Close()
}

func (s *session) nextRenewal(now time.Time) time.Time {
	var next time.Time
	for _, m := range s.maps {
		if next.IsZero() || m.renewAt.Before(next) {
			next = m.renewAt
		}
	}
	if next.IsZero() {
		next = now.Add(24 * time.Hour)
	}
	return next
}

// exchange sends req on the schedule until match accepts an answer.
func (c *Client) exchange(ctx context.Context, s *session, req []byte, match func([]byte) bool) ([]byte, error) {
	return c.exchangeN(ctx, s, func(int) [][]byte { return [][]byte{req} }, match)
}

// exchangeN is exchange with the datagrams of each try chosen by reqs.
func (c *Client) exchangeN(ctx context.Context, s *session, reqs func(try int) [][]byte, match func([]byte) bool) ([]byte, error) {
	for {
		select {
		case <-s.pkts: // stale answers to earlier tries
			continue
		default:
		}
		break
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	// A wake that is not a Rediscover (Add, Remove) is handed on to Run.
	var woken bool
	// Announcements are Run's to act on, except during discovery.
	var annc chan announcement
	if s.discovering {
		annc = c.annc
	}
	defer func() {
		if woken {
			c.poke()
		}
	}()
	send := func(try int) error {
		for _, req := range reqs(try) {
			if _, err := s.conn.Write(req); err != nil && !errors.Is(err, syscall.ECONNREFUSED) {
				return fmt.Errorf("send to %v: %w", s.gw, err)
			}
		}
		return nil
	}
	for try, wait := range c.cfg.Schedule {
		if err := send(try); err != nil {
			return nil, err
		}
		timer.Reset(wait)
	try:
		for {
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case b := <-s.pkts:
				if match(b) {
					return b, nil
				}
			case <-timer.C:
				break try
			case <-c.wake:
				woken = true
				c.mu.Lock()
				again := c.rediscover
				c.mu.Unlock()
				if again && s.discovering {
					return nil, errRediscover // Run sees the flag once woken
				}
			case a := <-annc:
				// A gateway (re)started its PCP/NAT-PMP server (RFC 6887
				// §14.1.1): this try goes again now, not at the end of a
				// wait of up to 64 s (and the wait starts again: an
				// announcement never shortens the schedule).
				c.log.Info("natpmp: announcement during discovery; asking again at once", "from", a.from)
				if err := send(try); err != nil {
					return nil, err
				}
				timer.Reset(wait)
			}
		}
	}
	return nil, fmt.Errorf("%v after %d tries: %w", s.gw, len(c.cfg.Schedule), ErrNoGateway)
}

func (c *Client) exchangePCP(ctx context.Context, s *session, req []byte, match func(PCPResponse) bool) (PCPResponse, error) {
	return exchangeParsed(c, ctx, s, req, "pcp", ParsePCPResponse, match)
}

func (c *Client) exchangeNATPMP(ctx context.Context, s *session, req []byte, match func(Response) bool) (Response, error) {
	return exchangeParsed(c, ctx, s, req, "natpmp", ParseResponse, match)
}

// exchangeParsed runs one request/response exchange whose answers are
// parsed with parse; unparsable answers are logged and ignored, and the
// first that match ends the exchange.
func exchangeParsed[R any](c *Client, ctx context.Context, s *session, req []byte, proto string, parse func([]byte) (R, error), match func(R) bool) (R, error) {
	var resp R
	_, err := c.exchange(ctx, s, req, func(b []byte) bool {
		r, err := parse(b)
		if err != nil {
			c.log.Debug("natpmp: bad answer", "proto", proto, "err", err)
			return false
		}
		if match(r) {
			resp = r
			return true
		}
		return false
	})
	if err != nil {
		return resp, fmt.Errorf("%s: %w", proto, err)
	}
	return resp, nil
}

// epochSeen records the gateway's epoch; when it shows a lost state every
// mapping is made due for re-creation.
func (c *Client) epochSeen(s *session, epoch uint32) {
	now := c.now()
	reset := false
	if s.hasEpoch {
		if s.pcp {
			reset = PCPEpochReset(s.epoch.server, s.epoch.at, epoch, now)
		} else {
			reset = NATPMPEpochReset(s.epoch.server, s.epoch.at, epoch, now)
		}
	}
	s.epoch, s.hasEpoch = epochSample{server: epoch, at: now}, true
	if reset {
		s.resets++
		c.log.Warn("natpmp: gateway lost its mappings (epoch went back); re-creating them", "gateway", s.gw, "epoch", epoch)
		for _, m := range s.maps {
			m.renewAt = now // ask again for the same external port
		}
	}
}

// queryExternal asks a NAT-PMP gateway for its external address.
func (c *Client) queryExternal(ctx context.Context, s *session) error {
	r, err := c.exchangeNATPMP(ctx, s, BuildExternalAddressRequest(), func(r Response) bool {
		return r.Op == OpExternalAddress|opResponse
	})
	if err != nil {
		return fmt.Errorf("external address request: %w", err)
	}
	c.epochSeen(s, r.Epoch)
	if r.Result != ResultSuccess {
		return fmt.Errorf("natpmp: external address request: %w", r.Result)
	}
	if s.external != r.External {
		c.log.Info("natpmp: external address", "addr", r.External)
	}
	s.external = r.External
	return nil
}

// requery handles an announcement: learn the address and epoch again and
// renew every mapping.
func (c *Client) requery(ctx context.Context, s *session) error {
	if !s.pcp {
		if err := c.queryExternal(ctx, s); err != nil {
			return err
		}
	}
	now := c.now()
	for _, m := range s.maps {
		m.renewAt = now
	}
	return c.reconcile(ctx, s)
}

// reconcile creates wanted mappings, renews due ones and deletes unwanted
// ones. An error means the gateway stopped answering.
func (c *Client) reconcile(ctx context.Context, s *session) error {
	c.mu.Lock()
	want := maps.Clone(c.want)
	c.mu.Unlock()
	defer c.refreshStatus(s)
	for req, m := range s.maps {
		if !want[req] {
			if err := c.deleteMapping(ctx, s, m); err != nil {
				return err
			}
			delete(s.maps, req)
		}
	}
	// A reply showing an epoch reset makes every mapping due again; a few
	// passes settle that.
	for range 3 {
		now := c.now()
		var due []*mapping
		for req := range want {
			m := s.maps[req]
			if m == nil {
				m = &mapping{req: req}
				if _, err := rand.Read(m.nonce[:]); err != nil {
					return fmt.Errorf("natpmp: nonce: %w", err)
				}
				s.maps[req] = m
			}
			if !m.renewAt.After(now) {
				due = append(due, m)
			}
		}
		if len(due) == 0 {
			return nil
		}
		slices.SortFunc(due, func(a, b *mapping) int {
			return int(a.req.InternalPort)<<8 + int(a.req.Protocol) - int(b.req.InternalPort)<<8 - int(b.req.Protocol)
		})
		for _, m := range due {
			if err := c.mapOne(ctx, s, m); err != nil {
				return err
			}
		}
	}
	return nil
}

// answers reports whether r is the gateway's answer to a MAP request for m:
// RFC 6887 §11.4 (and §8.3) has the client discard a MAP response whose
// nonce, protocol or internal port differ from its request. Error answers
// included: the server copies the request's opcode data into them (§7.2),
// so an error without it (a header cut short, or an answer to someone
// else's nonce) is not ours and cannot end the exchange; the retransmission
// schedule decides when the gateway has stopped answering. The only answer
// without a nonce taken is UNSUPP_VERSION (a version hint, matched by the
// caller): it carries no mapping result.
func (m *mapping) answers(r PCPResponse) bool {
	return r.Opcode == PCPOpMap && r.Map.Nonce == m.nonce &&
		r.Map.Protocol == m.req.Protocol && r.Map.InternalPort == m.req.InternalPort
}

// mapOne creates or renews m. A refusal by the gateway is recorded on m;
// only silence is returned as an error.
func (c *Client) mapOne(ctx context.Context, s *session, m *mapping) error {
	lifetime := uint32(c.cfg.Lifetime / time.Second)
	suggest := m.extPort
	if suggest == 0 {
		suggest = m.req.InternalPort
	}
	var (
		granted uint32
		extPort uint16
		ext     netip.Addr
		refusal error
	)
	if s.pcp {
		req := BuildPCPMapRequest(s.local, PCPMap{Nonce: m.nonce, Protocol: m.req.Protocol,
			InternalPort: m.req.InternalPort, ExternalPort: suggest, External: s.external}, lifetime)
		r, err := c.exchangePCP(ctx, s, req, func(r PCPResponse) bool {
			return r.Result == PCPUnsuppVersion || m.answers(r)
		})
		if err != nil {
			return fmt.Errorf("map %v: %w", m.req, err)
		}
		if r.Result == PCPUnsuppVersion {
			c.log.Warn("natpmp: gateway stopped speaking PCP; switching to NAT-PMP", "gateway", s.gw)
			s.pcp, s.hasEpoch = false, false
			if err := c.queryExternal(ctx, s); err != nil {
				return err
			}
			return c.mapOne(ctx, s, m)
		}
		c.epochSeen(s, r.Epoch)
		if r.Result != PCPSuccess {
			refusal = r.Result
		} else {
			granted, extPort, ext = r.Lifetime, r.Map.ExternalPort, r.Map.External
		}
	} else {
		op, _ := m.req.Protocol.natpmpOp()
		req, err := BuildMapRequest(m.req.Protocol, m.req.InternalPort, suggest, lifetime)
		if err != nil {
			return err
		}
		r, err := c.exchangeNATPMP(ctx, s, req, func(r Response) bool {
			return r.Op == op|opResponse && (r.Result != ResultSuccess || r.InternalPort == m.req.InternalPort)
		})
		if err != nil {
			return fmt.Errorf("map %v: %w", m.req, err)
		}
		c.epochSeen(s, r.Epoch)
		if r.Result != ResultSuccess {
			refusal = r.Result
		} else {
			granted, extPort, ext = r.Lifetime, r.ExternalPort, s.external
		}
	}
	now := c.now()
	if refusal != nil {
		c.log.Warn("natpmp: gateway refused mapping", "mapping", m.req, "err", refusal)
		m.err = fmt.Errorf("map %v: %w", m.req, refusal)
		m.extPort, m.lifetime, m.expires = 0, 0, time.Time{}
		m.renewAt = now.Add(c.cfg.RetryInterval)
		return nil
	}
	if granted == 0 {
		m.err = fmt.Errorf("map %v: gateway granted lifetime 0", m.req)
		m.extPort = 0
		m.renewAt = now.Add(c.cfg.RetryInterval)
		return nil
	}
	if m.extPort != extPort || s.external != ext {
		c.log.Info("natpmp: mapped", "mapping", m.req, "external", netip.AddrPortFrom(ext, extPort), "lifetime", granted)
	}
	m.err = nil
	m.extPort = extPort
	if ext.IsValid() {
		s.external = ext
	}
	m.lifetime = time.Duration(granted) * time.Second
	m.expires = now.Add(m.lifetime)
	m.renewAt = now.Add(m.lifetime / 2)
	return nil
}

func (c *Client) deleteMapping(ctx context.Context, s *session, m *mapping) error {
	if m.expires.IsZero() {
		return nil // never granted
	}
	if s.pcp {
		req := BuildPCPMapRequest(s.local, PCPMap{Nonce: m.nonce, Protocol: m.req.Protocol,
			InternalPort: m.req.InternalPort}, 0)
		_, err := c.exchangePCP(ctx, s, req, m.answers)
		if err != nil {
			return fmt.Errorf("delete %v: %w", m.req, err)
		}
	} else {
		op, _ := m.req.Protocol.natpmpOp()
		req, err := BuildMapRequest(m.req.Protocol, m.req.InternalPort, 0, 0)
		if err != nil {
			return err
		}
		_, err = c.exchangeNATPMP(ctx, s, req, func(r Response) bool {
			return r.Op == op|opResponse && (r.Result != ResultSuccess || r.InternalPort == m.req.InternalPort)
		})
		if err != nil {
			return fmt.Errorf("delete %v: %w", m.req, err)
		}
	}
	c.log.Info("natpmp: mapping deleted", "mapping", m.req)
	return nil
}

// shutdown deletes every mapping within ShutdownTimeout.
func (c *Client) shutdown(ctx context.Context, s *session) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.ShutdownTimeout)
	defer cancel()
	for req, m := range s.maps {
		if err := c.deleteMapping(dctx, s, m); err != nil {
			c.log.Warn("natpmp: mapping not deleted at shutdown", "mapping", req, "err", err)
			break
		}
		delete(s.maps, req)
	}
	s.close()
	c.setState(func(st *Status) {
		*st = Status{State: StateStopped, Gateway: s.gw, Local: s.local, Protocol: s.protocol()}
	})
}

// lost records that the gateway stopped answering.
func (c *Client) lost(s *session, err error) {
	state := StateFailed
	if errors.Is(err, ErrNoGateway) {
		state = StateNoGateway
	}
	c.log.Warn("natpmp: lost the gateway", "gateway", s.gw, "err", err)
	c.setState(func(st *Status) {
		*st = Status{State: state, Gateway: s.gw, Local: s.local, Detail: err.Error()}
		if state == StateNoGateway {
			st.External = s.local
		}
	})
}

// refreshStatus renders the session into the status.
func (c *Client) refreshStatus(s *session) {
	c.setState(func(st *Status) {
		*st = Status{State: StateMapped, Protocol: s.protocol(), Gateway: s.gw, Local: s.local,
			External: s.external, Epoch: s.epoch.server, Answered: s.epoch.at,
			Resets: s.resets}
		if s.external.IsValid() && behindNAT(s.external) {
			st.State = StateDoubleNAT
			st.External = netip.Addr{}
			st.Detail = fmt.Sprintf("gateway %v's external address %v is itself private", s.gw, s.external)
		}
		var errs []string
		for _, m := range s.maps {
			pm := Mapping{Protocol: m.req.Protocol, InternalPort: m.req.InternalPort, ExternalPort: m.extPort,
				Lifetime: m.lifetime, Expires: m.expires}
			if m.err != nil {
				pm.Err = m.err.Error()
				errs = append(errs, pm.Err)
			}
			st.Mappings = append(st.Mappings, pm)
		}
		slices.SortFunc(st.Mappings, func(a, b Mapping) int {
			if a.InternalPort != b.InternalPort {
				return int(a.InternalPort) - int(b.InternalPort)
			}
			return int(a.Protocol) - int(b.Protocol)
		})
		if st.State == StateMapped && len(errs) > 0 {
			slices.Sort(errs)
			st.Detail = fmt.Sprint(errs)
		}
	})
}

// setState edits the status under the lock and tells subscribers when the
// published part changed.
func (c *Client) setState(f func(*Status)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.status
	f(&c.status)
	if c.status.samePublished(old) {
		c.status.Since = old.Since
	} else {
		c.status.Since = c.now()
	}
	if c.status.samePublished(c.published) && !c.published.Since.IsZero() {
		return
	}
	c.published = c.status.clone()
	for ch := range c.subs {
		select {
		case <-ch:
		default:
		}
		ch <- c.published.clone()
	}
}
