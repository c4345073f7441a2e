package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func rec(t testing.TB, s string) Record {
	t.Helper()
	rr, err := dns.NewRR(s)
	if err != nil {
		t.Fatal(err)
	}
	return Record{RR: rr, Owner: "alice.btmm.example.", Expires: time.Unix(1800000000, 0)}
}

func names(s Store) map[string]int {
	out := map[string]int{}
	all, _ := s.All()
	for _, r := range all {
		out[r.RR.String()]++
	}
	return out
}

func TestUpdateAtomicAndWatch(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, rev0 := s.Watch(ctx)
	a := rec(t, "a.alice.btmm.example. 60 IN A 192.0.2.1")
	rev, err := s.Update(ctx, func(View) ([]Op, error) { return []Op{{Kind: Put, Record: a}}, nil })
	if err != nil || rev != rev0+1 {
		t.Fatalf("rev %d err %v", rev, err)
	}
	c := <-ch
	if len(c.Added) != 1 || c.Rev != rev {
		t.Fatalf("change %+v", c)
	}
	// A failing transaction commits nothing and notifies nothing.
	boom := errors.New("boom")
	b := rec(t, "b.alice.btmm.example. 60 IN A 192.0.2.2")
	if _, err := s.Update(ctx, func(View) ([]Op, error) { return []Op{{Kind: Put, Record: b}}, boom }); !errors.Is(err, boom) {
		t.Fatal(err)
	}
	// Refresh (same RR, new lease) is Refreshed, not Added; delete is Removed.
	a2 := a
	a2.Expires = a.Expires.Add(time.Hour)
	s.Update(ctx, func(View) ([]Op, error) { return []Op{{Kind: Put, Record: a2}}, nil })
	c = <-ch
	if len(c.Refreshed) != 1 || len(c.Added) != 0 {
		t.Fatalf("refresh change %+v", c)
	}
	// Case-insensitive identity.
	A := rec(t, "A.ALICE.btmm.example. 60 IN A 192.0.2.1")
	s.Update(ctx, func(View) ([]Op, error) { return []Op{{Kind: Delete, Record: A}}, nil })
	c = <-ch
	if len(c.Removed) != 1 || len(names(s)) != 0 {
		t.Fatalf("delete change %+v, left %v", c, names(s))
	}
	// A no-op transaction is not delivered and keeps the revision.
	r1, _ := s.Update(ctx, func(View) ([]Op, error) { return []Op{{Kind: Delete, Record: b}}, nil })
	if r1 != c.Rev {
		t.Fatalf("no-op bumped rev to %d", r1)
	}
	select {
	case c := <-ch:
		t.Fatalf("no-op delivered %+v", c)
	default:
	}
}

func TestReopenTornTailAndCompaction(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	s.CompactEvery = 5
	ctx := context.Background()
	for i := range 12 {
		r := rec(t, "h.alice.btmm.example. 60 IN TXT \"v"+string(rune('a'+i))+"\"")
		if _, err := s.Update(ctx, func(View) ([]Op, error) { return []Op{{Kind: Put, Record: r}}, nil }); err != nil {
			t.Fatal(err)
		}
	}
	s.PutMeta("llq/1", []byte("x"))
	s.PutMeta("llq/2", []byte("y"))
	s.DeleteMeta("llq/1")
	want := names(s)
	_, wantRev := s.All()
	s.Close()
	// A crash mid-append leaves a torn record: it must be ignored.
	f, _ := os.OpenFile(filepath.Join(dir, logName), os.O_APPEND|os.O_WRONLY, 0)
	f.Write([]byte{0, 0, 1, 0, 1, 2, 3, 4, '{', '"'})
	f.Close()
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	got := names(s2)
	_, rev := s2.All()
	if len(got) != len(want) || rev != wantRev {
		t.Fatalf("after reopen: %d records rev %d, want %d rev %d", len(got), rev, len(want), wantRev)
	}
	m, _ := s2.Meta("llq/")
	if len(m) != 1 || string(m["llq/2"]) != "y" {
		t.Fatalf("meta %v", m)
	}
	// Appending after the truncated tail works and survives another reopen.
	r := rec(t, "z.alice.btmm.example. 60 IN A 192.0.2.9")
	if _, err := s2.Update(ctx, func(View) ([]Op, error) { return []Op{{Kind: Put, Record: r}}, nil }); err != nil {
		t.Fatal(err)
	}
	s2.Close()
	s3, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	if len(names(s3)) != len(want)+1 {
		t.Fatalf("after second reopen: %v", names(s3))
	}
	var exp time.Time
	s3.Read(func(v View) { exp = v.Name("z.alice.btmm.example.")[0].Expires })
	if !exp.Equal(r.Expires) {
		t.Fatalf("lease expiry not persisted: %v", exp)
	}
}

func TestClosed(t *testing.T) {
	s, _ := Open(t.TempDir())
	s.Close()
	if _, err := s.Update(context.Background(), func(View) ([]Op, error) { return nil, nil }); !errors.Is(err, ErrClosed) {
		t.Fatal(err)
	}
}

// A watcher that commits while its own changes are undelivered must not
// deadlock (the lease expirer does exactly this).
func TestWatcherMayCommit(t *testing.T) {
	s, _ := Open(t.TempDir())
	defer s.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s.Watch(ctx) // never drained
	for i := range 200 {
		r := rec(t, "h.alice.btmm.example. 60 IN TXT \"v"+string(rune('a'+i%26))+string(rune('a'+i/26))+"\"")
		if _, err := s.Update(ctx, func(View) ([]Op, error) { return []Op{{Kind: Put, Record: r}}, nil }); err != nil {
			t.Fatal(err)
		}
	}
}

func TestOneOpenerAtATime(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); !errors.Is(err, ErrLocked) {
		t.Fatalf("second open: %v", err)
	}
	s.Close()
	s2, err := Open(dir)
	if err != nil {
		t.Fatalf("reopen after close: %v", err)
	}
	s2.Close()
}

// Concurrent writers share fsyncs (group commit); watchers still see every
// change once, in revision order, and a reopen has them all.
func TestGroupCommitOrder(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, _ := s.Watch(ctx)
	const writers, each = 8, 30
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				r := rec(t, fmt.Sprintf("w%d-%d.alice.btmm.example. 60 IN A 192.0.2.1", w, i))
				if _, err := s.Update(ctx, func(View) ([]Op, error) { return []Op{{Kind: Put, Record: r}}, nil }); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	var last uint64
	for range writers * each {
		c := <-ch
		if c.Rev != last+1 {
			t.Fatalf("rev %d after %d", c.Rev, last)
		}
		last = c.Rev
	}
	s.Close()
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if all, rev := s2.All(); len(all) != writers*each || rev != last {
		t.Fatalf("reopen: %d records rev %d", len(all), rev)
	}
}
