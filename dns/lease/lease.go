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
	"sync"
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
// store's watch, so changes committed elsewhere are covered too. It keeps one
// schedule entry per record: a refresh moves the record's entry, a removal
// drops it, so memory is bounded by the number of leased records however
// often they are refreshed.
type Expirer struct {
	Store store.Store
	Log   *slog.Logger
	// Now is the clock (default time.Now); tests run under
	// testing/synctest instead of replacing it.
	Now func() time.Time

	mu    sync.Mutex
	sched *Schedule
}

// Pending returns the number of scheduled expiries (one per leased record).
func (e *Expirer) Pending() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.sched == nil {
		return 0
	}
	return e.sched.Len()
}

// Schedule is the expiry schedule: a min-heap of lease ends indexed by
// record key, one entry per record.
type Schedule struct {
	h     expHeap
	byKey map[string]*item
}

type item struct {
	at    time.Time
	key   string // store.RRKey
	owner string // the RR's owner name, to find it again
	index int
}

type expHeap []*item

func (h expHeap) Len() int           { return len(h) }
func (h expHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h expHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}
func (h *expHeap) Push(x any) {
	it := x.(*item)
	it.index = len(*h)
	*h = append(*h, it)
}
func (h *expHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	return x
}

// NewSchedule returns an empty schedule.
func NewSchedule() *Schedule { return &Schedule{byKey: map[string]*item{}} }

// Len is the number of entries.
func (s *Schedule) Len() int { return len(s.h) }

// Set schedules r's expiry, replacing its previous entry; a record without
// a lease is unscheduled.
func (s *Schedule) Set(r store.Record) {
	k := r.Key()
	if r.Expires.IsZero() {
		s.Remove(k)
		return
	}
	if it, ok := s.byKey[k]; ok {
		it.at = r.Expires
		heap.Fix(&s.h, it.index)
		return
	}
	it := &item{at: r.Expires, key: k, owner: r.RR.Header().Name}
	s.byKey[k] = it
	heap.Push(&s.h, it)
}

// Remove unschedules the record with key k.
func (s *Schedule) Remove(k string) {
	if it, ok := s.byKey[k]; ok {
		heap.Remove(&s.h, it.index)
		delete(s.byKey, k)
	}
}

// Changed applies a committed store change.
func (s *Schedule) Changed(c store.Change) {
	for _, r := range c.Removed {
		s.Remove(r.Key())
	}
	for _, r := range c.Added {
		s.Set(r)
	}
	for _, r := range c.Refreshed {
		s.Set(r)
	}
}

// Next returns the earliest expiry.
func (s *Schedule) Next() (time.Time, bool) {
	if len(s.h) == 0 {
		return time.Time{}, false
	}
	return s.h[0].at, true
}

// due is one record whose lease ended.
type due struct{ key, owner string }

// popDue removes and returns the entries due at t.
func (s *Schedule) popDue(t time.Time) []due {
	var out []due
	for len(s.h) > 0 && !s.h[0].at.After(t) {
		it := heap.Pop(&s.h).(*item)
		delete(s.byKey, it.key)
		out = append(out, due{it.key, it.owner})
	}
	return out
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
	sched := NewSchedule()
	for _, r := range all {
		sched.Set(r)
	}
	e.mu.Lock()
	e.sched = sched
	e.mu.Unlock()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		// Expire everything due. The deletion re-checks each lease in the
		// store: a refresh committed meanwhile wins. A failed deletion is
		// retried a second later unless a change re-scheduled the record.
		t := now()
		e.mu.Lock()
		d := sched.popDue(t)
		e.mu.Unlock()
		if len(d) > 0 {
			if err := e.expire(ctx, d, t); err != nil && ctx.Err() == nil {
				e.Log.Warn("lease expiry failed; retrying", "err", err)
				e.mu.Lock()
				for _, x := range d {
					if _, ok := sched.byKey[x.key]; !ok {
						it := &item{at: t.Add(time.Second), key: x.key, owner: x.owner}
						sched.byKey[x.key] = it
						heap.Push(&sched.h, it)
					}
				}
				e.mu.Unlock()
			}
		}
		wait := time.Hour
		e.mu.Lock()
		if at, ok := sched.Next(); ok {
			wait = max(at.Sub(now()), 0)
		}
		e.mu.Unlock()
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return nil
		case c, ok := <-ch:
			if !ok {
				return nil
			}
			e.mu.Lock()
			sched.Changed(c)
			e.mu.Unlock()
		case <-timer.C:
		}
	}
}

func (e *Expirer) expire(ctx context.Context, d []due, t time.Time) error {
	_, err := e.Store.Update(ctx, func(v store.View) ([]store.Op, error) {
		var ops []store.Op
		for _, x := range d {
			for _, r := range v.Name(x.owner) {
				// Only if still the same lease: a refresh moved it later.
				if r.Key() == x.key && !r.Expires.IsZero() && !r.Expires.After(t) {
					ops = append(ops, store.Op{Kind: store.Delete, Record: r})
				}
			}
		}
		return ops, nil
	})
	if err == nil {
		e.Log.Debug("leases expired", "records", len(d))
	}
	return err
}
