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
	// Local is the address the client sent its UDP LLQ to ("" unknown):
	// persisted, so the events of a restored LLQ leave from it too.
	Local string
}

// Event is one event message for one LLQ, ready to sign and send.
type Event struct {
	Peer Peer
	// Key is the TSIG key name the LLQ was set up with ("" for none): the
	// sender signs with it.
	Key string
	// Wire is the packed, unsigned message (this event's message ID and
	// LLQ-ID in place). It is the sender's to read, not to modify or keep:
	// a retransmission passes the same bytes again.
	Wire []byte
	// LLQ is the LLQ-ID, for the sender's log.
	LLQ uint64
}

// Sender delivers events. SendEvents gets all the events of one store
// change (or of one retransmission round) at once, so that it can sign and
// send them in batches; it returns the errors of the events it could not
// send, joined. It is called from one goroutine at a time per Table.
type Sender interface {
	SendEvents(evs []Event) error
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
	// OnChangeSent, if set, is called after the events of one store
	// change were handed to Send, with their number and the time from
	// Changed (the change committed) to the last one sent (for metrics).
	OnChangeSent func(events int, took time.Duration)
	Log          *slog.Logger
	Now          func() time.Time
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
	mark    uint64 // the last change that gave this LLQ an event (Changed)
}

// pendingEvent is an event sent over UDP and not yet acknowledged.
type pendingEvent struct {
	wire []byte
	sent int
}

// retransmission is the events of one Changed call (or the ones still
// unacknowledged of an earlier round): one timer retransmits them all.
type retransmission struct {
	evs   []retxEvent
	delay time.Duration
	timer *time.Timer
}

type retxEvent struct {
	id    uint64 // LLQ-ID
	msgID uint16
	pe    *pendingEvent
}

// persisted form of a UDP LLQ.
type persisted struct {
	ID      uint64 `json:"id"`
	Name    string `json:"name"`
	Type    uint16 `json:"type"`
	Class   uint16 `json:"class"`
	Key     string `json:"key,omitempty"`
	Addr    string `json:"addr"`
	Local   string `json:"local,omitempty"`
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
	// Events: the changes numbered for Entry.mark, the retransmission
	// rounds waiting for their timer, and sendMu, which keeps Sender calls
	// from overlapping.
	changes uint64
	retx    map[*retransmission]struct{}
	sendMu  sync.Mutex
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
		byName: map[string]map[uint64]*Entry{}, perKey: map[string]int{}, pqDone: make(chan struct{}),
		retx: map[*retransmission]struct{}{}}
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
			Key: e.Key, Addr: e.Peer.Addr, Local: e.Peer.Local, Expires: e.Expires.UnixNano()})
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
			Key: p.Key, Peer: Peer{Net: "udp", Addr: p.Addr, Local: p.Local}, Expires: exp}
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
	}
	for r := range t.retx {
		r.timer.Stop()
	}
	clear(t.retx)
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
	delete(e.pending, msgID)
}

