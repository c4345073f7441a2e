package xfrm

import (
	"testing"

	"github.com/btmm/btmm/controlplane"
)

func TestInnerMTU(t *testing.T) {
	for _, tc := range []struct {
		link   int
		cipher controlplane.Cipher
		want   int
	}{
		// 1500 - 20 IPv4 - 8 UDP - 8 ESP - 8 IV - 16 ICV = 1440 (a multiple of 4), minus 2 trailer.
		{1500, controlplane.CipherAESGCM, 1438},
		// 1500 - 20 - 8 - 8 - 16 IV - 16 ICV = 1432 -> 1424 (a multiple of 16), minus 2.
		{1500, controlplane.CipherAESCBCHMAC, 1422},
		{9000, controlplane.CipherAESGCM, 8938},
		{1300, controlplane.CipherAESGCM, minIPv6MTU},
	} {
		if got := InnerMTU(tc.link, tc.cipher); got != tc.want {
			t.Errorf("InnerMTU(%d, %s) = %d, want %d", tc.link, tc.cipher, got, tc.want)
		}
		// The largest inner packet, padded and encapsulated, must fit the link.
		if tc.want > minIPv6MTU {
			tr := transformOf(tc.cipher)
			payload := tc.want + espTrailerLen
			if r := payload % tr.block; r != 0 {
				payload += tr.block - r
			}
			if outer := ipv4HeaderLen + udpHeaderLen + espHeaderLen + tr.ivLen + payload + tr.icvLen; outer > tc.link {
				t.Errorf("%s: inner %d encapsulates to %d > link %d", tc.cipher, tc.want, outer, tc.link)
			}
		}
	}
}

func TestTransportMTU(t *testing.T) {
	for _, tc := range []struct {
		kind   controlplane.PathKind
		cipher controlplane.Cipher
		want   int
	}{
		// 1500 - 40 outer IPv6 - 40 inner - 8 ESP - 8 IV - 16 ICV = 1388, + 40 inner header - 2 trailer.
		{controlplane.PathIPv6, controlplane.CipherAESGCM, 1426},
		{controlplane.PathSit, controlplane.CipherAESGCM, 1446},
		{controlplane.PathFOU, controlplane.CipherAESGCM, 1434},
		// 1500 - 20 - 40 - 8 - 16 - 16 = 1400 -> 1392 (16s), + 40 - 2.
		{controlplane.PathSit, controlplane.CipherAESCBCHMAC, 1430},
		{controlplane.PathESPInUDP, controlplane.CipherAESGCM, 1438},
	} {
		got := TransportMTU(1500, tc.kind, tc.cipher)
		if got != tc.want {
			t.Errorf("TransportMTU(1500, %v, %s) = %d, want %d", tc.kind, tc.cipher, got, tc.want)
		}
		if tc.kind == controlplane.PathESPInUDP {
			continue
		}
		tr := transformOf(tc.cipher)
		payload := got - ipv6HeaderLen + espTrailerLen
		if r := payload % tr.block; r != 0 {
			payload += tr.block - r
		}
		if outer := TunnelOverhead(tc.kind) + ipv6HeaderLen + espHeaderLen + tr.ivLen + payload + tr.icvLen; outer > 1500 {
			t.Errorf("%v %s: inner %d encapsulates to %d > 1500", tc.kind, tc.cipher, got, outer)
		}
		if TransportMTU(1300, tc.kind, tc.cipher) != minIPv6MTU {
			t.Errorf("%v: below 1280 on a 1300-byte link", tc.kind)
		}
	}
}
