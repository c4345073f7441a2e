// Package llq implements the server side of DNS Long-Lived Queries (RFC
// 8764) for btmm-dnsd: the four-way setup (request, challenge carrying a
// fresh LLQ-ID, challenge response, ACK with the current answers), lease
// refresh and cancel, and gratuitous event responses carrying added and
// removed RRs (removals with TTL 0xFFFFFFFF, RFC 8764 §6.2), retransmitted
// over UDP until acknowledged — three transmissions in all with exponential
// backoff — after which the LLQ is deleted.
//
// The challenge is stateless: the LLQ-ID is the issue time (high 32 bits)
// and a keyed MAC of the time, client, question and TSIG key (low 32 bits),
// so a request whose challenge is never answered allocates nothing. Over
// TCP/TLS there is no challenge: the first response is already the ACK with
// the answers (a following challenge response is ACKed again).
//
// The wire option itself is miekg/dns's EDNS0_LLQ; this package adds the
// constants and the table. Events are driven by store changes (Table.Changed).
package llq

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/btmm/btmm/dns/store"
	"github.com/miekg/dns"
)

// LLQ option values (RFC 8764 §5.1, §5.2).
const (
	Version = 1

	OpSetup   = 1
	OpRefresh = 2
	OpEvent   = 3

	ErrNoError   = 0
	ErrServFull  = 1
	ErrStatic    = 2
	ErrFormat    = 3
	ErrNoSuchLLQ = 4
	ErrBadVers   = 5
	ErrUnknown   = 6

	// RemovedTTL marks a removed RR in an event (RFC 8764 §6.2).
	RemovedTTL = 0xFFFFFFFF
)

// Option returns the LLQ option of m, if any.
func Option(m *dns.Msg) (*dns.EDNS0_LLQ, bool) {
	opt := m.IsEdns0()
	if opt == nil {
		return nil, false
	}
	for _, o := range opt.Option {
		if l, ok := o.(*dns.EDNS0_LLQ); ok {
			return l, true
		}
	}
	return nil, false
}

// SetOption adds (or replaces) an LLQ option on m, adding an OPT RR if needed.
func SetOption(m *dns.Msg, o dns.EDNS0_LLQ) {
	o.Code = dns.EDNS0LLQ
	opt := m.IsEdns0()
	if opt == nil {
		m.SetEdns0(dns.DefaultMsgSize, false)
		opt = m.IsEdns0()
	}
	for i, x := range opt.Option {
		if _, ok := x.(*dns.EDNS0_LLQ); ok {
			opt.Option[i] = &o
			return
		}
	}
	opt.Option = append(opt.Option, &o)
}

// Peer identifies where an LLQ's events go.
type Peer struct {
	Net  string // "udp" or "tcp" (TCP and TLS)
	Addr string // client ip:port
	// Conn identifies the stream connection for "tcp" (nil for UDP); the
	// LLQ lives as long as the connection (DropConn).
	Conn any
	// Reply is the transport's reply context for UDP (the request's
	// session, so events leave from the address the client used); not
	// persisted.
	Reply any
}

// Sender delivers an event to a peer. Key is the TSIG key name the LLQ was
// set up with ("" for none); the sender signs with it.
type Sender interface {
	SendEvent(p Peer, key string, m *dns.Msg) error
}

// Config configures a Table.
type Config struct {
	MinLease, MaxLease time.Duration // RFC 8764 suggests; default [15 min, 2 h]
	Retransmit         time.Duration // first event retransmission delay; default 2 s
	Transmissions      int           // event transmissions before deleting; default 3
	ChallengeWindow    time.Duration // how long a challenge stays answerable; default 60 s
	MaxPerKey          int           // LLQs per TSIG key; default 256
	MaxTotal           int           // all LLQs; default 200000
	MaxPending         int           // unacknowledged events per LLQ before deletion; default 32
	// Answer returns the current answers for a question (for the ACK) and
	// the store revision they reflect; changes up to that revision are not
	// sent as events to an LLQ set up with them.
	Answer func(q dns.Question) ([]dns.RR, uint64)
	Send   Sender
	// Persist, when set, is called in order (from one goroutine) with the
	// LLQ's state after creation or refresh, and with nil data on deletion.
	Persist func(id uint64, data []byte)
	Log     *slog.Logger
	Now     func() time.Time
}

