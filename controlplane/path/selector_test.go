package path

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// TestSelectorNATKinds: for each pair of NAT situations the selector on
// both sides settles on the path kind an ICE agent would.
func TestSelectorNATKinds(t *testing.T) {
	type side struct {
		nat       string // "", "eim", "sym", "pcp"
		sharedNAT bool   // behind the same NAT as the other host
	}
	for _, tc := range []struct {
		name       string
		a, b       side
		atob, btoa Kind
	}{
		{"public-public", side{}, side{}, KindDirect, KindDirect},
		{"pcp-public", side{nat: "pcp"}, side{}, KindDirect, KindDirect},
		{"pcp-pcp", side{nat: "pcp"}, side{nat: "pcp"}, KindDirect, KindDirect},
		{"eim-eim", side{nat: "eim"}, side{nat: "eim"}, KindPunched, KindPunched},
		// a reaches b's public address; b answers a's reflexive endpoint.
		{"eim-public", side{nat: "eim"}, side{}, KindDirect, KindPunched},
		// b learns a's per-destination mapping from a's PING (peer-reflexive).
		{"sym-public", side{nat: "sym"}, side{}, KindDirect, KindPunched},
		{"sym-pcp", side{nat: "sym"}, side{nat: "pcp"}, KindDirect, KindPunched},
		// Linux masquerade filters by address and port: a symmetric NAT
		// facing it cannot be punched (nor in ICE): relay.
		{"sym-eim", side{nat: "sym"}, side{nat: "eim"}, KindRelayUDP, KindRelayUDP},
		{"sym-sym", side{nat: "sym"}, side{nat: "sym"}, KindRelayUDP, KindRelayUDP},
		{"same-nat-no-hairpin", side{nat: "sym"}, side{nat: "sym", sharedNAT: true}, KindLAN, KindLAN},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				n := newSimNet(t, ctx)
				mk := func(name, ula, lan, pub string, sd side, shared *simNAT) *simHost {
					if sd.nat == "" {
						return n.addHost(t, name, ula, pub+":4500", nil)
					}
					nat := shared
					if nat == nil {
						nat = newNAT(pub, sd.nat == "sym")
					}
					h := n.addHost(t, name, ula, lan+":4500", nat)
					if sd.nat == "pcp" {
						h.pcp = nat.staticMap(h.addr)
					}
					return h
				}
				a := mk("a", "fd00::a", "192.168.1.2", "11.1.0.2", tc.a, nil)
				var shared *simNAT
				if tc.b.sharedNAT {
					shared = a.nat
				}
				b := mk("b", "fd00::b", "192.168.1.3", "11.2.0.2", tc.b, shared)
				meet(t, a, b)
				time.Sleep(10 * time.Second)
				synctest.Wait()
				pa, pb := a.sel.Current(b.ula), b.sel.Current(a.ula)
				if pa.Kind != tc.atob || pb.Kind != tc.btoa {
					t.Errorf("a->b %v, b->a %v; want %v, %v\na: %+v\nb: %+v", pa, pb, tc.atob, tc.btoa, a.sel.Status(), b.sel.Status())
				}
			})
		})
	}
}

// TestSelectorUpgradeAndFallback: two hosts behind symmetric NATs start
// relayed; when one host's NAT gains a PCP mapping (published, pushed) the
// path moves to direct; when the direct path stops answering it falls back
// to the relay within DeadAfter plus a probe interval.
func TestSelectorUpgradeAndFallback(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		n := newSimNet(t, ctx)
		var changes []string
		a := n.addHost(t, "a", "fd00::a", "192.168.1.2:4500", newNAT("11.1.0.2", true))
		b := n.addHost(t, "b", "fd00::b", "192.168.2.2:4500", newNAT("11.2.0.2", true))
		a.sel.cfg.OnChange = func(_ netip.Addr, p Path) { changes = append(changes, p.String()) }
		meet(t, a, b)
		time.Sleep(5 * time.Second)
		synctest.Wait()
		if p := a.sel.Current(b.ula); p.Kind != KindRelayUDP {
			t.Fatalf("start: %v, want relay", p)
		}
		// b's gateway now speaks PCP: b publishes the mapping.
		b.pcp = b.nat.staticMap(b.addr)
		meet(t, a, b)
		time.Sleep(5 * time.Second)
		synctest.Wait()
		if p := a.sel.Current(b.ula); p.Kind != KindDirect || p.Remote != b.pcp {
			t.Fatalf("after PCP: %v, want direct %v", p, b.pcp)
		}
		// The direct path breaks (something between a and b drops it;
		// the relay, which sends to b's mapping too, still gets through).
		start := time.Now()
		n.mu.Lock()
		n.cut = func(from, to netip.AddrPort) bool { return to == b.pcp && from.Addr() != n.relay }
		n.mu.Unlock()
		for a.sel.Current(b.ula).Kind == KindDirect && time.Since(start) < time.Minute {
			time.Sleep(100 * time.Millisecond)
		}
		took := time.Since(start)
		if p := a.sel.Current(b.ula); p.Kind != KindRelayUDP {
			t.Fatalf("after the direct path broke: %v, want relay", p)
		}
		if max := a.sel.cfg.DeadAfter + a.sel.cfg.Active; took > max {
			t.Errorf("fallback took %v, want <= %v", took, max)
		}
		// Repaired: the upgrade probe (every Upgrade) finds it again.
		n.mu.Lock()
		n.cut = nil
		n.mu.Unlock()
		time.Sleep(a.sel.cfg.Upgrade + time.Second)
		synctest.Wait()
		if p := a.sel.Current(b.ula); p.Kind != KindDirect {
			t.Fatalf("after repair: %v, want direct again", p)
		}
		want := []string{"relay-udp 11.0.0.1:40001", "direct 11.2.0.2:4500", "relay-udp 11.0.0.1:40001", "direct 11.2.0.2:4500"}
		if len(changes) != len(want) {
			t.Fatalf("changes %q, want %q", changes, want)
		}
		for i := range want {
			if changes[i] != want[i] {
				t.Errorf("change %d = %q, want %q", i, changes[i], want[i])
			}
		}
	})
}

