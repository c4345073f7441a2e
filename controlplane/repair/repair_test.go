package repair

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/btmm/btmm/controlplane"
)

// kernel is a fake dataplane: broken says how many objects someone
// removed; apply puts them back.
type kernel struct {
	mu      sync.Mutex
	broken  int
	applies int
	err     error
	times   []time.Time
}

func (k *kernel) apply(context.Context) ([]controlplane.Change, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.applies++
	k.times = append(k.times, time.Now())
	if k.err != nil {
		return nil, k.err
	}
	var ch []controlplane.Change
	for range k.broken {
		ch = append(ch, controlplane.Change{Op: "add", Object: "state", What: "spi 0x00001001"})
	}
	k.broken = 0
	return ch, nil
}

func (k *kernel) breakIt(n int) {
	k.mu.Lock()
	k.broken += n
	k.mu.Unlock()
}

func (k *kernel) stamps() []time.Time {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]time.Time(nil), k.times...)
}

func (k *kernel) count() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.applies
}

// logs counts records by level.
type logs struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (l *logs) Enabled(context.Context, slog.Level) bool { return true }
func (l *logs) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	l.recs = append(l.recs, r)
	l.mu.Unlock()
	return nil
}
func (l *logs) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logs) WithGroup(string) slog.Handler      { return l }

func (l *logs) at(level slog.Level) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, r := range l.recs {
		if r.Level == level {
			out = append(out, r.Message)
		}
	}
	return out
}

func start(t *testing.T, k *kernel, cfg Config) (*Loop, *logs, context.CancelFunc) {
	lg := &logs{}
	cfg.Logger = slog.New(lg)
	l := New(k.apply, cfg)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { l.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return l, lg, cancel
}

// TestBurstIsOneRepair: a flush notifies once per object; the loop waits
// Settle and repairs once, records it and logs it once.
func TestBurstIsOneRepair(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := &kernel{}
		l, lg, _ := start(t, k, Config{Audit: -1})
		t0 := time.Now()
		k.breakIt(4)
		for range 4 {
			l.Kick("xfrm state deleted")
			time.Sleep(time.Millisecond)
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if k.count() != 1 {
			t.Fatalf("%d applies for one burst, want 1", k.count())
		}
		times := k.stamps()
		if d := times[0].Sub(t0); d != 20*time.Millisecond {
			t.Errorf("repaired %v after the first notification, want the settle time 20ms", d)
		}
		r := l.Last()
		if r.Count != 1 || len(r.What) != 4 || r.At != times[0] || r.Err != "" {
			t.Errorf("Last = %+v", r)
		}
		if w := lg.at(slog.LevelWarn); len(w) != 1 || !strings.Contains(w[0], "restored") {
			t.Errorf("warnings %q, want one", w)
		}
		// Our own changes echoed back: applies that change nothing are no repair.
		l.Kick("route deleted")
		time.Sleep(time.Second)
		synctest.Wait()
		if k.count() != 2 || l.Last().Count != 1 {
			t.Errorf("applies %d, repairs %d; want 2 and 1", k.count(), l.Last().Count)
		}
	})
}

// TestRateLimit: someone deletes our state every 10 ms for 10 s (a fight).
// The loop repairs Burst times at once, then once per Interval; one Warn
// for the whole burst, one summary when it is over.
func TestRateLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := &kernel{}
		l, lg, _ := start(t, k, Config{Audit: -1, Burst: 3})
		for end := time.Now().Add(10 * time.Second); time.Now().Before(end); {
			k.breakIt(1)
			l.Kick("xfrm state deleted")
			time.Sleep(10 * time.Millisecond)
		}
		time.Sleep(2 * time.Second) // the last kick's repair
		synctest.Wait()
		n := k.count()
		// 3 at once, then one per second over ~10 s.
		if n < 11 || n > 14 {
			t.Errorf("%d repairs in 10 s of fighting, want 3 + ~10", n)
		}
		times := k.stamps()
		for i := 4; i < len(times); i++ {
			if gap := times[i].Sub(times[i-1]); gap < time.Second-time.Millisecond {
				t.Errorf("repairs %d and %d %v apart, want >= 1 s once the burst is spent", i-1, i, gap)
			}
		}
		time.Sleep(time.Minute)
		synctest.Wait()
		if w := lg.at(slog.LevelWarn); len(w) != 1 {
			t.Errorf("warnings %q, want one for the burst", w)
		}
		if i := lg.at(slog.LevelInfo); len(i) != 1 || !strings.Contains(i[0], "burst over") {
			t.Errorf("info lines %q, want one summary", i)
		}
		if l.Last().Count != n {
			t.Errorf("count %d, want %d", l.Last().Count, n)
		}
		// A new burst later is logged again.
		k.breakIt(1)
		l.Kick("route deleted")
		time.Sleep(time.Second)
		synctest.Wait()
		if w := lg.at(slog.LevelWarn); len(w) != 2 {
			t.Errorf("warnings %q, want a second one for the new burst", w)
		}
	})
}

