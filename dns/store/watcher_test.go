package store

import (
	"context"
	"testing"
	"testing/synctest"
)

// TestWatcher: Push never blocks while nobody reads (far more than the
// channel's buffer), everything arrives in order, Stop closes the channel,
// and so does the end of the context.
func TestWatcher(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := NewWatcher(t.Context())
		const n = 1000
		for i := range n {
			w.Push(Change{Rev: uint64(i + 1)})
		}
		for i := range n {
			c, ok := <-w.C()
			if !ok || c.Rev != uint64(i+1) {
				t.Fatalf("change %d: %+v ok=%v", i, c, ok)
			}
		}
		w.Push(Change{Rev: n + 1})
		synctest.Wait()
		w.Stop()
		if c, ok := <-w.C(); ok && c.Rev != n+1 {
			t.Fatalf("after Stop: %+v", c)
		}
		if _, ok := <-w.C(); ok {
			t.Fatal("C still open after Stop")
		}

		ctx, cancel := context.WithCancel(t.Context())
		w = NewWatcher(ctx)
		w.Push(Change{Rev: 1})
		w.Push(Change{Rev: 2})
		synctest.Wait() // both in the channel's buffer, nobody reads
		cancel()
		synctest.Wait()
		n2 := 0
		for range w.C() {
			n2++
		}
		if n2 > 2 {
			t.Fatalf("%d changes after the context ended, want at most the two buffered", n2)
		}
	})
}
