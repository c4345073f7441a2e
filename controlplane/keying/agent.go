package keying

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/btmm/btmm/controlplane"
)

// PeerConfig is one of the user's other hosts to key with.
type PeerConfig struct {
	Name  string         // for logs and status
	ULA   netip.Addr     // the peer's ULA (RFC 6281 §6.3)
	Outer netip.AddrPort // where its tunnel port is reachable (from its SRV record)
	// Principal is the peer's host principal (Kerberos mode), e.g.
	// "host/b.example.com" or "host/b.example.com@EXAMPLE.COM"; see
	// DefaultPrincipal. Unused in PSK mode.
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
	// has not), and both rekey at 80%/90% of the Kerberos ticket's life.
	SALifetime time.Duration
	// PrevInHold is how long an old inbound SA stays after a rekey (30 s).
	PrevInHold time.Duration
	// RetransmitBase, RetransmitMax, Retransmits: the first retransmission
	// after 500 ms, doubling up to 8 s, 6 retransmissions, then the attempt fails.
	RetransmitBase, RetransmitMax time.Duration
	Retransmits                   int
	// RetryBase, RetryMax: after a failed attempt, wait 2 s doubling up to 5 min.
	RetryBase, RetryMax time.Duration
	// ResponseCacheTTL: how long an answered INIT/CONFIRM is answered again
	// from cache when retransmitted (default: the whole retransmission span).
	ResponseCacheTTL time.Duration
}

func (c *Config) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.SALifetime, time.Hour)
	def(&c.PrevInHold, 30*time.Second)
	def(&c.RetransmitBase, 500*time.Millisecond)
	def(&c.RetransmitMax, 8*time.Second)
	def(&c.RetryBase, 2*time.Second)
	def(&c.RetryMax, 5*time.Minute)
	if c.Retransmits <= 0 {
		c.Retransmits = 6
	}
	var span time.Duration
	for i, rto := 0, c.RetransmitBase; i <= c.Retransmits; i, rto = i+1, min(2*rto, c.RetransmitMax) {
		span += rto
	}
	def(&c.ResponseCacheTTL, span+time.Second)
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

	cmds     chan func()
	authDone chan authResult
	rx       chan datagram
	done     chan struct{}

	// owned by Run
	peers    map[netip.Addr]*peer
	replay   map[string]time.Time
	answered map[[32]byte]cachedReply
	ctx      context.Context
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
	b     []byte
	to    netip.AddrPort
	until time.Time
}

