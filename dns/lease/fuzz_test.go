package lease

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// updateWithOption returns a raw UPDATE whose OPT RR carries option 2 with
// the given data.
func updateWithOption(data []byte) []byte {
	m := new(dns.Msg)
	m.SetUpdate("btmm.example.")
	b, _ := m.Pack()
	b[11] = 1 // ARCOUNT
	opt := []byte{0, 0, 41, 0x10, 0, 0, 0, 0, 0}
	rd := binary.BigEndian.AppendUint16(nil, 2)
	rd = binary.BigEndian.AppendUint16(rd, uint16(len(data)))
	rd = append(rd, data...)
	opt = binary.BigEndian.AppendUint16(opt, uint16(len(rd)))
	return append(append(b, opt...), rd...)
}

// FuzzUpdateLease parses the Update-Lease option from the wire, grants, and
// checks the echo re-parses to the granted value within bounds.
func FuzzUpdateLease(f *testing.F) {
	f.Add([]byte{0, 0, 0x0e, 0x10})
	f.Add([]byte{0, 0, 0, 1, 0, 0, 0x1c, 0x20})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{1, 2, 3})
	b := DefaultBounds
	f.Fuzz(func(t *testing.T, data []byte) {
		m := new(dns.Msg)
		if m.Unpack(updateWithOption(data)) != nil {
			return
		}
		g, echo := b.Grant(m)
		if g < b.Min || g > b.Max {
			if _, ok := Option(m); ok || g != b.Default {
				t.Fatalf("granted %v outside bounds", g)
			}
		}
		if echo == nil {
			return
		}
		if time.Duration(echo.Lease)*time.Second != g {
			t.Fatalf("echo %d != granted %v", echo.Lease, g)
		}
		resp := new(dns.Msg)
		resp.SetReply(m)
		resp.SetEdns0(1232, false)
		resp.IsEdns0().Option = append(resp.IsEdns0().Option, echo)
		wire, err := resp.Pack()
		if err != nil {
			t.Fatal(err)
		}
		back := new(dns.Msg)
		if err := back.Unpack(wire); err != nil {
			t.Fatal(err)
		}
		ul, ok := Option(back)
		if !ok || ul.Lease != echo.Lease || ul.KeyLease != echo.KeyLease {
			t.Fatalf("echo round trip %v != %v", ul, echo)
		}
	})
}
