//go:build linux

package keying

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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

	var conn *net.UDPConn
	if err := a.Do(func() (err error) {
		conn, err = net.DialUDP("udp6", nil, &net.UDPAddr{IP: ulaB.AsSlice(), Port: 9})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var sent, failed atomic.Int64
	var firstErr atomic.Value
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
				firstErr.CompareAndSwap(nil, err)
				continue
			}
			sent.Add(1)
		}
	}()
	const swaps = 300
	deadline := time.Now().Add(time.Minute)
	for range swaps {
		// Every swap overlaps the flood: wait for a couple of datagrams.
		for start := sent.Load() + failed.Load(); sent.Load()+failed.Load() < start+2; {
			if time.Now().After(deadline) {
				close(stop)
				wg.Wait()
				t.Fatalf("the sender stalled: %d datagrams sent", sent.Load())
			}
			time.Sleep(100 * time.Microsecond)
		}
		p.Out = newSA()
		if err := inst.Install(ctx, p); err != nil {
			close(stop)
			wg.Wait()
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	st, err := a.Run("cat", "/proc/net/xfrm_stat")
	if err != nil {
		t.Fatal(err)
	}
	invalid := xfrmStat(t, st, "XfrmOutStateInvalid")
	t.Logf("%d swaps, %d datagrams sent, %d sends failed, XfrmOutStateInvalid %d; non-zero xfrm_stat:\n%s",
		swaps, sent.Load(), failed.Load(), invalid, nonZero(st))
	if invalid != 0 || failed.Load() != 0 {
		err, _ := firstErr.Load().(error)
		t.Errorf("packets lost to an outbound SA deleted under them: XfrmOutStateInvalid %d, failed sends %d (first: %v)",
			invalid, failed.Load(), err)
	}
}

func xfrmStat(t *testing.T, st, name string) int64 {
	t.Helper()
	for _, l := range strings.Split(st, "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == name {
			n, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal(errors.New("xfrm_stat lacks " + name))
	return 0
}
