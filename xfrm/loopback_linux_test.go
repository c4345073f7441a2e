package xfrm

import (
	"context"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestLoopbackOuterPlan: a peer behind btmmd's relay-tcp bridge (outer
// address a loopback socket) gets SAs between 127.0.0.1 and that socket,
// whatever Local.Outer says (the bridge takes only our tunnel port on
// loopback and writes back to 127.0.0.1), and a ULA route that is not on
// lo (IPv6 makes a route on lo a reject route): via the xfrm interface, or
// in the fallback via a device that is up (the default route's, here the
// fake's eth0). TestVMLoopbackOuter proves it carries traffic.
func TestLoopbackOuterPlan(t *testing.T) {
	for _, tc := range []struct {
		name   string
		noXfrm bool
		want   string
	}{
		{"xfrm interface", false, `addr fd00::a/128 dev btmm0
policy dir fwd fd00::b/128 -> fd00::a/128 if_id 0x6281 tmpl 127.0.0.1 -> 127.0.0.1 esp tunnel reqid 0x6281
policy dir in fd00::b/128 -> fd00::a/128 if_id 0x6281 tmpl 127.0.0.1 -> 127.0.0.1 esp tunnel reqid 0x6281
policy dir out fd00::a/128 -> fd00::b/128 if_id 0x6281 tmpl 127.0.0.1 -> 127.0.0.1 esp tunnel reqid 0x6281
route fd00::b/128 dev btmm0 src fd00::a proto 98 mtu 1438
state 127.0.0.1:4500 -> 127.0.0.1:45678 spi 0x00001001 esp tunnel reqid 0x6281 if_id 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::a/128 -> fd00::b/128
state 127.0.0.1:45678 -> 127.0.0.1:4500 spi 0x00001002 esp tunnel reqid 0x6281 if_id 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::b/128 -> fd00::a/128
`},
		{"lo fallback", true, `addr fd00::a/128 dev lo
policy dir fwd fd00::b/128 -> fd00::a/128 tmpl 127.0.0.1 -> 127.0.0.1 esp tunnel reqid 0x6281
policy dir in fd00::b/128 -> fd00::a/128 tmpl 127.0.0.1 -> 127.0.0.1 esp tunnel reqid 0x6281
policy dir out fd00::a/128 -> fd00::b/128 tmpl 127.0.0.1 -> 127.0.0.1 esp tunnel reqid 0x6281
route fd00::b/128 dev eth0 src fd00::a proto 98 mtu 1438
state 127.0.0.1:4500 -> 127.0.0.1:45678 spi 0x00001001 esp tunnel reqid 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::a/128 -> fd00::b/128
state 127.0.0.1:45678 -> 127.0.0.1:4500 spi 0x00001002 esp tunnel reqid 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::b/128 -> fd00::a/128
`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := newFakeKernel()
			k.noXfrmi = tc.noXfrm
			d := newFake(t, k, Config{})
			// Local.Outer set (stateOf: 10.0.0.1) must not leak into the
			// bridged peer's SAs.
			st := stateOf(peer("b", ulaB, "127.0.0.1:45678", gcm(0x1001), gcm(0x1002)))
			if _, err := d.Set(context.Background(), st); err != nil {
				t.Fatal(err)
			}
			got := mustRender(t, k)
			if diff := cmp.Diff(tc.want, withoutLink(got)); diff != "" {
				t.Fatalf("kernel (-want +got):\n%s", diff)
			}
			// Back to a wire address: the SAs move to the usual local address.
			st.Peers[0].Outer = netip.MustParseAddrPort("10.0.0.2:4500")
			if _, err := d.Set(context.Background(), st); err != nil {
				t.Fatal(err)
			}
			if got := mustRender(t, k); strings.Contains(got, "127.0.0.1") || !strings.Contains(got, "10.0.0.1:4500 -> 10.0.0.2:4500") {
				t.Fatalf("after the peer left the bridge:\n%s", got)
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}
