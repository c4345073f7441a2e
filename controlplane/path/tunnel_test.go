package path

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/dns/register"
)

func TestTunnelCandidates(t *testing.T) {
	ap := netip.MustParseAddrPort
	peer := netip.MustParseAddr("fd00::b")
	caps := register.Capabilities{Candidates: []register.Candidate{
		{Kind: "v6", Addr: ap("[2001:db8:2::2]:4500")},
		{Kind: "v6", Addr: ap("[fd00::99]:4500")}, // a ULA is no outer address
		{Kind: "v6", Addr: ap("11.9.9.9:4500")},   // nor IPv4 for v6
		{Kind: "sit", Addr: ap("11.2.0.2:4500")},
		{Kind: "sit", Addr: ap("[2001:db8:2::2]:1")}, // nor IPv6 for sit
		{Kind: "fou", Addr: ap("11.2.0.2:16080")},
	}}
	got := CandidatesFrom(ap("11.2.0.2:4500"), caps)
	want := []Candidate{
		{Kind: KindIPv6, Addr: ap("[2001:db8:2::2]:4500"), Source: "txt"},
		{Kind: KindSit, Addr: ap("11.2.0.2:0"), Source: "txt"},
		{Kind: KindFOU, Addr: ap("11.2.0.2:16080"), Source: "txt"},
		// The ESP-in-UDP endpoint at the sit address stays a candidate of its own.
		{Kind: KindDirect, Addr: ap("11.2.0.2:4500"), Source: "srv"},
	}
	if !slices.Equal(want, got) {
		t.Fatalf("CandidatesFrom = %+v\nwant %+v", got, want)
	}
	rank := func(k Kind) int { return slices.Index(DefaultPreference, k) }
	all := func(Kind) bool { return true }
	probes := WithTunnelProbes(peer, 4500, got, all, rank)
	ll := func(k controlplane.PathKind) netip.AddrPort {
		return netip.AddrPortFrom(controlplane.TunnelLinkLocal(peer).WithZone(controlplane.TunnelDevice(k, peer)), 4500)
	}
	want = []Candidate{
		{Kind: KindIPv6, Addr: ap("[2001:db8:2::2]:4500"), Source: "txt", Probe: ll(controlplane.PathIPv6)},
		{Kind: KindSit, Addr: ap("11.2.0.2:0"), Source: "txt", Probe: ll(controlplane.PathSit)},
		{Kind: KindDirect, Addr: ap("11.2.0.2:4500"), Source: "srv"},
	}
	if !slices.Equal(want, probes) {
		t.Fatalf("WithTunnelProbes, sit ranked above fou = %+v\nwant %+v", probes, want)
	}
	if p := WithTunnelProbes(peer, 4500, got, all, func(k Kind) int { return map[Kind]int{KindFOU: 0, KindSit: 1}[k] }); len(p) != 3 || p[1].Kind != KindFOU {
		t.Errorf("fou ranked above sit: %+v", p)
	}
	// Behind a NAT (no sit) with no IPv6 of ours: only fou (and ESP-in-UDP).
	if p := WithTunnelProbes(peer, 4500, got, func(k Kind) bool { return k == KindFOU }, rank); len(p) != 2 || p[0].Kind != KindFOU || p[1].Kind != KindDirect {
		t.Errorf("usable fou only: %+v", p)
	}
	wantT := []controlplane.Tunnel{{Kind: controlplane.PathIPv6, Remote: ap("[2001:db8:2::2]:0")}, {Kind: controlplane.PathSit, Remote: ap("11.2.0.2:0")}}
	if got := Tunnels(probes); !slices.Equal(wantT, got) {
		t.Errorf("Tunnels = %+v, want %+v", got, wantT)
	}
	if tt := Tunnels([]Candidate{{Kind: KindFOU, Addr: ap("11.2.0.2:16080")}}); len(tt) != 1 || tt[0].Remote != ap("11.2.0.2:16080") {
		t.Errorf("fou tunnel: %+v", tt)
	}
	for _, k := range []Kind{KindIPv6, KindSit, KindFOU} {
		if !k.Tunnel() || k.PathKind() == controlplane.PathESPInUDP {
			t.Errorf("%v: not a tunnel kind", k)
		}
		if back, err := ParseKind(k.String()); err != nil || back != k {
			t.Errorf("ParseKind(%v) = %v, %v", k, back, err)
		}
	}
	if KindRelayUDP.Tunnel() || KindDirect.PathKind() != controlplane.PathESPInUDP {
		t.Error("ESP-in-UDP kinds reported as tunnels")
	}
}

// tunnelNet joins two selectors: a datagram sent to a host's direct
// endpoint arrives from the sender's direct endpoint; one sent to its
// link-local through a tunnel device arrives from the sender's link-local
// on the receiver's device for it, as the kernel delivers it. cut drops
// what a path kind would lose, in both directions.
type tunnelNet struct {
	mu    sync.Mutex
	hosts map[netip.Addr]*tunnelHost
	cut   map[controlplane.PathKind]bool
}

type tunnelHost struct {
	ula    netip.Addr
	direct netip.AddrPort
	sel    *Selector
	net    *tunnelNet
}