// Entry is one established LLQ.
type Entry struct {
	ID      uint64
	Q       dns.Question
	Key     string
	Peer    Peer
	Expires time.Time

	rev     uint64 // store revision of the answers in the ACK
	timer   *time.Timer
	pending map[uint16]*pendingEvent
}

type pendingEvent struct {
	msg   *dns.Msg
	sent  int
	timer *time.Timer
}

// persisted form of a UDP LLQ.
type persisted struct {
	ID      uint64 `json:"id"`
	Name    string `json:"name"`
	Type    uint16 `json:"type"`
	Class   uint16 `json:"class"`
	Key     string `json:"key,omitempty"`
	Addr    string `json:"addr"`
	Expires int64  `json:"exp"`
}

// Table holds the established LLQs.
type Table struct {
	cfg    Config
	secret []byte

	mu     sync.Mutex
	closed bool
	byID   map[uint64]*Entry
	byName map[string]map[uint64]*Entry
	perKey map[string]int
	pq     []persistOp
	pqCond *sync.Cond
	pqDone chan struct{}
}

type persistOp struct {
	id   uint64
	data []byte
}

// NewTable returns a table; call Close when done.
func NewTable(cfg Config) *Table {
	if cfg.MinLease == 0 {
		cfg.MinLease = 15 * time.Minute
	}
	if cfg.MaxLease == 0 {
		cfg.MaxLease = 2 * time.Hour
	}
	if cfg.Retransmit == 0 {
		cfg.Retransmit = 2 * time.Second
	}
	if cfg.Transmissions == 0 {
		cfg.Transmissions = 3
	}
	if cfg.ChallengeWindow == 0 {
		cfg.ChallengeWindow = 60 * time.Second
	}
	if cfg.MaxPerKey == 0 {
		cfg.MaxPerKey = 256
	}
	if cfg.MaxTotal == 0 {
		cfg.MaxTotal = 200000
	}
	if cfg.MaxPending == 0 {
		cfg.MaxPending = 32
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Answer == nil {
		cfg.Answer = func(dns.Question) ([]dns.RR, uint64) { return nil, 0 }
	}
	t := &Table{cfg: cfg, secret: make([]byte, 32), byID: map[uint64]*Entry{},
		byName: map[string]map[uint64]*Entry{}, perKey: map[string]int{}, pqDone: make(chan struct{})}
	rand.Read(t.secret)
	t.pqCond = sync.NewCond(&t.mu)
	go t.persistLoop()
	return t
}

func (t *Table) persistLoop() {
	defer close(t.pqDone)
	t.mu.Lock()
	for {
		for len(t.pq) == 0 && !t.closed {
			t.pqCond.Wait()
		}
		if len(t.pq) == 0 && t.closed {
			t.mu.Unlock()
			return
		}
		ops := t.pq
		t.pq = nil
		t.mu.Unlock()
		for _, op := range ops {
			if t.cfg.Persist != nil {
				t.cfg.Persist(op.id, op.data)
			}
		}
		t.mu.Lock()
	}
}

// persistLocked queues the entry's state (nil e: deletion).
func (t *Table) persistLocked(id uint64, e *Entry) {
	if t.cfg.Persist == nil {
		return
	}
	if e != nil && e.Peer.Net != "udp" {
		return // stream LLQs die with their connection
	}
	var data []byte
	if e != nil {
		data, _ = json.Marshal(persisted{ID: e.ID, Name: e.Q.Name, Type: e.Q.Qtype, Class: e.Q.Qclass,
			Key: e.Key, Addr: e.Peer.Addr, Expires: e.Expires.UnixNano()})
	}
	t.pq = append(t.pq, persistOp{id, data})
	t.pqCond.Signal()
}

// Restore re-creates UDP LLQs from persisted data (skipping expired ones).
func (t *Table) Restore(data [][]byte) int {
	now := t.cfg.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, d := range data {
		var p persisted
		if json.Unmarshal(d, &p) != nil || p.ID == 0 {
			continue
		}
		exp := time.Unix(0, p.Expires)
		if !exp.After(now) {
			t.pq = append(t.pq, persistOp{p.ID, nil})
			continue
		}
		e := &Entry{ID: p.ID, Q: dns.Question{Name: p.Name, Qtype: p.Type, Qclass: p.Class},
			Key: p.Key, Peer: Peer{Net: "udp", Addr: p.Addr}, Expires: exp}
		t.addLocked(e)
		n++
	}
	t.pqCond.Signal()
	return n
}

func lname(n string) string { return strings.ToLower(dns.CanonicalName(n)) }

func (t *Table) addLocked(e *Entry) {
	e.pending = map[uint16]*pendingEvent{}
	t.byID[e.ID] = e
	n := lname(e.Q.Name)
	if t.byName[n] == nil {
		t.byName[n] = map[uint64]*Entry{}
	}
	t.byName[n][e.ID] = e
	t.perKey[e.Key]++
	id := e.ID
	e.timer = time.AfterFunc(e.Expires.Sub(t.cfg.Now()), func() { t.expire(id) })
}

func (t *Table) removeLocked(e *Entry, reason string) {
	if t.byID[e.ID] != e {
		return
	}
	delete(t.byID, e.ID)
	n := lname(e.Q.Name)
	delete(t.byName[n], e.ID)
	if len(t.byName[n]) == 0 {
		delete(t.byName, n)
	}
	if t.perKey[e.Key]--; t.perKey[e.Key] <= 0 {
		delete(t.perKey, e.Key)
	}
	e.timer.Stop()
	for _, p := range e.pending {
		p.timer.Stop()
	}
	t.persistLocked(e.ID, nil)
	t.cfg.Log.Debug("llq deleted", "id", e.ID, "name", e.Q.Name, "reason", reason)
}

func (t *Table) expire(id uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e, ok := t.byID[id]; ok && !e.Expires.After(t.cfg.Now()) {
		t.removeLocked(e, "lease expired")
	}
}

// Len returns the number of established LLQs.
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.byID)
}

