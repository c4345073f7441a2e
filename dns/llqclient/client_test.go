package llqclient

import (
	"bytes"
	"context"
	"fmt"
	"github.com/btmm/btmm/dns/llq"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/btmm/btmm/dns/register"
	"github.com/miekg/dns"
)

// pipe is an in-memory Transport: what the client sends goes to the fake
// responder's inbox; the responder's replies come back through out.
type pipe struct {
	inbox  chan []byte
	out    chan []byte
	closed chan struct{}
	once   sync.Once
}

func (p *pipe) Send(b []byte) error {
	select {
	case p.inbox <- b:
		return nil
	case <-p.closed:
		return net.ErrClosed
	}
}

func (p *pipe) Recv() ([]byte, error) {
	select {
	case b := <-p.out:
		return b, nil
	case <-p.closed:
		return nil, net.ErrClosed
	}
}

func (p *pipe) Close() error { p.once.Do(func() { close(p.closed) }); return nil }

// fakeLLQ is a small LLQ responder for state-machine tests (RFC 8764 §5-7),
// not a DNS server: one zone of records in memory.
type fakeLLQ struct {
	t     *testing.T
	key   *register.Key
	mu    sync.Mutex
	rrs   []dns.RR
	llqs  map[uint64]dns.Question
	next  uint64
	log   []string // "setup1 name", "setup2", "refresh", "ack", "query"
	acks  map[uint16]bool
	noLLQ bool // answer like BIND: no LLQ option
	mute  bool // drop everything
	lease uint32
	p     *pipe
	// beforeAck runs (f.mu held) when a challenge response is answered,
	// after the ACK's answers are taken and before the ACK is sent: a
	// change there sends its event ahead of the ACK, as a server whose
	// reply goroutine is slower than its event sender does.
	beforeAck func()
	// lateFirst > 0: each request is answered once, lateFirst after its
	// first transmission (after the client's retransmission went out);
	// its retransmissions are not answered.
	lateFirst time.Duration
	seen      map[uint16]bool
}

func newFake(t *testing.T, key *register.Key) *fakeLLQ {
	return &fakeLLQ{t: t, key: key, llqs: map[uint64]dns.Question{}, next: 0x1000, acks: map[uint16]bool{}, lease: 3600}
}

// dial is Config.Dial: a fresh pipe served by a goroutine.
func (f *fakeLLQ) dial(ctx context.Context, server string) (Transport, error) {
	p := &pipe{inbox: make(chan []byte, 64), out: make(chan []byte, 64), closed: make(chan struct{})}
	f.mu.Lock()
	f.p = p
	f.mu.Unlock()
	go func() {
		for {
			select {
			case b := <-p.inbox:
				f.serve(b)
			case <-p.closed:
				return
			}
		}
	}()
	return p, nil
}

func (f *fakeLLQ) record(s string) {
	f.log = append(f.log, s)
}

func (f *fakeLLQ) steps() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.log)
}

func (f *fakeLLQ) reply(m *dns.Msg) { f.replyTo(m, "") }

func (f *fakeLLQ) replyTo(m *dns.Msg, requestMAC string) {
	var b []byte
	var err error
	if f.key != nil {
		m.SetTsig(f.key.Name, f.key.Algorithm, 300, time.Now().Unix())
		b, _, err = dns.TsigGenerateWithProvider(m, f.key.Provider(), requestMAC, false)
	} else {
		b, err = m.Pack()
	}
	if err != nil {
		f.t.Errorf("fake: pack: %v", err)
		return
	}
	f.p.out <- b
}

func (f *fakeLLQ) answers(q dns.Question) []dns.RR {
	var out []dns.RR
	for _, rr := range f.rrs {
		if strings.EqualFold(rr.Header().Name, q.Name) && rr.Header().Rrtype == q.Qtype {
			out = append(out, dns.Copy(rr))
		}
	}
	return out
}

