package llqclient

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"github.com/btmm/btmm/dns/llq"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/btmm/btmm/dns/register"
	"github.com/miekg/dns"
)

var llqErrNames = map[uint16]string{
	llq.ErrServFull: "SERV-FULL", llq.ErrStatic: "STATIC", llq.ErrFormat: "FORMAT-ERR",
	llq.ErrNoSuchLLQ: "NO-SUCH-LLQ", llq.ErrBadVers: "BAD-VERS", llq.ErrUnknown: "UNKNOWN-ERR",
}

// Defaults.
const (
	DefaultLease        = time.Hour
	DefaultPollInterval = 5 * time.Minute
	DefaultRetryLLQ     = 10 * time.Minute
	DefaultTimeout      = 2 * time.Second
	DefaultTries        = 3
	DefaultKeepAlive    = 25 * time.Second
)

// Config configures a Client.
type Config struct {
	// Server is the LLQ server "host:port"; empty discovers it by SRV
	// _dns-llq._udp.<Domain> through Resolver.
	Server   string
	Domain   string
	Resolver string
	Key      *register.Key // TSIG key; nil sends unsigned
	// AcceptUnsigned believes unsigned answers and events from this server
	// (one that never signs, such as Apple's dnsextd); the policy is
	// dns/register's ResponsePolicy, the same as the registrar's.
	AcceptUnsigned bool

	Lease        time.Duration // requested LLQ lease; default DefaultLease
	PollInterval time.Duration // fallback polling; default DefaultPollInterval
	RetryLLQ     time.Duration // while polling, try LLQ again after; default DefaultRetryLLQ
	Timeout      time.Duration // first retransmission; default DefaultTimeout
	Tries        int           // transmissions per request; default DefaultTries
	Rand         *rand.Rand    // jitter; nil uses the runtime's random numbers
	// TLS, when set, prefers DNS over TLS (_dns-llq-tls._tcp, RFC 7858):
	// the LLQs then live on one TLS connection, and are set up again on a
	// new one when it breaks.
	TLS *tls.Config

	// KeepAlive bounds the silence on a UDP transport: when nothing was
	// sent for this long, the established LLQ due for refresh first is
	// refreshed now, so that a NAT in front of this host keeps the
	// mapping the server's events come back through (a Linux NAT forgets
	// a quiet UDP flow after 30 s, 120 s once it has lasted a while; Apple's
	// mDNSResponder maps its LLQ port with NAT-PMP for the same reason).
	// Default DefaultKeepAlive with the built-in UDP transport; none over
	// TLS (a TCP mapping lives for days) or with a caller's Dial unless
	// set; negative disables it.
	KeepAlive time.Duration

	// Dial opens the transport; nil dials UDP (or TLS). Tests use it for
	// an in-memory responder.
	Dial func(ctx context.Context, server string) (Transport, error)
}

// Transport carries whole DNS messages to and from one server.
type Transport interface {
	Send(msg []byte) error
	// Recv blocks for the next message. Any error it returns means the
	// transport is finished (after Close: an error wrapping net.ErrClosed);
	// transient errors (ICMP port unreachable on UDP) are not returned.
	Recv() ([]byte, error)
	Close() error
}

// Mode of one watched question.
type Mode string

// Modes.
const (
	ModeSetup   Mode = "setup"   // four-way handshake in progress
	ModeLLQ     Mode = "llq"     // established, changes are pushed
	ModePolling Mode = "polling" // LLQ unavailable: plain queries every PollInterval
)

// QueryStatus describes one watched question.
type QueryStatus struct {
	Name    string
	Type    string
	Mode    Mode
	Reason  string        // why polling, "" otherwise
	Lease   time.Duration // granted LLQ lease
	Answers int
	Setups  int // completed four-way setups (more than one: re-established)
}

// Status is a snapshot for btmmctl.
type Status struct {
	Server    string
	Queries   []QueryStatus
	Polling   int    // questions in polling mode
	LastError string // transport level
	// AcceptUnsigned: unsigned answers and events are believed
	// (Config.AcceptUnsigned).
	AcceptUnsigned bool `json:",omitempty"`
}