// TestFailedRepairRetried: a repair that fails is retried with backoff
// (1 s, 2 s, 4 s, ...) until it works; Last carries the error meanwhile.
func TestFailedRepairRetried(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := &kernel{err: errors.New("add route fd00::b: network is down")}
		l, _, _ := start(t, k, Config{Audit: -1})
		k.breakIt(1)
		l.Kick("route deleted")
		time.Sleep(4 * time.Second)
		synctest.Wait()
		if n := k.count(); n != 3 { // at 0, +1 s, +2 s
			t.Errorf("%d attempts in 4 s, want 3 (backoff 1 s, 2 s)", n)
		}
		if r := l.Last(); !strings.Contains(r.Err, "network is down") || r.Count != 0 {
			t.Errorf("Last = %+v, want the error and no repair", r)
		}
		k.mu.Lock()
		k.err = nil
		k.mu.Unlock()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		if r := l.Last(); r.Err != "" || r.Count != 1 {
			t.Errorf("after recovery Last = %+v, want one repair, no error", r)
		}
		n := k.count()
		time.Sleep(time.Minute)
		synctest.Wait()
		if k.count() != n {
			t.Errorf("kept retrying after success: %d -> %d", n, k.count())
		}
	})
}

// TestAudit: without notifications the loop still re-applies every Audit,
// which catches what the kernel never announces.
func TestAudit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := &kernel{}
		l, _, _ := start(t, k, Config{Audit: 10 * time.Second})
		time.Sleep(35 * time.Second)
		synctest.Wait()
		if n := k.count(); n != 3 {
			t.Errorf("%d audits in 35 s, want 3", n)
		}
		k.breakIt(2) // e.g. a map entry deleted with bpftool
		time.Sleep(10 * time.Second)
		synctest.Wait()
		if r := l.Last(); r.Count != 1 || len(r.What) != 2 {
			t.Errorf("Last = %+v, want the audit's repair", r)
		}
	})
}

// TestStops: Run returns when its context ends, also while waiting.
func TestStops(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		k := &kernel{}
		l := New(k.apply, Config{})
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { l.Run(ctx); close(done) }()
		l.Kick("x")
		time.Sleep(time.Millisecond) // inside the settle wait
		cancel()
		synctest.Wait()
		select {
		case <-done:
		default:
			t.Fatal("Run did not return")
		}
		if k.count() != 0 {
			t.Error("applied after cancel")
		}
	})
}

// TestKickOnXfrm: only flushes, overruns and our reqid's states and
// policies kick; a foreign IKE daemon's do not.
func TestKickOnXfrm(t *testing.T) {
	for _, tc := range []struct {
		name string
		typ  uint16
		b    []byte
		want string // the kick's reason; "" no kick
	}{
		{"our state deleted", XfrmDelSA, buildSA(XfrmDelSA, ula4, 0x1001, 0x6281, nil), "xfrm state spi 0x00001001 deleted"},
		{"our policy changed", XfrmUpdPolicy, buildPolicy(XfrmUpdPolicy, 0x6281), "xfrm policy added or changed"},
		{"states flushed", XfrmFlushSA, []byte{50, 0, 0, 0}, "xfrm states flushed"},
		{"overrun", Overrun, nil, "xfrm notifications lost (socket overrun)"},
		{"foreign state", XfrmNewSA, buildSA(XfrmNewSA, ula4, 0x9999, 7, nil), ""},
		{"foreign policy deleted", XfrmDelPolicy, buildPolicy(XfrmDelPolicy, 7), ""},
	} {
		l := New(nil, Config{})
		l.KickOnXfrm(0x6281)(tc.typ, tc.b)
		if l.reason != tc.want {
			t.Errorf("%s: kick %q, want %q", tc.name, l.reason, tc.want)
		}
	}
}

// TestKickOnRoute: the shared start of the dataplanes' rtnetlink handlers
// kicks for an overrun and for our route (our protocol) or our ULA going;
// foreign routes and addresses neither kick nor reach the dataplane; other
// messages (links) reach it unkicked; a malformed one is dropped.
func TestKickOnRoute(t *testing.T) {
	ours := netip.MustParsePrefix("fd00::b/128")
	ula := netip.MustParseAddr("fd00::a")
	for _, tc := range []struct {
		name string
		typ  uint16
		b    []byte
		want string // the kick's reason; "" no kick
		more bool
	}{
		{"overrun", Overrun, nil, "rtnetlink notifications lost (socket overrun)", false},
		{"our route deleted", RTMDelRoute, buildRoute(RTMDelRoute, 98, ours, 3), "route fd00::b/128 deleted", false},
		{"foreign route deleted", RTMDelRoute, buildRoute(RTMDelRoute, 4, ours, 3), "", true},
		{"our route added", RTMNewRoute, buildRoute(RTMNewRoute, 98, ours, 3), "", true},
		{"our ULA deleted", RTMDelAddr, buildAddr(RTMDelAddr, netip.PrefixFrom(ula, 128), 1), "address fd00::a/128 deleted", false},
		{"another address deleted", RTMDelAddr, buildAddr(RTMDelAddr, ours, 1), "", true},
		{"link down", RTMNewLink, buildLink(3, 0), "", true},
		{"malformed", RTMDelRoute, []byte{10, 128}, "", false},
	} {
		l := New(nil, Config{})
		m, more := l.KickOnRoute(tc.typ, tc.b, 98, ula)
		if l.reason != tc.want || more != tc.more {
			t.Errorf("%s: kick %q, more %v; want %q, %v", tc.name, l.reason, more, tc.want, tc.more)
		}
		if more && m.Type != tc.typ {
			t.Errorf("%s: message type %d, want %d", tc.name, m.Type, tc.typ)
		}
	}
}
