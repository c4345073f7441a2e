package etcdstore

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/store"
	"github.com/btmm/btmm/internal/etcdtest"
	"github.com/miekg/dns"
	"google.golang.org/grpc"
)

// open opens a store on the cluster (all endpoints, or only ep), dialling
// from the hub namespace.
func open(t *testing.T, c *etcdtest.Cluster, eps ...string) *Store {
	t.Helper()
	if len(eps) == 0 {
		eps = c.Endpoints()
	}
	local, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dial := grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
		return c.DialHub("tcp", addr)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := Open(ctx, Config{Endpoints: eps, Local: local, Prefix: "/t/",
		SessionTTL: 2 * time.Second, DialOptions: []grpc.DialOption{dial},
		Guard: func(n string) string { return "g" }, Log: testLog()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func rrOf(t testing.TB, s string) dns.RR {
	t.Helper()
	rr, err := dns.NewRR(s)
	if err != nil {
		t.Fatal(err)
	}
	return rr
}

// TestReplicas: a change committed through one replica reaches every
// replica's Watch and cache; concurrent read-modify-write transactions
// through three replicas lose no increment (the guard conditions make them
// serialisable); updates through every replica commit with the etcd leader
// killed; exactly one replica leads at a time.
func TestReplicas(t *testing.T) {
	c := etcdtest.Start(t, 3)
	a, b, cc := open(t, c), open(t, c), open(t, c)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, _ := cc.Watch(ctx)
	r := store.Record{RR: rrOf(t, "mac.alice.btmm.example. 60 IN AAAA fd00::1"), Expires: time.Now().Add(time.Hour)}
	rev, err := a.Update(ctx, func(store.View) ([]store.Op, error) { return []store.Op{{Kind: store.Put, Record: r}}, nil })
	if err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-ch:
		if got.Rev != rev || len(got.Added) != 1 || got.Added[0].Key() != r.Key() || !got.Added[0].Expires.Equal(r.Expires) {
			t.Fatalf("change at the third replica: %+v (rev %d)", got, rev)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no change at the third replica")
	}
	// Read-your-writes at the replica that committed; the others follow.
	a.Read(func(v store.View) {
		if len(v.Name("mac.alice.btmm.example.")) != 1 {
			t.Fatal("committing replica does not see its write")
		}
	})

	counter := func(v store.View) int {
		for _, r := range v.Name("n.alice.btmm.example.") {
			n, _ := strconv.Atoi(r.RR.(*dns.TXT).Txt[0])
			return n
		}
		return 0
	}
	incr := func(s *Store) error {
		_, err := s.Update(ctx, func(v store.View) ([]store.Op, error) {
			n := counter(v)
			var ops []store.Op
			for _, old := range v.Name("n.alice.btmm.example.") {
				ops = append(ops, store.Op{Kind: store.Delete, Record: old})
			}
			next := store.Record{RR: rrOf(t, fmt.Sprintf(`n.alice.btmm.example. 60 IN TXT "%d"`, n+1))}
			return append(ops, store.Op{Kind: store.Put, Record: next}), nil
		})
		return err
	}
	var wg sync.WaitGroup
	const each = 10
	for _, s := range []*Store{a, b, cc} {
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range each {
					if err := incr(s); err != nil {
						t.Error(err)
					}
				}
			}()
		}
	}
	wg.Wait()
	// Every increment returned once its own replica applied it; b reads
	// after it applied the newest of them.
	if err := b.waitRev(ctx, int64(max(mustRev(a), mustRev(b), mustRev(cc)))); err != nil {
		t.Fatal(err)
	}
	b.Read(func(v store.View) {
		if n := counter(v); n != 3*2*each {
			t.Fatalf("counter %d after %d increments: lost updates", n, 3*2*each)
		}
	})

	// The leader killed: an update through every replica commits, each
	// within its RequestTimeout (the survivors elect a new leader; a try
	// that went to the dead one or to a member still following it is
	// asked again).
	dead := c.Leader(10 * time.Second)
	c.Kill(dead)
	for i, s := range []*Store{a, b, cc} {
		if err := incr(s); err != nil {
			t.Fatalf("update through replica %d with member %d (the leader) killed: %v", i, dead, err)
		}
	}
	if err := a.waitRev(ctx, int64(max(mustRev(a), mustRev(b), mustRev(cc)))); err != nil {
		t.Fatal(err)
	}
	a.Read(func(v store.View) {
		if n := counter(v); n != 3*2*each+3 {
			t.Fatalf("counter %d after %d increments: lost updates", n, 3*2*each+3)
		}
	})
	c.Restart(dead)

	// One leader at a time.
	var leaders, maxLeaders, led atomic.Int32
	lctx, lcancel := context.WithTimeout(ctx, 4*time.Second)
	defer lcancel()
	var lwg sync.WaitGroup
	for _, s := range []*Store{a, b, cc} {
		lwg.Add(1)
		go func() {
			defer lwg.Done()
			s.Lead(lctx, func(ctx context.Context) {
				n := leaders.Add(1)
				led.Add(1)
				for {
					m := maxLeaders.Load()
					if n <= m || maxLeaders.CompareAndSwap(m, n) {
						break
					}
				}
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
				leaders.Add(-1)
			})
		}()
	}
	lwg.Wait()
	if maxLeaders.Load() != 1 || led.Load() < 2 {
		t.Fatalf("max concurrent leaders %d, leaderships %d", maxLeaders.Load(), led.Load())
	}
}

func mustRev(s *Store) uint64 {
	_, rev := s.All()
	return rev
}

// snapshot is a store's records as sorted "key ttl expiry" lines.
func snapshot(s *Store) ([]string, uint64) {
	all, rev := s.All()
	out := make([]string, 0, len(all))
	for _, r := range all {
		out = append(out, fmt.Sprintf("%s %d %d", r.Key(), r.RR.Header().Ttl, r.Expires.UnixNano()))
	}
	slices.Sort(out)
	return out, rev
}

// TestLoadPaged: Open reads the prefix in pages, all at the revision of
// the first page, so the cache is the store exactly as of that revision
// (writes committed between pages, before and after the read's cursor, are
// not half in it) and the watch delivers them from the next revision; a
// compaction past that revision in the middle of the read starts it again.
func TestLoadPaged(t *testing.T) {
	c := etcdtest.Start(t, 1)
	a := open(t, c)
	ctx := t.Context()
	put := func(names ...string) uint64 {
		t.Helper()
		rev, err := a.Update(ctx, func(v store.View) ([]store.Op, error) {
			var ops []store.Op
			for _, n := range names {
				if strings.HasPrefix(n, "-") {
					for _, r := range v.Name(n[1:]) {
						ops = append(ops, store.Op{Kind: store.Delete, Record: r})
					}
					continue
				}
				ops = append(ops, store.Op{Kind: store.Put, Record: store.Record{
					RR: rrOf(t, n+" 60 IN AAAA fd00::1"), Expires: time.Now().Add(time.Hour)}})
			}
			return ops, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return rev
	}
	var names []string
	for i := range 50 {
		names = append(names, fmt.Sprintf("h%02d.alice.btmm.example.", i))
	}
	put(names...)
	want, wantRev := snapshot(a)

	loadPage = 7
	defer func() { loadPage, loadPageHook = 2000, nil }()
	pages := 0
	loadPageHook = func(page int) {
		pages++
		if page == 2 {
			// One write behind the cursor, one ahead of it.
			put("-h00.alice.btmm.example.", "h49.alice.btmm.example.", "zz.alice.btmm.example.")
		}
	}
	b := open(t, c)
	loadPageHook = nil
	got, gotRev := snapshot(b)
	if gotRev != wantRev || !slices.Equal(got, want) {
		t.Fatalf("after a paged load at revision %d (want %d): %d records, want %d as of the first page\n got %q\nwant %q",
			gotRev, wantRev, len(got), len(want), got, want)
	}
	if pages < 8 {
		t.Fatalf("%d pages for 50 names and a guard at 7 keys a page", pages)
	}
	// The watch carries on from there: b catches up with a.
	if err := b.waitRev(ctx, int64(mustRev(a))); err != nil {
		t.Fatal(err)
	}
	got, _ = snapshot(b)
	want, _ = snapshot(a)
	if !slices.Equal(got, want) {
		t.Fatalf("after the watch: got %q want %q", got, want)
	}

	// Compacted past the read's revision after its first page: read again.
	compacted := false
	loadPageHook = func(page int) {
		if page == 0 && !compacted {
			compacted = true
			rev := put("h10.alice.btmm.example.", "-h11.alice.btmm.example.")
			if _, err := a.cli.Compact(ctx, int64(rev)); err != nil {
				t.Error(err)
			}
		}
	}
	d := open(t, c)
	loadPageHook = nil
	got, gotRev = snapshot(d)
	want, wantRev = snapshot(a)
	if !compacted || gotRev != wantRev || !slices.Equal(got, want) {
		t.Fatalf("load across a compaction (compacted %v): revision %d want %d\n got %q\nwant %q", compacted, gotRev, wantRev, got, want)
	}
}

// testLog logs the stores' debug lines to stderr with BTMM_DEBUG_ETCD=1.
func testLog() *slog.Logger {
	if os.Getenv("BTMM_DEBUG_ETCD") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