// Client keeps LLQs on a set of questions. See the package comment.
type Client struct {
	cfg Config
	log *slog.Logger

	// Commands from other goroutines, never blocking the caller (a
	// callback may call Watch from the Run goroutine itself).
	cmdMu     sync.Mutex
	cmdQ      []func()
	cmdNotify chan struct{}

	mu     sync.Mutex
	status Status

	// Owned by the Run goroutine.
	conn   Transport
	server string
	// silent is set when a discovered server stopped answering: serve
	// returns so that Run discovers a server again (with replicas, the
	// discovery SRVs name the live ones).
	silent bool
	// rebinding is set by Rebind: the transport was closed on purpose, so
	// its end is no failure (logged as info, set up again at once).
	rebinding bool
	// stale are the LLQs left on the server by a Rebind, cancelled from
	// the new socket once it is up.
	stale   []staleLLQ
	queries map[qkey]*query
	pending map[uint16]*query
	// keepAlive is the KeepAlive in force on conn; lastSend is when
	// anything was last sent on it.
	keepAlive time.Duration
	lastSend  time.Time
}

type qkey struct {
	name  string
	qtype uint16
}

type state int

const (
	stSetup1  state = iota // initial request sent, waiting for the challenge
	stSetup2               // challenge response sent, waiting for ACK + answers
	stActive               // established; refreshing when refreshing is true
	stPolling              // plain queries
)

// staleLLQ is an LLQ that a Rebind left on the server.
type staleLLQ struct {
	q  *query
	id uint64
}

type query struct {
	key   qkey
	fns   map[int]func([]dns.RR)
	st    state
	id    uint64
	lease time.Duration
	msgID uint16
	// reqMACs are the TSIG MACs of every transmission of the request
	// q waits for, the latest last: each retransmission is signed anew,
	// and under load the answer to an earlier one comes after the next
	// went out (it answers the same question and is as authentic).
	reqMACs []string
	tries   int
	due     time.Time // next retransmission, refresh or poll
	waiting bool      // a request is outstanding
	setups  int
	reason  string
	dropped string    // why the last answer to q was not believed
	llqAt   time.Time // while polling: when to try LLQ again

	lastReq   *dns.Msg
	answers   map[string]dns.RR
	delivered bool
	// early holds the records of events that came for this LLQ before
	// its setup's ACK (stSetup2): the server registers the LLQ, and may
	// send events for changes after the ACK's answers were taken, before
	// the ACK itself leaves. They are applied on top of the ACK's answers.
	early []dns.RR
}