func (f *fakeLLQ) serve(b []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m := new(dns.Msg)
	if err := m.Unpack(b); err != nil {
		f.t.Errorf("fake: unpack: %v", err)
		return
	}
	if f.key != nil {
		if m.IsTsig() == nil {
			f.t.Errorf("fake: unsigned message from client")
			return
		}
		if err := dns.TsigVerifyWithProvider(b, f.key.Provider(), "", false); err != nil {
			f.t.Errorf("fake: bad TSIG from client: %v", err)
			return
		}
	}
	if f.mute {
		return
	}
	reqMAC := ""
	if t := m.IsTsig(); t != nil {
		reqMAC = t.MAC
	}
	if f.lateFirst > 0 && !m.Response {
		if f.seen == nil {
			f.seen = map[uint16]bool{}
		}
		if f.seen[m.Id] {
			return // a retransmission: only the first is answered
		}
		f.seen[m.Id] = true
	}
	o, ok := llq.Option(m)
	if m.Response {
		if ok && o.Opcode == llq.OpEvent {
			f.record("ack")
			f.acks[m.Id] = true
		}
		return
	}
	q := m.Question[0]
	resp := new(dns.Msg)
	resp.SetReply(m)
	if !ok || f.noLLQ {
		f.record("query")
		resp.Answer = f.answers(q)
		f.answer(resp, reqMAC)
		return
	}
	opt := &dns.EDNS0_LLQ{Code: dns.EDNS0LLQ, Version: 1, Opcode: o.Opcode, Id: o.Id, LeaseLife: f.lease}
	switch {
	case o.Opcode == llq.OpSetup && o.Id == 0:
		f.record("setup1 " + q.Name)
		f.next++
		opt.Id = f.next
		f.llqs[f.next] = q
	case o.Opcode == llq.OpSetup:
		f.record("setup2")
		if _, ok := f.llqs[o.Id]; !ok {
			opt.Error = llq.ErrNoSuchLLQ
		} else {
			resp.Answer = f.answers(q)
			if f.beforeAck != nil {
				f.beforeAck()
			}
		}
	case o.Opcode == llq.OpRefresh:
		f.record(fmt.Sprintf("refresh %d", o.LeaseLife))
		if _, ok := f.llqs[o.Id]; !ok {
			opt.Error = llq.ErrNoSuchLLQ
		} else if o.LeaseLife == 0 {
			delete(f.llqs, o.Id)
		}
	}
	llq.SetOption(resp, *opt)
	f.answer(resp, reqMAC)
}

// answer replies to a request, lateFirst later if set.
func (f *fakeLLQ) answer(resp *dns.Msg, reqMAC string) {
	if f.lateFirst == 0 {
		f.replyTo(resp, reqMAC)
		return
	}
	p := f.p
	go func() {
		select {
		case <-time.After(f.lateFirst):
		case <-p.closed:
			return
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		f.replyTo(resp, reqMAC)
	}()
}

// change updates the zone and sends events to every LLQ on the name.
func (f *fakeLLQ) change(add, del string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.changeLocked(add, del)
}

func (f *fakeLLQ) changeLocked(add, del string) {
	var changed []dns.RR
	if add != "" {
		rr, _ := dns.NewRR(add)
		f.rrs = append(f.rrs, rr)
		changed = append(changed, rr)
	}
	if del != "" {
		rr, _ := dns.NewRR(del)
		f.rrs = slices.DeleteFunc(f.rrs, func(x dns.RR) bool { return dns.IsDuplicate(x, rr) })
		gone := dns.Copy(rr)
		gone.Header().Ttl = llq.RemovedTTL
		changed = append(changed, gone)
	}
	for id, q := range f.llqs {
		ev := new(dns.Msg)
		ev.Id = dns.Id()
		ev.Response = true
		ev.Question = []dns.Question{q}
		for _, rr := range changed {
			if strings.EqualFold(rr.Header().Name, q.Name) && rr.Header().Rrtype == q.Qtype {
				ev.Answer = append(ev.Answer, rr)
			}
		}
		if len(ev.Answer) == 0 {
			continue
		}
		llq.SetOption(ev, dns.EDNS0_LLQ{Code: dns.EDNS0LLQ, Version: 1, Opcode: llq.OpEvent, Id: id})
		f.reply(ev)
	}
}

// restart forgets every LLQ, like a server restart.
func (f *fakeLLQ) restart() {
	f.mu.Lock()
	f.llqs = map[uint64]dns.Question{}
	f.mu.Unlock()
}

type watcher struct {
	mu  sync.Mutex
	got [][]string
}

func (w *watcher) fn(rrs []dns.RR) {
	var s []string
	for _, rr := range rrs {
		s = append(s, strings.TrimPrefix(rr.String(), rr.Header().String()))
	}
	w.mu.Lock()
	w.got = append(w.got, s)
	w.mu.Unlock()
}

func (w *watcher) last() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.got) == 0 {
		return nil
	}
	return w.got[len(w.got)-1]
}

