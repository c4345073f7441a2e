package keying

import (
	"bytes"
	"context"
	"net/netip"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/btmm/btmm/controlplane"
)

var (
	addrA2 = netip.MustParseAddrPort("10.0.2.1:61000")
	addrA3 = netip.MustParseAddrPort("10.0.3.1:4500")
	evil   = netip.MustParseAddrPort("10.6.6.6:4500")
)

// movedNet is a keyed pair a-b on a memNet whose tap counts (and can drop)
// MOVED messages and keeps the last one sent.
type movedNet struct {
	n    *memNet
	a, b *node

	mu      sync.Mutex
	moved   int // MOVED transmissions seen
	acks    int // MOVED_ACKs seen
	inits   int // INITs after keying (a rekey would show here)
	drop    int // drop this many MOVED
	lastMov []byte
	lastAck []byte
	keyed   bool
}

func newMovedNet(t *testing.T) *movedNet {
	t.Helper()
	mn := &movedNet{n: newMemNet()}
	mn.n.tap = func(from, to netip.AddrPort, b []byte) []byte {
		mn.mu.Lock()
		defer mn.mu.Unlock()
		switch msgType(b) {
		case MsgMoved:
			mn.moved++
			mn.lastMov = bytes.Clone(b)
			if mn.drop > 0 {
				mn.drop--
				return nil
			}
		case MsgMovedAck:
			mn.acks++
			mn.lastAck = bytes.Clone(b)
		case MsgInit:
			if mn.keyed {
				mn.inits++
			}
		}
		return b
	}
	mn.a = startNode(t, mn.n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
	mn.b = startNode(t, mn.n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
	mn.a.peers(t, peerB)
	mn.b.peers(t, peerA)
	time.Sleep(5 * time.Second)
	synctest.Wait()
	if p, ok := mn.b.rec.peer(ulaA); !ok || p.Outer != addrA {
		t.Fatalf("not keyed: %+v %v", p, ok)
	}
	mn.mu.Lock()
	mn.keyed = true
	mn.mu.Unlock()
	return mn
}

func (mn *movedNet) counts() (moved, acks, inits int) {
	mn.mu.Lock()
	defer mn.mu.Unlock()
	return mn.moved, mn.acks, mn.inits
}

// moveA moves a to addr and announces it.
func (mn *movedNet) moveA(t *testing.T, addr netip.AddrPort) {
	t.Helper()
	mn.n.move(mn.a.ep, addr)
	if err := mn.a.agent.Moved(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestMovedRetargetsPeer: after a moves and says so, b sends to a's new
// address at once (one round trip, no DNS), with the same SPIs and keys.
func TestMovedRetargetsPeer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		mn := newMovedNet(t)
		before, _ := mn.b.rec.peer(ulaA)
		mn.moveA(t, addrA2)
		synctest.Wait() // one round trip on the in-memory network
		after, _ := mn.b.rec.peer(ulaA)
		if after.Outer != addrA2 {
			t.Fatalf("b sends to a at %v, want %v", after.Outer, addrA2)
		}
		if after.Out.SPI != before.Out.SPI || after.In.SPI != before.In.SPI || !bytes.Equal(after.Out.Key, before.Out.Key) {
			t.Fatalf("the move rekeyed: out %v -> %v, in %v -> %v", before.Out, after.Out, before.In, after.In)
		}
		// Acknowledged: no retransmission, no rekey.
		time.Sleep(time.Minute)
		synctest.Wait()
		if moved, acks, inits := mn.counts(); moved != 1 || acks != 1 || inits != 0 {
			t.Fatalf("MOVED sent %d times, %d MOVED_ACKs, %d INITs; want 1, 1, 0", moved, acks, inits)
		}
		if st := mn.b.status(t); st.Outer != addrA2 {
			t.Fatalf("b's keying status still has a at %v", st.Outer)
		}
		// a moves again: a new number, followed again.
		mn.moveA(t, addrA3)
		synctest.Wait()
		if p, _ := mn.b.rec.peer(ulaA); p.Outer != addrA3 {
			t.Fatalf("second move: b sends to %v", p.Outer)
		}
	})
}

// A lost MOVED is retransmitted on the INIT schedule (0.5 s, doubling).
func TestMovedRetransmitted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		mn := newMovedNet(t)
		mn.mu.Lock()
		mn.drop = 2
		mn.mu.Unlock()
		mn.moveA(t, addrA2)
		time.Sleep(400 * time.Millisecond)
		synctest.Wait()
		if p, _ := mn.b.rec.peer(ulaA); p.Outer != addrA {
			t.Fatalf("b moved although every MOVED was dropped: %v", p.Outer)
		}
		time.Sleep(1200 * time.Millisecond) // retransmissions at 0.5 s and 1.5 s
		synctest.Wait()
		if p, _ := mn.b.rec.peer(ulaA); p.Outer != addrA2 {
			t.Fatalf("b did not follow after the retransmission: %v", p.Outer)
		}
		if moved, acks, _ := mn.counts(); moved != 3 || acks != 1 {
			t.Fatalf("MOVED sent %d times (want 3), %d acks", moved, acks)
		}
		// With nobody answering, a gives up after the last retransmission.
		mn.mu.Lock()
		mn.drop = 1 << 30
		mn.mu.Unlock()
		mn.moveA(t, addrA3)
		time.Sleep(2 * time.Minute)
		synctest.Wait()
		if moved, _, _ := mn.counts(); moved != 3+1+DefaultRetransmits() {
			t.Fatalf("unanswered MOVED sent %d times in all, want %d", moved, 3+1+DefaultRetransmits())
		}
	})
}