// New checks cfg; it does no I/O.
func New(cfg Config, log *slog.Logger) (*Client, error) {
	if cfg.Server == "" && (cfg.Domain == "" || cfg.Resolver == "") {
		return nil, errors.New("llqclient: need Server, or Domain and Resolver for SRV discovery")
	}
	if cfg.Lease == 0 {
		cfg.Lease = DefaultLease
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.RetryLLQ == 0 {
		cfg.RetryLLQ = DefaultRetryLLQ
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Tries == 0 {
		cfg.Tries = DefaultTries
	}
	if cfg.Lease < time.Second || cfg.PollInterval < time.Second || cfg.Tries < 1 {
		return nil, fmt.Errorf("llqclient: lease %v / poll interval %v / tries %d out of range", cfg.Lease, cfg.PollInterval, cfg.Tries)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Client{
		cfg:       cfg,
		log:       log,
		cmdNotify: make(chan struct{}, 1),
		queries:   map[qkey]*query{},
		pending:   map[uint16]*query{},
	}, nil
}

var watchSeq struct {
	sync.Mutex
	n int
}

// Watch keeps an LLQ on name/qtype and calls fn with the complete answer
// whenever it changes (see the package comment). Several watchers of one
// question share its LLQ. The returned function stops this watcher; the
// LLQ is cancelled when its last watcher stops. Watch may be called before
// or during Run, from any goroutine.
func (c *Client) Watch(name string, qtype uint16, fn func([]dns.RR)) (stop func()) {
	k := qkey{dns.CanonicalName(name), qtype}
	watchSeq.Lock()
	watchSeq.n++
	n := watchSeq.n
	watchSeq.Unlock()
	c.do(func() { c.addWatch(k, n, fn) })
	var once sync.Once
	return func() { once.Do(func() { c.do(func() { c.removeWatch(k, n) }) }) }
}

// Rebind drops the transport and sets every LLQ up again on a new one. Call
// it when this host's address or its NAT's public address changed: the
// server sends events to the address it last heard from, so LLQs set up from
// the old one would go silent until their next refresh.
func (c *Client) Rebind() {
	c.do(func() {
		if c.conn != nil {
			c.log.Info("llq: our address changed, setting the LLQs up again")
			c.rebinding = true
			c.conn.Close()
		}
	})
}

func (c *Client) do(f func()) {
	c.cmdMu.Lock()
	c.cmdQ = append(c.cmdQ, f)
	c.cmdMu.Unlock()
	select {
	case c.cmdNotify <- struct{}{}:
	default:
	}
}

func (c *Client) runCmds() {
	for {
		c.cmdMu.Lock()
		q := c.cmdQ
		c.cmdQ = nil
		c.cmdMu.Unlock()
		if len(q) == 0 {
			return
		}
		for _, f := range q {
			f()
		}
	}
}

// Status returns a snapshot.
func (c *Client) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.status
	s.Queries = slices.Clone(s.Queries)
	return s
}

// Run connects and serves the watched questions until ctx ends; then it
// cancels the LLQs (lease 0) and closes the socket. It returns nil on a
// clean shutdown.
func (c *Client) Run(ctx context.Context) error {
	defer func() {
		if c.conn != nil {
			c.cancelAll()
			c.conn.Close()
		}
		c.publishStatus()
	}()
	failures := 0
	for {
		if err := c.connect(ctx); err != nil {
			failures++
			c.setError(err)
			wait := register.Backoff(failures, time.Minute, c.rand())
			c.log.Warn("llq: cannot reach server", "err", err, "retry_in", wait)
			if !c.idle(ctx, wait) {
				return nil
			}
			continue
		}
		failures = 0
		err := c.serve(ctx)
		c.conn.Close()
		c.conn = nil
		if ctx.Err() != nil {
			return nil
		}
		// A stream transport (TLS) broke, or a discovered server went
		// silent: every LLQ lived there. After Rebind that is the plan,
		// not a failure: no warning, no error in the status, no backoff.
		for _, q := range c.queries {
			if c.rebinding && q.st == stActive && q.id != 0 {
				// Still live on the server until its lease ends: cancel
				// it from the new socket (the server matches the ID and
				// key, not the address), or every move would leave a
				// set behind until the server's per-key limit answers
				// SERV-FULL.
				c.stale = append(c.stale, staleLLQ{q, q.id})
			}
			delete(c.pending, q.msgID)
			q.waiting, q.due, q.st, q.id = false, time.Time{}, stSetup1, 0
		}
		if c.rebinding {
			c.rebinding = false
			c.log.Debug("llq: transport closed for the rebind", "err", err)
			continue
		}
		c.setError(err)
		c.log.Warn("llq: connection lost, reconnecting", "err", err)
		if !c.idle(ctx, register.Backoff(1, time.Minute, c.rand())) {
			return nil
		}
	}
}

// idle waits d while still taking Watch/stop commands; false when ctx ended.
func (c *Client) idle(ctx context.Context, d time.Duration) bool {
	c.publishStatus()
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			return true
		case <-c.cmdNotify:
			c.runCmds()
		}
	}
}

// serve runs the LLQs on c.conn until ctx ends (nil) or the transport fails.
func (c *Client) serve(ctx context.Context) error {
	in := make(chan []byte, 64)
	rerr := make(chan error, 1)
	stop := make(chan struct{})
	readerDone := make(chan struct{})
	conn := c.conn
	go func() {
		defer close(readerDone)
		for {
			b, err := conn.Recv()
			if err != nil {
				rerr <- err
				return
			}
			select {
			case in <- b:
			case <-stop:
				return
			}
		}
	}()
	defer func() {
		close(stop)
		if ctx.Err() != nil {
			c.cancelAll() // while the socket is still open
		}
		conn.Close()
		<-readerDone
	}()
	for _, st := range c.stale {
		c.send(st.q, c.llqMsg(st.q, llq.OpRefresh, st.id, 0), false)
	}
	c.stale = nil
	for _, q := range c.queries {
		c.startSetup(q)
	}
	c.runCmds() // watches added from now on start their own setup
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	c.lastSend = time.Now()
	for {
		c.publishStatus()
		d, ok := c.nextDue()
		if ka, kok := c.keepAliveDue(); kok && (!ok || ka.Before(d)) {
			d, ok = ka, true
		}
		if ok {
			timer.Reset(max(time.Until(d), 0))
		} else {
			timer.Stop()
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-rerr:
			return fmt.Errorf("llqclient: receive from %s: %w", c.server, err)
		case <-c.cmdNotify:
			c.runCmds()
		case b := <-in:
			c.handle(b)
		case <-timer.C:
			now := time.Now()
			c.keepAliveNow(now)
			c.fire(now)
			if c.silent {
				c.silent = false
				return fmt.Errorf("llqclient: %s does not answer LLQ setups", c.server)
			}
		}
	}
}

