package natpmp

import (
	"net/netip"
	"time"
)

// epochSample is a server epoch value and the client time it arrived.
type epochSample struct {
	server uint32
	at     time.Time
}

// NATPMPEpochReset reports whether a NAT-PMP gateway lost its mapping state
// (RFC 6886 §3.6): the new seconds-since-start-of-epoch is more than 2 s
// below the previous value plus 7/8 of the client time elapsed since.
func NATPMPEpochReset(prev uint32, prevAt time.Time, cur uint32, now time.Time) bool {
	elapsed := max(now.Sub(prevAt), 0)
	expect := time.Duration(prev)*time.Second + elapsed*7/8
	return time.Duration(cur)*time.Second+2*time.Second < expect
}

// PCPEpochReset reports whether a PCP server lost its state (RFC 6887
// §8.5): its epoch went back by more than a second, or its clock and ours
// advanced at rates more than 1/16 (plus 2 s) apart.
func PCPEpochReset(prev uint32, prevAt time.Time, cur uint32, now time.Time) bool {
	if int64(cur) < int64(prev)-1 {
		return true
	}
	client := max(now.Sub(prevAt), 0)
	server := time.Duration(int64(cur)-int64(prev)) * time.Second
	return client+2*time.Second < server-server/16 || server+2*time.Second < client-client/16
}

var (
	cgnat    = netip.MustParsePrefix("100.64.0.0/10")
	private4 = []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("172.16.0.0/12"),
		netip.MustParsePrefix("192.168.0.0/16"),
	}
)

// IsCGNAT reports whether a is in the RFC 6598 shared address space.
func IsCGNAT(a netip.Addr) bool { return cgnat.Contains(a.Unmap()) }

// IsPrivate reports whether a is RFC 1918 private IPv4.
func IsPrivate(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range private4 {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// behindNAT reports whether a host address a is one a NAT sits in front of:
// RFC 1918, CGNAT or link-local.
func behindNAT(a netip.Addr) bool {
	return IsPrivate(a) || IsCGNAT(a) || a.Unmap().IsLinkLocalUnicast()
}
