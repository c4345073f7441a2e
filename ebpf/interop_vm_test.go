package ebpf

import (
	"context"
	"crypto/sha256"
	"net/netip"
	"testing"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/btmm/btmm/xfrm"
)

// TestInteropXfrmPackageVM: host a on this (eBPF) dataplane, host b on btmm's
// own XFRM dataplane (package xfrm, with its ESP-in-UDP socket), keyed with
// mirrored SAs. Ping both ways and a 1 MB TCP transfer prove that the two
// dataplanes put the same bytes on the wire (RFC 6281 Figure 2).
func TestInteropXfrmPackageVM(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	a, b := topology(t)
	a.start(t, Config{})
	st := a.state(b, netip.AddrPortFrom(b.outer, b.port))
	a.set(t, st)

	conn, err := xfrm.ListenAt(context.Background(), b.ns.NsHandle(), netip.AddrPortFrom(netip.IPv4Unspecified(), b.port))
	must(t, err)
	t.Cleanup(func() { conn.Close() })
	bdp, err := xfrm.New(b.ns.NsHandle(), xfrm.Config{})
	must(t, err)
	bst := &controlplane.State{
		Local: controlplane.Local{ULA: b.ula, Port: b.port},
		Peers: []controlplane.Peer{{Name: a.name, ULA: a.ula, Outer: netip.AddrPortFrom(a.outer, a.port),
			Out: st.Peers[0].In, In: st.Peers[0].Out}},
	}
	if _, err := bdp.Set(context.Background(), bst); err != nil {
		bdp.Close()
		t.Fatalf("xfrm dataplane on b: %v", err)
	}
	ping(t, a, b)
	ping(t, b, a)
	data := randomBytes(t, 1<<20)
	s := openStream(t, a, b)
	n, err := s.conn.Write(data)
	s.sent.Add(int64(n))
	must(t, err)
	sum := sha256.Sum256(data)
	s.finish(t, sum[:])

	stats, err := bdp.Stats(context.Background())
	must(t, err)
	if len(stats) != 1 || stats[0].RxPackets == 0 || stats[0].TxPackets == 0 {
		t.Errorf("xfrm dataplane on b counted %+v, want traffic both ways", stats)
	}
	if d, _ := a.dp.Drops(); d[DropUnknownPeer]+d[DropMalformed] != 0 {
		t.Errorf("a dropped packets from the xfrm host: %v", d)
	}
	must(t, bdp.Close())
}
