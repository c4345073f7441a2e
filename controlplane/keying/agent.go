package keying

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/identity"
)

// PeerConfig is one of the user's other hosts to key with.
type PeerConfig struct {
	Name  string         // for logs and status
	ULA   netip.Addr     // the peer's ULA (RFC 6281 §6.3)
	Outer netip.AddrPort // where its tunnel port is reachable (from its SRV record)
	// Principal is the peer's host principal (Kerberos mode), e.g.
	// "host/b.example.com" or "host/b.example.com@EXAMPLE.COM". Derive it
	// from the name that holds the ULA (DefaultPrincipal) or from local
	// configuration, never from anything the peer publishes: an INIT for
	// this ULA is accepted only from this principal. Unused in PSK mode.
	Principal string
}

// DefaultPrincipal is the host principal RFC 6281 §7.1 implies for a host
// named host in the user's domain: host/<host>.<domain>@REALM.
func DefaultPrincipal(host, domain, realm string) string {
	p := "host/" + strings.TrimSuffix(host, ".") + "." + strings.Trim(domain, ".")
	if realm != "" {
		p += "@" + realm
	}
	return p
}

// Installer applies keying results to the dataplane (normally by folding
// them into the controlplane.State given to Dataplane.Set).
type Installer interface {
	// Install makes p the complete key set for the peer p.ULA: Out is the
	// SA to send with, In the newest inbound SA, PrevIn older inbound SAs
	// still accepted for packets in flight. It is called with new inbound
	// SAs before the outbound SA switches to a new key (make-before-break).
	Install(ctx context.Context, p controlplane.Peer) error
	// Remove drops every SA of the peer.
	Remove(ctx context.Context, ula netip.Addr) error
}

// Config configures an Agent. Zero durations take the defaults shown.
type Config struct {
	ULA       netip.Addr // this host's ULA
	Auth      Auth       // *Kerberos or *PSK
	Transport Transport
	Installer Installer
	Logger    *slog.Logger     // default: discard
	Now       func() time.Time // default time.Now; timers run on the same (real or synctest) time
	// Ciphers acceptable, in order of preference (default AES-GCM, then AES-CBC+HMAC-SHA-256).
	Ciphers []controlplane.Cipher
	// SALifetime is the soft lifetime of an SA pair (default 1 h). Its
	// initiator rekeys at 80% of it, its responder at 90% (if the initiator
	// has not), and both rekey at 80%/90% of the Kerberos ticket's life
	// and of the time to the pair's hard end.
	SALifetime time.Duration
	// HardLifetime bounds every SA pair (default 2 × SALifetime). A pair's
	// hard end is the earliest of: its keying + HardLifetime; in Kerberos
	// mode, the initiator's last login (the ticket's authtime) +
	// HardLifetime; the ticket's end. When it passes and no rekey has
	// succeeded, the agent removes the peer's SAs (ErrExpired). Kerberos
	// hosts log in again every HardLifetime/2, and an INIT whose login is
	// older than HardLifetime is refused: a host whose principal is deleted
	// from the KDC is cut off within one HardLifetime. Give the dataplane a
	// hard time limit a little above it (HardLimit) as the backstop for a
	// dead agent.
	HardLifetime time.Duration
	// PrevInHold is how long an old inbound SA stays after a rekey (30 s).
	PrevInHold time.Duration
	// RetransmitBase, RetransmitMax, Retransmits: the first retransmission
	// after 500 ms, doubling up to 8 s, 6 retransmissions, then the attempt fails.
	RetransmitBase, RetransmitMax time.Duration
	Retransmits                   int
	// RetryBase, RetryMax: after a failed attempt, wait 2 s doubling up to 5 min.
	RetryBase, RetryMax time.Duration
	// ResponseCacheTTL: how long an answered INIT/CONFIRM is answered again
	// from cache when retransmitted, and how long a responder waits for the
	// CONFIRM of an exchange (default: the whole retransmission span).
	ResponseCacheTTL time.Duration
	// AuthTimeout bounds the initiator's authentication of one exchange
	// (the KDC round trips); default 20 s.
	AuthTimeout time.Duration
	// ReplayFile keeps the responder's replay cache across restarts (see
	// docs/keying.md); "" keeps it in memory only.
	ReplayFile string
	// HandshakeRate and HandshakeBurst are the per-source token bucket for
	// datagrams that make this host work without state (INITs, their
	// FRAGMENTs, and the COOKIEs they get): default 20 a second, burst 20.
	HandshakeRate  float64
	HandshakeBurst int
	// LoadThreshold is how many such datagrams a second put the responder
	// under load, when it wants a cookie (MAC2) first (default 64).
	LoadThreshold int
}

// HardLimit is the kernel hard time limit to give SAs made with cfg: a
// margin above the hard lifetime the agent enforces itself, so the kernel
// only acts when the agent cannot.
func HardLimit(cfg Config) time.Duration {
	cfg.setDefaults()
	return cfg.HardLifetime + time.Minute
}

const (
	maxSources  = 4096 // rate-limiter table
	maxAnswered = 256  // cached replies
)

func (c *Config) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.SALifetime, time.Hour)
	def(&c.HardLifetime, 2*c.SALifetime)
	def(&c.PrevInHold, 30*time.Second)
	def(&c.RetransmitBase, 500*time.Millisecond)
	def(&c.RetransmitMax, 8*time.Second)
	def(&c.RetryBase, 2*time.Second)
	def(&c.RetryMax, 5*time.Minute)
	def(&c.AuthTimeout, 20*time.Second)
	if c.Retransmits <= 0 {
		c.Retransmits = 6
	}
	var span time.Duration
	for i, rto := 0, c.RetransmitBase; i <= c.Retransmits; i, rto = i+1, min(2*rto, c.RetransmitMax) {
		span += rto
	}
	def(&c.ResponseCacheTTL, span+time.Second)
	if c.HandshakeRate <= 0 {
		c.HandshakeRate = 20
	}
	if c.HandshakeBurst <= 0 {
		c.HandshakeBurst = 20
	}
	if c.LoadThreshold <= 0 {
		c.LoadThreshold = 64
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if len(c.Ciphers) == 0 {
		c.Ciphers = []controlplane.Cipher{controlplane.CipherAESGCM, controlplane.CipherAESCBCHMAC}
	}
}

// Agent runs the keying exchanges of one host with all its peers. One
// goroutine (Run) owns all state; the Installer is called from it.
type Agent struct {
	cfg      Config
	proposal []CipherID
	pol      authPolicy

	cmds     chan func()
	authDone chan authResult
	rx       chan datagram
	done     chan struct{}

	// owned by Run
	peers    map[netip.Addr]*peer
	replay   *replayCache
	answered map[[32]byte]cachedReply
	reasm    *reassembler
	limiter  *rateLimiter
	load     loadMeter
	jar      cookieJar
	logs     logLimiter
	stats    Stats
	ctx      context.Context

	// tamper, when set (tests), sees every whole message this agent sends
	// (after its MAC, before MAC1 and fragmentation) and may change it:
	// an on-path attacker who knows the peer's MAC1 key.
	tamper func(t MsgType, msg []byte) []byte
}

// Stats counts what the agent did with what it received; it shows the
// handshake DoS defences at work.
type Stats struct {
	Datagrams        uint64 // keying datagrams received
	Malformed        uint64 // unparsable
	OldVersion       uint64 // version 1 datagrams (INITs are refused with a version 1 ERROR)
	BadMAC1          uint64 // INIT datagrams dropped by the cheap check
	RateLimited      uint64 // dropped by the per-source token bucket
	CookiesSent      uint64 // COOKIE answers (under load, no valid MAC2)
	FragmentsBad     uint64 // FRAGMENTs refused by reassembly
	InitsRefused     uint64 // INITs answered with ERROR (or ignored)
	InitsAccepted    uint64 // INITs answered with RESP
	RepliesFromCache uint64
	// Attempts counts the exchanges we started as initiator; Failures
	// counts the failed ones by Reason (timeout, clock_skew, ...).
	Attempts uint64
	Failures map[string]uint64
}

type datagram struct {
	b    []byte
	from netip.AddrPort
}

type authResult struct {
	ula netip.Addr
	id  [8]byte
	res *initiation
	err error
}

type cachedReply struct {
	dgs   [][]byte
	until time.Time
}

type keyed struct {
	out, in   controlplane.SA
	mat       material
	exchange  [8]byte
	initiator bool
	at        time.Time
	ticketEnd time.Time
	hardEnd   time.Time
	hardWhy   string
	rekeyAt   time.Time
	until     time.Time // responder, while pending: when an unconfirmed exchange is dropped
	// MOVED announcements under this pair: the last number we sent, and
	// the highest we accepted from the peer (with its source address, so a
	// retransmission is answered and a replay from elsewhere is not).
	movedOut    uint64
	movedIn     uint64
	movedInFrom netip.AddrPort
}