// TestSelectorRefusesForgedProbes: probes from unknown keys, with a bad
// tag, or PONGs for no PING of ours change nothing and send nothing.
func TestSelectorRefusesForgedProbes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ka, _ := NewKey()
		kb, _ := NewKey()
		kx, _ := NewKey()
		var sent int
		s, err := New(Config{Key: ka, Send: func([]byte, netip.AddrPort) error { sent++; return nil }})
		if err != nil {
			t.Fatal(err)
		}
		pb := kb.Public()
		ula := netip.MustParseAddr("fd00::b")
		if err := s.SetPeer(ula, "b", pb[:], nil); err != nil {
			t.Fatal(err)
		}
		from := netip.MustParseAddrPort("11.9.9.9:4500")
		pa := ka.Public()
		pairB, _ := kb.PairKey(pa[:])
		pairX, _ := kx.PairKey(pa[:])
		ping := Probe{Type: Ping, Sender: kb.Public()}
		good := ping.Seal(pairB)
		bad := append([]byte(nil), good...)
		bad[len(bad)-1] ^= 1
		for name, b := range map[string][]byte{
			"unknown key":        (&Probe{Type: Ping, Sender: kx.Public()}).Seal(pairX),
			"key of b, tag of x": (&Probe{Type: Ping, Sender: kb.Public()}).Seal(pairX),
			"flipped tag":        bad,
			"stray pong":         (&Probe{Type: Pong, Sender: kb.Public(), Seen: from}).Seal(pairB),
			"truncated":          good[:len(good)-1],
			"garbage":            []byte{ProbeMagic, 1, 1, 0, 9, 9},
		} {
			if err := s.HandleProbe(b, from); err == nil {
				t.Errorf("%s: accepted", name)
			}
		}
		if sent != 0 || len(s.Status()[0].Candidates) != 0 {
			t.Errorf("forged probes sent %d datagrams / learnt %+v", sent, s.Status())
		}
		if err := s.HandleProbe(good, from); err != nil || sent != 2 {
			t.Errorf("good PING: %v, sent %d (want PONG + triggered PING)", err, sent)
		}
		if err := s.SetPeer(ula, "b", make([]byte, 32), nil); err == nil {
			t.Error("all-zero (low-order) peer key accepted")
		}
	})
}

// TestSelectorLearntBounded: a flood of PINGs from many source ports (a
// peer behind a symmetric NAT, or a replayer) keeps at most MaxLearnt
// peer-reflexive candidates.
func TestSelectorLearntBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ka, _ := NewKey()
		kb, _ := NewKey()
		s, _ := New(Config{Key: ka, Send: func([]byte, netip.AddrPort) error { return nil }})
		pb := kb.Public()
		ula := netip.MustParseAddr("fd00::b")
		s.SetPeer(ula, "b", pb[:], nil)
		pa := ka.Public()
		pair, _ := kb.PairKey(pa[:])
		for i := range 1000 {
			time.Sleep(time.Millisecond)
			ping := Probe{Type: Ping, Sender: kb.Public()}
			s.HandleProbe(ping.Seal(pair), netip.AddrPortFrom(netip.MustParseAddr("11.9.9.9"), uint16(1000+i)))
		}
		if n := len(s.Status()[0].Candidates); n != s.cfg.MaxLearnt {
			t.Errorf("%d candidates kept, want %d", n, s.cfg.MaxLearnt)
		}
	})
}

