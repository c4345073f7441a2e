package controlplane_test

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/dataplanetest"
)

var (
	me    = netip.MustParseAddr("fd11::1")
	bULA  = netip.MustParseAddr("fd22::2")
	local = controlplane.Local{ULA: me, Port: 4500}
)

func sa(spi uint32) controlplane.SA {
	return controlplane.SA{SPI: spi, Cipher: controlplane.CipherAESGCM, Key: make([]byte, 20)}
}

func TestReconcilerSequence(t *testing.T) {
	ctx := context.Background()
	fake := &dataplanetest.Fake{}
	r := controlplane.NewReconciler(fake, local, nil)
	steps := []struct {
		name string
		do   func() error
		want string
	}{
		{"address known, no keys yet: nothing in the kernel", func() error {
			return r.SetPeerOuter(ctx, "b", bULA, netip.MustParseAddrPort("11.2.0.2:4500"), "dns")
		}, ""},
		{"keyed: SAs and route appear", func() error {
			return r.Install(ctx, controlplane.Peer{ULA: bULA, Out: sa(0x1001), In: sa(0x2001)})
		}, `route fd22::2/128 src fd11::1
state in fd22::2 -> fd11::1 spi 0x2001
state out fd11::1 -> fd22::2 spi 0x1001 encap 11.2.0.2:4500`},
		{"peer moved (LLQ push): outbound SA follows, keys unchanged", func() error {
			return r.SetPeerOuter(ctx, "b", bULA, netip.MustParseAddrPort("11.2.0.2:61000"), "dns")
		}, `route fd22::2/128 src fd11::1
state in fd22::2 -> fd11::1 spi 0x2001
state out fd11::1 -> fd22::2 spi 0x1001 encap 11.2.0.2:61000`},
		{"rekey make-before-break: new inbound SA beside the old one", func() error {
			return r.Install(ctx, controlplane.Peer{ULA: bULA, Out: sa(0x1001), In: sa(0x2002), PrevIn: []controlplane.SA{sa(0x2001)}})
		}, `route fd22::2/128 src fd11::1
state in fd22::2 -> fd11::1 spi 0x2001 (previous)
state in fd22::2 -> fd11::1 spi 0x2002
state out fd11::1 -> fd22::2 spi 0x1001 encap 11.2.0.2:61000`},
		{"keying reports a fresher source address", func() error {
			return r.Install(ctx, controlplane.Peer{ULA: bULA, Outer: netip.MustParseAddrPort("11.9.0.9:4500"), Out: sa(0x1002), In: sa(0x2002)})
		}, `route fd22::2/128 src fd11::1
state in fd22::2 -> fd11::1 spi 0x2002
state out fd11::1 -> fd22::2 spi 0x1002 encap 11.9.0.9:4500`},
		{"keys removed (DELETE): SAs go", func() error { return r.Remove(ctx, bULA) }, ""},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if diff := cmp.Diff(s.want, fake.Render()); diff != "" {
			t.Fatalf("%s: kernel state (-want +got):\n%s", s.name, diff)
		}
	}
	peers, _, _ := r.Status()
	if len(peers) != 1 || peers[0].Keyed || peers[0].OuterBy != "keying" {
		t.Fatalf("status after remove: %+v", peers)
	}
}

func TestReconcilerRefusesInvalidAndChangesNothing(t *testing.T) {
	ctx := context.Background()
	fake := &dataplanetest.Fake{}
	r := controlplane.NewReconciler(fake, local, nil)
	r.SetPeerOuter(ctx, "b", bULA, netip.MustParseAddrPort("11.2.0.2:4500"), "dns")
	if err := r.Install(ctx, controlplane.Peer{ULA: bULA, Out: sa(0x1001), In: sa(0x2001)}); err != nil {
		t.Fatal(err)
	}
	before := fake.Render()
	bad := sa(0x1003)
	bad.Key = []byte{1, 2, 3}
	err := r.Install(ctx, controlplane.Peer{ULA: bULA, Out: bad, In: sa(0x2003)})
	if err == nil || !strings.Contains(err.Error(), "20, 28 or 36-byte key") {
		t.Fatalf("bad key accepted or unclear error: %v", err)
	}
	if strings.Contains(err.Error(), "\x01\x02\x03") {
		t.Fatal("error leaks key bytes")
	}
	if got := fake.Render(); got != before {
		t.Fatalf("kernel state changed by refused input:\n%s", got)
	}
}