// announcement is a MOVED being sent to one peer until it is acknowledged.
type announcement struct {
	exchange [8]byte // of the SA pair whose keys sign it
	seq      uint64
	sent     []byte // the MOVED as last sent (transcript of the MOVED_ACK)
	tries    int
	rto      time.Duration
	nextTx   time.Time
}

type heldSA struct {
	sa    controlplane.SA
	until time.Time
}

type phase int

const (
	waitAuth phase = iota
	waitResp
	waitAck
)

func (p phase) String() string { return [...]string{"auth", "resp", "ack"}[p] }

type exchange struct {
	id     [8]byte
	phase  phase
	nonce  []byte
	spi    uint32
	auth   *initiation
	eph    *ephemeral
	init   []byte   // the INIT message as sent (transcript of RESP and ERROR)
	sent   [][]byte // the datagrams retransmitted (INIT or CONFIRM)
	tries  int
	rto    time.Duration
	nextTx time.Time
	result *keyed
	bad    error // why the last answer to this exchange was ignored
	hint   error // an unauthenticated refusal seen for this exchange
	cancel context.CancelFunc
}

type peer struct {
	cfg         PeerConfig
	outer       netip.AddrPort
	cur         *keyed // the SA pair both sides have confirmed
	pending     *keyed // responder: keyed by an INIT, not yet CONFIRMed
	held        []heldSA
	ex          *exchange
	moved       *announcement // our MOVED awaiting its MOVED_ACK
	nextAttempt time.Time
	backoff     time.Duration
	lastErr     error
	installed   *controlplane.Peer // what the Installer last accepted for this peer
	cookie      []byte             // from the peer's last COOKIE
	cookieAt    time.Time
}

// New checks cfg and returns an Agent; call Run to start it.
func New(cfg Config) (*Agent, error) {
	cfg.setDefaults()
	if !identity.IsULA(cfg.ULA) {
		return nil, fmt.Errorf("keying: local ULA %v is not an IPv6 ULA", cfg.ULA)
	}
	if cfg.Auth == nil || cfg.Transport == nil || cfg.Installer == nil {
		return nil, errors.New("keying: Config needs Auth, Transport and Installer")
	}
	if k, ok := cfg.Auth.(*Kerberos); ok {
		if err := k.check(); err != nil {
			return nil, fmt.Errorf("keying: %w", err)
		}
	}
	a := &Agent{
		cfg:      cfg,
		pol:      authPolicy{maxAuthAge: cfg.HardLifetime},
		cmds:     make(chan func()),
		authDone: make(chan authResult),
		rx:       make(chan datagram),
		done:     make(chan struct{}),
		peers:    map[netip.Addr]*peer{},
		answered: map[[32]byte]cachedReply{},
		reasm:    newReassembler(),
		limiter:  newRateLimiter(cfg.HandshakeRate, cfg.HandshakeBurst, maxSources),
		load:     loadMeter{limit: cfg.LoadThreshold},
		logs:     logLimiter{every: 10 * time.Second},
	}
	var err error
	a.replay, err = loadReplayCache(cfg.ReplayFile, cfg.Now(), cfg.Auth.maxSkew())
	if err != nil {
		cfg.Logger.Error("keying: "+err.Error(), "file", cfg.ReplayFile)
	}
	for _, c := range cfg.Ciphers {
		id, err := CipherIDFor(c)
		if err != nil {
			return nil, fmt.Errorf("keying: %w", err)
		}
		a.proposal = append(a.proposal, id)
	}
	return a, nil
}

// PeerStatus is what Status reports about a peer; it holds no key material.
type PeerStatus struct {
	Name        string
	ULA         netip.Addr
	Outer       netip.AddrPort
	Established bool
	Out, In     controlplane.SA // keys cleared
	Initiator   bool            // we initiated the current keying
	At, RekeyAt time.Time
	HardEnd     time.Time // the SAs are removed then unless a rekey succeeds
	Pending     bool      // a responder's exchange waits for its CONFIRM
	LastError   error
}

// SetPeers replaces the set of peers (level-triggered). New peers are keyed
// at once; removed peers get a DELETE and their SAs are removed; a peer
// whose principal changed is keyed again. It returns after the agent has
// applied the change, or with ctx's error.
func (a *Agent) SetPeers(ctx context.Context, peers []PeerConfig) error {
	seen := map[netip.Addr]bool{}
	for _, p := range peers {
		if !p.ULA.Is6() || p.ULA == a.cfg.ULA {
			return fmt.Errorf("keying: peer %q: bad ULA %v", p.Name, p.ULA)
		}
		if seen[p.ULA] {
			return fmt.Errorf("keying: ULA %v listed twice (peer %q)", p.ULA, p.Name)
		}
		seen[p.ULA] = true
	}
	return a.do(ctx, func() { a.setPeers(peers) })
}

// Rekey starts a new exchange with the peer now (unless one is running),
// e.g. when the dataplane reports an SA's soft byte or packet limit. The
// current SAs stay until the new ones are in place.
func (a *Agent) Rekey(ctx context.Context, ula netip.Addr) error {
	var err error
	derr := a.do(ctx, func() {
		p := a.peers[ula]
		switch {
		case p == nil:
			err = fmt.Errorf("keying: rekey %v: %w", ula, ErrUnknownPeer)
		case p.ex == nil:
			p.nextAttempt = a.cfg.Now()
			p.backoff = 0
		}
	})
	if derr != nil {
		return derr
	}
	return err
}

// Retry sends an exchange in flight with the peer again now instead of at
// its next retransmission: the path checks just found a way to the peer
// (e.g. the relay forwards once both sides have bound, and the first INIT
// arrived before that). No exchange in flight: nothing happens.
func (a *Agent) Retry(ctx context.Context, ula netip.Addr) error {
	return a.do(ctx, func() {
		if p := a.peers[ula]; p != nil && p.ex != nil && p.ex.phase != waitAuth {
			p.ex.nextTx = a.cfg.Now()
		}
	})
}

// Moved tells every keyed peer that this host's outer address changed: it
// sends each one an authenticated MOVED from the tunnel socket (so from the
// new address and through the new NAT), retransmitted like an INIT until
// the peer acknowledges it. The peer verifies it with the current SA pair's
// keying material and moves its SAs to the address the MOVED came from, with
// no rekey and no DNS round trip. Peers not keyed yet (or in backoff after a
// failure on the old network) are keyed again at once.
func (a *Agent) Moved(ctx context.Context) error {
	return a.do(ctx, func() {
		now := a.cfg.Now()
		for _, p := range a.peers {
			if p.cur == nil {
				if p.ex == nil {
					p.nextAttempt, p.backoff = now, 0
				}
				continue
			}
			p.cur.movedOut++
			p.moved = &announcement{exchange: p.cur.exchange, seq: p.cur.movedOut}
			a.sendMoved(p, now, true)
		}
	})
}

// Status returns every peer's keying state.
func (a *Agent) Status(ctx context.Context) ([]PeerStatus, error) {
	var out []PeerStatus
	err := a.do(ctx, func() {
		for _, p := range a.peers {
			s := PeerStatus{Name: p.cfg.Name, ULA: p.cfg.ULA, Outer: p.outer, LastError: p.lastErr, Pending: p.pending != nil}
			if k := p.cur; k != nil {
				s.Established = true
				s.Out, s.In = k.out, k.in
				s.Out.Key, s.In.Key = nil, nil
				s.Initiator, s.At, s.RekeyAt, s.HardEnd = k.initiator, k.at, k.rekeyAt, k.hardEnd
			}
			out = append(out, s)
		}
	})
	slices.SortFunc(out, func(x, y PeerStatus) int { return x.ULA.Compare(y.ULA) })
	return out, err
}

// Stats returns the agent's counters.
func (a *Agent) Stats(ctx context.Context) (Stats, error) {
	var s Stats
	err := a.do(ctx, func() { s = a.stats; s.Failures = maps.Clone(a.stats.Failures) })
	return s, err
}

