package keying

import (
	"bytes"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// bigMessage is an encoded INIT of n bytes or so (an APReq of filler).
func bigMessage(t testing.TB, n int) []byte {
	m := &Message{Type: MsgInit, Mode: ModeKerberos, Exchange: [8]byte{1, 2, 3}, APReq: bytes.Repeat([]byte{0x5a}, n), MAC: make([]byte, macLen)}
	b, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestDatagramsFitAndReassemble: every datagram stays within
// MaxDatagramLen (so with the marker, UDP and IPv6 headers within 1280
// bytes); the pieces reassemble to the message in any order, duplicates
// included.
func TestDatagramsFitAndReassemble(t *testing.T) {
	k1 := bytes.Repeat([]byte{1}, 32)
	for _, n := range []int{10, 1100, 1200, 2500, 6000} {
		msg := bigMessage(t, n)
		for _, cookie := range [][]byte{nil, bytes.Repeat([]byte{2}, 16)} {
			dgs, err := datagrams(msg, k1, cookie)
			if err != nil {
				t.Fatalf("%d bytes: %v", len(msg), err)
			}
			for _, d := range dgs {
				if len(d) > MaxDatagramLen {
					t.Errorf("%d-byte message: a %d-byte datagram", len(msg), len(d))
				}
				if ip6 := 40 + 8 + len(NonESPMarker) + len(d); ip6 > 1280 {
					t.Errorf("IPv6 packet of %d bytes", ip6)
				}
				var m Message
				if err := m.Unmarshal(d); err != nil || !mac1OK(&m, d, k1) || (cookie != nil) != (m.MAC2 != nil) {
					t.Errorf("datagram %x...: %v, MAC1/MAC2 wrong", d[:16], err)
				}
			}
			if len(msg)+2*attrLen(cookieMACLen) <= MaxDatagramLen {
				if len(dgs) != 1 {
					t.Errorf("%d bytes fit one datagram, sent in %d", len(msg), len(dgs))
				}
				continue
			}
			r := newReassembler()
			order := append(rand.Perm(len(dgs)), 0) // a duplicate too
			var got []byte
			for _, i := range order {
				var m Message
				if err := m.Unmarshal(dgs[i]); err != nil {
					t.Fatal(err)
				}
				out, err := r.add(&m, netip.MustParseAddrPort("192.0.2.1:4500"), time.Unix(0, 0))
				if err != nil {
					t.Fatal(err)
				}
				if out != nil {
					got = out
				}
			}
			if !bytes.Equal(got, msg) {
				t.Errorf("%d bytes: reassembled %d bytes, not the message", len(msg), len(got))
			}
			if len(r.bufs) != 1 { // the late duplicate started a new message
				t.Errorf("%d messages left in reassembly", len(r.bufs))
			}
		}
	}
	if maxFragments*fragPiece < MaxMessageLen {
		t.Errorf("%d fragments of %d bytes do not carry a %d-byte message", maxFragments, fragPiece, MaxMessageLen)
	}
	ack, _ := (&Message{Type: MsgAck, Mode: ModePSK, Cipher: 1, APRep: make([]byte, 1300)}).Marshal()
	if _, err := datagrams(ack, nil, nil); err == nil {
		t.Error("a long ACK was fragmented")
	}
}

// TestReassemblyBounds: a contradicting piece drops the message; sources
// get maxReassemblyPer messages at most, everybody maxReassembly, and an
// unfinished message is dropped after reassemblyTTL.
func TestReassemblyBounds(t *testing.T) {
	now := time.Unix(1000, 0)
	piece := func(ex byte, i, n uint8, data string) *Message {
		return &Message{Type: MsgFragment, Mode: ModePSK, Exchange: [8]byte{ex}, Frag: Fragment{Of: MsgInit, Index: i, Count: n}, Data: []byte(data)}
	}
	src := netip.MustParseAddrPort("192.0.2.1:4500")
	r := newReassembler()
	if out, err := r.add(piece(1, 0, 2, "aa"), src, now); out != nil || err != nil {
		t.Fatal(out, err)
	}
	if _, err := r.add(piece(1, 0, 2, "ab"), src, now); err == nil || len(r.bufs) != 0 {
		t.Errorf("contradicting piece: %v, %d left", err, len(r.bufs))
	}
	if _, err := r.add(piece(1, 0, 3, "aa"), src, now); err != nil {
		t.Fatal(err)
	}
	if _, err := r.add(piece(1, 1, 2, "aa"), src, now); err == nil || len(r.bufs) != 0 {
		t.Errorf("other count: %v, %d left", err, len(r.bufs))
	}
	for i := range maxReassemblyPer {
		if _, err := r.add(piece(byte(i), 0, 2, "x"), netip.AddrPortFrom(src.Addr(), uint16(1000+i)), now); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.add(piece(99, 0, 2, "x"), netip.AddrPortFrom(src.Addr(), 9999), now); err == nil {
		t.Errorf("source %v got more than %d messages in reassembly", src.Addr(), maxReassemblyPer)
	}
	for i := range 2 * maxReassembly {
		a := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		if _, err := r.add(piece(1, 0, 2, "x"), netip.AddrPortFrom(a, 4500), now.Add(time.Duration(i)*time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		if len(r.bufs) > maxReassembly {
			t.Fatalf("%d messages in reassembly", len(r.bufs))
		}
	}
	if _, ok := r.bufs[reasmKey{netip.AddrPortFrom(src.Addr(), 1000), [8]byte{0}, MsgInit}]; ok {
		t.Error("the oldest message was not evicted")
	}
	r.expire(now.Add(time.Hour))
	if len(r.bufs) != 0 || len(r.perSource) != 0 {
		t.Errorf("after the TTL: %d messages, %d sources", len(r.bufs), len(r.perSource))
	}
	big := strings.Repeat("z", MaxMessageLen/2+1)
	r.add(piece(5, 0, 3, big), src, now)
	if _, err := r.add(piece(5, 1, 3, big), src, now); err == nil {
		t.Error("more than MaxMessageLen reassembled")
	}
}

// FuzzReassembly: any sequence of datagrams (split from the input) into the
// reassembler never panics, never holds more than its bounds, and what it
// returns is the concatenation of pieces that agree with each other.
func FuzzReassembly(f *testing.F) {
	dgs, _ := datagrams(bigMessage(f, 3000), bytes.Repeat([]byte{1}, 32), nil)
	f.Add(bytes.Join(dgs, []byte{0xff, 0xfe}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := newReassembler()
		now := time.Unix(0, 0)
		for i, d := range bytes.Split(b, []byte{0xff, 0xfe}) {
			var m Message
			if m.Unmarshal(d) != nil || m.Type != MsgFragment {
				continue
			}
			from := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), uint16(i%3))
			out, _ := r.add(&m, from, now)
			if len(out) > MaxMessageLen {
				t.Fatalf("reassembled %d bytes", len(out))
			}
			if len(r.bufs) > maxReassembly || r.perSource[sourceKey(from.Addr())] > maxReassemblyPer {
				t.Fatalf("bounds: %d messages", len(r.bufs))
			}
			now = now.Add(time.Second)
		}
	})
}