func TestReconcilerRetriesFailedApply(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		fake := &dataplanetest.Fake{}
		r := controlplane.NewReconciler(fake, local, nil)
		go r.Run(ctx)
		fake.FailNext(2)
		r.SetPeerOuter(ctx, "b", bULA, netip.MustParseAddrPort("11.2.0.2:4500"), "dns")
		err := r.Install(ctx, controlplane.Peer{ULA: bULA, Out: sa(0x1001), In: sa(0x2001)})
		if !errors.Is(err, dataplanetest.ErrInjected) {
			t.Fatalf("first apply: %v", err)
		}
		time.Sleep(1500 * time.Millisecond) // first retry at 1 s fails too
		synctest.Wait()
		if fake.Render() != "" {
			t.Fatal("applied despite injected failure")
		}
		time.Sleep(2 * time.Second) // second retry after 2 s succeeds
		synctest.Wait()
		// The refused install was rolled back: keying will retry the
		// exchange, so the retry applies nothing of those keys.
		if strings.Contains(fake.Render(), "spi 0x1001") {
			t.Fatalf("keys of a failed install were applied later:\n%s", fake.Render())
		}
		if err := r.Install(ctx, controlplane.Peer{ULA: bULA, Out: sa(0x1003), In: sa(0x2003)}); err != nil {
			t.Fatalf("install after recovery: %v", err)
		}
		if !strings.Contains(fake.Render(), "spi 0x1003") {
			t.Fatalf("not applied after recovery; sets=%d", fake.Sets())
		}
		if _, _, lastErr := r.Status(); lastErr != nil {
			t.Fatalf("status still shows error: %v", lastErr)
		}
	})
}

// A late ESP packet from the address a peer left must not pull it back.
func TestReconcilerIgnoresStaleKernelMapping(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		fake := &dataplanetest.Fake{}
		r := controlplane.NewReconciler(fake, local, nil)
		oldAddr, newAddr := netip.MustParseAddrPort("11.2.0.2:4500"), netip.MustParseAddrPort("11.2.0.3:4500")
		r.SetPeerOuter(ctx, "b", bULA, oldAddr, controlplane.SourceDNS)
		r.Install(ctx, controlplane.Peer{ULA: bULA, Out: sa(0x1001), In: sa(0x2001)})
		r.SetPeerOuter(ctx, "b", bULA, newAddr, controlplane.SourceDNS)
		r.SetPeerOuter(ctx, "b", bULA, oldAddr, controlplane.SourceKernel) // late packet
		if !strings.Contains(fake.Render(), "encap "+newAddr.String()) {
			t.Fatalf("a stale mapping event moved the peer back:\n%s", fake.Render())
		}
		// A mapping to a third address is followed at once.
		third := netip.MustParseAddrPort("11.2.0.3:61001")
		r.SetPeerOuter(ctx, "b", bULA, third, controlplane.SourceKernel)
		if !strings.Contains(fake.Render(), "encap "+third.String()) {
			t.Fatalf("kernel mapping to a new address not followed:\n%s", fake.Render())
		}
		// After the window, going back is believed again.
		time.Sleep(controlplane.StaleMappingWindow + time.Second)
		r.SetPeerOuter(ctx, "b", bULA, newAddr, controlplane.SourceKernel)
		if !strings.Contains(fake.Render(), "encap "+newAddr.String()) {
			t.Fatalf("mapping after the window not followed:\n%s", fake.Render())
		}
	})
}

// ESP that keeps arriving from the address a peer left (for longer than a
// late burst) is followed back: a NAT that gave the peer's first packets
// a transient port after its conntrack flush (TestVMReconvergence) and then
// took it back black-holed our traffic for the whole StaleMappingWindow.
func TestReconcilerFollowsPersistentMappingBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		fake := &dataplanetest.Fake{}
		r := controlplane.NewReconciler(fake, local, nil)
		usual, transient := netip.MustParseAddrPort("11.3.0.2:4500"), netip.MustParseAddrPort("11.3.0.2:39862")
		r.SetPeerOuter(ctx, "b", bULA, usual, controlplane.SourceDNS)
		r.Install(ctx, controlplane.Peer{ULA: bULA, Out: sa(0x1001), In: sa(0x2001)})
		time.Sleep(time.Minute)
		r.SetPeerOuter(ctx, "b", bULA, transient, controlplane.SourceKernel) // the NAT's remap
		if !strings.Contains(fake.Render(), "encap "+transient.String()) {
			t.Fatalf("kernel mapping to a new address not followed:\n%s", fake.Render())
		}
		// ESP from the usual port again, one event per packet: the
		// first second is taken for late packets, then it is followed.
		for range 9 {
			time.Sleep(100 * time.Millisecond)
			r.SetPeerOuter(ctx, "b", bULA, usual, controlplane.SourceKernel)
		}
		if !strings.Contains(fake.Render(), "encap "+transient.String()) {
			t.Fatalf("moved back within a late burst's second:\n%s", fake.Render())
		}
		time.Sleep(200 * time.Millisecond)
		r.SetPeerOuter(ctx, "b", bULA, usual, controlplane.SourceKernel)
		if !strings.Contains(fake.Render(), "encap "+usual.String()) {
			t.Fatalf("ESP from the previous address for 1.1 s not followed:\n%s", fake.Render())
		}
		// A late burst after that move is ignored again.
		r.SetPeerOuter(ctx, "b", bULA, transient, controlplane.SourceKernel)
		if !strings.Contains(fake.Render(), "encap "+usual.String()) {
			t.Fatalf("a late packet after moving back moved the peer again:\n%s", fake.Render())
		}
	})
}

