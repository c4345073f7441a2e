package xfrm

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
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
	var conn *net.UDPConn
	if err := a.Do(func() (err error) {
		conn, err = net.DialUDP("udp6", nil, &net.UDPAddr{IP: ulaB.AsSlice(), Port: 9})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var sent, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		payload := make([]byte, 64)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := conn.Write(payload); err != nil {
				failed.Add(1)
				continue
			}
			sent.Add(1)
		}
	}()
	const swaps = 100
	for range swaps {
		// Let datagrams go out on the current SA before replacing it.
		for before := sent.Load(); sent.Load() < before+20; {
			time.Sleep(time.Millisecond)
		}
		st.Peers[0].Out = newSA()
		if _, err := d.Set(ctx, st); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	stat, _ := a.Run("cat", "/proc/net/xfrm_stat")
	t.Logf("%d swaps, %d datagrams sent, %d failed", swaps, sent.Load(), failed.Load())
	for _, l := range strings.Split(stat, "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "XfrmOutStateInvalid" && f[1] != "0" {
			t.Errorf("packets hit a deleted outbound SA: %s", l)
		}
	}
	if failed.Load() != 0 {
		t.Errorf("%d sends failed across the swaps", failed.Load())
	}
}
