//go:build linux

package keying

import (
	"context"
	"encoding/binary"
	"github.com/btmm/btmm/internal/udpflood"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// TestVMInstallerOutboundSwap sends UDP through the test installer's
// outbound SA as fast as one socket can while the agent-style Install
// replaces that SA again and again. A packet whose route was resolved just
// before a swap must still find its SA when it is encrypted: the kernel
// counts each one that does not as XfrmOutStateInvalid and drops it (the
// ping flood's rare lost echo). Needs ESP (the VM tier).
func TestVMInstallerOutboundSwap(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	a, b := netns.New(t, "sa"), netns.New(t, "sb")
	netns.MustVeth(t, a, "va", b, "vb")
	a.MustAddr(t, "lo", ulaA.String()+"/128")
	a.MustAddr(t, "va", "10.0.0.1/24")
	b.MustAddr(t, "vb", "10.0.0.2/24")
	link, err := a.LinkByName("va")
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Handle.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: host128(ulaB.AsSlice()),
		Src: ulaA.AsSlice(), MTU: 1400}); err != nil {
		t.Fatal(err)
	}
	inst := &xfrmInstaller{h: a.Handle, localOuter: net.IPv4(10, 0, 0, 1).To4(), localULA: ulaA.AsSlice()}
	newSA := func() controlplane.SA {
		spi := max(binary.BigEndian.Uint32(randBytes(4)), 0x100)
		return controlplane.SA{SPI: spi, Cipher: controlplane.CipherAESGCM, Key: randBytes(36)}
	}
	p := controlplane.Peer{Name: "b", ULA: ulaB, Outer: netip.MustParseAddrPort("10.0.0.2:4500"), Out: newSA(), In: newSA()}
	ctx := context.Background()
	if err := inst.Install(ctx, p); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inst.Remove(ctx, ulaB) })

	flood := udpflood.Start(t, a, netip.AddrPortFrom(ulaB, 9))
	const swaps = 300
	deadline := time.Now().Add(time.Minute)
	for range swaps {
		// Every swap overlaps the flood: wait for a couple of datagrams.
		if !flood.Wait(2, time.Until(deadline)) {
			sent, _, _ := flood.Stop()
			t.Fatalf("the sender stalled: %d datagrams sent", sent)
		}
		p.Out = newSA()
		if err := inst.Install(ctx, p); err != nil {
			flood.Stop()
			t.Fatal(err)
		}
	}
	sent, failed, firstErr := flood.Stop()
	st := udpflood.XfrmStat(t, a)
	invalid := st["XfrmOutStateInvalid"]
	t.Logf("%d swaps, %d datagrams sent, %d sends failed, XfrmOutStateInvalid %d; non-zero xfrm_stat:\n%s",
		swaps, sent, failed, invalid, udpflood.NonZero(st))
	if invalid != 0 || failed != 0 {
		t.Errorf("packets lost to an outbound SA deleted under them: XfrmOutStateInvalid %d, failed sends %d (first: %v)",
			invalid, failed, firstErr)
	}
}
