package llq

import (
	"fmt"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/btmm/btmm/dns/store"
	"github.com/miekg/dns"
)

type sent struct {
	at  time.Time
	p   Peer
	msg *dns.Msg
}

type fakeSender struct {
	mu   sync.Mutex
	msgs []sent
}

func (f *fakeSender) SendEvents(evs []Event) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, ev := range evs {
		m := new(dns.Msg)
		if err := m.Unpack(ev.Wire); err != nil {
			return err
		}
		if o, ok := Option(m); !ok || o.Id != ev.LLQ {
			return fmt.Errorf("event for LLQ %d carries %v", ev.LLQ, o)
		}
		f.msgs = append(f.msgs, sent{time.Now(), ev.Peer, m})
	}
	return nil
}

func (f *fakeSender) all() []sent {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]sent(nil), f.msgs...)
}

const qname = "mac.alice.btmm.example."

func req(op uint16, id uint64, lease uint32) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(qname, dns.TypeAAAA)
	SetOption(m, dns.EDNS0_LLQ{Version: Version, Opcode: op, Id: id, LeaseLife: lease})
	return m
}

var peer = Peer{Net: "udp", Addr: "192.0.2.1:5353"}

func setup(t *testing.T, tb *Table, p Peer, key string) uint64 {
	t.Helper()
	before := tb.Len()
	ch, err := tb.Handle(req(OpSetup, 0, 3600), p, key)
	if err != nil {
		t.Fatal(err)
	}
	o, _ := Option(ch)
	if o.Error != ErrNoError || o.Id == 0 {
		t.Fatalf("challenge %v", o)
	}
	if tb.Len() != before {
		t.Fatal("challenge allocated an LLQ")
	}
	ack, _ := tb.Handle(req(OpSetup, o.Id, o.LeaseLife), p, key)
	ao, _ := Option(ack)
	if ao.Error != ErrNoError || ao.Id != o.Id {
		t.Fatalf("ack %v", ao)
	}
	return o.Id
}

func change(added, removed string) store.Change {
	var c store.Change
	if added != "" {
		rr, _ := dns.NewRR(added)
		c.Added = append(c.Added, store.Record{RR: rr})
	}
	if removed != "" {
		rr, _ := dns.NewRR(removed)
		c.Removed = append(c.Removed, store.Record{RR: rr})
	}
	return c
}

func TestSetupChallengeIsStatelessAndBound(t *testing.T) {
	tb := NewTable(Config{})
	defer tb.Close()
	ch, _ := tb.Handle(req(OpSetup, 0, 10), peer, "k.")
	o, _ := Option(ch)
	if o.LeaseLife != 15*60 {
		t.Fatalf("lease %d, want clamped to 900", o.LeaseLife)
	}
	// From another address, another key, or forged: NO-SUCH-LLQ, nothing kept.
	for _, tc := range []struct {
		p   Peer
		key string
		id  uint64
	}{
		{Peer{Net: "udp", Addr: "192.0.2.2:5353"}, "k.", o.Id},
		{peer, "other.", o.Id},
		{peer, "k.", o.Id ^ 1},
	} {
		r, _ := tb.Handle(req(OpSetup, tc.id, 900), tc.p, tc.key)
		if ro, _ := Option(r); ro.Error != ErrNoSuchLLQ || tb.Len() != 0 {
			t.Fatalf("%+v: got %v, len %d", tc, ro, tb.Len())
		}
	}
	// Bad version.
	m := req(OpSetup, 0, 900)
	o2, _ := Option(m)
	o2.Version = 2
	r, _ := tb.Handle(m, peer, "k.")
	if ro, _ := Option(r); ro.Error != ErrBadVers {
		t.Fatalf("bad version: %v", ro)
	}
}

func TestChallengeWindowExpires(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tb := NewTable(Config{})
		defer tb.Close()
		ch, _ := tb.Handle(req(OpSetup, 0, 900), peer, "k.")
		o, _ := Option(ch)
		time.Sleep(2 * time.Minute)
		r, _ := tb.Handle(req(OpSetup, o.Id, 900), peer, "k.")
		if ro, _ := Option(r); ro.Error != ErrNoSuchLLQ || tb.Len() != 0 {
			t.Fatalf("stale challenge accepted: %v", ro)
		}
	})
}