func (n *tunnelNet) send(from *tunnelHost, b []byte, to netip.AddrPort) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, h := range n.hosts {
		if h == from {
			continue
		}
		src := from.direct
		kind := controlplane.PathESPInUDP
		if to != h.direct {
			for _, k := range []controlplane.PathKind{controlplane.PathIPv6, controlplane.PathSit, controlplane.PathFOU} {
				if to == netip.AddrPortFrom(controlplane.TunnelLinkLocal(h.ula).WithZone(controlplane.TunnelDevice(k, h.ula)), 4500) {
					kind = k
					src = netip.AddrPortFrom(controlplane.TunnelLinkLocal(from.ula).WithZone(controlplane.TunnelDevice(k, from.ula)), 4500)
				}
			}
			if kind == controlplane.PathESPInUDP {
				continue
			}
		}
		if n.cut[kind] {
			return nil
		}
		b := append([]byte(nil), b...)
		go h.sel.HandleProbe(b, src)
	}
	return nil
}

// TestSelectorTunnelKinds: with IPv6, FOU and a direct ESP-in-UDP
// endpoint all answering, the default preference picks IPv6; when its
// checks stop answering the path falls back to FOU, then to ESP-in-UDP;
// when they answer again the upgrade probes move it back up. A preference
// that ranks fou first picks fou.
func TestSelectorTunnelKinds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		n := &tunnelNet{hosts: map[netip.Addr]*tunnelHost{}, cut: map[controlplane.PathKind]bool{}}
		mk := func(ula, direct string, pref []Kind) *tunnelHost {
			h := &tunnelHost{ula: netip.MustParseAddr(ula), direct: netip.MustParseAddrPort(direct), net: n}
			k, err := NewKey()
			if err != nil {
				t.Fatal(err)
			}
			h.sel, err = New(Config{Key: k, Preference: pref, Send: func(b []byte, to netip.AddrPort) error { return n.send(h, b, to) }})
			if err != nil {
				t.Fatal(err)
			}
			n.hosts[h.ula] = h
			go h.sel.Run(ctx)
			return h
		}
		cands := func(of *tunnelHost, v6, fou string) []Candidate {
			c := []Candidate{{Kind: KindDirect, Addr: of.direct, Source: "srv"},
				{Kind: KindIPv6, Addr: netip.MustParseAddrPort(v6), Source: "txt"},
				{Kind: KindFOU, Addr: netip.MustParseAddrPort(fou), Source: "txt"}}
			return WithTunnelProbes(of.ula, 4500, c, func(Kind) bool { return true }, func(k Kind) int { return slices.Index(DefaultPreference, k) })
		}
		a := mk("fd00::a", "11.1.0.2:4500", nil)
		b := mk("fd00::b", "11.2.0.2:4500", nil)
		meetTunnel := func(a, b *tunnelHost) {
			pa, pb := a.sel.cfg.Key.Public(), b.sel.cfg.Key.Public()
			if err := a.sel.SetPeer(b.ula, "b", pb[:], cands(b, "[2001:db8:2::2]:4500", "11.2.0.2:16080")); err != nil {
				t.Fatal(err)
			}
			if err := b.sel.SetPeer(a.ula, "a", pa[:], cands(a, "[2001:db8:1::2]:4500", "11.1.0.2:6080")); err != nil {
				t.Fatal(err)
			}
		}
		meetTunnel(a, b)
		settle := func(d time.Duration) {
			time.Sleep(d)
			synctest.Wait()
		}
		settle(5 * time.Second)
		if p := a.sel.Current(b.ula); p.Kind != KindIPv6 || p.Remote != netip.MustParseAddrPort("[2001:db8:2::2]:4500") {
			t.Fatalf("all answering: %v, want ipv6", p)
		}
		cut := func(k controlplane.PathKind, on bool) {
			n.mu.Lock()
			n.cut[k] = on
			n.mu.Unlock()
		}
		cut(controlplane.PathIPv6, true)
		settle(a.sel.cfg.DeadAfter + a.sel.cfg.Active + time.Second)
		if p := a.sel.Current(b.ula); p.Kind != KindFOU {
			t.Fatalf("ipv6 dead: %v, want fou", p)
		}
		cut(controlplane.PathFOU, true)
		settle(a.sel.cfg.DeadAfter + a.sel.cfg.Active + time.Second)
		if p := a.sel.Current(b.ula); p.Kind != KindDirect {
			t.Fatalf("ipv6 and fou dead: %v, want direct (ESP-in-UDP)", p)
		}
		cut(controlplane.PathIPv6, false)
		cut(controlplane.PathFOU, false)
		settle(a.sel.cfg.Upgrade + a.sel.cfg.Active)
		if p := a.sel.Current(b.ula); p.Kind != KindIPv6 {
			t.Fatalf("repaired: %v, want ipv6 again", p)
		}
		// Another host preferring fou.
		c := mk("fd00::c", "11.3.0.2:4500", []Kind{KindFOU, KindIPv6, KindDirect})
		delete(n.hosts, b.ula)
		b = mk("fd00::b", "11.2.0.2:4500", nil)
		meetTunnel(c, b)
		settle(5 * time.Second)
		if p := c.sel.Current(b.ula); p.Kind != KindFOU {
			t.Fatalf("preference fou first: %v", p)
		}
	})
}