// Get returns a copy of the entry (without internal state).
func (t *Table) Get(id uint64) (Entry, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.byID[id]
	if !ok {
		return Entry{}, false
	}
	return Entry{ID: e.ID, Q: e.Q, Key: e.Key, Peer: e.Peer, Expires: e.Expires}, true
}

// DropConn deletes the LLQs bound to a closed stream connection.
func (t *Table) DropConn(conn any) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, e := range t.byID {
		if e.Peer.Conn == conn {
			t.removeLocked(e, "connection closed")
		}
	}
}

// DropKey deletes the LLQs set up with a TSIG key (the key was removed).
func (t *Table) DropKey(key string) {
	key = lname(key)
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, e := range t.byID {
		if lname(e.Key) == key {
			t.removeLocked(e, "key removed")
		}
	}
}

// Close stops all timers and the persistence goroutine (state stays
// persisted for the next start).
func (t *Table) Close() {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return
	}
	t.closed = true
	for _, e := range t.byID {
		e.timer.Stop()
		for _, p := range e.pending {
			p.timer.Stop()
		}
	}
	t.pqCond.Broadcast()
	t.mu.Unlock()
	<-t.pqDone
}

func (t *Table) challengeID(issued uint32, p Peer, q dns.Question, key string) uint64 {
	m := hmac.New(sha256.New, t.secret)
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], issued)
	m.Write(b[:])
	fmt.Fprintf(m, "%s|%s|%s|%d|%d|%s", p.Net, p.Addr, lname(q.Name), q.Qtype, q.Qclass, lname(key))
	sum := m.Sum(nil)
	return uint64(issued)<<32 | uint64(binary.BigEndian.Uint32(sum))
}

func (t *Table) clamp(secs uint32) time.Duration {
	return min(max(time.Duration(secs)*time.Second, t.cfg.MinLease), t.cfg.MaxLease)
}

// ErrNotLLQ is returned by Handle for a message without an LLQ option.
var ErrNotLLQ = errors.New("llq: no LLQ option")

