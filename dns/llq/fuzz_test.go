package llq

import (
	"encoding/binary"
	"testing"

	"github.com/miekg/dns"
)

func queryWithLLQ(data []byte) []byte {
	m := new(dns.Msg)
	m.SetQuestion(qname, dns.TypeAAAA)
	b, _ := m.Pack()
	b[11] = 1
	opt := []byte{0, 0, 41, 0x10, 0, 0, 0, 0, 0}
	rd := binary.BigEndian.AppendUint16(nil, dns.EDNS0LLQ)
	rd = binary.BigEndian.AppendUint16(rd, uint16(len(data)))
	rd = append(rd, data...)
	opt = binary.BigEndian.AppendUint16(opt, uint16(len(rd)))
	return append(append(b, opt...), rd...)
}

// FuzzLLQ parses an LLQ option from the wire, runs it through the table
// (setup, challenge response, refresh, event ACK), and checks that every
// response marshals and re-parses with the same LLQ option.
func FuzzLLQ(f *testing.F) {
	opt := func(ver, op, errc uint16, id uint64, lease uint32) []byte {
		b := binary.BigEndian.AppendUint16(nil, ver)
		b = binary.BigEndian.AppendUint16(b, op)
		b = binary.BigEndian.AppendUint16(b, errc)
		b = binary.BigEndian.AppendUint64(b, id)
		return binary.BigEndian.AppendUint32(b, lease)
	}
	f.Add(opt(1, 1, 0, 0, 3600))
	f.Add(opt(1, 1, 0, 0x6b0ad40847134800, 3600))
	f.Add(opt(1, 2, 0, 42, 0))
	f.Add(opt(1, 3, 0, 42, 0))
	f.Add(opt(2, 1, 0, 0, 1))
	f.Add([]byte{0, 1})
	tb := NewTable(Config{MaxTotal: 64})
	f.Cleanup(tb.Close)
	f.Fuzz(func(t *testing.T, data []byte) {
		m := new(dns.Msg)
		if m.Unpack(queryWithLLQ(data)) != nil {
			return
		}
		o, ok := Option(m)
		if !ok {
			return
		}
		// Parse -> marshal -> parse of the request option.
		w, err := m.Pack()
		if err != nil {
			t.Fatal(err)
		}
		m2 := new(dns.Msg)
		if err := m2.Unpack(w); err != nil {
			t.Fatal(err)
		}
		if o2, _ := Option(m2); o2 == nil || !same(o2, o) {
			t.Fatalf("option round trip %v != %v", o2, o)
		}
		resp, err := tb.Handle(m, peer, "k.")
		if err != nil || resp == nil {
			return
		}
		ro, _ := Option(resp)
		w, err = resp.Pack()
		if err != nil {
			t.Fatal(err)
		}
		back := new(dns.Msg)
		if err := back.Unpack(w); err != nil {
			t.Fatal(err)
		}
		if bo, _ := Option(back); bo == nil || !same(bo, ro) {
			t.Fatalf("response option round trip %v != %v", bo, ro)
		}
		if ro.Opcode == OpSetup && o.Id == 0 && ro.Error == ErrNoError && tb.Len() > 64 {
			t.Fatal("challenge allocated state")
		}
	})
}

func same(a, b *dns.EDNS0_LLQ) bool {
	return a.Version == b.Version && a.Opcode == b.Opcode && a.Error == b.Error && a.Id == b.Id && a.LeaseLife == b.LeaseLife
}