// TestSelectorTriggeredCheckOnKnownCandidate: a learns of b first (b has
// just started and does not know a yet, so a's first PINGs go unanswered);
// b learns of a 30 ms later and PINGs it. a's answer to that PING comes
// with a PING of its own to b (triggered check), so a's path is chosen
// within milliseconds, not at its next burst offset (100 ms).
func TestSelectorTriggeredCheckOnKnownCandidate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		n := newSimNet(t, ctx)
		a := n.addHost(t, "a", "fd00::a", "11.1.0.2:4500", nil)
		b := n.addHost(t, "b", "fd00::b", "11.2.0.2:4500", nil)
		pa, pb := a.key.Public(), b.key.Public()
		if err := a.sel.SetPeer(b.ula, b.name, pb[:], b.candidates()); err != nil {
			t.Fatal(err)
		}
		time.Sleep(30 * time.Millisecond)
		synctest.Wait()
		if p := a.sel.Current(b.ula); p.IsValid() {
			t.Fatalf("a has a path to b (%v) before b knows a", p)
		}
		if err := b.sel.SetPeer(a.ula, a.name, pa[:], a.candidates()); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
		synctest.Wait()
		if p := a.sel.Current(b.ula); p.Kind != KindDirect {
			t.Errorf("a -> b 35 ms after a learnt of b (5 ms after b learnt of a): %v, want direct (triggered by b's PING)\n%+v", p, a.sel.Status())
		}
	})
}

// TestSelectorMoved: after our own network changed (Moved) a path that
// answered before the move stays if it answers again (no change at all),
// and is given up MoveGrace after the move if it does not, instead of
// DeadAfter after its last answer: a and b behind one NAT on the LAN path,
// then a moves behind another NAT, where b's LAN address is unreachable.
func TestSelectorMoved(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		n := newSimNet(t, ctx)
		shared := newNAT("11.1.0.2", false)
		a := n.addHost(t, "a", "fd00::a", "192.168.1.2:4500", shared)
		b := n.addHost(t, "b", "fd00::b", "192.168.1.3:4500", shared)
		var changes []string
		a.sel.cfg.OnChange = func(_ netip.Addr, p Path) { changes = append(changes, p.String()) }
		meet(t, a, b)
		time.Sleep(5 * time.Second)
		synctest.Wait()
		if p := a.sel.Current(b.ula); p.Kind != KindLAN {
			t.Fatalf("start: %v, want lan", p)
		}
		// Moved with nothing changed: the LAN path answers the burst and stays.
		before := len(changes)
		a.sel.Moved()
		time.Sleep(a.sel.cfg.MoveGrace + time.Second)
		synctest.Wait()
		if p := a.sel.Current(b.ula); p.Kind != KindLAN || len(changes) != before {
			t.Fatalf("after a Moved that changed nothing: %v, changes %q", p, changes[before:])
		}
		// a moves behind another NAT: b's LAN address is out of reach.
		n.mu.Lock()
		a.nat, a.addr = newNAT("11.5.0.2", false), netip.MustParseAddrPort("192.168.5.2:4500")
		n.mu.Unlock()
		start := time.Now()
		a.sel.Moved()
		for a.sel.Current(b.ula).Kind == KindLAN && time.Since(start) < time.Minute {
			time.Sleep(10 * time.Millisecond)
		}
		took := time.Since(start)
		if took > a.sel.cfg.MoveGrace+10*time.Millisecond {
			t.Errorf("the dead LAN path was given up %v after the move, want MoveGrace (%v); DeadAfter is %v", took, a.sel.cfg.MoveGrace, a.sel.cfg.DeadAfter)
		}
		synctest.Wait()
		if p := a.sel.Current(b.ula); p.Kind != KindRelayUDP {
			t.Errorf("after the move: %v, want the relay (its answer came from the new network)", p)
		}
	})
}

// TestSelectorSeenChange: a PONG that reports our PINGs to a candidate
// coming from another source than the previous PONG did (our NAT was
// replaced) is reported once (OnSeenChange); steady PONGs and the relay's
// (whose source seen is the relay's own port) are not.
func TestSelectorSeenChange(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		n := newSimNet(t, ctx)
		a := n.addHost(t, "a", "fd00::a", "192.168.1.2:4500", newNAT("11.1.0.2", false))
		b := n.addHost(t, "b", "fd00::b", "11.3.0.2:4500", nil)
		type change struct{ remote, old, seen netip.AddrPort }
		var mu sync.Mutex
		var got []change
		a.sel.cfg.OnSeenChange = func(remote, old, seen netip.AddrPort) {
			mu.Lock()
			got = append(got, change{remote, old, seen})
			mu.Unlock()
		}
		meet(t, a, b)
		time.Sleep(3 * a.sel.cfg.Active)
		synctest.Wait()
		if p := a.sel.Current(b.ula); p.Kind != KindDirect {
			t.Fatalf("start: %v, want direct", p)
		}
		mu.Lock()
		if len(got) != 0 {
			t.Errorf("steady PONGs reported as changes: %v", got)
		}
		mu.Unlock()
		old := a.rfx()
		// The gateway is replaced: same public address, new mappings.
		n.mu.Lock()
		a.nat = newNAT("11.1.0.2", false)
		a.nat.next = 30000
		n.mu.Unlock()
		time.Sleep(2 * a.sel.cfg.Active)
		synctest.Wait()
		mu.Lock()
		defer mu.Unlock()
		if len(got) != 1 || got[0].remote != b.addr || got[0].old.Port() != old.Port() || got[0].seen.Port() <= 30000 {
			t.Errorf("changes reported %v, want one for %v from %v to a port above 30000", got, b.addr, old)
		}
	})
}
