package lease

import (
	"context"
	"fmt"
	"log/slog"
	"runtime"
	"testing"
	"testing/synctest"
	"time"

	"github.com/btmm/btmm/dns/store"
	"github.com/miekg/dns"
)

func TestGrant(t *testing.T) {
	b := DefaultBounds
	for _, tc := range []struct {
		opt       *dns.EDNS0_UL
		want      time.Duration
		wantEcho  uint32
		wantKeyLs uint32
	}{
		{nil, 2 * time.Hour, 0, 0},
		{&dns.EDNS0_UL{Lease: 60}, 30 * time.Minute, 1800, 0},
		{&dns.EDNS0_UL{Lease: 3600, KeyLease: 99999}, time.Hour, 3600, 7200},
		{&dns.EDNS0_UL{Lease: 1 << 31}, 2 * time.Hour, 7200, 0},
	} {
		m := new(dns.Msg)
		m.SetUpdate("btmm.example.")
		if tc.opt != nil {
			m.SetEdns0(1232, false)
			tc.opt.Code = dns.EDNS0UL
			m.IsEdns0().Option = append(m.IsEdns0().Option, tc.opt)
		}
		g, echo := b.Grant(m)
		if g != tc.want {
			t.Errorf("%v: granted %v, want %v", tc.opt, g, tc.want)
		}
		if (echo == nil) != (tc.opt == nil) || echo != nil && (echo.Lease != tc.wantEcho || echo.KeyLease != tc.wantKeyLs) {
			t.Errorf("%v: echo %v", tc.opt, echo)
		}
	}
	if (Bounds{Min: time.Hour, Max: time.Minute}).Validate() == nil {
		t.Error("bad bounds accepted")
	}
}

func has(s store.Store, name string) bool {
	found := false
	s.Read(func(v store.View) { found = len(v.Name(name)) > 0 })
	return found
}

func put(t *testing.T, s store.Store, rrText string, exp time.Time) {
	t.Helper()
	rr, _ := dns.NewRR(rrText)
	if _, err := s.Update(context.Background(), func(store.View) ([]store.Op, error) {
		return []store.Op{{Kind: store.Put, Record: store.Record{RR: rr, Expires: exp}}}, nil
	}); err != nil {
		t.Fatal(err)
	}
}

func TestExpirer(t *testing.T) {
	dir := t.TempDir()
	synctest.Test(t, func(t *testing.T) {
		s, err := store.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		// One record already expired before start (server was down).
		put(t, s, "old.alice.btmm.example. 60 IN A 192.0.2.1", time.Now().Add(-time.Minute))
		put(t, s, "perm.alice.btmm.example. 60 IN A 192.0.2.3", time.Time{})
		e := &Expirer{Store: s, Log: slog.New(slog.DiscardHandler)}
		done := make(chan struct{})
		go func() { e.Run(ctx); close(done) }()
		synctest.Wait()
		if has(s, "old.alice.btmm.example.") {
			t.Fatal("record expired during downtime not removed at start")
		}
		put(t, s, "a.alice.btmm.example. 60 IN A 192.0.2.2", time.Now().Add(30*time.Minute))
		time.Sleep(20 * time.Minute)
		// Refresh: extends to 20m+30m.
		put(t, s, "a.alice.btmm.example. 60 IN A 192.0.2.2", time.Now().Add(30*time.Minute))
		time.Sleep(15 * time.Minute) // past the original expiry
		synctest.Wait()
		if !has(s, "a.alice.btmm.example.") {
			t.Fatal("refreshed record expired at its old lease")
		}
		time.Sleep(16 * time.Minute)
		synctest.Wait()
		if has(s, "a.alice.btmm.example.") {
			t.Fatal("record outlived its lease")
		}
		if !has(s, "perm.alice.btmm.example.") {
			t.Fatal("record without lease removed")
		}
		cancel()
		<-done
	})
}

// An endless refresh loop keeps one schedule entry per record (the old
// scheduler kept one per refresh until the old expiry: ~217 B each).
func TestRefreshLoopKeepsOneEntryPerRecord(t *testing.T) {
	s, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e := &Expirer{Store: s, Log: slog.New(slog.DiscardHandler)}
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	const records, rounds = 50, 40
	base := time.Now().Add(time.Hour)
	var last uint64
	for round := range rounds {
		var ops []store.Op
		for i := range records {
			rr, _ := dns.NewRR(fmt.Sprintf("h%d.alice.btmm.example. 60 IN A 192.0.2.1", i))
			ops = append(ops, store.Op{Kind: store.Put, Record: store.Record{RR: rr,
				Expires: base.Add(time.Duration(round) * time.Second)}})
		}
		rev, err := s.Update(ctx, func(store.View) ([]store.Op, error) { return ops, nil })
		if err != nil {
			t.Fatal(err)
		}
		last = rev
	}
	// Wait until the expirer has seen the last change, then count.
	deadline := time.Now().Add(10 * time.Second)
	for e.Pending() != records && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := e.Pending(); n != records {
		t.Fatalf("%d schedule entries for %d records after %d refreshes each (rev %d)", n, records, rounds, last)
	}
	// A deleted record leaves the schedule.
	rr, _ := dns.NewRR("h0.alice.btmm.example. 60 IN A 192.0.2.1")
	s.Update(ctx, func(store.View) ([]store.Op, error) {
		return []store.Op{{Kind: store.Delete, Record: store.Record{RR: rr}}}, nil
	})
	for e.Pending() != records-1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := e.Pending(); n != records-1 {
		t.Fatalf("%d entries after a delete", n)
	}
	cancel()
	<-done
}

// BenchmarkRefreshLoop: b.N lease refreshes spread over 10,000 records (run
// with -benchtime 1000000x for the 1M); reports the live heap after
// the loop and its growth over the loop.
func BenchmarkRefreshLoop(b *testing.B) {
	const records = 10000
	recs := make([]store.Record, records)
	for i := range recs {
		rr, _ := dns.NewRR(fmt.Sprintf("h%d.alice.btmm.example. 60 IN AAAA fd00::%x", i, i+1))
		recs[i] = store.Record{RR: rr, Expires: time.Unix(1800000000, 0)}
	}
	s := NewSchedule()
	for _, r := range recs {
		s.Set(r)
	}
	heapNow := func() float64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return float64(m.HeapAlloc)
	}
	before := heapNow()
	b.ResetTimer()
	for i := range b.N {
		r := recs[i%records]
		r.Expires = r.Expires.Add(time.Duration(i) * time.Millisecond)
		s.Changed(store.Change{Refreshed: []store.Record{r}})
	}
	b.StopTimer()
	after := heapNow()
	if s.Len() != records {
		b.Fatalf("%d entries", s.Len())
	}
	b.ReportMetric(after, "heap-B")
	b.ReportMetric(after-before, "heap-growth-B")
	runtime.KeepAlive(recs)
}