// Status, Desired and other reports must not wait for a kernel call that
// hangs (issue 12 item 6): the reconciler's lock is not held across Set.
func TestReconcilerStatusWhileSetStalled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	fake := &dataplanetest.Fake{}
	r := controlplane.NewReconciler(fake, local, nil)
	r.SetPeerOuter(ctx, "b", bULA, netip.MustParseAddrPort("11.2.0.2:4500"), "dns")
	waiting, release := fake.Stall()
	defer release()
	installed := make(chan error, 1)
	go func() { installed <- r.Install(ctx, controlplane.Peer{ULA: bULA, Out: sa(0x1001), In: sa(0x2001)}) }()
	<-waiting

	answered := make(chan []controlplane.PeerStatus, 1)
	go func() {
		peers, _, _ := r.Status()
		r.Desired()
		r.Local()
		// A report that changes nothing in the kernel returns at once too.
		r.SetPeerOuter(ctx, "c", netip.MustParseAddr("fd33::3"), netip.MustParseAddrPort("11.3.0.2:4500"), "dns")
		answered <- peers
	}()
	select {
	case peers := <-answered:
		if len(peers) != 1 || !peers[0].Keyed {
			t.Fatalf("status during the stalled install: %+v", peers)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Status blocked behind a stalled Dataplane.Set")
	}
	select {
	case err := <-installed:
		t.Fatalf("install returned while its Set was stalled: %v", err)
	default:
	}
	release()
	if err := <-installed; err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(fake.Render(), "spi 0x1001") {
		t.Fatalf("install not applied after the stall:\n%s", fake.Render())
	}
}

// A Set stalled in the kernel ends with its context (shutdown reaches it),
// and a refused install is rolled back without undoing what others reported
// meanwhile.
func TestReconcilerStalledSetCancelled(t *testing.T) {
	fake := &dataplanetest.Fake{}
	r := controlplane.NewReconciler(fake, local, nil)
	bg := context.Background()
	r.SetPeerOuter(bg, "b", bULA, netip.MustParseAddrPort("11.2.0.2:4500"), "dns")
	if err := r.Install(bg, controlplane.Peer{ULA: bULA, Out: sa(0x1001), In: sa(0x2001)}); err != nil {
		t.Fatal(err)
	}
	waiting, release := fake.Stall()
	defer release()
	ctx, cancel := context.WithCancel(bg)
	installed := make(chan error, 1)
	go func() { installed <- r.Install(ctx, controlplane.Peer{ULA: bULA, Out: sa(0x1002), In: sa(0x2002)}) }()
	<-waiting
	cancel()
	if err := <-installed; !errors.Is(err, context.Canceled) {
		t.Fatalf("stalled install after cancel: %v", err)
	}
	release()
	peers, _, _ := r.Status()
	if len(peers) != 1 || peers[0].OutSPI != 0x1001 {
		t.Fatalf("refused install not rolled back: %+v", peers)
	}
}