func (w *watcher) calls() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.got)
}

func newTestClient(t *testing.T, f *fakeLLQ, mut func(*Config)) *Client {
	cfg := Config{Server: "fake:53", Dial: f.dial, Key: f.key, Lease: time.Hour, Rand: rand.New(rand.NewPCG(3, 4))}
	if mut != nil {
		mut(&cfg)
	}
	c, err := New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

const host = "laptop.alice.btmm.example."

func TestSetupEventsAndAcks(t *testing.T) {
	key, _ := register.NewKey("alice.btmm.example.", "hmac-md5", "c2VjcmV0LXNlY3JldC1zZWNyZXQ=")
	synctest.Test(t, func(t *testing.T) {
		f := newFake(t, key)
		f.change(host+" 60 IN AAAA fd00::1", "")
		c := newTestClient(t, f, nil)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		go func() { done <- c.Run(ctx) }()
		var w watcher
		c.Watch(host, dns.TypeAAAA, w.fn)
		synctest.Wait()
		if got := f.steps(); !slices.Equal(got, []string{"setup1 " + host, "setup2"}) {
			t.Errorf("handshake = %q", got)
		}
		if got := w.last(); !slices.Equal(got, []string{"fd00::1"}) {
			t.Errorf("after setup: %q", got)
		}
		f.change(host+" 60 IN AAAA fd00::2", host+" 60 IN AAAA fd00::1")
		synctest.Wait()
		if got := w.last(); !slices.Equal(got, []string{"fd00::2"}) {
			t.Errorf("after event: %q", got)
		}
		if got := f.steps(); got[len(got)-1] != "ack" {
			t.Errorf("event not acknowledged: %q", got)
		}
		st := c.Status()
		if len(st.Queries) != 1 || st.Queries[0].Mode != ModeLLQ || st.Polling != 0 || st.Queries[0].Lease != time.Hour {
			t.Errorf("status = %+v", st)
		}
		// A second watcher of the same question shares the LLQ and gets the
		// current answer at once.
		var w2 watcher
		stop2 := c.Watch(host, dns.TypeAAAA, w2.fn)
		synctest.Wait()
		if got := w2.last(); !slices.Equal(got, []string{"fd00::2"}) || len(f.steps()) != 3 {
			t.Errorf("second watcher: %q, steps %q", got, f.steps())
		}
		stop2()
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if got := f.steps(); got[len(got)-1] != "refresh 0" {
			t.Errorf("shutdown did not cancel the LLQ: %q", got)
		}
	})
}

// TestEventBeforeSetupAck: the server registers an LLQ, takes the answers
// for its ACK, and a change's event leaves before the ACK does (the real
// server's event sender and reply path are separate goroutines). The client
// must end with the changed answers: the event is newer than the ACK's
// answers. (Before, the ACK's answers replaced the event's change, and the
// acknowledged event never came again: in the VM an IPv6-only host's peers
// could keep its first TXT, without its c-v6 endpoint, for the LLQ's hour.)
func TestEventBeforeSetupAck(t *testing.T) {
	key, _ := register.NewKey("alice.btmm.example.", "hmac-md5", "c2VjcmV0LXNlY3JldC1zZWNyZXQ=")
	synctest.Test(t, func(t *testing.T) {
		f := newFake(t, key)
		txt := "_autotunnel._udp." + host
		f.change(txt+` 60 IN TXT "txtvers=1"`, "")
		raced := false
		f.beforeAck = func() {
			if !raced {
				raced = true
				f.changeLocked(txt+` 60 IN TXT "txtvers=1" "c-v6=[2001:db8:4::2]:4500"`, txt+` 60 IN TXT "txtvers=1"`)
			}
		}
		c := newTestClient(t, f, nil)
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go c.Run(ctx)
		var w watcher
		c.Watch(txt, dns.TypeTXT, w.fn)
		synctest.Wait()
		if !raced {
			t.Fatalf("the change did not happen during the setup: %q", f.steps())
		}
		if got := f.steps(); !slices.Contains(got, "ack") {
			t.Errorf("the early event was not acknowledged: %q", got)
		}
		want := []string{`"txtvers=1" "c-v6=[2001:db8:4::2]:4500"`}
		if got := w.last(); !slices.Equal(got, want) {
			t.Errorf("after the setup: %q, want %q (the event that came before the ACK was lost)", got, want)
		}
		// Later events still apply on top.
		f.change(txt+` 60 IN TXT "txtvers=2"`, txt+` 60 IN TXT "txtvers=1" "c-v6=[2001:db8:4::2]:4500"`)
		synctest.Wait()
		if got := w.last(); !slices.Equal(got, []string{`"txtvers=2"`}) {
			t.Errorf("after a later event: %q", got)
		}
	})
}

// TestLateAnswerToFirstTransmission: under load the server answers each
// request only after the client sent it again (re-signed, with another
// MAC). That answer is authentic (signed over the MAC of a transmission of
// ours, same ID and question) and is used: the LLQ is set up. Before, only
// the latest transmission's MAC was tried, every answer was dropped ("llq:
// dropping an answer we cannot believe", seen in the VM under two busy
// loops) and the question fell back to polling every 5 minutes.
func TestLateAnswerToFirstTransmission(t *testing.T) {
	key, _ := register.NewKey("alice.btmm.example.", "hmac-md5", "c2VjcmV0LXNlY3JldC1zZWNyZXQ=")
	synctest.Test(t, func(t *testing.T) {
		f := newFake(t, key)
		f.change(host+" 60 IN AAAA fd00::1", "")
		f.lateFirst = DefaultTimeout + 500*time.Millisecond
		c := newTestClient(t, f, nil)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		go func() { done <- c.Run(ctx) }()
		var w watcher
		c.Watch(host, dns.TypeAAAA, w.fn)
		time.Sleep(30 * time.Second)
		synctest.Wait()
		st := c.Status()
		if len(st.Queries) != 1 || st.Queries[0].Mode != ModeLLQ || st.Polling != 0 {
			t.Errorf("status = %+v, want the LLQ set up", st)
		}
		if got := w.last(); !slices.Equal(got, []string{"fd00::1"}) {
			t.Errorf("answers %q", got)
		}
		cancel()
		<-done
	})
}

func TestRefreshScheduleAndReestablish(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(t, nil)
		f.lease = 600
		f.change(host+" 60 IN AAAA fd00::1", "")
		c := newTestClient(t, f, nil)
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go c.Run(ctx)
		var w watcher
		c.Watch(host, dns.TypeAAAA, w.fn)
		start := time.Now()
		synctest.Wait()
		var refreshes []time.Duration
		count := func() int {
			n := 0
			for _, s := range f.steps() {
				if s == "refresh 3600" {
					n++
				}
			}
			return n
		}
		for range 1000 {
			time.Sleep(time.Second)
			synctest.Wait()
			if count() > len(refreshes) {
				refreshes = append(refreshes, time.Since(start))
			}
		}
		if len(refreshes) < 3 {
			t.Fatalf("refreshes at %v in 1000 s, want >= 3", refreshes)
		}
		prev := time.Duration(0)
		for i, r := range refreshes {
			if gap := r - prev; gap < 240*time.Second || gap > 361*time.Second {
				t.Errorf("refresh %d after %v, want ~half of the 600 s lease (240-360 s)", i, gap)
			}
			prev = r
		}
		// Server restart: the next refresh gets NO-SUCH-LLQ and the LLQ is
		// set up again; a change made meanwhile is in the new ACK.
		f.restart()
		f.mu.Lock()
		f.rrs = nil
		f.mu.Unlock()
		f.change(host+" 60 IN AAAA fd00::9", "")
		time.Sleep(400 * time.Second)
		synctest.Wait()
		if got := w.last(); !slices.Equal(got, []string{"fd00::9"}) {
			t.Errorf("after restart: %q", got)
		}
		st := c.Status()
		if st.Queries[0].Setups != 2 || st.Queries[0].Mode != ModeLLQ {
			t.Errorf("status after restart = %+v", st.Queries[0])
		}
		// Events after re-establishment still flow.
		f.change(host+" 60 IN AAAA fd00::a", "")
		synctest.Wait()
		if got := w.last(); !slices.Equal(got, []string{"fd00::9", "fd00::a"}) {
			t.Errorf("event after re-setup: %q", got)
		}
	})
}

