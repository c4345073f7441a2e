package xfrm

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane/repair"
)

// TestRepairPutsBack: someone flushes our states and policies and deletes
// our route; the repair (Set with the last desired state) puts back exactly
// what was there. The outbound SA continues above the sequence numbers it
// can have used, the inbound one refuses what it had seen; a foreign state,
// policy and route added meanwhile are left alone.
func TestRepairPutsBack(t *testing.T) {
	k := newFakeKernel()
	k.links[1].Attrs().Statistics = &netlink.LinkStatistics{TxPackets: 5000}
	d := newFake(t, k, Config{})
	st := stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))
	if _, err := d.Set(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	want := mustRender(t, k)
	for i := range k.states {
		k.states[i].Replay = &netlink.XfrmReplayState{OSeq: 1000, Seq: 2000, BitMap: 0xff}
	}
	// An audit or any Set sees the counters...
	if ch, err := d.reapply(context.Background()); err != nil || len(ch) != 0 {
		t.Fatalf("reapply with nothing wrong = %q, %v", changeStrings(ch), err)
	}
	// ...then 300 more packets leave eth0 and someone flushes everything.
	k.links[1].Attrs().Statistics.TxPackets += 300
	k.states, k.policies, k.routes = nil, nil, nil
	k.XfrmStateAdd(&netlink.XfrmState{Src: net.ParseIP("192.0.2.1"), Dst: net.ParseIP("192.0.2.2"), Proto: netlink.XFRM_PROTO_ESP,
		Mode: netlink.XFRM_MODE_TUNNEL, Spi: 0x9999, Reqid: 7, Aead: &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: make([]byte, 20), ICVLen: 128}})
	k.XfrmPolicyAdd(&netlink.XfrmPolicy{Dir: netlink.XFRM_DIR_OUT, Src: prefix128(netip.MustParseAddr("fd99::1")), Dst: prefix128(netip.MustParseAddr("fd99::2")),
		Tmpls: []netlink.XfrmPolicyTmpl{{Src: net.ParseIP("192.0.2.1"), Dst: net.ParseIP("192.0.2.2"), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: 7}}})
	k.RouteAdd(&netlink.Route{Dst: prefix128(netip.MustParseAddr("fd99::1")), LinkIndex: 2, Protocol: 4, Table: 254})
	foreign := mustRender(t, k)

	ch, err := d.reapply(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("repair: %q", changeStrings(ch))
	if len(ch) != 6 { // 2 states, 3 policies, 1 route
		t.Errorf("repair changed %d objects, want 6: %q", len(ch), changeStrings(ch))
	}
	got := mustRender(t, k)
	for _, l := range strings.Split(strings.TrimSpace(want), "\n") {
		if !strings.Contains(got, l) {
			t.Errorf("not put back: %s", l)
		}
	}
	for _, l := range strings.Split(strings.TrimSpace(foreign), "\n") {
		if !strings.Contains(got, l) {
			t.Errorf("foreign object touched: %s", l)
		}
	}
	for _, s := range k.states {
		switch s.Spi {
		case 0x1001: // out: 1000 + 300 packets since + margin
			if s.Replay.OSeq != 1000+300+seqMargin {
				t.Errorf("out SA put back with oseq %d, want %d", s.Replay.OSeq, 1000+300+seqMargin)
			}
		case 0x1002:
			if s.Replay.Seq != 2000 || s.Replay.BitMap != ^uint32(0) {
				t.Errorf("in SA put back with replay %+v, want seq 2000, full bitmap", *s.Replay)
			}
		}
	}
	if ch, err := d.reapply(context.Background()); err != nil || len(ch) != 0 {
		t.Errorf("second reapply = %q, %v; want nothing", changeStrings(ch), err)
	}
}

// TestRepairSkipsHardExpired: an SA the kernel deleted at its hard
// lifetime is not put back (that would defeat the lifetime); the rest is.
func TestRepairSkipsHardExpired(t *testing.T) {
	k := newFakeKernel()
	d := newFake(t, k, Config{})
	st := stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))
	if _, err := d.Set(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	k.states = nil
	d.expired[0x1001] = true // as the monitor records XFRM_MSG_EXPIRE hard=1
	if _, err := d.reapply(context.Background()); err != nil {
		t.Fatal(err)
	}
	if r := mustRender(t, k); strings.Contains(r, "spi 0x00001001") || !strings.Contains(r, "spi 0x00001002") {
		t.Errorf("after repair:\n%s\nwant 0x1002 back, 0x1001 not", r)
	}
	// New keys for the peer: the expired SPI is forgotten.
	if _, err := d.Set(context.Background(), stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1011), gcm(0x1012)))); err != nil {
		t.Fatal(err)
	}
	if len(d.expired) != 0 {
		t.Errorf("expired SPIs kept after a rekey: %v", d.expired)
	}
}

// TestRepairLoopRestoresFake: the loop, kicked as the watchers kick it,
// restores within its settle time and reports the repair.
func TestRepairLoopRestoresFake(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := newFakeKernel()
		d := newFake(t, k, Config{})
		d.repair = repair.New(d.reapply, repair.Config{Audit: -1})
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go d.repair.Run(ctx)
		st := stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))
		if _, err := d.Set(context.Background(), st); err != nil {
			t.Fatal(err)
		}
		want := mustRender(t, k)
		d.mu.Lock()
		k.routes = nil
		d.mu.Unlock()
		d.onRoute(repair.RTMDelRoute, delRouteMsg(ulaB))
		time.Sleep(time.Second)
		synctest.Wait()
		d.mu.Lock()
		got := mustRender(t, k)
		d.mu.Unlock()
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("not restored (-want +got):\n%s", diff)
		}
		r := d.LastRepair()
		if r.Count != 1 || len(r.What) != 1 || !strings.HasPrefix(r.What[0], "add route fd00::b/128") {
			t.Errorf("LastRepair = %+v", r)
		}
		// A foreign route's deletion is not ours: no kick, no repair.
		d.onRoute(repair.RTMDelRoute, delRouteMsgProto(ulaC, 4))
		time.Sleep(time.Second)
		synctest.Wait()
		if d.LastRepair().Count != 1 {
			t.Errorf("repaired after a foreign route went: %+v", d.LastRepair())
		}
	})
}

// delRouteMsg is RTM_DELROUTE for ula/128 with our protocol, as the kernel sends it.
func delRouteMsg(ula netip.Addr) []byte { return delRouteMsgProto(ula, byte(DefaultRouteProtocol)) }

func delRouteMsgProto(ula netip.Addr, proto byte) []byte {
	b := []byte{10, 128, 0, 0, 254, proto, 0, 1, 0, 0, 0, 0}
	b = append(b, 20, 0, 1, 0) // RTA_DST, 16 bytes
	return append(b, ula.AsSlice()...)
}
