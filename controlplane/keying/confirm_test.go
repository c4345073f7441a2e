package keying

import (
	"bytes"
	"context"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// TestUnconfirmedInitMovesNothing is issue 13's "a responder moves a peer's
// outer address only after the exchange is confirmed". a and b are keyed.
// Then m, at another address, holding the shared key and claiming a's ULA
// (what one fuzzing run with the PSK did to a working tunnel), sends b
// valid INITs whose exchanges it never CONFIRMs. b authenticates and
// answers them (RESP, a pending inbound SA beside the current ones), but at
// every change of b's dataplane its entry for a keeps a's outer address
// and its outbound SA, and a and b still accept each other's traffic; once
// m stops, the unconfirmed exchange is dropped and b holds exactly the pair
// it had. Control: when m's CONFIRM is let through, b does follow m (so the
// check above watched the path that would move it).
func TestUnconfirmedInitMovesNothing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		addrM := netip.MustParseAddrPort("10.6.6.6:4500")
		var confirmsFromM, confirmsPassed atomic.Int32
		var letConfirm, silenceM atomic.Bool
		n.tap = func(from, to netip.AddrPort, b []byte) []byte {
			if from != addrM {
				return b
			}
			if silenceM.Load() {
				return nil
			}
			if msgType(b) == MsgConfirm {
				confirmsFromM.Add(1)
				if !letConfirm.Load() {
					return nil
				}
				confirmsPassed.Add(1)
			}
			return b
		}
		long := func(c *Config) { c.SALifetime = time.Hour } // no rekey of a-b during the test
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), long)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), long)
		a.peers(t, peerB)
		b.peers(t, peerA)
		time.Sleep(5 * time.Second)
		synctest.Wait()
		before, ok := b.rec.peer(ulaA)
		pa, okA := a.rec.peer(ulaB)
		if !ok || !okA {
			t.Fatalf("a and b not keyed: %q %q", a.rec.Calls(), b.rec.Calls())
		}
		pairOK(t, pa, before)
		if before.Outer != addrA {
			t.Fatalf("setup: b sends to a at %v", before.Outer)
		}

		// From now on, every change of b's dataplane is checked.
		var mu sync.Mutex
		var bad []string
		changes := 0
		check := func() {
			p, ok := b.rec.peer(ulaA)
			pa, _ := a.rec.peer(ulaB)
			mu.Lock()
			defer mu.Unlock()
			changes++
			switch {
			case !ok:
				bad = append(bad, "b removed a")
			case p.Outer != before.Outer:
				bad = append(bad, "b moved a's outer address to "+p.Outer.String())
			case p.Out.SPI != before.Out.SPI || !bytes.Equal(p.Out.Key, before.Out.Key):
				bad = append(bad, "b switched its outbound SA to a")
			case !accepts(pa, p.Out) || !accepts(p, pa.Out):
				bad = append(bad, "a and b no longer accept each other's SAs")
			}
		}
		b.rec.mu.Lock()
		b.rec.onChange = check
		b.rec.mu.Unlock()
		statsBefore, _ := b.agent.Stats(context.Background())

		m := startNode(t, n, "m", ulaA, addrM, mustPSK(t, psk1), nil)
		m.peers(t, peerB)
		time.Sleep(3 * time.Second) // m's INIT answered, its CONFIRMs lost
		synctest.Wait()
		statsM, _ := b.agent.Stats(context.Background())
		if accepted := statsM.InitsAccepted - statsBefore.InitsAccepted; accepted == 0 {
			t.Fatalf("b answered none of m's INITs: the attack never reached the responder's state (%+v)", statsM)
		}
		if len(m.rec.Calls()) == 0 || confirmsFromM.Load() == 0 {
			t.Fatalf("m was never keyed as initiator by b's RESP (calls %q, CONFIRMs %d)", m.rec.Calls(), confirmsFromM.Load())
		}
		if !b.status(t).Pending {
			t.Errorf("b holds no unconfirmed exchange for a's ULA after m's INIT: %+v", b.status(t))
		}
		mu.Lock()
		if changes == 0 {
			t.Error("b's dataplane never changed: the pending inbound SA was not installed")
		}
		mu.Unlock()

		silenceM.Store(true)
		time.Sleep(2 * time.Minute) // past ResponseCacheTTL: the pending exchange is dropped
		synctest.Wait()
		after, ok := b.rec.peer(ulaA)
		if !ok || after.Outer != before.Outer || after.Out.SPI != before.Out.SPI || after.In.SPI != before.In.SPI ||
			!bytes.Equal(after.Out.Key, before.Out.Key) || !bytes.Equal(after.In.Key, before.In.Key) {
			t.Errorf("b's entry for a changed: before %v out=%08x in=%08x, after %v out=%08x in=%08x",
				before.Outer, before.Out.SPI, before.In.SPI, after.Outer, after.Out.SPI, after.In.SPI)
		}
		if st := b.status(t); st.Pending || !st.Established || st.Outer != addrA {
			t.Errorf("b's status for a after m stopped: %+v", st)
		}
		mu.Lock()
		for _, s := range bad {
			t.Error(s)
		}
		t.Logf("%d changes of b's dataplane during %d unconfirmed INITs from m", changes,
			statsM.InitsAccepted-statsBefore.InitsAccepted)
		mu.Unlock()

		// Control: the same exchange, confirmed, does move b's view of a.
		b.rec.mu.Lock()
		b.rec.onChange = nil
		b.rec.mu.Unlock()
		letConfirm.Store(true)
		silenceM.Store(false)
		if err := m.agent.Rekey(context.Background(), ulaB); err != nil { // now, not after m's backoff
			t.Fatal(err)
		}
		time.Sleep(time.Minute)
		synctest.Wait()
		if confirmsPassed.Load() == 0 {
			t.Fatal("control: no CONFIRM from m got through")
		}
		if p, _ := b.rec.peer(ulaA); p.Outer != addrM {
			t.Errorf("control: b sends to a's ULA at %v after a confirmed exchange from %v", p.Outer, addrM)
		}
	})
}
