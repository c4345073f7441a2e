// Package lease implements DNS update leases (EDNS0 option 2, RFC 9664) for
// btmm-dnsd: parsing the Update-Lease option, clamping the requested lease to
// the server's bounds, and an expiry scheduler that deletes records from the
// store when their lease ends. Expiry is on wall-clock time stored with each
// record, so leases keep running across a restart.
package lease

import (
	"container/heap"
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/btmm/btmm/dns/store"
	"github.com/miekg/dns"
)

// Bounds are the lease limits: a requested lease is clamped to [Min, Max];
// an update without the option gets Default (0: records never expire).
type Bounds struct {
	Min, Max, Default time.Duration
}

// DefaultBounds are RFC 6281-friendly limits: [30 min, 2 h], default 2 h.
var DefaultBounds = Bounds{Min: 30 * time.Minute, Max: 2 * time.Hour, Default: 2 * time.Hour}

// Validate checks the bounds.
func (b Bounds) Validate() error {
	if b.Min <= 0 || b.Max < b.Min || b.Default < 0 {
		return fmt.Errorf("lease: bad bounds min=%v max=%v default=%v", b.Min, b.Max, b.Default)
	}
	return nil
}

// Clamp returns the lease granted for a request of d.
func (b Bounds) Clamp(d time.Duration) time.Duration {
	return min(max(d, b.Min), b.Max)
}

// Option returns the Update-Lease option of m, if any.
func Option(m *dns.Msg) (*dns.EDNS0_UL, bool) {
	opt := m.IsEdns0()
	if opt == nil {
		return nil, false
	}
	for _, o := range opt.Option {
		if ul, ok := o.(*dns.EDNS0_UL); ok {
			return ul, true
		}
	}
	return nil, false
}

// Grant computes the lease for an UPDATE: with the option, the clamped
// request and the option to echo (KEY-LEASE clamped likewise when present);
// without it, the default and no option.
func (b Bounds) Grant(m *dns.Msg) (time.Duration, *dns.EDNS0_UL) {
	ul, ok := Option(m)
	if !ok {
		return b.Default, nil
	}
	g := b.Clamp(time.Duration(ul.Lease) * time.Second)
	echo := &dns.EDNS0_UL{Code: dns.EDNS0UL, Lease: uint32(g / time.Second)}
	if ul.KeyLease != 0 {
		echo.KeyLease = uint32(b.Clamp(time.Duration(ul.KeyLease)*time.Second) / time.Second)
	}
	return g, echo
}

// Expirer deletes records whose lease has ended. It learns expiries from the
// store's watch, so changes committed elsewhere are covered too.
type Expirer struct {
	Store store.Store
	Log   *slog.Logger
	// Now and After are the clock (default time.Now / time.After); tests
	// run under testing/synctest instead of replacing them.
	Now func() time.Time
}

type item struct {
	at  time.Time
	rec store.Record
}
type expHeap []item

func (h expHeap) Len() int           { return len(h) }
func (h expHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h expHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *expHeap) Push(x any)        { *h = append(*h, x.(item)) }
func (h *expHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// Run expires records until ctx ends. Records already past their lease
// (e.g. after downtime) are removed at once.
func (e *Expirer) Run(ctx context.Context) error {
	now := e.Now
	if now == nil {
		now = time.Now
	}
	ch, _ := e.Store.Watch(ctx)
	all, _ := e.Store.All()
	var h expHeap
	for _, r := range all {
		if !r.Expires.IsZero() {
			h = append(h, item{r.Expires, r})
		}
	}
	heap.Init(&h)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		// Expire everything due.
		var due []store.Record
		t := now()
		for h.Len() > 0 && !h[0].at.After(t) {
			due = append(due, heap.Pop(&h).(item).rec)
		}
		if len(due) > 0 {
			if err := e.expire(ctx, due, t); err != nil && ctx.Err() == nil {
				e.Log.Warn("lease expiry failed; retrying", "err", err)
				for _, r := range due {
					heap.Push(&h, item{t.Add(time.Second), r})
				}
			}
		}
		wait := time.Hour
		if h.Len() > 0 {
			wait = max(h[0].at.Sub(now()), 0)
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return nil
		case c, ok := <-ch:
			if !ok {
				return nil
			}
			for _, r := range append(c.Added, c.Refreshed...) {
				if !r.Expires.IsZero() {
					heap.Push(&h, item{r.Expires, r})
				}
			}
		case <-timer.C:
		}
	}
}

func (e *Expirer) expire(ctx context.Context, due []store.Record, t time.Time) error {
	_, err := e.Store.Update(ctx, func(v store.View) ([]store.Op, error) {
		var ops []store.Op
		for _, d := range due {
			for _, r := range v.Name(d.RR.Header().Name) {
				// Only if still the same lease: a refresh moved it later.
				if r.Key() == d.Key() && !r.Expires.IsZero() && !r.Expires.After(t) {
					ops = append(ops, store.Op{Kind: store.Delete, Record: r})
				}
			}
		}
		return ops, nil
	})
	if err == nil {
		e.Log.Debug("leases expired", "records", len(due))
	}
	return err
}