func (c *Client) connect(ctx context.Context) error {
	server, network := c.cfg.Server, "udp"
	tlsName := "" // a discovered server's SRV target: what its certificate must name
	if c.cfg.TLS != nil {
		network = "tcp-tls"
	}
	if server == "" {
		var services []string
		if c.cfg.TLS != nil {
			services = append(services, "_dns-llq-tls._tcp.")
		}
		services = append(services, "_dns-llq._udp.")
		var errs []error
		for _, svc := range services {
			s, target, err := register.DiscoverSRV(ctx, c.cfg.Resolver, svc+dns.Fqdn(c.cfg.Domain), c.cfg.Timeout)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			server, network, tlsName = s, "udp", target
			if strings.HasPrefix(svc, "_dns-llq-tls.") {
				network = "tcp-tls"
			}
			break
		}
		if server == "" {
			return fmt.Errorf("llqclient: discover server: %w", errors.Join(errs...))
		}
	}
	dial := c.cfg.Dial
	if dial == nil {
		dial = func(ctx context.Context, server string) (Transport, error) {
			if network == "tcp-tls" {
				return dialTLS(ctx, server, register.TLSFor(c.cfg.TLS, tlsName))
			}
			return dialUDP(ctx, server)
		}
	}
	conn, err := dial(ctx, server)
	if err != nil {
		return fmt.Errorf("llqclient: dial %s: %w", server, err)
	}
	c.conn, c.server = conn, server
	c.keepAlive = c.cfg.KeepAlive
	if c.keepAlive == 0 && c.cfg.Dial == nil && network == "udp" {
		c.keepAlive = DefaultKeepAlive
	}
	c.log.Info("llq: using server", "server", server, "net", network)
	return nil
}

func (c *Client) rand() func() float64 {
	if c.cfg.Rand != nil {
		return c.cfg.Rand.Float64
	}
	return rand.Float64
}

// RefreshAfter is when to refresh an LLQ granted for lease: about half of it,
// ±10% jitter (RFC 8764 §7 asks for a refresh before expiry; half leaves
// room for two retransmission rounds).
func RefreshAfter(lease time.Duration, rnd func() float64) time.Duration {
	return lease*4/10 + time.Duration(rnd()*float64(lease/5))
}

func (c *Client) pollAfter() time.Duration {
	p := c.cfg.PollInterval
	return p*9/10 + time.Duration(c.rand()()*float64(p/5))
}

func (c *Client) addWatch(k qkey, n int, fn func([]dns.RR)) {
	q, ok := c.queries[k]
	if !ok {
		q = &query{key: k, fns: map[int]func([]dns.RR){}, answers: map[string]dns.RR{}}
		c.queries[k] = q
		if c.conn != nil {
			c.startSetup(q)
		}
	}
	q.fns[n] = fn
	if q.delivered {
		fn(q.snapshot())
	}
}

func (c *Client) removeWatch(k qkey, n int) {
	q, ok := c.queries[k]
	if !ok {
		return
	}
	delete(q.fns, n)
	if len(q.fns) > 0 {
		return
	}
	if q.st == stActive && c.conn != nil {
		c.send(q, c.llqMsg(q, llq.OpRefresh, q.id, 0), false)
	}
	delete(c.pending, q.msgID)
	delete(c.queries, k)
}

func (c *Client) cancelAll() {
	if c.conn == nil {
		return
	}
	for _, q := range c.queries {
		if q.st == stActive {
			c.send(q, c.llqMsg(q, llq.OpRefresh, q.id, 0), false)
		}
	}
}

func (c *Client) nextDue() (time.Time, bool) {
	var d time.Time
	for _, q := range c.queries {
		if !q.due.IsZero() && (d.IsZero() || q.due.Before(d)) {
			d = q.due
		}
	}
	return d, !d.IsZero()
}