// Handle processes a request carrying an LLQ option from peer p,
// authenticated with TSIG key (""), and returns the response to send (nil:
// send nothing, as for an event acknowledgement). The caller has already
// authorised the question for the key.
func (t *Table) Handle(req *dns.Msg, p Peer, key string) (*dns.Msg, error) {
	o, ok := Option(req)
	if !ok {
		return nil, ErrNotLLQ
	}
	if o.Opcode == OpEvent {
		t.ack(o.Id, req.Id)
		return nil, nil
	}
	resp := new(dns.Msg)
	resp.SetReply(req)
	resp.Authoritative = true
	reply := func(opcode, errc uint16, id uint64, lease time.Duration) *dns.Msg {
		SetOption(resp, dns.EDNS0_LLQ{Version: Version, Opcode: opcode, Error: errc, Id: id,
			LeaseLife: uint32(lease / time.Second)})
		return resp
	}
	if o.Version != Version {
		return reply(o.Opcode, ErrBadVers, o.Id, 0), nil
	}
	if len(req.Question) != 1 {
		resp.Rcode = dns.RcodeFormatError
		return reply(o.Opcode, ErrFormat, o.Id, 0), nil
	}
	q := req.Question[0]
	q.Name = dns.CanonicalName(q.Name)
	now := t.cfg.Now()
	switch o.Opcode {
	case OpSetup:
		lease := t.clamp(o.LeaseLife)
		if o.Id == 0 {
			// Initial request: challenge with a stateless ID.
			t.mu.Lock()
			full := t.perKey[key] >= t.cfg.MaxPerKey || len(t.byID) >= t.cfg.MaxTotal
			t.mu.Unlock()
			if full {
				return reply(OpSetup, ErrServFull, 0, 0), nil
			}
			id := t.challengeID(uint32(now.Unix()), p, q, key)
			if p.Net == "tcp" {
				// Over a stream the handshake already proved the client's
				// address: no challenge, the LLQ is set up at once and
				// the answers sent (as Apple's dnsextd does). A client
				// that still sends the challenge response gets the ACK
				// again (below).
				t.mu.Lock()
				defer t.mu.Unlock()
				if e, ok := t.byID[id]; ok {
					resp.Answer, _ = t.cfg.Answer(e.Q)
					return reply(OpSetup, ErrNoError, e.ID, e.Expires.Sub(now).Truncate(time.Second)), nil
				}
				e := &Entry{ID: id, Q: q, Key: key, Peer: p, Expires: now.Add(lease)}
				resp.Answer, e.rev = t.cfg.Answer(q)
				t.addLocked(e)
				t.cfg.Log.Debug("llq established over a stream", "id", e.ID, "name", q.Name, "lease", lease)
				return reply(OpSetup, ErrNoError, id, lease), nil
			}
			return reply(OpSetup, ErrNoError, id, lease), nil
		}
		t.mu.Lock()
		defer t.mu.Unlock()
		if e, ok := t.byID[o.Id]; ok {
			// A repeated challenge response (our ACK was lost): ACK again.
			if e.Key != key || lname(e.Q.Name) != lname(q.Name) || e.Q.Qtype != q.Qtype {
				return reply(OpSetup, ErrNoSuchLLQ, o.Id, 0), nil
			}
			resp.Answer, _ = t.cfg.Answer(e.Q)
			return reply(OpSetup, ErrNoError, e.ID, e.Expires.Sub(now).Truncate(time.Second)), nil
		}
		issued := uint32(o.Id >> 32)
		age := now.Sub(time.Unix(int64(issued), 0))
		if age < -time.Second || age > t.cfg.ChallengeWindow ||
			!hmac.Equal(binary.BigEndian.AppendUint64(nil, t.challengeID(issued, p, q, key)),
				binary.BigEndian.AppendUint64(nil, o.Id)) {
			return reply(OpSetup, ErrNoSuchLLQ, o.Id, 0), nil
		}
		if t.perKey[key] >= t.cfg.MaxPerKey || len(t.byID) >= t.cfg.MaxTotal {
			return reply(OpSetup, ErrServFull, o.Id, 0), nil
		}
		e := &Entry{ID: o.Id, Q: q, Key: key, Peer: p, Expires: now.Add(lease)}
		resp.Answer, e.rev = t.cfg.Answer(q)
		t.addLocked(e)
		t.persistLocked(e.ID, e)
		t.cfg.Log.Debug("llq established", "id", e.ID, "name", q.Name, "type", dns.Type(q.Qtype), "lease", lease)
		return reply(OpSetup, ErrNoError, e.ID, lease), nil
	case OpRefresh:
		t.mu.Lock()
		defer t.mu.Unlock()
		e, ok := t.byID[o.Id]
		if !ok || e.Key != key {
			return reply(OpRefresh, ErrNoSuchLLQ, o.Id, 0), nil
		}
		if o.LeaseLife == 0 {
			t.removeLocked(e, "cancelled")
			return reply(OpRefresh, ErrNoError, o.Id, 0), nil
		}
		lease := t.clamp(o.LeaseLife)
		e.Expires = now.Add(lease)
		e.Peer = p // follow the client across a NAT rebinding
		e.timer.Reset(lease)
		t.persistLocked(e.ID, e)
		return reply(OpRefresh, ErrNoError, o.Id, lease), nil
	default:
		return reply(o.Opcode, ErrFormat, o.Id, 0), nil
	}
}

