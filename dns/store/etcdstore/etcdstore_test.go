package etcdstore

import (
	"context"
	"fmt"
	"net"
	"strconv"
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
	s, err := Open(ctx, Config{Endpoints: eps, Local: local, Prefix: "/t/", RequestTimeout: 3 * time.Second,
		SessionTTL: 2 * time.Second, DialOptions: []grpc.DialOption{dial},
		Guard: func(n string) string { return "g" }})
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
// serialisable); updates continue with one member killed; exactly one
// replica leads at a time.
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
	if err := b.waitRev(ctx, int64(mustRev(a))); err != nil {
		t.Fatal(err)
	}
	b.Read(func(v store.View) {
		if n := counter(v); n != 3*2*each {
			t.Fatalf("counter %d after %d increments: lost updates", n, 3*2*each)
		}
	})

	// One member killed: updates through every replica continue.
	c.Kill(2)
	for i, s := range []*Store{a, b, cc} {
		uctx, ucancel := context.WithTimeout(ctx, 20*time.Second)
		err := incr(s)
		ucancel()
		_ = uctx
		if err != nil {
			t.Fatalf("update through replica %d with member 2 down: %v", i, err)
		}
	}
	c.Restart(2)

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
