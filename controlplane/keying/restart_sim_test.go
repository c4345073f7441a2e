package keying

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"net/netip"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// TestRetryAfterTimeoutIsScheduled: an exchange that gets no answer fails
// after its last retransmission, and the retry after the backoff (2 s) goes
// out then by itself. (The failure happens inside the timer pass, which did
// not arm the timer for the retry: it waited for whatever woke the agent
// next — a datagram, a status call — and with an idle peer, for ever.)
func TestRetryAfterTimeoutIsScheduled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		var mu sync.Mutex
		inits := map[[8]byte]time.Duration{} // exchange -> first seen
		start := time.Now()
		n.tap = func(from, to netip.AddrPort, b []byte) []byte {
			var m Message
			if m.Unmarshal(b) == nil && msgType(b) == MsgInit {
				mu.Lock()
				if _, ok := inits[m.Exchange]; !ok {
					inits[m.Exchange] = time.Since(start)
				}
				mu.Unlock()
			}
			return nil // b is not there
		}
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		a.peers(t, peerB)
		// 31.5 s of retransmissions, then 2 s of backoff.
		time.Sleep(40 * time.Second)
		synctest.Wait()
		mu.Lock()
		defer mu.Unlock()
		if len(inits) != 2 {
			t.Fatalf("%d exchanges started in 40 s (at %v), want 2: the retry 2 s after the first one failed did not go out", len(inits), inits)
		}
		for _, at := range inits {
			if at > 0 && (at < 33*time.Second || at > 34*time.Second) {
				t.Errorf("retry at %v, want 33.5 s (31.5 s of retransmissions + 2 s backoff)", at)
			}
		}
	})
}

// TestResponderRetriesAfterUnconfirmedAnswer: b answers a's INIT (which ends
// b's own exchange), but a never gets the RESP and gives its exchange up;
// a's next attempt is minutes away (its backoff). When b's unconfirmed
// answer lapses, b keys on its own: a peer that is not keyed, has nothing
// in flight and nothing planned must not sit waiting for the other side.
func TestResponderRetriesAfterUnconfirmedAnswer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		var mu sync.Mutex
		dropResp := true
		n.tap = func(from, to netip.AddrPort, b []byte) []byte {
			mu.Lock()
			defer mu.Unlock()
			if dropResp && msgType(b) == MsgResp {
				return nil
			}
			return b
		}
		slow := func(c *Config) { c.RetryBase = 10 * time.Minute } // a's retry: not within this test
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), slow)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		b.peers(t, peerA) // b first: b's exchange is in flight when a's INIT comes
		time.Sleep(100 * time.Millisecond)
		a.peers(t, peerB)
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if st := b.status(t); !st.Pending || st.Established {
			t.Fatalf("setup: b should have answered a's INIT and wait for its CONFIRM: %+v", st)
		}
		// a's exchange fails at 31.6 s (its INIT answered each time, every
		// RESP lost), b's answer lapses at 32.6 s (ResponseCacheTTL); b
		// tries 2 s later.
		time.Sleep(30 * time.Second)
		synctest.Wait()
		if st := a.status(t); st.Established || !errors.Is(st.LastError, ErrTimeout) {
			t.Fatalf("setup: a's exchange should have failed: %+v", st)
		}
		mu.Lock()
		dropResp = false
		mu.Unlock()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		pa, okA := a.rec.peer(ulaB)
		pb, okB := b.rec.peer(ulaA)
		if !okA || !okB {
			t.Fatalf("not keyed 42 s after the start (b's own try due at 34.6 s): a %v, b %v\na: %+v\nb: %+v", okA, okB, a.status(t), b.status(t))
		}
		pairOK(t, pa, pb)
		if sb := b.status(t); !sb.Established || !sb.Initiator {
			t.Errorf("b should have keyed as initiator: %+v", sb)
		}
	})
}