// DefaultRetransmits is the default number of retransmissions.
func DefaultRetransmits() int {
	var c Config
	c.setDefaults()
	return c.Retransmits
}

// Only a MOVED that verifies under the current SA pair, with a number above
// the last accepted, moves anything.
func TestMovedRefusals(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		mn := newMovedNet(t)
		mn.moveA(t, addrA2)
		synctest.Wait()
		mn.mu.Lock()
		first := mn.lastMov // seq 1, sent from addrA2
		mn.mu.Unlock()
		mn.moveA(t, addrA3)
		synctest.Wait()
		mn.mu.Lock()
		second := mn.lastMov // seq 2, from addrA3
		reflected := bytes.Clone(mn.lastAck)
		mn.mu.Unlock()
		reflected[1] = byte(MsgMoved) // b's genuine MOVED_ACK, retyped
		if p, _ := mn.b.rec.peer(ulaA); p.Outer != addrA3 {
			t.Fatalf("setup: b at %v", p.Outer)
		}
		var m Message
		if err := m.Unmarshal(first); err != nil {
			t.Fatal(err)
		}
		forged := func(f func(*Message), key []byte) []byte {
			c := m
			f(&c)
			if key == nil {
				c.MAC = bytes.Repeat([]byte{0x42}, 32)
				b, err := c.Marshal()
				if err != nil {
					t.Fatal(err)
				}
				return b
			}
			b, err := sign(&c, key, nil)
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
		other := testMaterial(psk2, bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32))
		for _, c := range []struct {
			name string
			b    []byte
		}{
			{"replayed older MOVED", first},
			{"replayed current MOVED from elsewhere", second},
			{"bad MAC", forged(func(c *Message) { c.Seq = 99 }, nil)},
			{"signed with other keys", forged(func(c *Message) { c.Seq = 99 }, other.macKey(MsgMoved))},
			{"a MOVED_ACK retyped as MOVED", reflected},
			{"unknown exchange", forged(func(c *Message) { c.Seq = 99; c.Exchange = [8]byte{9} }, nil)},
			{"unknown ULA", forged(func(c *Message) { c.Seq = 99; c.ULA = netip.MustParseAddr("fd00::99") }, nil)},
			{"no MAC", forged(func(c *Message) { c.Seq = 99; c.MAC = nil }, nil)[:len(first)-35]},
		} {
			mn.n.inject(evil, addrB, c.b)
			synctest.Wait()
			if p, _ := mn.b.rec.peer(ulaA); p.Outer != addrA3 {
				t.Fatalf("%s moved b's SAs to %v", c.name, p.Outer)
			}
		}
		// A MOVED from a host that is not keyed with us changes nothing.
		mn.b.peers(t) // b forgets a (DELETE, SAs removed)
		mn.b.peers(t, peerA)
		mn.n.inject(evil, addrB, second)
		synctest.Wait()
		if p, ok := mn.b.rec.peer(ulaA); ok && p.Outer == evil {
			t.Fatal("unkeyed peer followed a MOVED")
		}
	})
}