func TestFallbackToPolling(t *testing.T) {
	t.Run("no LLQ option (BIND)", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			f := newFake(t, nil)
			f.noLLQ = true
			f.change(host+" 60 IN AAAA fd00::1", "")
			c := newTestClient(t, f, func(c *Config) { c.PollInterval = time.Minute; c.RetryLLQ = time.Hour })
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			go c.Run(ctx)
			var w watcher
			c.Watch(host, dns.TypeAAAA, w.fn)
			synctest.Wait()
			st := c.Status()
			if st.Polling != 1 || st.Queries[0].Reason != "server does not support LLQ" {
				t.Errorf("status = %+v", st)
			}
			if got := w.last(); !slices.Equal(got, []string{"fd00::1"}) {
				t.Errorf("answer = %q", got)
			}
			f.mu.Lock()
			f.rrs = nil
			f.mu.Unlock()
			f.change(host+" 60 IN AAAA fd00::2", "")
			time.Sleep(66 * time.Second) // one poll interval + jitter
			synctest.Wait()
			if got := w.last(); !slices.Equal(got, []string{"fd00::2"}) {
				t.Errorf("poll did not pick up the change: %q", got)
			}
			polls := 0
			for _, s := range f.steps() {
				if s == "query" {
					polls++
				}
			}
			// setup attempt answered without LLQ + 1 poll
			if polls != 2 {
				t.Errorf("%d plain queries, want 2: %q", polls, f.steps())
			}
		})
	})
	t.Run("silent server, then LLQ comes back", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			f := newFake(t, nil)
			f.mute = true
			c := newTestClient(t, f, func(c *Config) { c.PollInterval = time.Minute; c.RetryLLQ = 5 * time.Minute })
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			go c.Run(ctx)
			var w watcher
			c.Watch(host, dns.TypeAAAA, w.fn)
			// 3 transmissions: at 0, 2 s, 6 s; gives up at 14 s.
			time.Sleep(13 * time.Second)
			synctest.Wait()
			if st := c.Status(); st.Queries[0].Mode != ModeSetup {
				t.Errorf("gave up too early: %+v", st.Queries[0])
			}
			time.Sleep(2 * time.Second)
			synctest.Wait()
			if st := c.Status(); st.Queries[0].Mode != ModePolling || st.Queries[0].Reason != "no answer to LLQ setup" {
				t.Errorf("status = %+v", st.Queries[0])
			}
			f.mu.Lock()
			f.mute = false
			f.mu.Unlock()
			f.change(host+" 60 IN AAAA fd00::1", "")
			time.Sleep(6 * time.Minute)
			synctest.Wait()
			st := c.Status()
			if st.Queries[0].Mode != ModeLLQ || st.Polling != 0 {
				t.Errorf("LLQ not retried: %+v", st.Queries[0])
			}
			if got := w.last(); !slices.Equal(got, []string{"fd00::1"}) {
				t.Errorf("answer = %q", got)
			}
		})
	})
}

