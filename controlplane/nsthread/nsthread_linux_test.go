package nsthread_test

import (
	"errors"
	"runtime"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/btmm/btmm/controlplane/nsthread"
	inetns "github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// In runs f inside the namespace, passes f's error through, and leaves no
// thread of the process behind in that namespace.
func TestIn(t *testing.T) {
	testenv.RequireNetNS(t)
	n := inetns.New(t, "nsthread")
	target := n.NsHandle()
	var inside bool
	boom := errors.New("boom")
	for range 20 {
		err := nsthread.In(target, func() error {
			cur, err := netns.Get()
			if err != nil {
				return err
			}
			defer cur.Close()
			inside = cur.Equal(target)
			return boom
		})
		if !errors.Is(err, boom) {
			t.Fatalf("In: %v, want f's error", err)
		}
		if !inside {
			t.Fatal("f did not run inside the namespace")
		}
	}
	// Every thread the runtime hands out is back in the original namespace.
	for range 50 {
		done := make(chan bool)
		go func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			cur, err := netns.Get()
			if err != nil {
				done <- false
				return
			}
			defer cur.Close()
			done <- !cur.Equal(target)
		}()
		if !<-done {
			t.Fatal("a thread was left in the namespace")
		}
	}
	if err := nsthread.In(netns.None(), func() error { return nil }); err == nil {
		t.Error("In(None) succeeded")
	}
}