// FuzzMovedInput feeds arbitrary datagrams, from an arbitrary address, to a
// host keyed with a: only a MOVED that verifies under the pair's material
// may change where it sends to a, and it never answers with more bytes than
// it received.
func FuzzMovedInput(f *testing.F) {
	mat := testMaterial(psk1, bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32))
	ex := [8]byte{7, 7, 7, 7, 7, 7, 7, 7}
	genuine, err := sign(&Message{Type: MsgMoved, Mode: ModePSK, Exchange: ex, ULA: ulaA, Seq: 1}, mat.macKey(MsgMoved), nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(genuine)
	for _, g := range golden {
		f.Add(unhex(f, g.hex))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		n := newMemNet()
		n.tap = func(_, _ netip.AddrPort, p []byte) []byte {
			if len(p) > len(b) {
				t.Errorf("answered %d bytes to a %d-byte datagram", len(p), len(b))
			}
			return nil
		}
		rec := newRecorder("b")
		a, err := New(Config{ULA: ulaB, Auth: mustPSK(t, psk1), Transport: n.endpoint(addrB.String()), Installer: rec})
		if err != nil {
			t.Fatal(err)
		}
		a.ctx = context.Background()
		a.setPeers([]PeerConfig{peerA})
		p := a.peers[ulaA]
		p.cur = &keyed{mat: mat, exchange: ex, out: sa(0x1001), in: sa(0x2001), hardEnd: time.Now().Add(time.Hour)}
		p.nextAttempt = time.Time{}
		a.onDatagram(datagram{b: bytes.Clone(b), from: addrA2})
		if bytes.Equal(b, genuine) && p.outer != addrA2 {
			t.Errorf("a genuine MOVED did not move the peer (at %v)", p.outer)
		}
		if p.outer != addrA {
			var m Message
			if m.Unmarshal(b) != nil || m.Type != MsgMoved || verify(&m, b, mat.macKey(MsgMoved), nil) != nil {
				t.Errorf("moved to %v on a datagram that is no valid MOVED", p.outer)
			}
		}
	})
}

func sa(spi uint32) controlplane.SA {
	return controlplane.SA{SPI: spi, Cipher: controlplane.CipherAESGCM, Key: bytes.Repeat([]byte{byte(spi)}, 36)}
}

// TestInitFromBehindNAT: b sits behind a NAT without a port mapping, so a's
// INITs to b's published address are lost, while b's INITs reach a from the
// NAT's address. a has the lower ULA, which normally keeps a's own exchange
// when both start at once; here it must answer b's instead, or keying would
// starve until one side's backoff happens to leave a gap.
func TestInitFromBehindNAT(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		natAddr := netip.MustParseAddrPort("10.0.9.9:61000") // b as a sees it
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		b := startNode(t, n, "b", ulaB, natAddr, mustPSK(t, psk1), nil)
		a.peers(t, peerB) // peerB.Outer (b's published address) is unreachable
		b.peers(t, peerA)
		time.Sleep(3 * time.Second)
		synctest.Wait()
		pa, okA := a.rec.peer(ulaB)
		pb, okB := b.rec.peer(ulaA)
		if !okA || !okB {
			t.Fatalf("not keyed within 3 s: a %v, b %v; a: %q", okA, okB, a.rec.Calls())
		}
		if pa.Outer != natAddr {
			t.Fatalf("a sends to b at %v, want the NAT's %v", pa.Outer, natAddr)
		}
		pairOK(t, pa, pb)
	})
}

