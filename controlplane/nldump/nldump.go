// Package nldump repeats netlink dumps that the kernel interrupted.
//
// A dump (links, addresses, routes, XFRM states, filters...) that races a
// change to the table it reads comes back flagged NLM_F_DUMP_INTR;
// vishvananda/netlink then returns what it read together with
// ErrDumpInterrupted. The partial result may miss or repeat objects, so
// every dump whose result decides what we program, delete or report goes
// through Retry. A busy host (routing daemons, containers, our own
// dataplane reprogramming) interrupts dumps routinely.
package nldump

import (
	"errors"

	"github.com/vishvananda/netlink"
)

// Attempts is how many times Retry calls f before it gives up and returns
// the last ErrDumpInterrupted.
const Attempts = 10

// Retry calls f until its dump was not interrupted, at most Attempts times.
// Any other error is returned at once. After the last attempt the error
// (still ErrDumpInterrupted) is returned with no result: callers must not
// act on a dump known to be inconsistent.
func Retry[T any](f func() ([]T, error)) ([]T, error) {
	var err error
	for range Attempts {
		var r []T
		if r, err = f(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return r, err
		}
	}
	return nil, err
}