type keyed struct {
	out, in   controlplane.SA
	mat       material
	exchange  [8]byte
	initiator bool
	at        time.Time
	ticketEnd time.Time
	rekeyAt   time.Time
	confirmed bool // responder: the initiator confirmed it installed these
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

type exchange struct {
	id     [8]byte
	phase  phase
	nonce  []byte
	spi    uint32
	auth   *initiation
	init   []byte // the INIT as sent (transcript for the RESP MAC)
	sent   []byte // what is retransmitted (INIT or CONFIRM)
	tries  int
	rto    time.Duration
	nextTx time.Time
	result *keyed
	bad    error // why the last answer to this exchange was ignored
}

type peer struct {
	cfg          PeerConfig
	outer        netip.AddrPort
	cur          *keyed
	installedOut controlplane.SA // the Out the dataplane has (may lag cur.out until CONFIRM)
	held         []heldSA
	ex           *exchange
	moved        *announcement // our MOVED awaiting its MOVED_ACK
	nextAttempt  time.Time
	backoff      time.Duration
	lastErr      error
}

// New checks cfg and returns an Agent; call Run to start it.
func New(cfg Config) (*Agent, error) {
	cfg.setDefaults()
	if !cfg.ULA.Is6() || !netip.MustParsePrefix("fc00::/7").Contains(cfg.ULA) {
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
		cmds:     make(chan func()),
		authDone: make(chan authResult),
		rx:       make(chan datagram),
		done:     make(chan struct{}),
		peers:    map[netip.Addr]*peer{},
		replay:   map[string]time.Time{},
		answered: map[[32]byte]cachedReply{},
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
	LastError   error
}

// SetPeers replaces the set of peers (level-triggered). New peers are keyed
// at once; removed peers get a DELETE and their SAs are removed. It returns
// after the agent has applied the change, or with ctx's error.
func (a *Agent) SetPeers(ctx context.Context, peers []PeerConfig) error {
	for _, p := range peers {
		if !p.ULA.Is6() || p.ULA == a.cfg.ULA {
			return fmt.Errorf("keying: peer %q: bad ULA %v", p.Name, p.ULA)
		}
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
			s := PeerStatus{Name: p.cfg.Name, ULA: p.cfg.ULA, Outer: p.outer, LastError: p.lastErr}
			if k := p.cur; k != nil {
				s.Established = true
				s.Out, s.In = k.out, k.in
				s.Out.Key, s.In.Key = nil, nil
				s.Initiator, s.At, s.RekeyAt = k.initiator, k.at, k.rekeyAt
			}
			out = append(out, s)
		}
	})
	slices.SortFunc(out, func(x, y PeerStatus) int { return x.ULA.Compare(y.ULA) })
	return out, err
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
	for {
		b := make([]byte, MaxMessageLen+1)
		n, from, err := a.cfg.Transport.ReadKeying(b)
		if err != nil {
			select {
			case <-a.done:
			default:
				a.cfg.Logger.Debug("keying transport closed", "err", err)
			}
			return
		}
		select {
		case a.rx <- datagram{b[:n], from}:
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
		moved := p.outer != c.Outer && c.Outer != p.cfg.Outer
		p.cfg = c
		if moved {
			p.outer = c.Outer
			if p.cur != nil {
				a.install(p, p.installedOut) // the dataplane moves the SAs (no rekey)
			}
		}
	}
	for ula, p := range a.peers {
		if !want[ula] {
			a.sendDelete(p)
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
	for k, until := range a.replay {
		if !now.Before(until) {
			delete(a.replay, k)
		}
	}
	for _, p := range a.peers {
		// Old inbound SAs past their hold time.
		if n := len(p.held); n > 0 {
			p.held = slices.DeleteFunc(p.held, func(h heldSA) bool { return !now.Before(h.until) })
			if len(p.held) != n && p.cur != nil {
				a.install(p, p.installedOut)
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
			if ex.phase != waitAuth {
				if !now.Before(ex.nextTx) {
					a.retransmit(p, now)
				}
				if p.ex != nil {
					next = earliest(next, p.ex.nextTx)
				}
			}
			continue
		}
		// A retry after a failure waits out its backoff even when the
		// rekey time has passed; otherwise the next rekey is due.
		due := p.nextAttempt
		if due.IsZero() && p.cur != nil {
			due = p.cur.rekeyAt
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

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// allocSPI picks a random inbound SPI not in use by any of our SAs.
func (a *Agent) allocSPI() uint32 {
	used := map[uint32]bool{}
	for _, p := range a.peers {
		if p.cur != nil {
			used[p.cur.in.SPI], used[p.cur.out.SPI] = true, true
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

// start begins an exchange as initiator: authentication (which may talk to
// the KDC) runs on its own goroutine and reports to onAuth.
func (a *Agent) start(p *peer, now time.Time) {
	ex := &exchange{id: [8]byte(randBytes(8)), phase: waitAuth, nonce: randBytes(nonceLen), spi: a.allocSPI()}
	p.ex = ex
	p.nextAttempt = time.Time{}
	cfg, ula, id := p.cfg, p.cfg.ULA, ex.id
	a.log().Debug("keying: starting exchange", "peer", cfg.Name, "ula", ula, "rekey", p.cur != nil)
	go func() {
		res, err := a.cfg.Auth.initiate(a.ctx, cfg, now)
		select {
		case a.authDone <- authResult{ula, id, res, err}:
		case <-a.done:
		}
	}()
}

func (a *Agent) onAuth(r authResult) {
	p := a.peers[r.ula]
	if p == nil || p.ex == nil || p.ex.id != r.id || p.ex.phase != waitAuth {
		return // abandoned meanwhile (tie-break, peer removed)
	}
	if r.err != nil {
		a.fail(p, r.err)
		return
	}
	ex := p.ex
	ex.auth = r.res
	m := &Message{Type: MsgInit, Mode: a.cfg.Auth.Mode(), Exchange: ex.id, Nonce: ex.nonce, SPI: ex.spi,
		ULA: a.cfg.ULA, Proposal: a.proposal, Time: r.res.time, APReq: r.res.token}
	b, err := sign(m, initMACKey(r.res.secret, ex.nonce), nil)
	if err != nil {
		a.fail(p, fmt.Errorf("build INIT: %w", err))
		return
	}
	ex.init, ex.sent, ex.phase = b, b, waitResp
	a.transmit(p, a.cfg.Now(), true)
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
	if err := a.cfg.Transport.WriteKeying(ex.sent, p.outer); err != nil {
		a.log().Debug("keying: send failed", "peer", p.cfg.Name, "err", err)
	}
}

func (a *Agent) retransmit(p *peer, now time.Time) {
	ex := p.ex
	if ex.tries >= a.cfg.Retransmits {
		if ex.phase == waitAck {
			// Our SAs are installed; the responder may still send with the
			// old key, which PrevIn accepts until its hold ends. Rekey soon.
			a.log().Warn("keying: no ACK for CONFIRM; rekeying soon", "peer", p.cfg.Name)
			p.ex = nil
			a.backoff(p, now)
			return
		}
		if ex.bad != nil {
			a.fail(p, fmt.Errorf("%w: no valid answer from %v after %d transmissions; last answer ignored: %w", ErrTimeout, p.outer, ex.tries+1, ex.bad))
			return
		}
		a.fail(p, fmt.Errorf("%w: no answer from %v after %d transmissions", ErrTimeout, p.outer, ex.tries+1))
		return
	}
	a.log().Debug("keying: retransmit", "peer", p.cfg.Name, "phase", ex.phase, "try", ex.tries+1)
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
	p.ex = nil
	p.lastErr = fmt.Errorf("keying with %s (%v): %w", p.cfg.Name, p.cfg.ULA, err)
	a.backoff(p, now)
	a.log().Warn("keying: exchange failed", "peer", p.cfg.Name, "ula", p.cfg.ULA, "err", err, "retry_in", p.backoff)
}

func (a *Agent) onDatagram(d datagram) {
	var m Message
	if err := m.Unmarshal(d.b); err != nil {
		a.log().Debug("keying: dropped datagram", "from", d.from, "err", err)
		return
	}
	switch m.Type {
	case MsgInit:
		a.onInit(&m, d)
	case MsgResp:
		a.onResp(&m, d)
	case MsgConfirm:
		a.onConfirm(&m, d)
	case MsgAck:
		a.onAck(&m, d)
	case MsgDelete:
		a.onDelete(&m, d)
	case MsgError:
		a.onError(&m, d)
	case MsgMoved:
		a.onMoved(&m, d)
	case MsgMovedAck:
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
	if err := a.cfg.Transport.WriteKeying(b, p.outer); err != nil {
		a.log().Debug("keying: send MOVED failed", "peer", p.cfg.Name, "err", err)
	}
}

// onMoved follows a keyed peer to the address its MOVED came from. The MOVED
// must verify under the current SA pair and carry a number above any
// accepted before; the source address itself is not authenticated (a NAT
// rewrites it), as with ESP's own NAT-T mapping updates.
func (a *Agent) onMoved(m *Message, d datagram) {
	p := a.peers[m.ULA]
	if p == nil || p.cur == nil || p.cur.exchange != m.Exchange || m.Seq == 0 {
		a.log().Debug("keying: MOVED for no current SA pair", "ula", m.ULA, "from", d.from)
		return
	}
	k := p.cur
	if err := verify(m, d.b, k.mat.macKey(MsgMoved), nil); err != nil {
		a.log().Warn("keying: ignored bad MOVED", "peer", p.cfg.Name, "from", d.from, "err", err)
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
			if err := a.installKeyed(p, k, p.installedOut); err != nil {
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
	if err := a.cfg.Transport.WriteKeying(b, d.from); err != nil {
		a.log().Debug("keying: send MOVED_ACK failed", "peer", p.cfg.Name, "err", err)
	}
}

func (a *Agent) onMovedAck(m *Message, d datagram) {
	p := a.peers[m.ULA]
	if p == nil || p.moved == nil || p.cur == nil || p.cur.exchange != m.Exchange || p.moved.exchange != m.Exchange || m.Seq != p.moved.seq {
		return
	}
	if err := verify(m, d.b, p.cur.mat.macKey(MsgMovedAck), p.moved.sent); err != nil {
		a.log().Warn("keying: ignored bad MOVED_ACK", "peer", p.cfg.Name, "from", d.from, "err", err)
		return
	}
	a.log().Debug("keying: peer acknowledged our move", "peer", p.cfg.Name, "seq", m.Seq)
	p.moved = nil
}

// answerFromCache resends the reply to a retransmitted request.
func (a *Agent) answerFromCache(raw []byte, from netip.AddrPort) bool {
	r, ok := a.answered[sha256.Sum256(raw)]
	if !ok || !a.cfg.Now().Before(r.until) {
		return false
	}
	if err := a.cfg.Transport.WriteKeying(r.b, from); err != nil {
		a.log().Debug("keying: resend failed", "err", err)
	}
	return true
}

func (a *Agent) refuse(m *Message, raw []byte, from netip.AddrPort, p *peer, err error) {
	name := ""
	if p != nil {
		name = p.cfg.Name
		p.lastErr = fmt.Errorf("refused INIT from %s (%v) at %v: %w", name, p.cfg.ULA, from, err)
	}
	a.log().Warn("keying: refused INIT", "peer", name, "from", from, "err", err)
	// The ERROR is never longer than the INIT it answers, so a spoofed
	// INIT cannot make us an amplifier.
	text := safeText(err.Error())
	if room := len(raw) - headerLen - 5; len(text) > room {
		text = text[:max(room, 0)]
	}
	e := &Message{Type: MsgError, Mode: a.cfg.Auth.Mode(), Exchange: m.Exchange, Code: codeFor(err), Text: text}
	if b, merr := e.Marshal(); merr == nil && len(b) <= len(raw) {
		a.cfg.Transport.WriteKeying(b, from)
	}
}

func (a *Agent) onInit(m *Message, d datagram) {
	if a.answerFromCache(d.b, d.from) {
		return
	}
	now := a.cfg.Now()
	p := a.peers[m.ULA]
	if p == nil {
		a.refuse(m, d.b, d.from, nil, fmt.Errorf("%w: no peer has ULA %v", ErrUnknownPeer, m.ULA))
		return
	}
	if err := a.acceptInit(p, m, d, now); err != nil {
		a.refuse(m, d.b, d.from, p, err)
	}
}

func (a *Agent) acceptInit(p *peer, m *Message, d datagram, now time.Time) error {
	if m.Mode != a.cfg.Auth.Mode() {
		return fmt.Errorf("%w: peer uses %v, we use %v", ErrWrongMode, m.Mode, a.cfg.Auth.Mode())
	}
	if m.Nonce == nil || m.SPI < 0x100 || len(m.Proposal) == 0 {
		return fmt.Errorf("%w: INIT lacks nonce, SPI or proposal", ErrMalformed)
	}
	if ex := p.ex; ex != nil && ex.phase != waitAck {
		// Both sides started at once: the lower ULA stays initiator.
		if a.cfg.ULA.Less(p.cfg.ULA) {
			a.log().Debug("keying: simultaneous start, keeping our exchange", "peer", p.cfg.Name)
			return nil
		}
		a.log().Debug("keying: simultaneous start, answering the peer's", "peer", p.cfg.Name)
	}
	acc, err := a.cfg.Auth.accept(m, p.cfg, now)
	if err != nil {
		return err
	}
	if err := verify(m, d.b, initMACKey(acc.secret, m.Nonce), nil); err != nil {
		return err
	}
	if until, ok := a.replay[acc.replayKey]; ok && now.Before(until) {
		return fmt.Errorf("%w: this INIT was accepted before", ErrReplay)
	}
	a.replay[acc.replayKey] = acc.replayUntil
	var c CipherID
	for _, want := range a.proposal {
		if slices.Contains(m.Proposal, want) {
			c = want
			break
		}
	}
	if c == 0 {
		return fmt.Errorf("%w: peer offers %v, we accept %v", ErrNoProposal, m.Proposal, a.proposal)
	}
	nonceR, spiR := randBytes(nonceLen), a.allocSPI()
	mat := newMaterial(acc.secret, m.Nonce, nonceR)
	i2r, r2i, err := mat.espKeys(c, m.SPI, spiR, m.ULA, a.cfg.ULA)
	if err != nil {
		return err
	}
	k := &keyed{
		out:      controlplane.SA{SPI: m.SPI, Cipher: ciphers[c].name, Key: r2i},
		in:       controlplane.SA{SPI: spiR, Cipher: ciphers[c].name, Key: i2r},
		mat:      mat,
		exchange: m.Exchange,
		at:       now, ticketEnd: acc.ticketEnd,
	}
	k.rekeyAt = a.rekeyAt(now, acc.ticketStart, acc.ticketEnd, 9)
	resp := &Message{Type: MsgResp, Mode: m.Mode, Exchange: m.Exchange, Nonce: nonceR, SPI: spiR, ULA: a.cfg.ULA,
		Cipher: c, APRep: acc.reply}
	if !acc.ticketEnd.IsZero() {
		resp.TicketEnd = acc.ticketEnd.Unix()
	}
	rb, err := sign(resp, mat.macKey(MsgResp), d.b)
	if err != nil {
		return fmt.Errorf("build RESP: %w", err)
	}
	// Make before break: the new inbound SA goes in now; on a rekey the
	// outbound SA stays the old one until the initiator CONFIRMs it has the
	// new inbound SA, so nothing we send is dropped.
	old := p.cur
	installedOut := k.out
	var held []heldSA
	if old != nil {
		installedOut = p.installedOut
		held = append(slices.Clone(p.held), heldSA{old.in, now.Add(a.cfg.PrevInHold + a.cfg.ResponseCacheTTL)})
	} else {
		k.confirmed = true
	}
	outer := p.outer
	p.outer = d.from
	prevHeld := p.held
	p.held = held
	if err := a.installKeyed(p, k, installedOut); err != nil {
		p.outer, p.held = outer, prevHeld
		delete(a.replay, acc.replayKey) // nothing happened: the initiator may retry
		return fmt.Errorf("%w: %w", ErrInstall, err)
	}
	p.cur = k
	p.ex = nil
	p.nextAttempt = time.Time{}
	p.backoff, p.lastErr = 0, nil
	a.answered[sha256.Sum256(d.b)] = cachedReply{rb, d.from, now.Add(a.cfg.ResponseCacheTTL)}
	if err := a.cfg.Transport.WriteKeying(rb, d.from); err != nil {
		a.log().Debug("keying: send RESP failed", "err", err)
	}
	a.log().Info("keying: keyed as responder", "peer", p.cfg.Name, "ula", p.cfg.ULA, "out", k.out, "in", k.in, "rekey", old != nil)
	return nil
}

// rekeyAt is when an SA pair made at now is rekeyed: tenths (8 for the
// initiator, 9 for the responder) of the SA lifetime and of the ticket's.
func (a *Agent) rekeyAt(now, ticketStart, ticketEnd time.Time, tenths int64) time.Time {
	t := now.Add(a.cfg.SALifetime * time.Duration(tenths) / 10)
	if !ticketEnd.IsZero() {
		if ticketStart.IsZero() || ticketStart.After(now) {
			ticketStart = now
		}
		t = earliest(t, ticketStart.Add(ticketEnd.Sub(ticketStart)*time.Duration(tenths)/10))
	}
	return t
}

func (a *Agent) onResp(m *Message, d datagram) {
	var p *peer
	for _, q := range a.peers {
		if q.ex != nil && q.ex.id == m.Exchange {
			p = q
		}
	}
	if p == nil {
		return // not ours, or a duplicate after we moved on
	}
	ex := p.ex
	if ex.phase == waitAck {
		// Our CONFIRM crossed a retransmitted RESP: resend it.
		if err := a.cfg.Transport.WriteKeying(ex.sent, p.outer); err != nil {
			a.log().Debug("keying: resend CONFIRM failed", "err", err)
		}
		return
	}
	if ex.phase != waitResp {
		return
	}
	now := a.cfg.Now()
	if err := a.completeInitiator(p, ex, m, d, now); err != nil {
		if errors.Is(err, ErrTampered) || errors.Is(err, ErrMalformed) {
			// Could be forged: keep waiting for the genuine RESP.
			a.log().Warn("keying: ignored bad RESP", "peer", p.cfg.Name, "from", d.from, "err", err)
			ex.bad = err
			return
		}
		a.fail(p, err)
	}
}

func (a *Agent) completeInitiator(p *peer, ex *exchange, m *Message, d datagram, now time.Time) error {
	if m.Mode != a.cfg.Auth.Mode() || m.Nonce == nil || m.SPI < 0x100 || m.Cipher == 0 || m.ULA != p.cfg.ULA {
		return fmt.Errorf("%w: RESP lacks nonce, SPI, cipher or the peer's ULA", ErrMalformed)
	}
	mat := newMaterial(ex.auth.secret, ex.nonce, m.Nonce)
	if err := verify(m, d.b, mat.macKey(MsgResp), ex.init); err != nil {
		return err
	}
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
	name := ciphers[m.Cipher].name
	k := &keyed{
		out: controlplane.SA{SPI: m.SPI, Cipher: name, Key: i2r}, in: controlplane.SA{SPI: ex.spi, Cipher: name, Key: r2i},
		mat: mat, exchange: ex.id, initiator: true, at: now, ticketEnd: ex.auth.ticketEnd, confirmed: true,
	}
	k.rekeyAt = a.rekeyAt(now, ex.auth.ticketStart, ex.auth.ticketEnd, 8)
	prevHeld := p.held
	if p.cur != nil {
		p.held = append(slices.Clone(p.held), heldSA{p.cur.in, now.Add(a.cfg.PrevInHold + a.cfg.ResponseCacheTTL)})
	}
	outer := p.outer
	p.outer = d.from
	if err := a.installKeyed(p, k, k.out); err != nil {
		p.held, p.outer = prevHeld, outer
		return fmt.Errorf("%w: %w", ErrInstall, err)
	}
	p.cur = k
	p.lastErr, p.backoff = nil, 0
	c := &Message{Type: MsgConfirm, Mode: m.Mode, Exchange: ex.id, SPI: ex.spi, ULA: a.cfg.ULA}
	cb, err := sign(c, mat.macKey(MsgConfirm), nil)
	if err != nil {
		return fmt.Errorf("build CONFIRM: %w", err)
	}
	ex.result, ex.sent, ex.phase = k, cb, waitAck
	a.transmit(p, now, true)
	a.log().Info("keying: keyed as initiator", "peer", p.cfg.Name, "ula", p.cfg.ULA, "out", k.out, "in", k.in)
	return nil
}

func (a *Agent) onConfirm(m *Message, d datagram) {
	if a.answerFromCache(d.b, d.from) {
		return
	}
	p := a.peers[m.ULA]
	if p == nil || p.cur == nil || p.cur.initiator || p.cur.exchange != m.Exchange {
		return
	}
	k := p.cur
	if err := verify(m, d.b, k.mat.macKey(MsgConfirm), nil); err != nil {
		a.log().Warn("keying: ignored bad CONFIRM", "peer", p.cfg.Name, "from", d.from, "err", err)
		return
	}
	now := a.cfg.Now()
	if !k.confirmed {
		if err := a.installKeyed(p, k, k.out); err != nil {
			a.log().Warn("keying: switching to the new outbound SA failed", "peer", p.cfg.Name, "err", err)
			return // no ACK: the initiator retransmits, we retry
		}
		k.confirmed = true
		a.log().Info("keying: switched outbound SA", "peer", p.cfg.Name, "out", k.out)
	}
	ack := &Message{Type: MsgAck, Mode: m.Mode, Exchange: m.Exchange, ULA: a.cfg.ULA}
	ab, err := sign(ack, k.mat.macKey(MsgAck), nil)
	if err != nil {
		return
	}
	a.answered[sha256.Sum256(d.b)] = cachedReply{ab, d.from, now.Add(a.cfg.ResponseCacheTTL)}
	a.cfg.Transport.WriteKeying(ab, d.from)
}

func (a *Agent) onAck(m *Message, d datagram) {
	p := a.peers[m.ULA]
	if p == nil || p.ex == nil || p.ex.id != m.Exchange || p.ex.phase != waitAck {
		return
	}
	if err := verify(m, d.b, p.ex.result.mat.macKey(MsgAck), nil); err != nil {
		a.log().Warn("keying: ignored bad ACK", "peer", p.cfg.Name, "err", err)
		return
	}
	// The responder now sends with the new key: the old inbound SA only
	// has to catch packets already in flight.
	now := a.cfg.Now()
	for i := range p.held {
		p.held[i].until = earliest(p.held[i].until, now.Add(a.cfg.PrevInHold))
	}
	p.ex = nil
	p.backoff = 0
}

func (a *Agent) onDelete(m *Message, d datagram) {
	p := a.peers[m.ULA]
	if p == nil || p.cur == nil || p.cur.exchange != m.Exchange {
		return
	}
	if err := verify(m, d.b, p.cur.mat.macKey(MsgDelete), nil); err != nil {
		a.log().Warn("keying: ignored bad DELETE", "peer", p.cfg.Name, "from", d.from, "err", err)
		return
	}
	a.log().Info("keying: peer deleted its SAs", "peer", p.cfg.Name, "ula", p.cfg.ULA)
	a.remove(p)
	p.ex = nil
	p.backoff = 0
	a.backoff(p, a.cfg.Now()) // it is going away: try again later, with backoff
}

func (a *Agent) onError(m *Message, d datagram) {
	for _, p := range a.peers {
		if p.ex != nil && p.ex.id == m.Exchange && p.ex.phase == waitResp {
			// Unauthenticated: it ends this attempt (a retry follows with
			// backoff) but changes no SA.
			a.fail(p, fmt.Errorf("%w: %w: %s says %q", ErrPeerRefused, sentinelFor(m.Code), d.from, safeText(m.Text)))
			return
		}
	}
}

// installKeyed hands the dataplane k with out as the outbound SA.
func (a *Agent) installKeyed(p *peer, k *keyed, out controlplane.SA) error {
	var prev []controlplane.SA
	for _, h := range p.held {
		if h.sa.SPI != k.in.SPI {
			prev = append(prev, h.sa)
		}
	}
	pe := controlplane.Peer{Name: p.cfg.Name, ULA: p.cfg.ULA, Outer: p.outer, Out: out, In: k.in, PrevIn: prev}
	if err := a.cfg.Installer.Install(a.ctx, pe); err != nil {
		return err
	}
	p.installedOut = out
	return nil
}

func (a *Agent) install(p *peer, out controlplane.SA) {
	if err := a.installKeyed(p, p.cur, out); err != nil {
		a.log().Warn("keying: install failed", "peer", p.cfg.Name, "err", err)
	}
}

func (a *Agent) remove(p *peer) {
	if p.cur == nil && len(p.held) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(a.ctx), 5*time.Second)
	defer cancel()
	if err := a.cfg.Installer.Remove(ctx, p.cfg.ULA); err != nil {
		a.log().Warn("keying: remove failed", "peer", p.cfg.Name, "err", err)
	}
	p.cur, p.held, p.installedOut, p.moved = nil, nil, controlplane.SA{}, nil
}

func (a *Agent) sendDelete(p *peer) {
	if p.cur == nil {
		return
	}
	m := &Message{Type: MsgDelete, Mode: a.cfg.Auth.Mode(), Exchange: p.cur.exchange, ULA: a.cfg.ULA,
		SPIs: []uint32{p.cur.in.SPI, p.cur.out.SPI}}
	b, err := sign(m, p.cur.mat.macKey(MsgDelete), nil)
	if err != nil {
		return
	}
	if err := a.cfg.Transport.WriteKeying(b, p.outer); err != nil {
		a.log().Debug("keying: send DELETE failed", "peer", p.cfg.Name, "err", err)
	}
}

func (a *Agent) shutdown() {
	for _, p := range a.peers {
		a.sendDelete(p)
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
