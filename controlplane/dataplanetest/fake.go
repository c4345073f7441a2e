// Package dataplanetest has an in-memory controlplane.Dataplane for tests of
// what drives a dataplane (the reconciler, btmmd): it keeps the last applied
// State, renders it as `ip xfrm`-like lines, and can be told to fail.
package dataplanetest

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/btmm/btmm/controlplane"
)

// Fake is an in-memory Dataplane. The zero value is ready to use.
type Fake struct {
	mu      sync.Mutex
	state   *controlplane.State
	sets    int
	failN   int
	closed  bool
	stall   chan struct{} // non-nil: Set waits for it to close
	stalled chan struct{} // closed when a Set starts waiting on stall
	tx, rx  map[netip.Addr]uint64
}

// Stall makes every Set wait (before it validates or records anything)
// until release is called or its context ends; it returns a channel that is
// closed once a Set is waiting. Tests use it for a kernel call that hangs.
func (f *Fake) Stall() (waiting <-chan struct{}, release func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	stall, stalled := make(chan struct{}), make(chan struct{})
	f.stall, f.stalled = stall, stalled
	var once sync.Once
	return stalled, func() {
		once.Do(func() {
			f.mu.Lock()
			if f.stall == stall {
				f.stall = nil
			}
			f.mu.Unlock()
			close(stall)
		})
	}
}

func (f *Fake) wait(ctx context.Context) error {
	f.mu.Lock()
	stall, stalled := f.stall, f.stalled
	if stall != nil {
		select {
		case <-stalled:
		default:
			close(stalled)
		}
	}
	f.mu.Unlock()
	if stall == nil {
		return nil
	}
	select {
	case <-stall:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// FailNext makes the next n Set calls fail without changing anything.
func (f *Fake) FailNext(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failN = n
}

// ErrInjected is what a Set made to fail by FailNext returns.
var ErrInjected = errors.New("injected dataplane failure")

// Set validates desired, then records it, reporting one Change per line of
// the rendering that appeared or disappeared.
func (f *Fake) Set(ctx context.Context, desired *controlplane.State) ([]controlplane.Change, error) {
	if err := f.wait(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, errors.New("dataplane closed")
	}
	if err := desired.Validate(); err != nil {
		return nil, err
	}
	f.sets++
	if f.failN > 0 {
		f.failN--
		return nil, ErrInjected
	}
	before, after := lines(f.state), lines(desired)
	var ch []controlplane.Change
	for _, l := range after {
		if !slices.Contains(before, l) {
			ch = append(ch, controlplane.Change{Op: "add", Object: "line", What: l})
		}
	}
	for _, l := range before {
		if !slices.Contains(after, l) {
			ch = append(ch, controlplane.Change{Op: "delete", Object: "line", What: l})
		}
	}
	cp := *desired
	cp.Peers = slices.Clone(desired.Peers)
	f.state = &cp
	return ch, nil
}

// CountTx adds n sent packets to a peer's counters, as if ESP went out.
func (f *Fake) CountTx(ula netip.Addr, n uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.tx == nil {
		f.tx = map[netip.Addr]uint64{}
	}
	f.tx[ula] += n
}

// CountRx adds n received packets to a peer's counters, as if ESP came in.
func (f *Fake) CountRx(ula netip.Addr, n uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.rx == nil {
		f.rx = map[netip.Addr]uint64{}
	}
	f.rx[ula] += n
}

// Stats returns the counters of every peer: zero, or what CountTx and
// CountRx added.
func (f *Fake) Stats(context.Context) ([]controlplane.PeerStats, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var st []controlplane.PeerStats
	if f.state != nil {
		for _, p := range f.state.Peers {
			st = append(st, controlplane.PeerStats{ULA: p.ULA, TxPackets: f.tx[p.ULA], RxPackets: f.rx[p.ULA]})
		}
	}
	return st, nil
}

// Close forgets the state.
func (f *Fake) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.state, f.closed = nil, true
	return nil
}

// Render returns the applied state as sorted lines, one per SA and route,
// without key material.
func (f *Fake) Render() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return strings.Join(lines(f.state), "\n")
}

// Sets counts Set calls that passed validation.
func (f *Fake) Sets() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sets
}

func lines(s *controlplane.State) []string {
	if s == nil {
		return nil
	}
	var l []string
	for _, p := range s.Peers {
		route := fmt.Sprintf("route %s/128 src %s", p.ULA, s.Local.ULA)
		if p.Via != controlplane.PathESPInUDP {
			route += fmt.Sprintf(" via %v dev %s", p.Via, controlplane.TunnelDevice(p.Via, p.ULA))
		}
		for _, t := range p.Tunnels {
			l = append(l, fmt.Sprintf("tunnel %v dev %s", t, controlplane.TunnelDevice(t.Kind, p.ULA)))
		}
		l = append(l, route,
			fmt.Sprintf("state out %s -> %s spi 0x%x encap %s", s.Local.ULA, p.ULA, p.Out.SPI, p.Outer),
			fmt.Sprintf("state in %s -> %s spi 0x%x", p.ULA, s.Local.ULA, p.In.SPI))
		for _, sa := range p.PrevIn {
			l = append(l, fmt.Sprintf("state in %s -> %s spi 0x%x (previous)", p.ULA, s.Local.ULA, sa.SPI))
		}
	}
	slices.Sort(l)
	return l
}
