package llqclient

import (
	"github.com/btmm/btmm/dns/llq"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// FuzzHandle feeds arbitrary server messages to a client with an LLQ in
// every state: nothing may panic, and the answer set stays well-formed
// (every RR matches the question). Seeds are a challenge, an ACK with
// answers, an event and a removal.
func FuzzHandle(f *testing.F) {
	mk := func(op uint16, id uint64, answers ...string) []byte {
		m := new(dns.Msg)
		m.Id = 7
		m.Response = true
		m.Question = []dns.Question{{Name: host, Qtype: dns.TypeAAAA, Qclass: dns.ClassINET}}
		for _, a := range answers {
			rr, _ := dns.NewRR(a)
			m.Answer = append(m.Answer, rr)
		}
		llq.SetOption(m, dns.EDNS0_LLQ{Code: dns.EDNS0LLQ, Version: 1, Opcode: op, Id: id, LeaseLife: 60})
		b, _ := m.Pack()
		return b
	}
	f.Add(mk(llq.OpSetup, 5))
	f.Add(mk(llq.OpSetup, 5, host+" 60 IN AAAA fd00::1"))
	f.Add(mk(llq.OpEvent, 5, host+" 60 IN AAAA fd00::2"))
	f.Add(mk(llq.OpEvent, 5, host+" 4294967295 IN AAAA fd00::2", "other. 60 IN A 1.2.3.4"))
	f.Add(mk(llq.OpRefresh, 5))
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, st := range []state{stSetup1, stSetup2, stActive, stPolling} {
			c, err := New(Config{Server: "x:53"}, nil)
			if err != nil {
				t.Fatal(err)
			}
			c.conn = discard{}
			var got []dns.RR
			q := &query{key: qkey{host, dns.TypeAAAA}, fns: map[int]func([]dns.RR){1: func(rrs []dns.RR) { got = rrs }},
				answers: map[string]dns.RR{}, st: st, id: 5, msgID: 7, waiting: true, due: time.Now()}
			c.queries[q.key] = q
			c.pending[7] = q
			c.handle(b)
			for _, rr := range got {
				if !q.matches(rr) || rr.Header().Ttl == llq.RemovedTTL {
					t.Fatalf("state %d: answer set holds %v", st, rr)
				}
			}
		}
	})
}

type discard struct{}

func (discard) Send([]byte) error     { return nil }
func (discard) Recv() ([]byte, error) { select {} }
func (discard) Close() error          { return nil }
