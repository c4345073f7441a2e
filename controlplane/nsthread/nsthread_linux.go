// Package nsthread runs code inside another network namespace. setns(2)
// moves one OS thread, not the process, so the code runs on a goroutine
// locked to its thread; afterwards the thread goes back to the namespace it
// started in. A thread that cannot go back is left locked, so the Go runtime
// ends it with the goroutine instead of reusing it in the wrong namespace.
// Sockets and netlink handles made inside keep their namespace for life.
package nsthread

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs f on a locked OS thread and returns the thread to its original
// network namespace afterwards; f may enter others (netns.Set, netns.New).
func Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("current network namespace: %w", err)
			return
		}
		defer orig.Close()
		ferr := f()
		if err := netns.Set(orig); err != nil {
			// Not unlocked: the thread dies with this goroutine.
			errc <- errors.Join(ferr, fmt.Errorf("return to the original network namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// In runs f inside the network namespace ns (see Do).
func In(ns netns.NsHandle, f func() error) error {
	return Do(func() error {
		if err := netns.Set(ns); err != nil {
			return fmt.Errorf("enter network namespace: %w", err)
		}
		return f()
	})
}