// keepAliveDue is when the transport has been quiet for KeepAlive, if
// there is an established LLQ to refresh then.
func (c *Client) keepAliveDue() (time.Time, bool) {
	if c.keepAlive <= 0 || c.earliestActive() == nil {
		return time.Time{}, false
	}
	return c.lastSend.Add(c.keepAlive), true
}

// keepAliveNow brings the next refresh forward to now when the transport
// has been quiet for KeepAlive.
func (c *Client) keepAliveNow(now time.Time) {
	if t, ok := c.keepAliveDue(); ok && !now.Before(t) {
		c.earliestActive().due = now
	}
}

// earliestActive is the established, idle LLQ whose refresh is due first.
func (c *Client) earliestActive() *query {
	var e *query
	for _, q := range c.queries {
		if q.st == stActive && !q.waiting && (e == nil || q.due.Before(e.due)) {
			e = q
		}
	}
	return e
}

// fire runs every action that is due.
func (c *Client) fire(now time.Time) {
	for _, q := range c.queries {
		if q.due.IsZero() || q.due.After(now) {
			continue
		}
		switch {
		case q.waiting && q.tries < c.cfg.Tries:
			c.retransmit(q)
		case q.waiting && (q.st == stSetup1 || q.st == stSetup2) && c.cfg.Server == "":
			c.silent = true // discovered: look for another server first
		case q.waiting && (q.st == stSetup1 || q.st == stSetup2):
			reason := "no answer to LLQ setup"
			if q.dropped != "" {
				reason = q.dropped // answers came, but could not be believed
			}
			c.toPolling(q, reason)
		case q.waiting && q.st == stActive:
			c.log.Info("llq: refresh unanswered, setting up again", "name", q.key.name, "type", dns.TypeToString[q.key.qtype])
			c.startSetup(q)
		case q.waiting && q.st == stPolling:
			q.waiting = false
			q.due = now.Add(c.pollAfter())
		case q.st == stActive:
			q.tries = 0
			c.send(q, c.llqMsg(q, llq.OpRefresh, q.id, c.cfg.Lease), true)
		case q.st == stPolling && !now.Before(q.llqAt):
			c.startSetup(q)
		case q.st == stPolling:
			q.tries = 0
			m := new(dns.Msg)
			m.SetQuestion(q.key.name, q.key.qtype)
			m.RecursionDesired = false
			c.send(q, m, true)
		}
	}
}

func (c *Client) startSetup(q *query) {
	delete(c.pending, q.msgID)
	q.st, q.id, q.tries, q.dropped, q.early = stSetup1, 0, 0, "", nil
	c.send(q, c.llqMsg(q, llq.OpSetup, 0, c.cfg.Lease), true)
}

func (c *Client) toPolling(q *query, reason string) {
	if q.st != stPolling || q.reason != reason {
		c.log.Warn("llq: unavailable, polling", "name", q.key.name, "type", dns.TypeToString[q.key.qtype], "reason", reason, "every", c.cfg.PollInterval)
	}
	delete(c.pending, q.msgID)
	q.st, q.reason, q.waiting, q.id, q.early = stPolling, reason, false, 0, nil
	now := time.Now()
	q.llqAt = now.Add(c.cfg.RetryLLQ)
	q.due = now // poll at once
}

func (c *Client) llqMsg(q *query, op uint16, id uint64, lease time.Duration) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(q.key.name, q.key.qtype)
	m.RecursionDesired = false
	llq.SetOption(m, dns.EDNS0_LLQ{Code: dns.EDNS0LLQ, Version: llq.Version, Opcode: op, Id: id, LeaseLife: uint32(lease / time.Second)})
	return m
}

// send signs and sends m for q. With track, it is the request q waits for.
func (c *Client) send(q *query, m *dns.Msg, track bool) {
	if track {
		delete(c.pending, q.msgID)
		q.msgID = m.Id
		q.tries = 1
		q.waiting = true
		q.due = time.Now().Add(c.cfg.Timeout)
		c.pending[m.Id] = q
	}
	b, mac, err := c.pack(m, "")
	if err != nil {
		c.log.Error("llq: pack request", "err", err)
		return
	}
	if track {
		q.reqMACs = []string{mac}
		q.lastReq = m
	}
	c.lastSend = time.Now()
	if err := c.conn.Send(b); err != nil {
		c.setError(fmt.Errorf("llqclient: send to %s: %w", c.server, err))
	}
}

