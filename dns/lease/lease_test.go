package lease

import (
	"context"
	"log/slog"
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