// TestRestartUnderLossKeysAgain restarts one of two keyed peers (DELETE on
// the way out, a new agent on the same address and ULA) under random loss
// and delay, with the other one learning of the restart by DNS at random
// moments (or not at all). Both must be keyed with each other again within a
// minute of the last change. 100 seeds; either side may have the lower ULA.
func TestRestartUnderLossKeysAgain(t *testing.T) {
	for seed := int64(0); seed < 100; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { restartUnderLoss(t, seed) })
	}
}

func restartUnderLoss(t *testing.T, seed int64) {
	synctest.Test(t, func(t *testing.T) {
		var rmu sync.Mutex
		rng := rand.New(rand.NewSource(seed))
		rnd := func(d time.Duration) time.Duration {
			rmu.Lock()
			defer rmu.Unlock()
			return time.Duration(rng.Int63n(int64(d) + 1))
		}
		chance := func(p float64) bool {
			rmu.Lock()
			defer rmu.Unlock()
			return rng.Float64() < p
		}
		loss := 0.0
		if chance(0.5) {
			loss = 0.2
		}
		n := newMemNet()
		n.tap = func(from, to netip.AddrPort, b []byte) []byte {
			if !chance(loss) {
				time.AfterFunc(rnd(400*time.Millisecond), func() { n.inject(from, to, b) })
			}
			return nil
		}
		ulaX, ulaY := ulaA, ulaB
		if chance(0.5) {
			ulaX, ulaY = ulaB, ulaA
		}
		pX := PeerConfig{Name: "x", ULA: ulaX, Outer: addrA}
		pY := PeerConfig{Name: "y", ULA: ulaY, Outer: addrB}
		// x restarts; y stays.
		startX := func() (*Agent, *recorder, func()) {
			rec := newRecorder("x")
			ep := n.endpoint(addrA.String())
			a, err := New(Config{ULA: ulaX, Auth: mustPSK(t, psk1), Transport: ep, Installer: rec, SALifetime: 10 * time.Minute})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { a.Run(ctx); ep.Close(); close(done) }()
			var once sync.Once
			stop := func() { once.Do(func() { cancel(); <-done }) }
			t.Cleanup(stop)
			return a, rec, stop
		}
		y := startNode(t, n, "y", ulaY, addrB, mustPSK(t, psk1), nil)
		x, xrec, stopX := startX()
		if err := x.SetPeers(context.Background(), []PeerConfig{pY}); err != nil {
			t.Fatal(err)
		}
		y.peers(t, pX)
		time.Sleep(time.Minute)
		synctest.Wait()
		if _, ok := xrec.peer(ulaY); !ok {
			t.Fatalf("seed %d (loss %v): not keyed a minute after the start", seed, loss)
		}
		stopX() // DELETE to y
		removed := chance(0.7)
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			if removed { // y hears by DNS that x left
				time.Sleep(rnd(3 * time.Second))
				y.peers(t)
			}
		}()
		time.Sleep(rnd(3 * time.Second))
		x2, x2rec, _ := startX()
		wg.Add(2)
		go func() {
			defer wg.Done()
			time.Sleep(rnd(3 * time.Second))
			x2.SetPeers(context.Background(), []PeerConfig{pY})
		}()
		go func() {
			defer wg.Done()
			time.Sleep(3*time.Second + rnd(5*time.Second))
			y.peers(t, pX) // and that it is back
		}()
		wg.Wait()
		time.Sleep(time.Minute)
		synctest.Wait()
		px, okX := x2rec.peer(ulaY)
		py, okY := y.rec.peer(ulaX)
		if !okX || !okY {
			sx, _ := x2.Status(context.Background())
			t.Fatalf("seed %d (loss %v, restarted host has the lower ULA %v, the other heard it leave %v): not keyed a minute after the restart: %v %v\nrestarted: %+v\nother: %+v",
				seed, loss, ulaX.Less(ulaY), removed, okX, okY, sx, y.status(t))
		}
		usable(t, px, py)
		usable(t, py, px)
	})
}