func TestDropsForgedEvents(t *testing.T) {
	key, _ := register.NewKey("alice.btmm.example.", "hmac-sha256", "c2VjcmV0LXNlY3JldC1zZWNyZXQ=")
	synctest.Test(t, func(t *testing.T) {
		f := newFake(t, key)
		f.change(host+" 60 IN AAAA fd00::1", "")
		c := newTestClient(t, f, nil)
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go c.Run(ctx)
		var w watcher
		c.Watch(host, dns.TypeAAAA, w.fn)
		synctest.Wait()
		calls := w.calls()
		// An unsigned event with the right LLQ ID.
		ev := new(dns.Msg)
		ev.Id = 7
		ev.Response = true
		ev.Question = []dns.Question{{Name: host, Qtype: dns.TypeAAAA, Qclass: dns.ClassINET}}
		rr, _ := dns.NewRR(host + " 60 IN AAAA fd00::666")
		ev.Answer = []dns.RR{rr}
		llq.SetOption(ev, dns.EDNS0_LLQ{Code: dns.EDNS0LLQ, Version: 1, Opcode: llq.OpEvent, Id: 0x1001})
		b, _ := ev.Pack()
		f.p.out <- b
		// Garbage.
		f.p.out <- []byte{1, 2, 3}
		synctest.Wait()
		if w.calls() != calls || f.steps()[len(f.steps())-1] == "ack" {
			t.Errorf("forged event accepted: %q", w.last())
		}
	})
}

