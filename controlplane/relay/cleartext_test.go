package relay

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
)

// tcp6 builds an IPv6/TCP packet (checksum field left as pseudo).
func tcp6(seq uint32, flags byte, payload []byte) []byte {
	p := make([]byte, 40+20+len(payload))
	p[0] = 0x60
	binary.BigEndian.PutUint16(p[4:], uint16(20+len(payload)))
	p[6], p[7] = protoTCP, 64
	src, dst := netip.MustParseAddr("fd00::a").As16(), netip.MustParseAddr("fd00::b").As16()
	copy(p[8:], src[:])
	copy(p[24:], dst[:])
	binary.BigEndian.PutUint16(p[40:], 40000)
	binary.BigEndian.PutUint16(p[42:], 5001)
	binary.BigEndian.PutUint32(p[44:], seq)
	p[52] = 5 << 4
	p[53] = flags
	p[56], p[57] = 0x12, 0x34 // a partial checksum, as the stack leaves it for the card
	copy(p[60:], payload)
	return p
}

// checksumOK verifies an IPv6 upper-layer checksum (sums to 0xffff).
func checksumOK(p []byte) bool {
	l4 := p[40:]
	var sum uint32
	for i := 8; i < 40; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(p[i:]))
	}
	sum += uint32(len(l4)) + uint32(p[6])
	for i := 0; i+1 < len(l4); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(l4[i:]))
	}
	if len(l4)%2 == 1 {
		sum += uint32(l4[len(l4)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return sum == 0xffff
}

// TestCompleteCleartext: a TCP super-packet is split into segments that fit,
// with consecutive sequence numbers, FIN/PSH on the last only, CWR on the
// first only, and valid checksums; the payload is intact. A small packet
// gets its checksum and stays whole; UDP too; non-IPv6 passes unchanged.
func TestCompleteCleartext(t *testing.T) {
	payload := make([]byte, 5000)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	segs := CompleteCleartext(tcp6(1000, tcpCWR|tcpPSH|tcpFIN|0x10, payload), 1400)
	if len(segs) != 4 { // 1340 bytes of payload each: 1340*3 + 980
		t.Fatalf("%d segments, want 4", len(segs))
	}
	var got []byte
	for i, s := range segs {
		if len(s) > 1400 || !checksumOK(s) {
			t.Errorf("segment %d: %d bytes, checksum ok %v", i, len(s), checksumOK(s))
		}
		if seq := binary.BigEndian.Uint32(s[44:]); seq != 1000+uint32(len(got)) {
			t.Errorf("segment %d: seq %d, want %d", i, seq, 1000+len(got))
		}
		if pl := int(binary.BigEndian.Uint16(s[4:])); pl != len(s)-40 {
			t.Errorf("segment %d: payload length %d for %d bytes", i, pl, len(s))
		}
		f := s[53]
		if want := i == len(segs)-1; (f&tcpFIN != 0) != want || (f&tcpPSH != 0) != want {
			t.Errorf("segment %d: flags %#x", i, f)
		}
		if (f&tcpCWR != 0) != (i == 0) || f&0x10 == 0 {
			t.Errorf("segment %d: flags %#x (CWR first only, ACK on all)", i, f)
		}
		got = append(got, s[60:]...)
	}
	if !bytes.Equal(got, payload) {
		t.Error("payload changed by splitting")
	}

	small := CompleteCleartext(tcp6(1, 0x18, []byte("hello")), MaxCleartextPacket)
	if len(small) != 1 || !checksumOK(small[0]) {
		t.Errorf("small packet: %d packets, checksum ok %v", len(small), len(small) == 1 && checksumOK(small[0]))
	}
	u := tcp6(0, 0, []byte("udp payload"))
	u[6] = protoUDP
	binary.BigEndian.PutUint16(u[44:], uint16(len(u)-40)) // UDP length
	if out := CompleteCleartext(u, MaxCleartextPacket); len(out) != 1 || !checksumOK(out[0]) {
		t.Error("UDP checksum not completed")
	}
	esp := []byte{0, 0, 0x10, 1, 0, 0, 0, 1, 0x60, 0x60}
	if out := CompleteCleartext(bytes.Clone(esp), MaxCleartextPacket); len(out) != 1 || !bytes.Equal(out[0], esp) {
		t.Errorf("non-IPv6 changed: %x", out)
	}
}

// FuzzCompleteCleartext: never panics; every IPv6 TCP/UDP packet that comes
// out fits, carries a valid checksum, and the TCP payloads add up to the
// input's.
func FuzzCompleteCleartext(f *testing.F) {
	f.Add(tcp6(7, 0x18, make([]byte, 3000)), 1400)
	f.Add(tcp6(7, 0x18, []byte("x")), 1472)
	f.Add([]byte{0x60, 0, 0, 0, 0, 0, protoUDP}, 100)
	f.Fuzz(func(t *testing.T, b []byte, max int) {
		max = 100 + max%2000
		if max < 100 {
			max += 2000
		}
		in := bytes.Clone(b)
		out := CompleteCleartext(b, max)
		if len(in) < 60 || in[0]>>4 != 6 || in[6] != protoTCP || 40+int(binary.BigEndian.Uint16(in[4:])) > len(in) {
			return
		}
		hl := int(in[52]>>4) * 4
		n := 40 + int(binary.BigEndian.Uint16(in[4:]))
		if hl < 20 || 40+hl > n {
			return
		}
		total := 0
		for _, s := range out {
			if len(out) > 1 && len(s) > max {
				t.Fatalf("segment of %d bytes over %d", len(s), max)
			}
			if !checksumOK(s) {
				t.Fatalf("bad checksum in %x", s)
			}
			total += len(s) - 40 - hl
		}
		if total != n-40-hl {
			t.Fatalf("payload %d bytes in, %d out", n-40-hl, total)
		}
	})
}