func (t *Table) ack(id uint64, msgID uint16) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.byID[id]
	if !ok {
		return
	}
	if p, ok := e.pending[msgID]; ok {
		p.timer.Stop()
		delete(e.pending, msgID)
	}
}

// Changed sends the events for one store change to every matching LLQ.
func (t *Table) Changed(c store.Change) {
	type out struct {
		e   *Entry
		msg *dns.Msg
	}
	var sends []out
	t.mu.Lock()
	events := map[uint64]*dns.Msg{}
	var order []*Entry
	add := func(r store.Record, removed bool) {
		h := r.RR.Header()
		for _, e := range t.byName[lname(h.Name)] {
			if e.Q.Qtype != dns.TypeANY && e.Q.Qtype != h.Rrtype {
				continue
			}
			if e.Q.Qclass != dns.ClassANY && e.Q.Qclass != h.Class {
				continue
			}
			if c.Rev != 0 && c.Rev <= e.rev {
				continue // already in the answers the LLQ was set up with
			}
			m := events[e.ID]
			if m == nil {
				m = new(dns.Msg)
				m.Id = dns.Id()
				m.Response = true
				m.Authoritative = true
				m.Question = []dns.Question{e.Q}
				SetOption(m, dns.EDNS0_LLQ{Version: Version, Opcode: OpEvent, Id: e.ID})
				events[e.ID] = m
				order = append(order, e)
			}
			rr := dns.Copy(r.RR)
			rr.Header().Name = e.Q.Name
			if removed {
				rr.Header().Ttl = RemovedTTL
			}
			m.Answer = append(m.Answer, rr)
		}
	}
	for _, r := range c.Removed {
		add(r, true)
	}
	for _, r := range c.Added {
		add(r, false)
	}
	for _, e := range order {
		m := events[e.ID]
		if e.Peer.Net == "udp" {
			if len(e.pending) >= t.cfg.MaxPending {
				t.removeLocked(e, "too many unacknowledged events")
				continue
			}
			t.trackLocked(e, m)
		}
		sends = append(sends, out{e, m})
	}
	t.mu.Unlock()
	for _, s := range sends {
		t.send(s.e, s.msg)
	}
}

func (t *Table) trackLocked(e *Entry, m *dns.Msg) {
	for e.pending[m.Id] != nil {
		m.Id = dns.Id()
	}
	pe := &pendingEvent{msg: m, sent: 1}
	e.pending[m.Id] = pe
	id, msgID := e.ID, m.Id
	delay := t.cfg.Retransmit
	var fire func()
	fire = func() {
		t.mu.Lock()
		e, ok := t.byID[id]
		if !ok || e.pending[msgID] != pe || t.closed {
			t.mu.Unlock()
			return
		}
		if pe.sent >= t.cfg.Transmissions {
			t.removeLocked(e, "events not acknowledged")
			t.mu.Unlock()
			return
		}
		pe.sent++
		delay *= 2
		pe.timer = time.AfterFunc(delay, fire)
		t.mu.Unlock()
		t.send(e, pe.msg)
	}
	pe.timer = time.AfterFunc(delay, fire)
}

func (t *Table) send(e *Entry, m *dns.Msg) {
	if t.cfg.Send == nil {
		return
	}
	// Each send gets its own copy: signing appends a TSIG RR.
	if err := t.cfg.Send.SendEvent(e.Peer, e.Key, m.Copy()); err != nil {
		t.cfg.Log.Debug("llq event send failed", "id", e.ID, "err", err)
	}
}