// TestSimultaneousStartAsymmetricPaths: a and b start at once and each
// reaches the other another way (path selection, issue 14: a sends to b
// through a relay, b sends to a directly), so each one's INIT arrives from
// an address other than the one the receiver sends to, and both INITs
// arrive. Both answer the other's; the lower ULA's own exchange must still
// complete (it gets b's RESP), or neither side ever CONFIRMs and both drop
// their unconfirmed SAs.
func TestSimultaneousStartAsymmetricPaths(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		relayA := netip.MustParseAddrPort("10.0.5.1:40000") // a's allocation
		relayB := netip.MustParseAddrPort("10.0.5.1:40001") // b's allocation
		// The relay: what reaches b's allocation goes to b from a's, and back.
		for _, r := range []struct{ at, from, to netip.AddrPort }{{relayB, relayA, addrB}, {relayA, relayB, addrA}} {
			ep := n.endpoint(r.at.String())
			go func() {
				buf := make([]byte, 65536)
				for {
					k, _, err := ep.ReadKeying(buf)
					if err != nil {
						return
					}
					n.inject(r.from, r.to, buf[:k])
				}
			}()
			t.Cleanup(func() { ep.Close() })
		}
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		if !ulaA.Less(ulaB) {
			t.Fatal("setup: a must have the lower ULA")
		}
		a.peers(t, PeerConfig{Name: "b", ULA: ulaB, Outer: relayB})
		b.peers(t, peerA)
		time.Sleep(3 * time.Second)
		synctest.Wait()
		pa, okA := a.rec.peer(ulaB)
		pb, okB := b.rec.peer(ulaA)
		if !okA || !okB {
			t.Fatalf("not keyed within 3 s: a %v, b %v", okA, okB)
		}
		// Traffic flows both ways at once. Which exchange is in use may
		// still change (when b's own exchange completed before a's INIT
		// reached it, b answers that INIT too, as a rekey: its new
		// inbound SA is In and the one in use stays in PrevIn until the
		// unconfirmed answer lapses).
		usable(t, pa, pb)
		usable(t, pb, pa)
		// Past the time an unconfirmed answer is kept: the pair in use
		// must be a confirmed one on both sides.
		time.Sleep(time.Minute)
		synctest.Wait()
		pa, okA = a.rec.peer(ulaB)
		pb, okB = b.rec.peer(ulaA)
		if !okA || !okB {
			t.Fatalf("a minute later: keyed a %v, b %v; a: %q; b: %q", okA, okB, a.rec.Calls(), b.rec.Calls())
		}
		pairOK(t, pa, pb)
	})
}

// TestMovedReachesPublishedAddress: a's view of b is stale (b moved to a
// port that only existed on a's old network, then back, unannounced). When a
// moves, its MOVED also goes to b's published address, b follows, and b's
// authenticated MOVED_ACK from its real address corrects a's view.
func TestMovedReachesPublishedAddress(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		mn := newMovedNet(t)
		// b announces a move to addrB2, then silently returns to addrB.
		mn.n.move(mn.b.ep, netip.MustParseAddrPort("10.0.7.7:26687"))
		if err := mn.b.agent.Moved(context.Background()); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if p, _ := mn.a.rec.peer(ulaB); p.Outer.Port() != 26687 {
			t.Fatalf("setup: a sends to b at %v", p.Outer)
		}
		mn.n.move(mn.b.ep, addrB)
		// a moves: its MOVED to the stale address is lost, the copy to
		// b's published address (peerB.Outer) arrives.
		mn.moveA(t, addrA2)
		synctest.Wait()
		if p, _ := mn.b.rec.peer(ulaA); p.Outer != addrA2 {
			t.Fatalf("b sends to a at %v, want %v", p.Outer, addrA2)
		}
		if p, _ := mn.a.rec.peer(ulaB); p.Outer != addrB {
			t.Fatalf("a still sends to b at %v after b's MOVED_ACK came from %v", p.Outer, addrB)
		}
		if _, _, inits := mn.counts(); inits != 0 {
			t.Fatalf("%d INITs: a move must not rekey", inits)
		}
	})
}

// usable fails unless what x sends with (x.Out) is installed inbound at y
// (In, or an earlier inbound SA y still keeps).
func usable(t testing.TB, x, y controlplane.Peer) {
	t.Helper()
	for _, in := range append([]controlplane.SA{y.In}, y.PrevIn...) {
		if x.Out.SPI == in.SPI && bytes.Equal(x.Out.Key, in.Key) && x.Out.Cipher == in.Cipher {
			return
		}
	}
	t.Errorf("outbound SA %v is not among the receiver's inbound SAs (In %v, PrevIn %v)", x.Out, y.In, y.PrevIn)
}