func (a *Agent) do(ctx context.Context, f func()) error {
	done := make(chan struct{})
	select {
	case a.cmds <- func() { f(); close(done) }:
	case <-a.done:
		return errors.New("keying: agent stopped")
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Run runs the agent until ctx is done; then it sends DELETE to every keyed
// peer, removes their SAs and returns. It does not close the Transport:
// close it after Run returns to stop the reader goroutine.
func (a *Agent) Run(ctx context.Context) error {
	a.ctx = ctx
	defer close(a.done)
	go a.read()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next := a.tick()
		timer.Reset(max(next.Sub(a.cfg.Now()), time.Millisecond))
		select {
		case <-ctx.Done():
			a.shutdown()
			return nil
		case f := <-a.cmds:
			f()
		case r := <-a.authDone:
			a.onAuth(r)
		case d := <-a.rx:
			a.onDatagram(d)
		case <-timer.C:
		}
	}
}

func (a *Agent) read() {
	buf := make([]byte, MaxMessageLen+1)
	for {
		n, from, err := a.cfg.Transport.ReadKeying(buf)
		if err != nil {
			select {
			case <-a.done:
			default:
				a.cfg.Logger.Debug("keying transport closed", "err", err)
			}
			return
		}
		select {
		case a.rx <- datagram{bytes.Clone(buf[:n]), from}: // only what arrived is kept
		case <-a.done:
			return
		}
	}
}

func (a *Agent) log() *slog.Logger { return a.cfg.Logger }

func (a *Agent) setPeers(cfgs []PeerConfig) {
	now := a.cfg.Now()
	want := map[netip.Addr]bool{}
	for _, c := range cfgs {
		want[c.ULA] = true
		p, ok := a.peers[c.ULA]
		if !ok {
			a.peers[c.ULA] = &peer{cfg: c, outer: c.Outer, nextAttempt: now}
			continue
		}
		if p.cfg.Principal != c.Principal {
			// The SAs were authenticated for another principal: they go,
			// and the peer is keyed again under the one configured now.
			a.log().Warn("keying: peer's principal changed; keying again", "peer", c.Name, "ula", c.ULA,
				"old", p.cfg.Principal, "new", c.Principal)
			a.sendDelete(p)
			a.endExchange(p)
			a.remove(p)
			p.cfg, p.outer, p.cookie = c, c.Outer, nil
			p.nextAttempt, p.backoff = now, 0
			continue
		}
		moved := p.outer != c.Outer && c.Outer != p.cfg.Outer
		p.cfg = c
		if moved {
			p.outer = c.Outer
			if p.cur != nil || p.pending != nil {
				a.reinstall(p) // the dataplane moves the SAs (no rekey)
			}
			if ex := p.ex; ex != nil && ex.phase != waitAuth {
				// What is in flight went to the old address (e.g. a
				// peer's SRV before the path checks chose): send it to
				// the new one now, not at the next retransmission.
				ex.nextTx = now
			}
		}
	}
	for ula, p := range a.peers {
		if !want[ula] {
			a.sendDelete(p)
			a.endExchange(p)
			a.remove(p)
			delete(a.peers, ula)
		}
	}
}

// tick runs every due timer and returns when the next one is due.
func (a *Agent) tick() time.Time {
	now := a.cfg.Now()
	next := now.Add(time.Hour)
	for k, r := range a.answered {
		if !now.Before(r.until) {
			delete(a.answered, k)
		}
	}
	a.replay.expire(now)
	a.reasm.expire(now)
	for _, p := range a.peers {
		if k := p.pending; k != nil {
			if !now.Before(k.until) {
				a.log().Info("keying: no CONFIRM for our RESP; dropping the unconfirmed SAs", "peer", p.cfg.Name)
				p.pending = nil
				a.reinstall(p)
			} else {
				next = earliest(next, k.until)
			}
		}
		if k := p.cur; k != nil {
			if !now.Before(k.hardEnd) {
				a.expire(p, now)
			} else {
				next = earliest(next, k.hardEnd)
			}
		}
		// Old inbound SAs past their hold time.
		if n := len(p.held); n > 0 {
			p.held = slices.DeleteFunc(p.held, func(h heldSA) bool { return !now.Before(h.until) })
			if len(p.held) != n {
				a.reinstall(p)
			}
			for _, h := range p.held {
				next = earliest(next, h.until)
			}
		}
		if an := p.moved; an != nil {
			if p.cur == nil {
				p.moved = nil
			} else {
				if p.cur.exchange != an.exchange {
					// Rekeyed meanwhile: announce under the new pair
					// (the peer may have answered the exchange from a
					// cache without learning our address).
					p.cur.movedOut++
					an.exchange, an.seq = p.cur.exchange, p.cur.movedOut
				}
				if !now.Before(an.nextTx) {
					a.sendMoved(p, now, false)
				}
				if p.moved != nil {
					next = earliest(next, p.moved.nextTx)
				}
			}
		}
		if ex := p.ex; ex != nil {
			if ex.phase != waitAuth && !now.Before(ex.nextTx) {
				a.retransmit(p, now)
			}
			if p.ex != nil {
				if p.ex.phase != waitAuth {
					next = earliest(next, p.ex.nextTx)
				}
				continue
			}
			// The attempt just ended (no answer, no ACK): its retry
			// below must wake us, not whatever comes next.
		}
		// A retry after a failure waits out its backoff even when the
		// rekey time has passed; otherwise the next rekey is due.
		due := p.nextAttempt
		if due.IsZero() && p.cur != nil {
			due = p.cur.rekeyAt
		}
		if due.IsZero() && p.pending == nil {
			// Not keyed, nothing in flight, nothing planned: we answered
			// the peer's INIT (which ended our own exchange) and its
			// CONFIRM never came. The peer may have given that exchange
			// up (its RESP lost or late), and waiting for it alone
			// leaves the pair to its backoff: try ourselves.
			a.backoff(p, now)
			due = p.nextAttempt
		}
		if due.IsZero() {
			continue
		}
		if !now.Before(due) {
			a.start(p, now)
			continue
		}
		next = earliest(next, due)
	}
	return next
}

func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// expire removes a peer's SAs at their hard end: no rekey succeeded in time.
func (a *Agent) expire(p *peer, now time.Time) {
	k := p.cur
	err := fmt.Errorf("%w: the SA pair keyed at %v reached its hard end (%s) at %v", ErrExpired,
		k.at.UTC().Format(time.RFC3339), k.hardWhy, k.hardEnd.UTC().Format(time.RFC3339))
	if p.lastErr != nil {
		err = fmt.Errorf("%w; last keying error: %w", err, p.lastErr)
	}
	p.lastErr = err
	a.log().Warn("keying: peer's SAs expired without a successful rekey; removed", "peer", p.cfg.Name, "ula", p.cfg.ULA, "err", err)
	p.cur, p.held = nil, nil
	a.reinstall(p)
	if p.ex == nil && p.nextAttempt.IsZero() {
		p.nextAttempt = now
	}
}

// allocSPI picks a random inbound SPI not in use by any of our SAs.
func (a *Agent) allocSPI() uint32 {
	used := map[uint32]bool{}
	for _, p := range a.peers {
		for _, k := range []*keyed{p.cur, p.pending} {
			if k != nil {
				used[k.in.SPI], used[k.out.SPI] = true, true
			}
		}
		for _, h := range p.held {
			used[h.sa.SPI] = true
		}
		if p.ex != nil {
			used[p.ex.spi] = true
		}
	}
	for {
		s := binary.BigEndian.Uint32(randBytes(4))
		if s >= 0x100 && !used[s] {
			return s
		}
	}
}

// hardEnd is when an SA pair keyed at now must go, and why.
func (a *Agent) hardEnd(now, authTime, ticketEnd time.Time) (time.Time, string) {
	end, why := now.Add(a.cfg.HardLifetime), fmt.Sprintf("hard lifetime %v", a.cfg.HardLifetime)
	if !authTime.IsZero() && authTime.Add(a.cfg.HardLifetime).Before(end) {
		end, why = authTime.Add(a.cfg.HardLifetime), fmt.Sprintf("hard lifetime %v after the initiator's login", a.cfg.HardLifetime)
	}
	if !ticketEnd.IsZero() && ticketEnd.Before(end) {
		end, why = ticketEnd, "end of the initiator's Kerberos ticket"
	}
	return end, why
}

// rekeyAt is when an SA pair made at now is rekeyed: tenths (8 for the
// initiator, 9 for the responder) of the SA lifetime, of the ticket's and
// of the time to the hard end.
func (a *Agent) rekeyAt(now, ticketStart, ticketEnd, hardEnd time.Time, tenths int64) time.Time {
	t := now.Add(a.cfg.SALifetime * time.Duration(tenths) / 10)
	if !ticketEnd.IsZero() {
		if ticketStart.IsZero() || ticketStart.After(now) {
			ticketStart = now
		}
		t = earliest(t, ticketStart.Add(ticketEnd.Sub(ticketStart)*time.Duration(tenths)/10))
	}
	return earliest(t, now.Add(hardEnd.Sub(now)*time.Duration(tenths)/10))
}

// start begins an exchange as initiator: authentication (which may talk to
// the KDC) runs on its own goroutine, bounded by AuthTimeout, and reports
// to onAuth.
func (a *Agent) start(p *peer, now time.Time) {
	ctx, cancel := context.WithTimeout(a.ctx, a.cfg.AuthTimeout)
	ex := &exchange{id: [8]byte(randBytes(8)), phase: waitAuth, nonce: randBytes(nonceLen), spi: a.allocSPI(), cancel: cancel}
	p.ex = ex
	p.nextAttempt = time.Time{}
	a.stats.Attempts++
	cfg, ula, id, pol := p.cfg, p.cfg.ULA, ex.id, a.pol
	a.log().Debug("keying: starting exchange", "peer", cfg.Name, "ula", ula, "rekey", p.cur != nil)
	go func() {
		res, err := a.cfg.Auth.initiate(ctx, cfg, now, pol)
		select {
		case a.authDone <- authResult{ula, id, res, err}:
		case <-a.done:
			res.erase()
		}
	}()
}

// endExchange abandons or finishes p's exchange: its KDC wait is cancelled
// and its ephemeral keys and Kerberos subkey are wiped.
func (a *Agent) endExchange(p *peer) {
	ex := p.ex
	if ex == nil {
		return
	}
	ex.cancel()
	ex.eph.erase()
	ex.eph = nil
	ex.auth.erase()
	p.ex = nil
}

func (a *Agent) onAuth(r authResult) {
	p := a.peers[r.ula]
	if p == nil || p.ex == nil || p.ex.id != r.id || p.ex.phase != waitAuth {
		r.res.erase()
		return // abandoned meanwhile (tie-break, peer removed)
	}
	if r.err != nil {
		a.fail(p, r.err)
		return
	}
	ex := p.ex
	ex.auth = r.res
	eph, err := newEphemeral()
	if err != nil {
		a.fail(p, err)
		return
	}
	ex.eph = eph
	x, ek := eph.shares()
	m := &Message{Type: MsgInit, Mode: a.cfg.Auth.Mode(), Exchange: ex.id, Nonce: ex.nonce, SPI: ex.spi,
		ULA: a.cfg.ULA, Proposal: a.proposal, Time: r.res.time, APReq: r.res.token, X25519: x, MLKEM: ek}
	b, err := sign(m, initKey(r.res.secret, ex.nonce, MsgInit), nil)
	if err != nil {
		a.fail(p, fmt.Errorf("build INIT: %w", err))
		return
	}
	if a.tamper != nil {
		b = a.tamper(MsgInit, bytes.Clone(b))
	}
	ex.init = b
	now := a.cfg.Now()
	if ex.sent, err = datagrams(b, a.peerMAC1Key(p), p.validCookie(now)); err != nil {
		a.fail(p, fmt.Errorf("build INIT: %w", err))
		return
	}
	ex.phase = waitResp
	a.transmit(p, now, true)
}

// peerMAC1Key is the MAC1 key of INITs to p (it is the responder).
func (a *Agent) peerMAC1Key(p *peer) []byte { return mac1Key(p.cfg.ULA, a.cfg.Auth.identity(&p.cfg)) }

func (p *peer) validCookie(now time.Time) []byte {
	if p.cookie != nil && now.Sub(p.cookieAt) < cookieValidFor {
		return p.cookie
	}
	p.cookie = nil
	return nil
}

func (a *Agent) transmit(p *peer, now time.Time, first bool) {
	ex := p.ex
	if first {
		ex.tries, ex.rto = 0, a.cfg.RetransmitBase
	} else {
		ex.tries++
		ex.rto = min(2*ex.rto, a.cfg.RetransmitMax)
	}
	ex.nextTx = now.Add(ex.rto)
	a.send(ex.sent, p.outer)
}

func (a *Agent) send(dgs [][]byte, to netip.AddrPort) {
	for _, b := range dgs {
		if err := a.cfg.Transport.WriteKeying(b, to); err != nil {
			a.log().Debug("keying: send failed", "to", to, "err", err)
		}
	}
}

func (a *Agent) retransmit(p *peer, now time.Time) {
	ex := p.ex
	if ex.tries >= a.cfg.Retransmits {
		if ex.phase == waitAck {
			// Our SAs are installed; the responder may still send with the
			// old key, which PrevIn accepts until its hold ends. Rekey soon.
			a.log().Warn("keying: no ACK for CONFIRM; rekeying soon", "peer", p.cfg.Name)
			a.endExchange(p)
			a.backoff(p, now)
			return
		}
		err := fmt.Errorf("%w: no answer from %v after %d transmissions", ErrTimeout, p.outer, ex.tries+1)
		if _, psk := a.cfg.Auth.(*PSK); psk {
			// A peer whose PSK differs drops our INITs at the cheap check
			// (MAC1) and cannot tell us: say what is most likely.
			err = fmt.Errorf("%w: no answer from %v after %d transmissions: do the PSK files differ? (a peer with another PSK drops our INITs unanswered; compare them with sha256sum)",
				ErrTimeout, p.outer, ex.tries+1)
		}
		switch {
		case ex.hint != nil && ex.bad != nil:
			err = fmt.Errorf("%w: no valid answer from %v after %d transmissions; last answer ignored: %w; an unauthenticated refusal said: %w",
				ErrTimeout, p.outer, ex.tries+1, ex.bad, ex.hint)
		case ex.hint != nil:
			err = fmt.Errorf("%w: no valid answer from %v after %d transmissions; an unauthenticated refusal said: %w", ErrTimeout, p.outer, ex.tries+1, ex.hint)
		case ex.bad != nil:
			err = fmt.Errorf("%w: no valid answer from %v after %d transmissions; last answer ignored: %w", ErrTimeout, p.outer, ex.tries+1, ex.bad)
		}
		a.fail(p, err)
		return
	}
	a.log().Debug("keying: retransmit", "peer", p.cfg.Name, "phase", ex.phase, "try", ex.tries+1)
	if ex.phase == waitResp {
		// A cookie that expired meanwhile is dropped (or a new one used).
		if dgs, err := datagrams(ex.init, a.peerMAC1Key(p), p.validCookie(now)); err == nil {
			ex.sent = dgs
		}
	}
	a.transmit(p, now, false)
}

func (a *Agent) backoff(p *peer, now time.Time) {
	if p.backoff == 0 {
		p.backoff = a.cfg.RetryBase
	} else {
		p.backoff = min(2*p.backoff, a.cfg.RetryMax)
	}
	p.nextAttempt = now.Add(p.backoff)
}

// fail ends the current attempt with err and schedules a retry with backoff.
func (a *Agent) fail(p *peer, err error) {
	now := a.cfg.Now()
	a.endExchange(p)
	p.lastErr = fmt.Errorf("keying with %s (%v): %w", p.cfg.Name, p.cfg.ULA, err)
	if a.stats.Failures == nil {
		a.stats.Failures = map[string]uint64{}
	}
	a.stats.Failures[Reason(err)]++
	a.backoff(p, now)
	if ok, n := a.logs.allow("fail "+p.cfg.ULA.String(), now); ok {
		a.log().Warn("keying: exchange failed", "peer", p.cfg.Name, "ula", p.cfg.ULA, "err", err, "retry_in", p.backoff, "suppressed", n)
	}
}

// onDatagram runs the cheap checks and dispatches a datagram. Nothing
// expensive (Kerberos, X25519, ML-KEM) happens before the checks of
// admitInit for datagrams that would make us work without state.
func (a *Agent) onDatagram(d datagram) {
	now := a.cfg.Now()
	a.stats.Datagrams++
	if len(d.b) >= 2 && d.b[0] == 1 {
		a.refuseOldVersion(d, now)
		return
	}
	var m Message
	if err := m.Unmarshal(d.b); err != nil {
		a.stats.Malformed++
		if ok, n := a.logs.allow("malformed", now); ok {
			a.log().Debug("keying: dropped datagram", "from", d.from, "err", err, "suppressed", n)
		}
		return
	}
	switch {
	case m.Type == MsgInit || m.Type == MsgFragment && m.Frag.Of == MsgInit:
		if !a.admitInit(&m, d, now) {
			return
		}
		msg := messagePart(&m, d.b)
		m.MAC1, m.MAC2 = nil, nil
		if m.Type == MsgFragment {
			if msg = a.reassemble(&m, d.from, now); msg == nil {
				return
			}
			// An INIT in pieces carries MAC1 on the pieces only.
			if err := m.Unmarshal(msg); err != nil || m.Type != MsgInit || m.MAC1 != nil {
				a.stats.FragmentsBad++
				return
			}
		}
		a.onInit(&m, msg, d.from, now)
	case m.Type == MsgResp || m.Type == MsgFragment && m.Frag.Of == MsgResp:
		p := a.exchangeFor(m.Exchange, waitResp)
		if p == nil || m.MAC1 != nil {
			return // not ours, or a duplicate after we moved on
		}
		msg := d.b
		if m.Type == MsgFragment {
			if msg = a.reassemble(&m, d.from, now); msg == nil {
				return
			}
			if err := m.Unmarshal(msg); err != nil || m.Type != MsgResp || m.MAC1 != nil {
				a.stats.FragmentsBad++
				return
			}
		}
		a.onResp(p, &m, msg, d.from, now)
	case m.MAC1 != nil:
		return // only INITs carry MAC1
	case m.Type == MsgCookie:
		a.onCookie(&m, now)
	case m.Type == MsgConfirm:
		a.onConfirm(&m, d, now)
	case m.Type == MsgAck:
		a.onAck(&m, d)
	case m.Type == MsgDelete:
		a.onDelete(&m, d)
	case m.Type == MsgError:
		a.onError(&m, d)
	case m.Type == MsgMoved:
		a.onMoved(&m, d)
	case m.Type == MsgMovedAck:
		a.onMovedAck(&m, d)
	}
}

// sendMoved (re)transmits p's MOVED, signed with the current pair's
// material, on the INIT schedule; after the last retransmission it gives up
// (the peer still follows through DNS).
func (a *Agent) sendMoved(p *peer, now time.Time, first bool) {
	an := p.moved
	if first {
		an.tries, an.rto = 0, a.cfg.RetransmitBase
	} else {
		if an.tries >= a.cfg.Retransmits {
			a.log().Warn("keying: peer did not acknowledge our move; it will follow our DNS records", "peer", p.cfg.Name, "outer", p.outer)
			p.moved = nil
			return
		}
		an.tries++
		an.rto = min(2*an.rto, a.cfg.RetransmitMax)
	}
	an.nextTx = now.Add(an.rto)
	m := &Message{Type: MsgMoved, Mode: a.cfg.Auth.Mode(), Exchange: an.exchange, ULA: a.cfg.ULA, Seq: an.seq}
	b, err := sign(m, p.cur.mat.macKey(MsgMoved), nil)
	if err != nil {
		a.log().Warn("keying: build MOVED", "peer", p.cfg.Name, "err", err)
		p.moved = nil
		return
	}
	an.sent = b
	a.send([][]byte{b}, p.outer)
	if pub := p.cfg.Outer; pub.IsValid() && pub != p.outer {
		// Where we sent to may be an artifact of the network we left (a
		// port our old NAT rewrote): the peer's published endpoint is
		// where it can be reached from anywhere.
		a.send([][]byte{b}, pub)
	}
}

// onMoved follows a keyed peer to the address its MOVED came from. The MOVED
// must verify under the current (confirmed) SA pair and carry a number above
// any accepted before; the source address itself is not authenticated (a
// NAT rewrites it), as with ESP's own NAT-T mapping updates.
func (a *Agent) onMoved(m *Message, d datagram) {
	p := a.peers[m.ULA]
	if p == nil || p.cur == nil || p.cur.exchange != m.Exchange || m.Seq == 0 {
		a.log().Debug("keying: MOVED for no current SA pair", "ula", m.ULA, "from", d.from)
		return
	}
	k := p.cur
	if err := verify(m, d.b, k.mat.macKey(MsgMoved), nil); err != nil {
		a.log().Debug("keying: ignored bad MOVED", "peer", p.cfg.Name, "from", d.from, "err", err)
		return
	}
	switch {
	case m.Seq < k.movedIn || m.Seq == k.movedIn && d.from != k.movedInFrom:
		a.log().Warn("keying: ignored replayed MOVED", "peer", p.cfg.Name, "from", d.from, "seq", m.Seq, "accepted", k.movedIn)
		return
	case m.Seq > k.movedIn:
		if p.outer != d.from {
			old := p.outer
			p.outer = d.from
			if err := a.reinstall(p); err != nil {
				p.outer = old
				a.log().Warn("keying: moving SAs to the peer's new address failed", "peer", p.cfg.Name, "outer", d.from, "err", err)
				return // no ACK: the peer retransmits, we retry
			}
			a.log().Info("keying: peer moved", "peer", p.cfg.Name, "ula", p.cfg.ULA, "from", old, "to", d.from)
		}
		k.movedIn, k.movedInFrom = m.Seq, d.from
	}
	ack := &Message{Type: MsgMovedAck, Mode: a.cfg.Auth.Mode(), Exchange: m.Exchange, ULA: a.cfg.ULA, Seq: m.Seq}
	b, err := sign(ack, k.mat.macKey(MsgMovedAck), d.b)
	if err != nil {
		return
	}
	a.send([][]byte{b}, d.from)
}

func (a *Agent) onMovedAck(m *Message, d datagram) {
	p := a.peers[m.ULA]
	if p == nil || p.moved == nil || p.cur == nil || p.cur.exchange != m.Exchange || p.moved.exchange != m.Exchange || m.Seq != p.moved.seq {
		return
	}
	if err := verify(m, d.b, p.cur.mat.macKey(MsgMovedAck), p.moved.sent); err != nil {
		a.log().Debug("keying: ignored bad MOVED_ACK", "peer", p.cfg.Name, "from", d.from, "err", err)
		return
	}
	a.log().Debug("keying: peer acknowledged our move", "peer", p.cfg.Name, "seq", m.Seq)
	p.moved = nil
	if d.from != p.outer {
		// The peer answered, authenticated, from elsewhere than where we
		// send to: from our new network, that is where it is.
		old := p.outer
		p.outer = d.from
		if err := a.reinstall(p); err != nil {
			p.outer = old
			a.log().Warn("keying: following the peer's address seen from our new network failed", "peer", p.cfg.Name, "err", err)
			return
		}
		a.log().Info("keying: peer answered our MOVED from another address; sending there", "peer", p.cfg.Name, "from", old, "to", d.from)
	}
}

func (a *Agent) reassemble(m *Message, from netip.AddrPort, now time.Time) []byte {
	msg, err := a.reasm.add(m, from, now)
	if err != nil {
		a.stats.FragmentsBad++
		if ok, n := a.logs.allow("fragment", now); ok {
			a.log().Debug("keying: fragment dropped", "from", from, "err", err, "suppressed", n)
		}
		return nil
	}
	return msg
}

// exchangeFor finds the peer whose exchange id is waiting in phase ph.
func (a *Agent) exchangeFor(id [8]byte, ph phase) *peer {
	for _, p := range a.peers {
		if p.ex != nil && p.ex.id == id && p.ex.phase == ph {
			return p
		}
	}
	return nil
}

// admitInit is the cheap front door for datagrams that make us work
// without state (INIT and FRAGMENTs of INIT): MAC1 (who does not know our
// ULA and identity is dropped after one HMAC), the per-source token bucket,
// and, under load, MAC2 (a cookie proves the sender receives at its
// address; without one it gets a COOKIE and nothing else).
func (a *Agent) admitInit(m *Message, d datagram, now time.Time) bool {
	if !mac1OK(m, d.b, mac1Key(a.cfg.ULA, a.cfg.Auth.identity(nil))) {
		a.stats.BadMAC1++
		for _, p := range a.peers {
			if p.outer.Addr() == d.from.Addr() {
				// Probably a misconfiguration rather than noise: say so.
				if ok, n := a.logs.allow("mac1 "+p.cfg.Name, now); ok {
					a.log().Warn("keying: dropped an INIT from a peer's address that fails the cheap check (MAC1): do the PSK files differ? (or the peer has another ULA or principal for this host)",
						"peer", p.cfg.Name, "from", d.from, "suppressed", n)
				}
				return false
			}
		}
		if ok, n := a.logs.allow("mac1", now); ok {
			a.log().Debug("keying: dropped INIT datagram without a valid MAC1", "from", d.from, "suppressed", n)
		}
		return false
	}
	if !a.limiter.allow(d.from.Addr(), now) {
		a.stats.RateLimited++
		if ok, n := a.logs.allow("ratelimit", now); ok {
			a.log().Warn("keying: rate-limiting INIT datagrams", "from", d.from, "suppressed", n)
		}
		return false
	}
	if a.load.high(now) || a.reasm.busy() || a.limiter.full() {
		if !a.jar.mac2OK(m, d.b, d.from, now) {
			a.sendCookie(m, d, now)
			return false
		}
	}
	a.load.add(now)
	return true
}

func (a *Agent) sendCookie(m *Message, d datagram, now time.Time) {
	c := &Message{Type: MsgCookie, Mode: a.cfg.Auth.Mode(), Exchange: m.Exchange, Cookie: a.jar.seal(cookieKey(a.cfg.ULA, a.cfg.Auth.identity(nil)), d.from, m.MAC1, now)}
	b, err := c.Marshal()
	if err != nil || len(b) > len(d.b) {
		return // never more bytes than we got
	}
	a.stats.CookiesSent++
	if ok, n := a.logs.allow("cookie", now); ok {
		a.log().Info("keying: under load; answering INITs without a cookie with COOKIE", "from", d.from, "suppressed", n)
	}
	a.send([][]byte{b}, d.from)
}

// onCookie: the responder is under load and wants our INIT again with MAC2.
func (a *Agent) onCookie(m *Message, now time.Time) {
	p := a.exchangeFor(m.Exchange, waitResp)
	if p == nil {
		return
	}
	ex := p.ex
	for _, dg := range ex.sent {
		var sent Message
		if sent.Unmarshal(dg) != nil || sent.MAC1 == nil {
			continue
		}
		c, err := openCookie(cookieKey(p.cfg.ULA, a.cfg.Auth.identity(&p.cfg)), m.Cookie, sent.MAC1)
		if err != nil {
			continue
		}
		p.cookie, p.cookieAt = c, now
		dgs, err := datagrams(ex.init, a.peerMAC1Key(p), c)
		if err != nil {
			return
		}
		ex.sent = dgs
		a.log().Debug("keying: got a cookie; sending the INIT again", "peer", p.cfg.Name)
		a.send(ex.sent, p.outer) // the retransmission schedule goes on as before
		return
	}
	ex.bad = fmt.Errorf("%w: a COOKIE that does not open", ErrTampered)
}

// answerFromCache resends the reply to a retransmitted request.
func (a *Agent) answerFromCache(msg []byte, from netip.AddrPort, now time.Time) bool {
	r, ok := a.answered[sha256.Sum256(msg)]
	if !ok || !now.Before(r.until) {
		return false
	}
	a.stats.RepliesFromCache++
	a.send(r.dgs, from)
	return true
}

func (a *Agent) cacheReply(msg []byte, dgs [][]byte, until time.Time) {
	if len(a.answered) >= maxAnswered {
		var oldest [32]byte
		var at time.Time
		for k, r := range a.answered {
			if at.IsZero() || r.until.Before(at) {
				oldest, at = k, r.until
			}
		}
		delete(a.answered, oldest)
	}
	a.answered[sha256.Sum256(msg)] = cachedReply{dgs, until}
}

// refuse answers an INIT with ERROR. authKey is set when the INIT was
// authenticated (its MAC verified): the ERROR then carries a MAC and ends
// the initiator's attempt; otherwise the initiator treats it as a hint.
func (a *Agent) refuse(m *Message, msg []byte, from netip.AddrPort, p *peer, err error, authKey []byte, now time.Time) {
	a.stats.InitsRefused++
	name := ""
	if p != nil {
		name = p.cfg.Name
		if p.cur == nil || authKey != nil {
			// A refusal of an unauthenticated INIT for a keyed peer may
			// be anybody's: it is logged, not shown as the peer's state.
			p.lastErr = fmt.Errorf("refused INIT from %s (%v) at %v: %w", name, p.cfg.ULA, from, err)
		}
	}
	if ok, n := a.logs.allow("refuse "+name, now); ok {
		a.log().Warn("keying: refused INIT", "peer", name, "from", from, "authenticated", authKey != nil, "err", err, "suppressed", n)
	}
	// The ERROR is never longer than the INIT it answers, so a spoofed
	// INIT cannot make us an amplifier.
	text := safeText(err.Error())
	if room := len(msg) - headerLen - attrLen(2) - attrLen(macLen); len(text) > room {
		text = text[:max(room, 0)]
	}
	e := &Message{Type: MsgError, Mode: a.cfg.Auth.Mode(), Exchange: m.Exchange, Code: codeFor(err), Text: text}
	var b []byte
	var merr error
	if authKey != nil {
		b, merr = sign(e, authKey, msg)
	} else {
		b, merr = e.Marshal()
	}
	if merr != nil || len(b) > len(msg) || len(b) > MaxDatagramLen {
		return
	}
	// Not cached: a refusal may be transient (a peer not known yet), and
	// answering a retransmission again costs no more than the first time.
	a.send([][]byte{b}, from)
}

// refuseOldVersion answers a version 1 INIT with a version 1 ERROR its
// sender can read (code MALFORMED, a text that says what to do), never
// longer than the INIT, rate-limited per source.
func (a *Agent) refuseOldVersion(d datagram, now time.Time) {
	a.stats.OldVersion++
	if len(d.b) < headerLen || MsgType(d.b[1]) != MsgInit || !a.limiter.allow(d.from.Addr(), now) {
		return
	}
	ula := v1ULA(d.b)
	err := fmt.Errorf("%w: %v sent a keying version 1 INIT (btmm without forward secrecy); this host speaks version %d only: upgrade btmmd on that host",
		ErrVersion, d.from, Version)
	name := ""
	if p := a.peers[ula]; p != nil {
		name = p.cfg.Name
		p.lastErr = err
	}
	if ok, n := a.logs.allow("v1", now); ok {
		a.log().Warn("keying: refused INIT of an old peer", "peer", name, "ula", ula, "from", d.from, "err", err, "suppressed", n)
	}
	text := fmt.Sprintf("keying version 1 refused: this host speaks version %d (forward secrecy); upgrade btmmd", Version)
	if room := len(d.b) - headerLen - attrLen(2); len(text) > room {
		text = text[:max(room, 0)]
	}
	b := append([]byte{1, byte(MsgError), d.b[2], 0}, d.b[4:headerLen]...)
	b = append(b, attrError)
	b = binary.BigEndian.AppendUint16(b, uint16(2+len(text)))
	b = binary.BigEndian.AppendUint16(b, uint16(CodeMalformed))
	b = append(b, text...)
	if len(b) > len(d.b) {
		return // never more bytes than we got
	}
	a.send([][]byte{b}, d.from)
}

// v1ULA finds the ULA attribute (type 3, as in version 2) of a version 1 message.
func v1ULA(b []byte) netip.Addr {
	for p := b[min(len(b), headerLen):]; len(p) >= 3; {
		t, n := p[0], int(binary.BigEndian.Uint16(p[1:3]))
		if len(p) < 3+n {
			break
		}
		if t == attrULA && n == 16 {
			return netip.AddrFrom16([16]byte(p[3:19]))
		}
		p = p[3+n:]
	}
	return netip.Addr{}
}

func (a *Agent) onInit(m *Message, msg []byte, from netip.AddrPort, now time.Time) {
	if a.answerFromCache(msg, from, now) {
		return
	}
	p := a.peers[m.ULA]
	if p == nil {
		a.refuse(m, msg, from, nil, fmt.Errorf("%w: no peer has ULA %v", ErrUnknownPeer, m.ULA), nil, now)
		return
	}
	if authKey, err := a.acceptInit(p, m, msg, from, now); err != nil {
		a.refuse(m, msg, from, p, err, authKey, now)
	}
}

// acceptInit runs the responder's side of an exchange. An error refuses
// the INIT; authKey is the ERROR's MAC key once the INIT is authenticated.
func (a *Agent) acceptInit(p *peer, m *Message, msg []byte, from netip.AddrPort, now time.Time) (authKey []byte, err error) {
	if m.Mode != a.cfg.Auth.Mode() {
		return nil, fmt.Errorf("%w: peer uses %v, we use %v", ErrWrongMode, m.Mode, a.cfg.Auth.Mode())
	}
	if m.Nonce == nil || m.SPI < 0x100 || len(m.Proposal) == 0 || m.X25519 == nil || len(m.MLKEM) != mlkemEKLen || m.MAC == nil {
		return nil, fmt.Errorf("%w: INIT lacks nonce, SPI, proposal, key shares or MAC", ErrMalformed)
	}
	// keepOurs: we answer the peer's INIT and keep our own exchange too.
	keepOurs := false
	if ex := p.ex; ex != nil && ex.phase != waitAck {
		// Both sides started at once: the lower ULA stays initiator,
		// unless the peer's INIT comes from another address than the one
		// we send to. Then the peer may be behind a NAT that has no
		// mapping for where we send: our INITs may never arrive, and
		// waiting for ours would starve the exchange that can work (its
		// answer goes back the way it came). So we answer theirs, but
		// keep ours: both INITs may have arrived (each side reaches the
		// other another way, e.g. one through a relay), and the higher
		// ULA has then dropped its own exchange, so ours is the one that
		// completes. Whichever completes first wins (onConfirm, or
		// completeInitiator clearing the unconfirmed answer).
		if a.cfg.ULA.Less(p.cfg.ULA) && from == p.outer {
			a.log().Debug("keying: simultaneous start, keeping our exchange", "peer", p.cfg.Name)
			return nil, nil
		}
		keepOurs = a.cfg.ULA.Less(p.cfg.ULA)
		a.log().Debug("keying: simultaneous start, answering the peer's", "peer", p.cfg.Name, "keeping_ours", keepOurs)
	}
	// Authentication first (Kerberos: decrypting the ticket and the
	// authenticator; the INIT's MAC): no key exchange work for strangers.
	acc, err := a.cfg.Auth.accept(m, p.cfg, now, a.pol)
	if err != nil {
		return nil, err
	}
	defer acc.erase()
	if err := verify(m, msg, initKey(acc.secret, m.Nonce, MsgInit), nil); err != nil {
		return nil, err
	}
	authKey = initKey(acc.secret, m.Nonce, MsgError)
	if err := a.replay.check(acc.replayKey, acc.sent, now); err != nil {
		return authKey, err
	}
	var c CipherID
	for _, want := range a.proposal {
		if slices.Contains(m.Proposal, want) {
			c = want
			break
		}
	}
	if c == 0 {
		return authKey, fmt.Errorf("%w: peer offers %v, we accept %v", ErrNoProposal, m.Proposal, a.proposal)
	}
	xR, ct, dh, kem, err := respond(m.X25519, m.MLKEM)
	if err != nil {
		return authKey, err
	}
	respKey, session := schedule(acc.secret, dh, kem, msg)
	nonceR, spiR := randBytes(nonceLen), a.allocSPI()
	resp := &Message{Type: MsgResp, Mode: m.Mode, Exchange: m.Exchange, Nonce: nonceR, SPI: spiR, ULA: a.cfg.ULA,
		Cipher: c, APRep: acc.reply, X25519: xR, MLKEM: ct}
	if !acc.ticketEnd.IsZero() {
		resp.TicketEnd = acc.ticketEnd.Unix()
	}
	rb, err := sign(resp, respKey, msg)
	clear(respKey)
	if err != nil {
		session(nil)
		return authKey, fmt.Errorf("build RESP: %w", err)
	}
	mat := session(rb)
	i2r, r2i, err := mat.espKeys(c, m.SPI, spiR, m.ULA, a.cfg.ULA)
	if err != nil {
		return authKey, err
	}
	if a.tamper != nil {
		rb = a.tamper(MsgResp, bytes.Clone(rb))
	}
	dgs, err := datagrams(rb, nil, nil)
	if err != nil {
		return authKey, fmt.Errorf("build RESP: %w", err)
	}
	k := &keyed{
		out:      controlplane.SA{SPI: m.SPI, Cipher: ciphers[c].name, Key: r2i},
		in:       controlplane.SA{SPI: spiR, Cipher: ciphers[c].name, Key: i2r},
		mat:      mat,
		exchange: m.Exchange,
		at:       now, ticketEnd: acc.ticketEnd,
		until: now.Add(a.cfg.ResponseCacheTTL),
	}
	k.hardEnd, k.hardWhy = a.hardEnd(now, acc.authTime, acc.ticketEnd)
	k.rekeyAt = a.rekeyAt(now, acc.ticketStart, acc.ticketEnd, k.hardEnd, 9)
	// Make before break: the new inbound SA goes in now, beside the
	// current ones; our outbound SA, the peer's outer address and the
	// current pair change only when the initiator CONFIRMs (a replayed or
	// forged INIT can therefore not disturb a working tunnel).
	prev := p.pending
	p.pending = k
	if err := a.reinstall(p); err != nil {
		p.pending = prev
		return authKey, fmt.Errorf("%w: %w", ErrInstall, err)
	}
	if err := a.replay.add(acc.replayKey, acc.replayUntil, now); err != nil {
		a.log().Error("keying: cannot record the INIT in the replay cache; refusing it", "err", err)
		p.pending = prev
		a.reinstall(p)
		return authKey, fmt.Errorf("%w: replay cache: %w", ErrInstall, err)
	}
	if ex := p.ex; ex != nil && ex.phase != waitAck && !keepOurs {
		a.endExchange(p) // we lost the simultaneous start
	}
	p.nextAttempt = time.Time{}
	p.backoff = 0
	a.stats.InitsAccepted++
	a.cacheReply(msg, dgs, now.Add(a.cfg.ResponseCacheTTL))
	a.send(dgs, from)
	a.log().Info("keying: answered INIT", "peer", p.cfg.Name, "ula", p.cfg.ULA, "from", from, "in", k.in, "rekey", p.cur != nil)
	return nil, nil
}

func (a *Agent) onResp(p *peer, m *Message, msg []byte, from netip.AddrPort, now time.Time) {
	ex := p.ex
	if err := a.completeInitiator(p, ex, m, msg, from, now); err != nil {
		if errors.Is(err, ErrTampered) || errors.Is(err, ErrMalformed) {
			// Could be forged: keep waiting for the genuine RESP.
			if ok, n := a.logs.allow("resp "+p.cfg.ULA.String(), now); ok {
				a.log().Warn("keying: ignored bad RESP", "peer", p.cfg.Name, "from", from, "err", err, "suppressed", n)
			}
			ex.bad = err
			return
		}
		a.fail(p, err)
	}
}

func (a *Agent) completeInitiator(p *peer, ex *exchange, m *Message, msg []byte, from netip.AddrPort, now time.Time) error {
	if m.Mode != a.cfg.Auth.Mode() || m.Nonce == nil || m.SPI < 0x100 || m.Cipher == 0 || m.ULA != p.cfg.ULA ||
		m.X25519 == nil || len(m.MLKEM) != mlkemCTLen {
		return fmt.Errorf("%w: RESP lacks nonce, SPI, cipher, key shares or the peer's ULA", ErrMalformed)
	}
	dh, kem, err := ex.eph.finish(m.X25519, m.MLKEM)
	if err != nil {
		return err
	}
	respKey, session := schedule(ex.auth.secret, dh, kem, ex.init)
	err = verify(m, msg, respKey, ex.init)
	clear(respKey)
	if err != nil {
		session(nil)
		return err
	}
	mat := session(msg)
	if err := ex.auth.checkReply(m); err != nil {
		return err
	}
	if !slices.Contains(a.proposal, m.Cipher) {
		return fmt.Errorf("%w: responder chose %d, not in our proposal", ErrNoProposal, m.Cipher)
	}
	i2r, r2i, err := mat.espKeys(m.Cipher, ex.spi, m.SPI, a.cfg.ULA, p.cfg.ULA)
	if err != nil {
		return err
	}
	// The ephemeral keys and the subkey have done their work.
	ex.eph.erase()
	ex.eph = nil
	name := ciphers[m.Cipher].name
	k := &keyed{
		out: controlplane.SA{SPI: m.SPI, Cipher: name, Key: i2r}, in: controlplane.SA{SPI: ex.spi, Cipher: name, Key: r2i},
		mat: mat, exchange: ex.id, initiator: true, at: now, ticketEnd: ex.auth.ticketEnd,
	}
	k.hardEnd, k.hardWhy = a.hardEnd(now, ex.auth.authTime, ex.auth.ticketEnd)
	k.rekeyAt = a.rekeyAt(now, ex.auth.ticketStart, ex.auth.ticketEnd, k.hardEnd, 8)
	ex.auth.erase()
	saved := *p
	if p.cur != nil {
		p.held = append(slices.Clone(p.held), heldSA{p.cur.in, now.Add(a.cfg.PrevInHold + a.cfg.ResponseCacheTTL)})
	}
	// The RESP is authenticated: its source is where the peer is now.
	p.cur, p.pending, p.outer = k, nil, from
	if err := a.reinstall(p); err != nil {
		p.held, p.cur, p.pending, p.outer = saved.held, saved.cur, saved.pending, saved.outer
		return fmt.Errorf("%w: %w", ErrInstall, err)
	}
	p.lastErr, p.backoff = nil, 0
	c := &Message{Type: MsgConfirm, Mode: m.Mode, Exchange: ex.id, SPI: ex.spi, ULA: a.cfg.ULA}
	cb, err := sign(c, mat.macKey(MsgConfirm), nil)
	if err != nil {
		return fmt.Errorf("build CONFIRM: %w", err)
	}
	ex.result, ex.sent, ex.phase = k, [][]byte{cb}, waitAck
	a.transmit(p, now, true)
	a.log().Info("keying: keyed as initiator", "peer", p.cfg.Name, "ula", p.cfg.ULA, "out", k.out, "in", k.in, "hard_end", k.hardEnd)
	return nil
}

func (a *Agent) onConfirm(m *Message, d datagram, now time.Time) {
	if a.answerFromCache(d.b, d.from, now) {
		return
	}
	p := a.peers[m.ULA]
	if p == nil {
		return
	}
	k := p.pending
	if k == nil || k.exchange != m.Exchange {
		if p.cur != nil && !p.cur.initiator && p.cur.exchange == m.Exchange {
			k = p.cur // a CONFIRM repeated after the cache forgot our ACK
		} else {
			return
		}
	}
	if err := verify(m, d.b, k.mat.macKey(MsgConfirm), nil); err != nil {
		if ok, n := a.logs.allow("confirm "+p.cfg.ULA.String(), now); ok {
			a.log().Warn("keying: ignored bad CONFIRM", "peer", p.cfg.Name, "from", d.from, "err", err, "suppressed", n)
		}
		return
	}
	if k == p.pending {
		// Confirmed: the initiator has the new pair. Switch our outbound
		// SA, keep the old inbound one for packets in flight, and follow
		// the peer to the address this authenticated message came from.
		saved := *p
		if p.cur != nil {
			p.held = append(slices.Clone(p.held), heldSA{p.cur.in, now.Add(a.cfg.PrevInHold + a.cfg.ResponseCacheTTL)})
		}
		p.cur, p.pending, p.outer = k, nil, d.from
		k.until = time.Time{}
		if err := a.reinstall(p); err != nil {
			p.held, p.cur, p.pending, p.outer = saved.held, saved.cur, saved.pending, saved.outer
			a.log().Warn("keying: switching to the confirmed SAs failed", "peer", p.cfg.Name, "err", err)
			return // no ACK: the initiator retransmits, we retry
		}
		if ex := p.ex; ex != nil && ex.phase != waitAck {
			a.endExchange(p) // the one we kept after a simultaneous start: the peer's won
		}
		p.lastErr = nil
		a.log().Info("keying: keyed as responder (confirmed)", "peer", p.cfg.Name, "ula", p.cfg.ULA, "out", k.out, "outer", p.outer, "hard_end", k.hardEnd)
	}
	ack := &Message{Type: MsgAck, Mode: m.Mode, Exchange: m.Exchange, ULA: a.cfg.ULA}
	ab, err := sign(ack, k.mat.macKey(MsgAck), nil)
	if err != nil {
		return
	}
	a.cacheReply(d.b, [][]byte{ab}, now.Add(a.cfg.ResponseCacheTTL))
	a.send([][]byte{ab}, d.from)
}

func (a *Agent) onAck(m *Message, d datagram) {
	p := a.peers[m.ULA]
	if p == nil || p.ex == nil || p.ex.id != m.Exchange || p.ex.phase != waitAck {
		return
	}
	if err := verify(m, d.b, p.ex.result.mat.macKey(MsgAck), nil); err != nil {
		a.log().Debug("keying: ignored bad ACK", "peer", p.cfg.Name, "err", err)
		return
	}
	// The responder now sends with the new key: the old inbound SA only
	// has to catch packets already in flight.
	now := a.cfg.Now()
	for i := range p.held {
		p.held[i].until = earliest(p.held[i].until, now.Add(a.cfg.PrevInHold))
	}
	a.endExchange(p)
	p.backoff = 0
}

func (a *Agent) onDelete(m *Message, d datagram) {
	p := a.peers[m.ULA]
	if p == nil {
		return
	}
	var k *keyed
	for _, c := range []*keyed{p.cur, p.pending} {
		if c != nil && c.exchange == m.Exchange {
			k = c
		}
	}
	if k == nil {
		return
	}
	if err := verify(m, d.b, k.mat.macKey(MsgDelete), nil); err != nil {
		a.log().Debug("keying: ignored bad DELETE", "peer", p.cfg.Name, "from", d.from, "err", err)
		return
	}
	a.log().Info("keying: peer deleted its SAs", "peer", p.cfg.Name, "ula", p.cfg.ULA)
	a.endExchange(p)
	a.remove(p)
	p.backoff = 0
	a.backoff(p, a.cfg.Now()) // it is going away: try again later, with backoff
}

// onError handles a refusal. Authenticated (its MAC is keyed from our INIT's
// secret, so only the real responder could make it), it ends the attempt;
// otherwise it is a hint kept for the error shown if the attempt times out.
func (a *Agent) onError(m *Message, d datagram) {
	p := a.exchangeFor(m.Exchange, waitResp)
	if p == nil {
		return
	}
	ex := p.ex
	refusal := fmt.Errorf("%w: %w: %s says %q", ErrPeerRefused, sentinelFor(m.Code), d.from, safeText(m.Text))
	if m.MAC != nil && verify(m, d.b, initKey(ex.auth.secret, ex.nonce, MsgError), ex.init) == nil {
		a.fail(p, refusal)
		return
	}
	ex.hint = refusal
	a.log().Debug("keying: unauthenticated ERROR (a hint; retransmitting)", "peer", p.cfg.Name, "from", d.from, "err", refusal)
}

// desired is the dataplane's view of p: the current pair (or, before the
// first CONFIRM, the pending one) with every inbound SA still accepted.
func (a *Agent) desired(p *peer) (controlplane.Peer, bool) {
	out, in := p.cur, p.cur
	if p.pending != nil {
		in = p.pending
		if out == nil {
			out = p.pending // first keying: we may send once the initiator has it
		}
	}
	if in == nil {
		return controlplane.Peer{}, false
	}
	var prev []controlplane.SA
	if p.pending != nil && p.cur != nil {
		prev = append(prev, p.cur.in)
	}
	for _, h := range p.held {
		if h.sa.SPI != in.in.SPI && !slices.ContainsFunc(prev, func(s controlplane.SA) bool { return s.SPI == h.sa.SPI }) {
			prev = append(prev, h.sa)
		}
	}
	return controlplane.Peer{Name: p.cfg.Name, ULA: p.cfg.ULA, Outer: p.outer, Out: out.out, In: in.in, PrevIn: prev}, true
}

// reinstall hands the dataplane p's current desired key set (or removes it).
func (a *Agent) reinstall(p *peer) error {
	pe, ok := a.desired(p)
	if !ok {
		a.remove(p)
		return nil
	}
	if p.installed != nil && samePeer(*p.installed, pe) {
		return nil
	}
	if err := a.cfg.Installer.Install(a.ctx, pe); err != nil {
		a.log().Warn("keying: install failed", "peer", p.cfg.Name, "err", err)
		return err
	}
	p.installed = &pe
	return nil
}

func samePeer(x, y controlplane.Peer) bool {
	sa := func(a, b controlplane.SA) bool {
		return a.SPI == b.SPI && a.Cipher == b.Cipher && bytes.Equal(a.Key, b.Key)
	}
	return x.Name == y.Name && x.ULA == y.ULA && x.Outer == y.Outer && sa(x.Out, y.Out) && sa(x.In, y.In) &&
		slices.EqualFunc(x.PrevIn, y.PrevIn, sa)
}

// remove forgets p's SAs and has the Installer drop them.
func (a *Agent) remove(p *peer) {
	p.cur, p.pending, p.held, p.moved = nil, nil, nil, nil
	if p.installed == nil {
		return
	}
	p.installed = nil
	ctx, cancel := context.WithTimeout(context.WithoutCancel(a.ctx), 5*time.Second)
	defer cancel()
	if err := a.cfg.Installer.Remove(ctx, p.cfg.ULA); err != nil {
		a.log().Warn("keying: remove failed", "peer", p.cfg.Name, "err", err)
	}
}

func (a *Agent) sendDelete(p *peer) {
	k := p.cur
	if k == nil {
		return
	}
	m := &Message{Type: MsgDelete, Mode: a.cfg.Auth.Mode(), Exchange: k.exchange, ULA: a.cfg.ULA,
		SPIs: []uint32{k.in.SPI, k.out.SPI}}
	b, err := sign(m, k.mat.macKey(MsgDelete), nil)
	if err != nil {
		return
	}
	a.send([][]byte{b}, p.outer)
}

func (a *Agent) shutdown() {
	for _, p := range a.peers {
		a.sendDelete(p)
		a.endExchange(p)
		a.remove(p)
	}
}

// safeText bounds and cleans text that came from the network or from an
// error before it is logged or sent.
func safeText(s string) string {
	if len(s) > 300 {
		s = s[:300]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, s)
}

// logLimiter lets one log line of a kind through every interval and counts
// the ones it holds back (reported with the next). Kinds are fixed strings
// or per-peer, so the map stays small.
type logLimiter struct {
	every      time.Duration
	last       map[string]time.Time
	suppressed map[string]int
}

func (l *logLimiter) allow(kind string, now time.Time) (bool, int) {
	if l.last == nil {
		l.last, l.suppressed = map[string]time.Time{}, map[string]int{}
	}
	if t, ok := l.last[kind]; ok && now.Sub(t) < l.every {
		l.suppressed[kind]++
		return false, 0
	}
	n := l.suppressed[kind]
	l.last[kind] = now
	delete(l.suppressed, kind)
	if len(l.last) > 1024 {
		for k, t := range l.last {
			if now.Sub(t) >= l.every {
				delete(l.last, k)
			}
		}
	}
	return true, n
}