func (c *Client) retransmit(q *query) {
	m := q.lastReq
	if m == nil {
		return
	}
	q.tries++
	q.due = time.Now().Add(c.cfg.Timeout << (q.tries - 1))
	b, mac, err := c.pack(m, "")
	if err != nil {
		return
	}
	q.reqMACs = append(q.reqMACs, mac)
	c.lastSend = time.Now()
	if err := c.conn.Send(b); err != nil {
		c.setError(fmt.Errorf("llqclient: send to %s: %w", c.server, err))
	}
}

func (c *Client) pack(m *dns.Msg, requestMAC string) ([]byte, string, error) {
	if c.cfg.Key == nil {
		b, err := m.Pack()
		return b, "", err
	}
	if t := m.IsTsig(); t != nil {
		m.Extra = m.Extra[:len(m.Extra)-1]
	}
	m.SetTsig(c.cfg.Key.Name, c.cfg.Key.Algorithm, 300, time.Now().Unix())
	return dns.TsigGenerateWithProvider(m, c.cfg.Key.Provider(), requestMAC, false)
}

// verify applies the response policy to an answer or event.
func (c *Client) verify(raw []byte, requestMAC string) error {
	return register.ResponsePolicy{AcceptUnsigned: c.cfg.AcceptUnsigned}.Check(c.cfg.Key, raw, requestMAC)
}

// verifyAnswer checks an answer against the MACs of the request's
// transmissions, latest first; the error is the latest's.
func (c *Client) verifyAnswer(raw []byte, macs []string) error {
	var first error
	for i := len(macs) - 1; i >= 0; i-- {
		err := c.verify(raw, macs[i])
		if err == nil {
			return nil
		}
		if first == nil {
			first = err
		}
	}
	if first == nil {
		first = c.verify(raw, "")
	}
	return first
}

// droppedReason is what the status says when answers are not believed.
func droppedReason(err error) string {
	switch {
	case errors.Is(err, register.ErrServerDoesNotSign):
		return "server does not sign its responses (accept_unsigned accepts them, for Apple's dnsextd)"
	case errors.Is(err, register.ErrKeyRefused):
		return err.Error()
	}
	return "answers fail TSIG verification"
}

