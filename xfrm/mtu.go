package xfrm

import "github.com/btmm/btmm/controlplane"

// Overhead of ESP-in-UDP tunnel mode on an IPv4 outer path (RFC 3948, RFC 4303):
// outer IPv4 header, UDP header, ESP header (SPI + sequence number), the
// cipher's IV, the ESP trailer (pad length + next header) with padding to
// the cipher's block, and the ICV.
const (
	ipv4HeaderLen = 20
	udpHeaderLen  = 8
	espHeaderLen  = 8
	espTrailerLen = 2
	minIPv6MTU    = 1280
)

type transform struct {
	ivLen, block, icvLen int
}

func transformOf(c controlplane.Cipher) transform {
	switch c {
	case controlplane.CipherAESCBCHMAC:
		return transform{ivLen: 16, block: 16, icvLen: 16} // hmac(sha256) truncated to 128 bits (RFC 4868)
	default: // rfc4106(gcm(aes)): 8-byte IV, 4-byte alignment, 16-byte ICV
		return transform{ivLen: 8, block: 4, icvLen: 16}
	}
}

// InnerMTU is the largest inner IPv6 packet that fits in one outer IPv4 packet
// of size linkMTU after ESP-in-UDP encapsulation with cipher c, never below
// IPv6's minimum of 1280 (the kernel then fragments the outer packet).
func InnerMTU(linkMTU int, c controlplane.Cipher) int {
	t := transformOf(c)
	room := linkMTU - ipv4HeaderLen - udpHeaderLen - espHeaderLen - t.ivLen - t.icvLen
	room -= room % t.block // the padded payload is a whole number of blocks
	mtu := room - espTrailerLen
	if mtu < minIPv6MTU {
		return minIPv6MTU
	}
	return mtu
}

const ipv6HeaderLen = 40

// TunnelOverhead is what a tunnel device of kind k puts in front of the
// inner IPv6 packet: an IPv6 header (ip6tnl, encaplimit none), an IPv4 header
// (sit), or IPv4 + UDP + the 4-byte GUE header (sit over FOU).
func TunnelOverhead(k controlplane.PathKind) int {
	switch k {
	case controlplane.PathIPv6:
		return ipv6HeaderLen
	case controlplane.PathSit:
		return ipv4HeaderLen
	case controlplane.PathFOU:
		return ipv4HeaderLen + udpHeaderLen + 4
	}
	return ipv4HeaderLen + udpHeaderLen // ESP-in-UDP
}

// TransportMTU is the largest inner IPv6 packet that fits in one outer
// packet of size linkMTU when ESP in transport mode (cipher c) protects it
// inside a tunnel device of kind k: the inner IPv6 header stays in front,
// ESP header, IV, padded payload, trailer and ICV follow. Never below 1280.
func TransportMTU(linkMTU int, k controlplane.PathKind, c controlplane.Cipher) int {
	if k == controlplane.PathESPInUDP {
		return InnerMTU(linkMTU, c)
	}
	t := transformOf(c)
	room := linkMTU - TunnelOverhead(k) - ipv6HeaderLen - espHeaderLen - t.ivLen - t.icvLen
	room -= room % t.block
	mtu := ipv6HeaderLen + room - espTrailerLen
	if mtu < minIPv6MTU {
		return minIPv6MTU
	}
	return mtu
}
