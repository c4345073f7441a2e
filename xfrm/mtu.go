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