// handle processes one message from the server.
func (c *Client) handle(raw []byte) {
	m := new(dns.Msg)
	if err := m.Unpack(raw); err != nil || !m.Response || len(m.Question) != 1 {
		return
	}
	o, hasLLQ := llq.Option(m)
	if hasLLQ && o.Opcode == llq.OpEvent {
		c.handleEvent(raw, m, o)
		return
	}
	q, ok := c.pending[m.Id]
	if !ok || !strings.EqualFold(m.Question[0].Name, q.key.name) || m.Question[0].Qtype != q.key.qtype {
		return
	}
	if err := c.verifyAnswer(raw, q.reqMACs); err != nil {
		if q.dropped == "" {
			c.log.Warn("llq: dropping an answer we cannot believe", "name", q.key.name, "err", err)
		}
		q.dropped = droppedReason(err)
		return
	}
	q.dropped = ""
	delete(c.pending, m.Id)
	q.waiting = false
	now := time.Now()
	if m.Rcode != dns.RcodeSuccess && m.Rcode != dns.RcodeNameError {
		c.toPolling(q, "server answered "+dns.RcodeToString[m.Rcode])
		q.due = now.Add(c.pollAfter())
		return
	}
	if q.st == stPolling {
		c.replace(q, m.Answer)
		q.due = now.Add(c.pollAfter())
		return
	}
	if !hasLLQ {
		c.replace(q, m.Answer)
		c.toPolling(q, "server does not support LLQ")
		q.due = now.Add(c.pollAfter())
		return
	}
	if o.Error != llq.ErrNoError {
		name := llqErrNames[o.Error]
		if name == "" {
			name = fmt.Sprintf("error %d", o.Error)
		}
		if o.Error == llq.ErrNoSuchLLQ && q.st == stActive {
			c.log.Info("llq: server lost our LLQ, setting up again", "name", q.key.name, "type", dns.TypeToString[q.key.qtype])
			c.startSetup(q)
			return
		}
		c.toPolling(q, "LLQ "+name)
		if o.Error == llq.ErrServFull && o.LeaseLife > 0 {
			q.llqAt = now.Add(time.Duration(o.LeaseLife) * time.Second)
		}
		return
	}
	switch {
	case q.st == stSetup1 && o.Opcode == llq.OpSetup && o.Id != 0:
		// Challenge: echo the ID (challenge response).
		q.id = o.Id
		q.st = stSetup2
		c.send(q, c.llqMsg(q, llq.OpSetup, q.id, time.Duration(o.LeaseLife)*time.Second), true)
	case q.st == stSetup2 && o.Opcode == llq.OpSetup && o.Id == q.id:
		q.st, q.reason, q.setups = stActive, "", q.setups+1
		q.lease = time.Duration(o.LeaseLife) * time.Second
		q.due = now.Add(RefreshAfter(q.lease, c.rand()))
		c.log.Debug("llq: established", "name", q.key.name, "type", dns.TypeToString[q.key.qtype], "lease", q.lease, "answers", len(m.Answer), "early_events", len(q.early))
		// The ACK's answers, then the changes whose events came before it.
		// (Replacing the answers with the ACK's alone undid those changes,
		// and their events, acknowledged, never come again: the change
		// stayed lost until the LLQ was set up again, as a refresh
		// carries no answers.)
		next := map[string]dns.RR{}
		for _, rr := range m.Answer {
			if q.matches(rr) && rr.Header().Ttl != llq.RemovedTTL {
				next[rrKey(rr)] = rr
			}
		}
		q.apply(next, q.early)
		q.early = nil
		c.set(q, next)
	case q.st == stActive && o.Opcode == llq.OpRefresh:
		q.lease = time.Duration(o.LeaseLife) * time.Second
		q.due = now.Add(RefreshAfter(q.lease, c.rand()))
	default:
		c.log.Debug("llq: unexpected response, setting up again", "name", q.key.name, "opcode", o.Opcode)
		c.startSetup(q)
	}
}

func (c *Client) handleEvent(raw []byte, m *dns.Msg, o *dns.EDNS0_LLQ) {
	var q *query
	for _, cand := range c.queries {
		if cand.id == o.Id && cand.id != 0 && (cand.st == stActive || cand.st == stSetup2) {
			q = cand
			break
		}
	}
	if q == nil {
		return // not ours (any more); the server gives up after its retransmissions
	}
	if err := c.verify(raw, ""); err != nil {
		c.log.Warn("llq: dropping an event we cannot believe", "name", q.key.name, "err", err)
		return
	}
	ack := new(dns.Msg)
	ack.Id = m.Id
	ack.Response = true
	ack.Question = []dns.Question{m.Question[0]}
	llq.SetOption(ack, dns.EDNS0_LLQ{Code: dns.EDNS0LLQ, Version: llq.Version, Opcode: llq.OpEvent, Id: o.Id})
	if b, _, err := c.pack(ack, ""); err == nil {
		c.lastSend = time.Now()
		if err := c.conn.Send(b); err != nil {
			c.setError(fmt.Errorf("llqclient: ack event: %w", err))
		}
	}
	if q.st == stSetup2 {
		// Before the setup's ACK: its answers may predate this change
		// (handle applies it on top of them).
		c.log.Debug("llq: event before the setup's ACK", "name", q.key.name, "type", dns.TypeToString[q.key.qtype], "records", len(m.Answer))
		q.early = append(q.early, m.Answer...)
		return
	}
	next := make(map[string]dns.RR, len(q.answers))
	for k, v := range q.answers {
		next[k] = v
	}
	q.apply(next, m.Answer)
	c.set(q, next)
}

// apply changes answers by an event's records, in order: a record with
// llq.RemovedTTL goes, any other is added.
func (q *query) apply(answers map[string]dns.RR, rrs []dns.RR) {
	for _, rr := range rrs {
		if !q.matches(rr) {
			continue
		}
		if rr.Header().Ttl == llq.RemovedTTL {
			delete(answers, rrKey(rr))
		} else {
			answers[rrKey(rr)] = rr
		}
	}
}

func (q *query) matches(rr dns.RR) bool {
	h := rr.Header()
	return strings.EqualFold(h.Name, q.key.name) && (h.Rrtype == q.key.qtype || q.key.qtype == dns.TypeANY)
}

