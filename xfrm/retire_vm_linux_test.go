package xfrm

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"github.com/btmm/btmm/internal/udpflood"
	"net/netip"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// TestVMOutboundSwapLosesNothing floods UDP to a peer's ULA while Set
// replaces the outbound SA 100 times (a rekey each time): with the grace
// period no packet may hit a deleted SA (XfrmOutStateInvalid) and no send
// may fail. Without it the kernel drops the packets already bound to the
// old SA (seen: 1–18 per run).
func TestVMOutboundSwapLosesNothing(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	a, b := netns.New(t, "ra"), netns.New(t, "rb")
	netns.MustVeth(t, a, "va", b, "vb")
	a.MustAddr(t, "va", "10.0.0.1/24")
	b.MustAddr(t, "vb", "10.0.0.2/24")
	d, err := New(a.NsHandle(), Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	newSA := func() controlplane.SA {
		k := make([]byte, 20)
		rand.Read(k)
		s := make([]byte, 4)
		rand.Read(s)
		return controlplane.SA{SPI: max(binary.BigEndian.Uint32(s), 0x100), Cipher: controlplane.CipherAESGCM, Key: k}
	}
	ulaA, ulaB := netip.MustParseAddr("fd00::a"), netip.MustParseAddr("fd00::b")
	p := controlplane.Peer{Name: "b", ULA: ulaB, Outer: netip.MustParseAddrPort("10.0.0.2:4500"), Out: newSA(), In: newSA()}
	st := &controlplane.State{Local: controlplane.Local{ULA: ulaA, Port: 4500}, Peers: []controlplane.Peer{p}}
	ctx := context.Background()
	if _, err := d.Set(ctx, st); err != nil {
		t.Fatal(err)
	}
	flood := udpflood.Start(t, a, netip.AddrPortFrom(ulaB, 9))
	const swaps = 100
	for range swaps {
		// Let datagrams go out on the current SA before replacing it.
		if !flood.Wait(20, time.Minute) {
			t.Fatal("the sender stalled")
		}
		st.Peers[0].Out = newSA()
		if _, err := d.Set(ctx, st); err != nil {
			t.Fatal(err)
		}
	}
	sent, failed, _ := flood.Stop()
	t.Logf("%d swaps, %d datagrams sent, %d failed", swaps, sent, failed)
	if n := udpflood.XfrmStat(t, a)["XfrmOutStateInvalid"]; n != 0 {
		t.Errorf("packets hit a deleted outbound SA: XfrmOutStateInvalid %d", n)
	}
	if failed != 0 {
		t.Errorf("%d sends failed across the swaps", failed)
	}
}