func TestEventRetransmissionThenDelete(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fs := &fakeSender{}
		tb := NewTable(Config{Send: fs})
		defer tb.Close()
		id := setup(t, tb, peer, "k.")
		start := time.Now()
		tb.Changed(change(qname+" 60 IN AAAA fd00::1", qname+" 60 IN AAAA fd00::2"))
		time.Sleep(time.Minute)
		synctest.Wait()
		got := fs.all()
		if len(got) != 3 {
			t.Fatalf("transmissions = %d, want 3", len(got))
		}
		// Backoff: 0, 2 s, 6 s; the same message ID each time.
		for i, want := range []time.Duration{0, 2 * time.Second, 6 * time.Second} {
			if d := got[i].at.Sub(start); d != want {
				t.Errorf("transmission %d at %v, want %v", i, d, want)
			}
			if got[i].msg.Id != got[0].msg.Id {
				t.Errorf("transmission %d has a new message ID", i)
			}
		}
		ev := got[0].msg
		o, _ := Option(ev)
		if o.Opcode != OpEvent || o.Id != id || !ev.Response || len(ev.Answer) != 2 {
			t.Fatalf("event %v", ev)
		}
		if ev.Answer[0].Header().Ttl != RemovedTTL || ev.Answer[1].Header().Ttl != 60 {
			t.Fatalf("removal/addition TTLs: %v", ev.Answer)
		}
		if tb.Len() != 0 {
			t.Fatal("LLQ not deleted after three unacknowledged transmissions")
		}
	})
}

func TestEventAckStopsRetransmission(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fs := &fakeSender{}
		tb := NewTable(Config{Send: fs})
		defer tb.Close()
		id := setup(t, tb, peer, "k.")
		tb.Changed(change(qname+" 60 IN AAAA fd00::1", ""))
		// Unrelated names and types do not match.
		tb.Changed(change("other.alice.btmm.example. 60 IN AAAA fd00::1", ""))
		tb.Changed(change(qname+" 60 IN A 192.0.2.1", ""))
		synctest.Wait()
		got := fs.all()
		if len(got) != 1 {
			t.Fatalf("sent %d", len(got))
		}
		ack := new(dns.Msg)
		ack.Id = got[0].msg.Id
		ack.Response = true
		SetOption(ack, dns.EDNS0_LLQ{Version: Version, Opcode: OpEvent, Id: id})
		if r, _ := tb.Handle(ack, peer, ""); r != nil {
			t.Fatal("ack answered")
		}
		time.Sleep(time.Minute)
		if n := len(fs.all()); n != 1 || tb.Len() != 1 {
			t.Fatalf("after ack: %d sends, %d llqs", n, tb.Len())
		}
	})
}

func TestRefreshAndLeaseExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tb := NewTable(Config{})
		defer tb.Close()
		id := setup(t, tb, peer, "k.")
		time.Sleep(50 * time.Minute)
		// Refresh from a new address (NAT rebinding) with a too-long lease.
		np := Peer{Net: "udp", Addr: "192.0.2.9:1"}
		r, _ := tb.Handle(req(OpRefresh, id, 99999), np, "k.")
		if o, _ := Option(r); o.Error != ErrNoError || o.LeaseLife != 7200 {
			t.Fatalf("refresh %v", o)
		}
		if e, _ := tb.Get(id); e.Peer != np {
			t.Fatalf("peer not updated: %v", e.Peer)
		}
		// Refresh with another key: NO-SUCH-LLQ.
		r, _ = tb.Handle(req(OpRefresh, id, 900), peer, "x.")
		if o, _ := Option(r); o.Error != ErrNoSuchLLQ {
			t.Fatalf("foreign refresh %v", o)
		}
		time.Sleep(119 * time.Minute)
		if tb.Len() != 1 {
			t.Fatal("expired early")
		}
		time.Sleep(2 * time.Minute)
		synctest.Wait()
		if tb.Len() != 0 {
			t.Fatal("not expired")
		}
		r, _ = tb.Handle(req(OpRefresh, id, 900), peer, "k.")
		if o, _ := Option(r); o.Error != ErrNoSuchLLQ {
			t.Fatalf("refresh of expired %v", o)
		}
	})
}