func rrKey(rr dns.RR) string {
	c := dns.Copy(rr)
	c.Header().Ttl = 0
	c.Header().Name = strings.ToLower(c.Header().Name)
	return c.String()
}

func (c *Client) replace(q *query, rrs []dns.RR) {
	next := map[string]dns.RR{}
	for _, rr := range rrs {
		if q.matches(rr) && rr.Header().Ttl != llq.RemovedTTL {
			next[rrKey(rr)] = rr
		}
	}
	c.set(q, next)
}

func (c *Client) set(q *query, next map[string]dns.RR) {
	same := q.delivered && len(next) == len(q.answers)
	if same {
		for k := range next {
			if _, ok := q.answers[k]; !ok {
				same = false
				break
			}
		}
	}
	q.answers = next
	if same {
		return
	}
	q.delivered = true
	snap := q.snapshot()
	for _, fn := range q.fns {
		fn(snap)
	}
}

func (q *query) snapshot() []dns.RR {
	keys := make([]string, 0, len(q.answers))
	for k := range q.answers {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	out := make([]dns.RR, len(keys))
	for i, k := range keys {
		out[i] = dns.Copy(q.answers[k])
	}
	return out
}

func (c *Client) setError(err error) {
	c.mu.Lock()
	c.status.LastError = err.Error()
	c.mu.Unlock()
}

func (c *Client) publishStatus() {
	var qs []QueryStatus
	polling := 0
	for _, q := range c.queries {
		mode := ModeSetup
		switch q.st {
		case stActive:
			mode = ModeLLQ
		case stPolling:
			mode = ModePolling
			polling++
		}
		qs = append(qs, QueryStatus{Name: q.key.name, Type: dns.TypeToString[q.key.qtype], Mode: mode, Reason: q.reason, Lease: q.lease, Answers: len(q.answers), Setups: q.setups})
	}
	slices.SortFunc(qs, func(a, b QueryStatus) int { return strings.Compare(a.Name+"/"+a.Type, b.Name+"/"+b.Type) })
	c.mu.Lock()
	c.status.Server = c.server
	c.status.AcceptUnsigned = c.cfg.AcceptUnsigned
	c.status.Queries = qs
	c.status.Polling = polling
	c.mu.Unlock()
}

type udpTransport struct{ c *net.UDPConn }

func dialUDP(ctx context.Context, server string) (Transport, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "udp", server)
	if err != nil {
		return nil, err
	}
	return udpTransport{c.(*net.UDPConn)}, nil
}

func (t udpTransport) Send(b []byte) error { _, err := t.c.Write(b); return err }

func (t udpTransport) Recv() ([]byte, error) {
	b := make([]byte, 65535)
	for {
		n, err := t.c.Read(b)
		if err == nil {
			return b[:n], nil
		}
		if errors.Is(err, net.ErrClosed) {
			return nil, err
		}
		// ECONNREFUSED from an ICMP port unreachable while the server
		// restarts, and the like: the socket is still good.
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, err
		}
	}
}

func (t udpTransport) Close() error { return t.c.Close() }

// tlsTransport frames messages with the 2-byte length of RFC 1035 §4.2.2.
type tlsTransport struct {
	c  *tls.Conn
	mu sync.Mutex
}

func dialTLS(ctx context.Context, server string, cfg *tls.Config) (Transport, error) {
	d := tls.Dialer{Config: cfg}
	c, err := d.DialContext(ctx, "tcp", server)
	if err != nil {
		return nil, err
	}
	return &tlsTransport{c: c.(*tls.Conn)}, nil
}

func (t *tlsTransport) Send(b []byte) error {
	if len(b) > 0xffff {
		return fmt.Errorf("message of %d bytes too long for TCP framing", len(b))
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	_, err := t.c.Write(append([]byte{byte(len(b) >> 8), byte(len(b))}, b...))
	return err
}

func (t *tlsTransport) Recv() ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(t.c, l[:]); err != nil {
		return nil, err
	}
	b := make([]byte, int(l[0])<<8|int(l[1]))
	if _, err := io.ReadFull(t.c, b); err != nil {
		return nil, err
	}
	return b, nil
}

func (t *tlsTransport) Close() error { return t.c.Close() }
