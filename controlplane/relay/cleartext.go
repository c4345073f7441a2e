package relay

import (
	"encoding/binary"
)

// Cleartext packets on the relay-tcp bridge (ebpf dataplane's cleartext
// mode: a whole IPv6 packet rides in UDP). A packet the egress program
// hands to the bridge socket through lo never meets a network card, so
// what the stack left for the hardware is still to do: a TCP or UDP
// checksum only begun (CHECKSUM_PARTIAL) and a TCP segment larger than
// the path (GSO). CompleteCleartext does what the card would have done.
// ESP datagrams (secure mode) need none of it: XFRM completes checksums
// and segments before it encrypts.

// MaxCleartextPacket is the largest inner IPv6 packet CompleteCleartext
// leaves whole: what fits an IPv4 MTU of 1500 after the outer IPv4 and UDP
// headers (the relay sends it on as ESP-in-UDP would be).
const MaxCleartextPacket = 1500 - 20 - 8

const (
	protoTCP = 6
	protoUDP = 17

	tcpFIN = 0x01
	tcpPSH = 0x08
	tcpCWR = 0x80
)

// CompleteCleartext returns pkt (an IPv6 packet) with its TCP or UDP
// checksum computed, a TCP segment longer than maxPacket split into
// segments that fit (sequence numbers, lengths and flags as GSO sets
// them). Anything else (not IPv6, extension headers, truncated) is
// returned as it is: the receiver judges it.
func CompleteCleartext(pkt []byte, maxPacket int) [][]byte {
	if len(pkt) < 40 || pkt[0]>>4 != 6 {
		return [][]byte{pkt}
	}
	n := 40 + int(binary.BigEndian.Uint16(pkt[4:6]))
	if n > len(pkt) {
		return [][]byte{pkt}
	}
	pkt = pkt[:n]
	l4 := pkt[40:]
	switch pkt[6] {
	case protoTCP:
		if len(l4) < 20 {
			return [][]byte{pkt}
		}
		hl := int(l4[12]>>4) * 4
		if hl < 20 || hl > len(l4) {
			return [][]byte{pkt}
		}
		seg := maxPacket - 40 - hl
		payload := len(l4) - hl
		if len(pkt) <= maxPacket || seg <= 0 {
			setL4Checksum(pkt, 16)
			return [][]byte{pkt}
		}
		var out [][]byte
		seq := binary.BigEndian.Uint32(l4[4:8])
		flags := l4[13]
		for off := 0; off < payload; off += seg {
			m := min(seg, payload-off)
			s := make([]byte, 40+hl+m)
			copy(s, pkt[:40+hl])
			copy(s[40+hl:], l4[hl+off:hl+off+m])
			binary.BigEndian.PutUint16(s[4:6], uint16(hl+m))
			binary.BigEndian.PutUint32(s[44:48], seq+uint32(off))
			f := flags
			if off > 0 {
				f &^= tcpCWR
			}
			if off+m < payload {
				f &^= tcpFIN | tcpPSH
			}
			s[40+13] = f
			setL4Checksum(s, 16)
			out = append(out, s)
		}
		return out
	case protoUDP:
		if len(l4) >= 8 {
			setL4Checksum(pkt, 6)
		}
	}
	return [][]byte{pkt}
}

// setL4Checksum computes the checksum of pkt's upper-layer packet (RFC
// 8200 §8.1 pseudo-header) into the field at offset off of it.
func setL4Checksum(pkt []byte, off int) {
	l4 := pkt[40:]
	l4[off], l4[off+1] = 0, 0
	var sum uint32
	for i := 8; i < 40; i += 2 { // source and destination addresses
		sum += uint32(binary.BigEndian.Uint16(pkt[i:]))
	}
	sum += uint32(len(l4)>>16) + uint32(len(l4)&0xffff) + uint32(pkt[6])
	for i := 0; i+1 < len(l4); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(l4[i:]))
	}
	if len(l4)%2 == 1 {
		sum += uint32(l4[len(l4)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	c := ^uint16(sum)
	if c == 0 && pkt[6] == protoUDP {
		c = 0xffff // RFC 768: zero means "no checksum", not allowed over IPv6
	}
	binary.BigEndian.PutUint16(l4[off:], c)
}