// Tunnel paths: the peer's tunnels are kept whatever the path, a path
// change is one apply that touches no key, keying over IPv6 does not move
// the ESP-in-UDP endpoint, and what cannot be carried falls back.
func TestReconcilerTunnelPaths(t *testing.T) {
	ctx := context.Background()
	fake := &dataplanetest.Fake{}
	r := controlplane.NewReconciler(fake, controlplane.Local{ULA: me, Port: 4500, FOUPort: 6080}, nil)
	v6 := controlplane.Tunnel{Kind: controlplane.PathIPv6, Remote: netip.MustParseAddrPort("[2001:db8:2::2]:0")}
	fou := controlplane.Tunnel{Kind: controlplane.PathFOU, Remote: netip.MustParseAddrPort("11.2.0.2:6080")}
	cULA := netip.MustParseAddr("fd33::3")
	tunnels := `tunnel fou 11.2.0.2:6080 dev ` + controlplane.TunnelDevice(controlplane.PathFOU, bULA) + `
tunnel ipv6 2001:db8:2::2 dev ` + controlplane.TunnelDevice(controlplane.PathIPv6, bULA)
	steps := []struct {
		name string
		do   func() error
		want string
	}{
		{"ipv6-only peer keyed over IPv6: the keying source is not an ESP-in-UDP endpoint", func() error {
			return r.Install(ctx, controlplane.Peer{ULA: bULA, Outer: netip.MustParseAddrPort("[2001:db8:2::2]:4500"), Out: sa(0x1001), In: sa(0x2001)})
		}, ""},
		{"its tunnels become known, no path chosen yet: with no IPv4 endpoint its first tunnel carries it", func() error {
			return r.SetPeerPath(ctx, bULA, controlplane.PathESPInUDP, []controlplane.Tunnel{v6, fou})
		}, `route fd22::2/128 src fd11::1 via ipv6 dev ` + controlplane.TunnelDevice(controlplane.PathIPv6, bULA) + `
state in fd22::2 -> fd11::1 spi 0x2001
state out fd11::1 -> fd22::2 spi 0x1001 encap invalid AddrPort
` + tunnels},
		{"the checks choose ipv6", func() error {
			return r.SetPeerPath(ctx, bULA, controlplane.PathIPv6, []controlplane.Tunnel{v6, fou})
		}, `route fd22::2/128 src fd11::1 via ipv6 dev ` + controlplane.TunnelDevice(controlplane.PathIPv6, bULA) + `
state in fd22::2 -> fd11::1 spi 0x2001
state out fd11::1 -> fd22::2 spi 0x1001 encap invalid AddrPort
` + tunnels},
		{"an IPv4 endpoint appears; still sent by ipv6", func() error {
			return r.SetPeerOuter(ctx, "b", bULA, netip.MustParseAddrPort("11.2.0.2:4500"), "dns")
		}, `route fd22::2/128 src fd11::1 via ipv6 dev ` + controlplane.TunnelDevice(controlplane.PathIPv6, bULA) + `
state in fd22::2 -> fd11::1 spi 0x2001
state out fd11::1 -> fd22::2 spi 0x1001 encap 11.2.0.2:4500
` + tunnels},
		{"path changes to fou: the route moves, the SAs stay", func() error {
			return r.SetPeerPath(ctx, bULA, controlplane.PathFOU, []controlplane.Tunnel{v6, fou})
		}, `route fd22::2/128 src fd11::1 via fou dev ` + controlplane.TunnelDevice(controlplane.PathFOU, bULA) + `
state in fd22::2 -> fd11::1 spi 0x2001
state out fd11::1 -> fd22::2 spi 0x1001 encap 11.2.0.2:4500
` + tunnels},
		{"back to esp-in-udp", func() error {
			return r.SetPeerPath(ctx, bULA, controlplane.PathESPInUDP, []controlplane.Tunnel{v6, fou})
		}, `route fd22::2/128 src fd11::1
state in fd22::2 -> fd11::1 spi 0x2001
state out fd11::1 -> fd22::2 spi 0x1001 encap 11.2.0.2:4500
` + tunnels},
		{"a second peer behind the same NAT: its fou tunnel is left out", func() error {
			if err := r.Install(ctx, controlplane.Peer{ULA: cULA, Outer: netip.MustParseAddrPort("11.2.0.2:4501"), Out: sa(0x1002), In: sa(0x2002)}); err != nil {
				return err
			}
			return r.SetPeerPath(ctx, cULA, controlplane.PathFOU, []controlplane.Tunnel{fou})
		}, `route fd22::2/128 src fd11::1
route fd33::3/128 src fd11::1
state in fd22::2 -> fd11::1 spi 0x2001
state in fd33::3 -> fd11::1 spi 0x2002
state out fd11::1 -> fd22::2 spi 0x1001 encap 11.2.0.2:4500
state out fd11::1 -> fd33::3 spi 0x1002 encap 11.2.0.2:4501
` + tunnels},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if diff := cmp.Diff(s.want, fake.Render()); diff != "" {
			t.Fatalf("%s: kernel state (-want +got):\n%s", s.name, diff)
		}
	}
	if err := r.SetPeerPath(ctx, bULA, controlplane.PathSit, []controlplane.Tunnel{v6}); err == nil {
		t.Error("a path naming no tunnel was accepted")
	}
	if err := r.SetPeerOuter(ctx, "b", bULA, netip.MustParseAddrPort("[2001:db8:2::2]:4500"), "dns"); err == nil {
		t.Error("an IPv6 ESP-in-UDP endpoint was accepted")
	}
	peers, _, _ := r.Status()
	for _, p := range peers {
		if p.ULA == cULA && (p.Via != controlplane.PathESPInUDP || len(p.Tunnels) != 0) {
			t.Errorf("status of the peer whose tunnel was left out: via %v tunnels %v", p.Via, p.Tunnels)
		}
	}
}