func TestCancelAndPerKeyLimit(t *testing.T) {
	tb := NewTable(Config{MaxPerKey: 2})
	defer tb.Close()
	a := setup(t, tb, Peer{Net: "udp", Addr: "192.0.2.1:1"}, "k.")
	setup(t, tb, Peer{Net: "udp", Addr: "192.0.2.1:2"}, "k.")
	ch, _ := tb.Handle(req(OpSetup, 0, 900), Peer{Net: "udp", Addr: "192.0.2.1:3"}, "k.")
	if o, _ := Option(ch); o.Error != ErrServFull {
		t.Fatalf("third LLQ: %v", o)
	}
	// Other keys are unaffected.
	setup(t, tb, peer, "other.")
	r, _ := tb.Handle(req(OpRefresh, a, 0), Peer{Net: "udp", Addr: "192.0.2.1:1"}, "k.")
	if o, _ := Option(r); o.Error != ErrNoError || tb.Len() != 2 {
		t.Fatalf("cancel %v len %d", o, tb.Len())
	}
}

func TestPersistRestore(t *testing.T) {
	var mu sync.Mutex
	saved := map[uint64][]byte{}
	persist := func(id uint64, d []byte) {
		mu.Lock()
		defer mu.Unlock()
		if d == nil {
			delete(saved, id)
		} else {
			saved[id] = d
		}
	}
	tb := NewTable(Config{Persist: persist})
	id := setup(t, tb, peer, "k.")
	// Over a stream: no challenge, established by the first request; not persisted.
	tcp := Peer{Net: "tcp", Addr: "192.0.2.1:9", Conn: 1}
	r, _ := tb.Handle(req(OpSetup, 0, 900), tcp, "k.")
	if o, _ := Option(r); o.Error != ErrNoError || o.Id == 0 || tb.Len() != 2 {
		t.Fatalf("stream setup %v, len %d", o, tb.Len())
	}
	// A four-way client's challenge response on the stream is ACKed again.
	o, _ := Option(r)
	r2, _ := tb.Handle(req(OpSetup, o.Id, 900), tcp, "k.")
	if o2, _ := Option(r2); o2.Error != ErrNoError || o2.Id != o.Id || tb.Len() != 2 {
		t.Fatalf("stream challenge response %v, len %d", o2, tb.Len())
	}
	tb.DropConn(1)
	if tb.Len() != 1 {
		t.Fatal("stream LLQ outlived its connection")
	}
	tb.Close()
	mu.Lock()
	var data [][]byte
	for _, d := range saved {
		data = append(data, d)
	}
	mu.Unlock()
	tb2 := NewTable(Config{Persist: persist})
	defer tb2.Close()
	if n := tb2.Restore(data); n != 1 {
		t.Fatalf("restored %d", n)
	}
	if e, ok := tb2.Get(id); !ok || e.Peer != peer || e.Key != "k." {
		t.Fatalf("restored %v", e)
	}
}

// A change already reflected in the ACK's answers is not sent again.
func TestNoEventForChangesInTheAck(t *testing.T) {
	fs := &fakeSender{}
	tb := NewTable(Config{Send: fs, Answer: func(dns.Question) ([]dns.RR, uint64) { return nil, 5 }})
	defer tb.Close()
	setup(t, tb, peer, "k.")
	c := change(qname+" 60 IN AAAA fd00::1", "")
	c.Rev = 5
	tb.Changed(c)
	c.Rev = 6
	tb.Changed(c)
	if n := len(fs.all()); n != 1 {
		t.Fatalf("sent %d events, want 1 (for rev 6 only)", n)
	}
}