func TestRefreshAfter(t *testing.T) {
	for _, r := range []float64{0, 0.5, 0.999} {
		got := RefreshAfter(time.Hour, func() float64 { return r })
		if got < 24*time.Minute || got > 36*time.Minute {
			t.Errorf("RefreshAfter(1h, %v) = %v", r, got)
		}
	}
}

func TestReconnectAfterTransportLoss(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(t, nil)
		f.change(host+" 60 IN AAAA fd00::1", "")
		c := newTestClient(t, f, nil)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		go func() { done <- c.Run(ctx) }()
		var w watcher
		c.Watch(host, dns.TypeAAAA, w.fn)
		synctest.Wait()
		// The connection breaks (a TLS stream closed by a server restart)
		// and the server forgot the LLQ; meanwhile the record changed.
		f.mu.Lock()
		old := f.p
		f.mu.Unlock()
		f.restart()
		old.Close()
		f.change(host+" 60 IN AAAA fd00::2", host+" 60 IN AAAA fd00::1")
		synctest.Wait()
		if st := c.Status(); !strings.Contains(st.LastError, "closed") {
			t.Errorf("status after loss: %+v", st)
		}
		if got := w.last(); !slices.Equal(got, []string{"fd00::1"}) {
			t.Errorf("answer withdrawn while disconnected: %q", got)
		}
		time.Sleep(2 * time.Second) // reconnect backoff (<= 1 s)
		synctest.Wait()
		st := c.Status()
		if st.Queries[0].Mode != ModeLLQ || st.Queries[0].Setups != 2 {
			t.Errorf("not re-established: %+v", st.Queries[0])
		}
		if got := w.last(); !slices.Equal(got, []string{"fd00::2"}) {
			t.Errorf("change during the outage lost: %q", got)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
}

func TestConnectBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(t, nil)
		f.change(host+" 60 IN AAAA fd00::1", "")
		var attempts []time.Duration
		start := time.Now()
		dial := func(ctx context.Context, server string) (Transport, error) {
			attempts = append(attempts, time.Since(start))
			if len(attempts) <= 8 {
				return nil, fmt.Errorf("connection refused")
			}
			return f.dial(ctx, server)
		}
		c := newTestClient(t, f, func(c *Config) { c.Dial = dial })
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go c.Run(ctx)
		var w watcher
		c.Watch(host, dns.TypeAAAA, w.fn) // accepted while disconnected
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		if len(attempts) != 9 {
			t.Fatalf("%d dial attempts: %v", len(attempts), attempts)
		}
		for i := 1; i < len(attempts); i++ {
			full := min(time.Second<<(i-1), time.Minute)
			if gap := attempts[i] - attempts[i-1]; gap < full/2 || gap > full {
				t.Errorf("dial %d after %v, want in [%v, %v]", i, gap, full/2, full)
			}
		}
		if got := w.last(); !slices.Equal(got, []string{"fd00::1"}) {
			t.Errorf("after connecting: %q", got)
		}
		if st := c.Status(); st.Queries[0].Mode != ModeLLQ || !strings.Contains(st.LastError, "connection refused") {
			t.Errorf("status = %+v", st)
		}
	})
}