// Changed sends the events for one store change to every matching LLQ.
//
// The LLQs on one question get the same message but for its ID and LLQ-ID:
// it is built and packed once, and each LLQ's event is a copy of those bytes
// with its two IDs written in. All the events go to the Sender in one call,
// and the UDP ones share one retransmission timer.
func (t *Table) Changed(c store.Change) {
	start := time.Now()
	type group struct {
		msg     *dns.Msg
		rec     int // the last record added to msg (index into recs)
		entries []*Entry
	}
	type rec struct {
		r       store.Record
		removed bool
	}
	recs := make([]rec, 0, len(c.Removed)+len(c.Added))
	for _, r := range c.Removed {
		recs = append(recs, rec{r, true})
	}
	for _, r := range c.Added {
		recs = append(recs, rec{r, false})
	}
	t.mu.Lock()
	t.changes++
	mark := t.changes
	groups := map[dns.Question]*group{}
	var order []*group
	for i, x := range recs {
		h := x.r.RR.Header()
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
			g := groups[e.Q]
			if g == nil {
				m := new(dns.Msg)
				m.Response = true
				m.Authoritative = true
				m.Question = []dns.Question{e.Q}
				// The LLQ option is the message's last field: eventIDs
				// writes each LLQ's ID there.
				SetOption(m, dns.EDNS0_LLQ{Version: Version, Opcode: OpEvent})
				g = &group{msg: m, rec: -1}
				groups[e.Q] = g
				order = append(order, g)
			}
			if g.rec != i {
				g.rec = i
				rr := dns.Copy(x.r.RR)
				rr.Header().Name = e.Q.Name
				if x.removed {
					rr.Header().Ttl = RemovedTTL
				}
				g.msg.Answer = append(g.msg.Answer, rr)
			}
			if e.mark != mark {
				e.mark = mark
				g.entries = append(g.entries, e)
			}
		}
	}
	n := 0
	for _, g := range order {
		n += len(g.entries)
	}
	evs := make([]Event, 0, n)
	retx := &retransmission{delay: t.cfg.Retransmit}
	for _, g := range order {
		tmpl, err := g.msg.Pack()
		if err != nil {
			t.cfg.Log.Warn("llq event not sent: pack", "name", g.msg.Question[0].Name, "err", err)
			continue
		}
		// One allocation for the group's events and one for their
		// retransmission state (held until the last is acknowledged or
		// its LLQ deleted: seconds).
		size := len(tmpl)
		slab := make([]byte, size*len(g.entries))
		pes := make([]pendingEvent, len(g.entries))
		for i, e := range g.entries {
			udp := e.Peer.Net == "udp"
			if udp && len(e.pending) >= t.cfg.MaxPending {
				t.removeLocked(e, "too many unacknowledged events")
				continue
			}
			wire := slab[i*size : (i+1)*size : (i+1)*size]
			copy(wire, tmpl)
			msgID := dns.Id()
			for udp && e.pending[msgID] != nil {
				msgID = dns.Id()
			}
			eventIDs(wire, msgID, e.ID)
			if udp {
				pe := &pes[i]
				pe.wire, pe.sent = wire, 1
				e.pending[msgID] = pe
				retx.evs = append(retx.evs, retxEvent{e.ID, msgID, pe})
			}
			evs = append(evs, Event{Peer: e.Peer, Key: e.Key, Wire: wire, LLQ: e.ID})
		}
	}
	if len(retx.evs) > 0 {
		t.scheduleLocked(retx)
	}
	// The Sender is called in the order the changes came: sendMu is taken
	// before t.mu is let go.
	t.sendMu.Lock()
	t.mu.Unlock()
	t.send(evs)
	t.sendMu.Unlock()
	if t.cfg.OnChangeSent != nil && len(evs) > 0 {
		t.cfg.OnChangeSent(len(evs), time.Since(start))
	}
}

// eventIDs writes the message ID and the LLQ-ID into a packed event whose
// last field is the LLQ option (ID, then the 4-octet lease life).
func eventIDs(wire []byte, msgID uint16, llqID uint64) {
	binary.BigEndian.PutUint16(wire, msgID)
	binary.BigEndian.PutUint64(wire[len(wire)-12:], llqID)
}

// scheduleLocked arms r's timer: when it fires, the events of r not yet
// acknowledged are sent again (or their LLQ is deleted after the last
// transmission), and those go on in a new round with twice the delay.
func (t *Table) scheduleLocked(r *retransmission) {
	t.retx[r] = struct{}{}
	r.timer = time.AfterFunc(r.delay, func() {
		t.mu.Lock()
		if _, ok := t.retx[r]; !ok || t.closed {
			t.mu.Unlock()
			return
		}
		delete(t.retx, r)
		next := &retransmission{delay: 2 * r.delay}
		var evs []Event
		for _, x := range r.evs {
			e, ok := t.byID[x.id]
			if !ok || e.pending[x.msgID] != x.pe {
				continue // acknowledged, or the LLQ is gone
			}
			if x.pe.sent >= t.cfg.Transmissions {
				t.removeLocked(e, "events not acknowledged")
				continue
			}
			x.pe.sent++
			next.evs = append(next.evs, x)
			evs = append(evs, Event{Peer: e.Peer, Key: e.Key, Wire: x.pe.wire, LLQ: e.ID})
		}
		if len(next.evs) > 0 {
			t.scheduleLocked(next)
		}
		t.sendMu.Lock()
		t.mu.Unlock()
		t.send(evs)
		t.sendMu.Unlock()
	})
}

func (t *Table) send(evs []Event) {
	if t.cfg.Send == nil || len(evs) == 0 {
		return
	}
	if err := t.cfg.Send.SendEvents(evs); err != nil {
		t.cfg.Log.Debug("llq events not sent", "events", len(evs), "err", err)
	}
}