// TestFanoutSharesOneMessage: one change, many LLQs. Each LLQ gets one event
// holding every matching record under its own question (name as it asked,
// type), with its own LLQ-ID and message ID; the retransmission round after
// 2 s resends only the events not yet acknowledged.
func TestFanoutSharesOneMessage(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fs := &fakeSender{}
		tb := NewTable(Config{Send: fs})
		defer tb.Close()
		type llq struct {
			p     Peer
			qname string
			qtype uint16
			id    uint64
		}
		var ls []*llq
		for i := range 5 {
			ls = append(ls, &llq{p: Peer{Net: "udp", Addr: fmt.Sprintf("192.0.2.%d:5353", i+1)}, qname: qname, qtype: dns.TypeAAAA})
		}
		ls = append(ls, &llq{p: Peer{Net: "udp", Addr: "192.0.2.9:1"}, qname: "MAC.Alice.btmm.example.", qtype: dns.TypeAAAA},
			&llq{p: Peer{Net: "udp", Addr: "192.0.2.9:2"}, qname: qname, qtype: dns.TypeANY},
			&llq{p: Peer{Net: "udp", Addr: "192.0.2.9:3"}, qname: qname, qtype: dns.TypeTXT})
		for _, l := range ls {
			m := new(dns.Msg)
			m.SetQuestion(l.qname, l.qtype)
			SetOption(m, dns.EDNS0_LLQ{Version: Version, Opcode: OpSetup, LeaseLife: 3600})
			ch, _ := tb.Handle(m, l.p, "k.")
			o, _ := Option(ch)
			SetOption(m, dns.EDNS0_LLQ{Version: Version, Opcode: OpSetup, Id: o.Id, LeaseLife: 3600})
			if ack, _ := tb.Handle(m, l.p, "k."); ack == nil {
				t.Fatal("no ack")
			}
			l.id = o.Id
		}
		c := change(qname+" 60 IN AAAA fd00::1", qname+" 60 IN AAAA fd00::2")
		tb.Changed(c)
		got := fs.all()
		if len(got) != 7 { // not the TXT LLQ
			t.Fatalf("%d events, want 7", len(got))
		}
		msgIDs := map[uint16]bool{}
		byLLQ := map[uint64]*dns.Msg{}
		for _, s := range got {
			o, _ := Option(s.msg)
			byLLQ[o.Id] = s.msg
			msgIDs[s.msg.Id] = true
		}
		for _, l := range ls[:7] {
			m := byLLQ[l.id]
			if m == nil {
				t.Fatalf("no event for %s %s", l.p.Addr, dns.Type(l.qtype))
			}
			// The table keeps questions in canonical (lower) case.
			if len(m.Question) != 1 || m.Question[0].Name != dns.CanonicalName(l.qname) || m.Question[0].Qtype != l.qtype || len(m.Answer) != 2 {
				t.Fatalf("event for %s: %v", l.qname, m)
			}
			for _, rr := range m.Answer {
				if rr.Header().Name != m.Question[0].Name {
					t.Errorf("record owner %s in the event for %s", rr.Header().Name, l.qname)
				}
			}
		}
		if len(msgIDs) < 6 {
			t.Errorf("message IDs %v: want them drawn per event", msgIDs)
		}
		// Acknowledge two; after 2 s only the other five come again.
		// (The events of one question share one message: same answers.)
		for _, l := range ls[:2] {
			ack := new(dns.Msg)
			ack.Id = byLLQ[l.id].Id
			ack.Response = true
			SetOption(ack, dns.EDNS0_LLQ{Version: Version, Opcode: OpEvent, Id: l.id})
			tb.Handle(ack, l.p, "k.")
		}
		time.Sleep(3 * time.Second)
		synctest.Wait()
		again := fs.all()[7:]
		if len(again) != 5 {
			t.Fatalf("retransmitted %d events, want 5", len(again))
		}
		for _, s := range again {
			if o, _ := Option(s.msg); o.Id == ls[0].id || o.Id == ls[1].id {
				t.Fatalf("acknowledged event for LLQ %d sent again", o.Id)
			}
		}
	})
}