// After Rebind (our address changed) every LLQ is set up again from a new
// socket, so the server learns where to send events now. The planned
// reconnect is no warning and no error in the status (issue 17).
func TestRebindSetsUpAgain(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(t, nil)
		f.change(host+" 60 IN AAAA fd00::1", "")
		var logged bytes.Buffer
		c, err := New(Config{Server: "fake:53", Dial: f.dial, Key: f.key, Lease: time.Hour, Rand: rand.New(rand.NewPCG(3, 4))},
			slog.New(slog.NewTextHandler(&logged, &slog.HandlerOptions{Level: slog.LevelInfo})))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		go func() { done <- c.Run(ctx) }()
		var w watcher
		c.Watch(host, dns.TypeAAAA, w.fn)
		synctest.Wait()
		if st := c.Status(); st.Queries[0].Setups != 1 {
			t.Fatalf("before rebind: %+v", st.Queries[0])
		}
		c.Rebind()
		synctest.Wait() // no backoff: set up again at once
		if st := c.Status(); st.Queries[0].Mode != ModeLLQ || st.Queries[0].Setups != 2 || st.LastError != "" {
			t.Fatalf("not set up again after Rebind: %+v (last error %q)", st.Queries[0], st.LastError)
		}
		// The LLQ set up from the old address was cancelled from the
		// new socket: one LLQ on the server, not one per move.
		f.mu.Lock()
		live := len(f.llqs)
		f.mu.Unlock()
		if live != 1 {
			t.Errorf("%d LLQs on the server after a rebind, want 1 (the old one cancelled)", live)
		}
		if strings.Contains(logged.String(), "level=WARN") || !strings.Contains(logged.String(), "setting the LLQs up again") {
			t.Errorf("a planned rebind logged:\n%s", logged.String())
		}
		f.change(host+" 60 IN AAAA fd00::2", host+" 60 IN AAAA fd00::1")
		synctest.Wait()
		if got := w.last(); !slices.Equal(got, []string{"fd00::2"}) {
			t.Errorf("event after rebind: %q", got)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
}

// TestKeepAlive: with KeepAlive set, an idle transport carries a refresh
// at least every KeepAlive (the NAT mapping the server's events come back
// through stays), rotating over the established LLQs; without it (a
// caller's Dial, KeepAlive unset) refreshes follow the lease alone
// (TestRefreshScheduleAndReestablish).
func TestKeepAlive(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(t, nil)
		f.change(host+" 60 IN AAAA fd00::1", "")
		c := newTestClient(t, f, func(cfg *Config) { cfg.KeepAlive = 25 * time.Second })
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go c.Run(ctx)
		var w1, w2 watcher
		c.Watch(host, dns.TypeAAAA, w1.fn)
		c.Watch(host, dns.TypeTXT, w2.fn)
		synctest.Wait()
		start := time.Now()
		var at []time.Duration
		count := func() int {
			n := 0
			for _, s := range f.steps() {
				if s == "refresh 3600" {
					n++
				}
			}
			return n
		}
		for range 130 {
			time.Sleep(time.Second)
			synctest.Wait()
			if count() > len(at) {
				at = append(at, time.Since(start))
			}
		}
		if len(at) < 4 || len(at) > 6 {
			t.Fatalf("refreshes at %v in 130 s, want one every 25 s", at)
		}
		prev := time.Duration(0)
		for _, r := range at {
			if gap := r - prev; gap > 26*time.Second {
				t.Errorf("refreshes at %v: a gap of %v, want at most 25 s", at, gap)
			}
			prev = r
		}
	})
}
