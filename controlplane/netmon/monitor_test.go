package netmon

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlog{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tlog struct{ t testing.TB }

func (w tlog) Write(p []byte) (int, error) { w.t.Log(strings.TrimSpace(string(p))); return len(p), nil }

// check compares a verdict with a scenario's expectation.
func check(t *testing.T, sc scenario, n int, major bool, reasons []string) {
	t.Helper()
	switch {
	case sc.none && n != 0:
		t.Errorf("%s: reported %d change(s) (%q), want none", sc.name, n, reasons)
	case !sc.none && n == 0:
		t.Errorf("%s: no change reported", sc.name)
	case major != sc.major:
		t.Errorf("%s: major=%v (%q), want %v", sc.name, major, reasons, sc.major)
	case sc.reason != "" && !slices.ContainsFunc(reasons, func(r string) bool { return strings.Contains(r, sc.reason) }):
		t.Errorf("%s: reasons %q lack %q", sc.name, reasons, sc.reason)
	}
}

var (
	lan1 = netip.MustParsePrefix("192.168.1.2/24")
	gw1  = netip.MustParseAddr("192.168.1.1")
	lan2 = netip.MustParsePrefix("192.168.2.3/24")
	gw2  = netip.MustParseAddr("192.168.2.1")
	pub  = netip.MustParsePrefix("11.4.0.2/24")
	gwP  = netip.MustParseAddr("11.4.0.1")
)

func TestClassify(t *testing.T) {
	home := Host("eth0", 2, lan1, gw1, true)
	withLink := func(sn Snapshot, l Link, a ...Addr) Snapshot {
		sn.Links = append(slices.Clone(sn.Links), l)
		sn.Addrs = append(slices.Clone(sn.Addrs), a...)
		return sn
	}
	withRoute := func(sn Snapshot, r Route) Snapshot {
		sn.Routes = append(slices.Clone(sn.Routes), r)
		return sn
	}
	v6default := Route{Table: mainTable, Dst: netip.MustParsePrefix("::/0"), Gateway: netip.MustParseAddr("fe80::1"), Index: 2}
	for _, tc := range []struct {
		name     string
		old, cur Snapshot
		major    bool
		reason   string // "" with major false: no reasons at all
	}{
		{"unchanged", home, home, false, ""},
		{"other NAT", home, Host("eth0", 2, lan2, gw2, true), true, "default route changed"},
		{"public address", home, Host("eth0", 2, pub, gwP, true), true, "outer address changed: 192.168.1.2 -> 11.4.0.2"},
		{"Wi-Fi to Ethernet", home, Host("eth1", 3, lan1, gw1, true), true, "dev eth0 src 192.168.1.2 -> via 192.168.1.1 dev eth1"},
		{"offline", home, Host("eth0", 2, lan1, netip.Addr{}, true), true, "offline"},
		{"back online", Host("eth0", 2, lan1, netip.Addr{}, true), home, true, "appeared"},
		{"carrier lost, route kept", home, func() Snapshot { s := Host("eth0", 2, lan1, gw1, true); s.Links[1].Up = false; return s }(), true, "went down"},
		{"route's own source", home, withRoute(Host("eth0", 2, lan1, netip.Addr{}, true),
			Route{Table: mainTable, Dst: netip.MustParsePrefix("0.0.0.0/0"), Gateway: gw1, Index: 2, Src: netip.MustParseAddr("192.168.1.9")}), true, "-> 192.168.1.9"},
		{"unrelated link", home, withLink(home, Link{Index: 7, Name: "docker0", Up: true}, Addr{Index: 7, Prefix: netip.MustParsePrefix("172.17.0.1/16")}), false, "off the default route"},
		{"our own link", home, withLink(home, Link{Index: 8, Name: "btmm0", Up: true}, Addr{Index: 8, Prefix: netip.MustParsePrefix("10.9.9.9/24")}), false, ""},
		{"our ULA", home, func() Snapshot {
			s := home
			s.Addrs = append(slices.Clone(home.Addrs), Addr{Index: 2, Prefix: netip.MustParsePrefix("fd00::1/128")})
			return s
		}(), false, ""},
		{"IPv6 default only", home, withRoute(home, v6default), false, "btmm's outer is IPv4"},
		{"default route via our own link", home, withRoute(withLink(Host("eth0", 2, lan1, netip.Addr{}, true), Link{Index: 8, Name: "btmm0", Up: true}),
			Route{Table: mainTable, Dst: netip.MustParsePrefix("0.0.0.0/0"), Index: 8}), true, "offline"},
		{"lower metric wins", withRoute(home, Route{Table: mainTable, Dst: netip.MustParsePrefix("0.0.0.0/0"), Gateway: gw2, Index: 2, Priority: 100}),
			withRoute(home, Route{Table: mainTable, Dst: netip.MustParsePrefix("0.0.0.0/0"), Gateway: gw2, Index: 2, Priority: 100}), false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			major, reasons := Classify(tc.old.State(nil), tc.cur.State(nil))
			if major != tc.major {
				t.Fatalf("major = %v (%q), want %v", major, reasons, tc.major)
			}
			if tc.reason == "" && len(reasons) != 0 {
				t.Fatalf("reasons %q, want none", reasons)
			}
			if tc.reason != "" && !slices.ContainsFunc(reasons, func(r string) bool { return strings.Contains(r, tc.reason) }) {
				t.Fatalf("reasons %q lack %q", reasons, tc.reason)
			}
		})
	}
}

// harness runs a Monitor on a Fake inside a synctest bubble.
type harness struct {
	f       *Fake
	m       *Monitor
	mu      sync.Mutex
	changes []Change
}

func startHarness(t *testing.T, initial Snapshot, cfg Config) *harness {
	h := &harness{f: &Fake{}}
	h.f.Publish(initial)
	cfg.Logger = testLogger(t)
	var err error
	if h.m, err = New(h.f, cfg); err != nil {
		t.Fatal(err)
	}
	h.m.RegisterChangeCallback(func(c Change) {
		h.mu.Lock()
		h.changes = append(h.changes, c)
		h.mu.Unlock()
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { h.m.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	<-h.m.Ready()
	return h
}

func (h *harness) got() []Change {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.changes)
}

func linkMsgFor(sn Snapshot, name string) Msg {
	for _, l := range sn.Links {
		if l.Name == name {
			return Msg{Kind: LinkChanged, Link: &l}
		}
	}
	panic("no link " + name)
}

// A burst inside one debounce window gives one change, one window after
// its first notification, read with one snapshot.
func TestDebounce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		home := Host("eth0", 2, lan1, gw1, true)
		h := startHarness(t, home, Config{})
		start := time.Now()
		down := Host("eth0", 2, lan1, netip.Addr{}, false)
		h.f.Publish(down, linkMsgFor(down, "eth0"), Msg{Kind: AddrDeleted, Addr: &Addr{Index: 2, Prefix: lan1}})
		time.Sleep(100 * time.Millisecond)
		moved := Host("eth0", 2, lan2, gw2, true)
		h.f.Publish(moved, linkMsgFor(moved, "eth0"), Msg{Kind: AddrAdded, Addr: &moved.Addrs[0]},
			Msg{Kind: RouteAdded, Route: &moved.Routes[0]})
		time.Sleep(100 * time.Millisecond)
		synctest.Wait()
		if n := len(h.got()); n != 0 {
			t.Fatalf("%d change(s) reported inside the debounce window", n)
		}
		time.Sleep(DefaultDebounce)
		synctest.Wait()
		got := h.got()
		if len(got) != 1 {
			t.Fatalf("%d changes for one burst, want 1: %+v", len(got), got)
		}
		c := got[0]
		if !c.Major || c.Msgs != 5 || !c.First.Equal(start) || c.New.Default4.Outer != lan2.Addr() || c.Old.Default4.Outer != lan1.Addr() {
			t.Fatalf("change: %+v", c)
		}
		if n := h.f.Snapshots(); n != 2 {
			t.Fatalf("%d snapshots, want 2 (initial + one per burst)", n)
		}
		if h.m.State().Default4.Gateway != gw2 {
			t.Fatalf("State() = %v", h.m.State())
		}
		// A burst longer than the window is read once per window; an
		// intermediate state is reported, then the final one.
		h.f.Publish(down, linkMsgFor(down, "eth0"))
		time.Sleep(DefaultDebounce + 10*time.Millisecond)
		back := Host("eth0", 2, lan2, gw2, true)
		h.f.Publish(back, linkMsgFor(back, "eth0"))
		time.Sleep(DefaultDebounce + 10*time.Millisecond)
		synctest.Wait()
		got = h.got()[1:]
		if len(got) != 2 || !strings.Contains(strings.Join(got[0].Reasons, ";"), "offline") || !strings.Contains(strings.Join(got[1].Reasons, ";"), "appeared") {
			t.Fatalf("long burst: %+v", got)
		}
	})
}

// Notifications about btmm's own objects cost nothing: no snapshot, no change.
func TestNoiseFiltered(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		home := Host("eth0", 2, lan1, gw1, true)
		home.Links = append(home.Links, Link{Index: 9, Name: "btmm0", Up: true, Kind: "xfrm"})
		h := startHarness(t, home, Config{})
		ula := Addr{Index: 2, Prefix: netip.MustParsePrefix("fd12:3456::1/128")}
		ll := Addr{Index: 2, Prefix: netip.MustParsePrefix("fe80::1/64")}
		r128 := Route{Table: mainTable, Dst: netip.MustParsePrefix("fd99::2/128"), Index: 9}
		other := Route{Table: 100, Dst: netip.MustParsePrefix("0.0.0.0/0"), Index: 2}
		conn := Route{Table: mainTable, Dst: netip.MustParsePrefix("192.168.1.0/24"), Index: 2}
		ours := Addr{Index: 9, Prefix: netip.MustParsePrefix("10.9.9.9/24")}
		h.f.Publish(home, linkMsgFor(home, "btmm0"), Msg{Kind: AddrAdded, Addr: &ula}, Msg{Kind: AddrAdded, Addr: &ll},
			Msg{Kind: RouteAdded, Route: &r128}, Msg{Kind: RouteAdded, Route: &other}, Msg{Kind: RouteAdded, Route: &conn},
			Msg{Kind: AddrAdded, Addr: &ours}, Msg{Kind: LinkChanged, Link: &Link{Index: 1, Name: "lo", Loopback: true}})
		time.Sleep(time.Second)
		synctest.Wait()
		if n := h.f.Snapshots(); n != 1 {
			t.Fatalf("%d snapshots for noise, want only the initial one", n)
		}
		if n := len(h.got()); n != 0 {
			t.Fatalf("%d changes for noise", n)
		}
	})
}

// A failed snapshot is retried; a lost subscription is renewed and the state
// read again (what happened meanwhile is unknown).
func TestFailuresRecovered(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		home := Host("eth0", 2, lan1, gw1, true)
		h := startHarness(t, home, Config{RetryInterval: 2 * time.Second})
		h.f.FailSnapshots(errors.New("netlink: no buffer space"))
		moved := Host("eth0", 2, lan2, gw2, true)
		h.f.Publish(moved, Msg{Kind: RouteAdded, Route: &moved.Routes[0]})
		time.Sleep(time.Second)
		synctest.Wait()
		if len(h.got()) != 0 {
			t.Fatal("change reported although the snapshot failed")
		}
		h.f.FailSnapshots(nil)
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if got := h.got(); len(got) != 1 || got[0].New.Default4.Gateway != gw2 {
			t.Fatalf("after the retry: %+v", got)
		}
		// The subscription breaks while the network changes unseen.
		public := Host("eth0", 2, pub, gwP, true)
		h.f.Publish(public)
		h.f.Drop()
		time.Sleep(time.Second)
		synctest.Wait()
		if got := h.got(); len(got) != 2 || got[1].New.Default4.Outer != pub.Addr() || !got[1].Major {
			t.Fatalf("after a lost subscription: %+v", got)
		}
		// And the new subscription works.
		h.f.Publish(home, linkMsgFor(home, "eth0"))
		time.Sleep(time.Second)
		synctest.Wait()
		if got := h.got(); len(got) != 3 || got[2].New.Default4.Outer != lan1.Addr() {
			t.Fatalf("after resubscribing: %+v", got)
		}
	})
}

// The link going down and up inside one window leaves the state as it was
// but is a major change.
func TestFlapIsMajor(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		home := Host("eth0", 2, lan1, gw1, true)
		h := startHarness(t, home, Config{})
		down := Host("eth0", 2, lan1, gw1, false)
		h.f.Publish(down, linkMsgFor(down, "eth0"))
		time.Sleep(50 * time.Millisecond)
		h.f.Publish(home, linkMsgFor(home, "eth0"))
		time.Sleep(time.Second)
		synctest.Wait()
		if got := h.got(); len(got) != 1 || !got[0].Major || !strings.Contains(got[0].Reasons[0], "down and up") {
			t.Fatalf("flap: %+v", got)
		}
	})
}

// A flap the kernel folded into one notification that already shows the
// link up (linkwatch on a busy host) is still major: the carrier-down count
// of the default route's link grew. A count that grew on another link, or
// did not grow, is no flap.
func TestFoldedFlapIsMajor(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		withDowns := func(sn Snapshot, index int, n uint32) Snapshot {
			sn.Links = slices.Clone(sn.Links)
			for i := range sn.Links {
				if sn.Links[i].Index == index {
					sn.Links[i].Downs = n
				}
			}
			return sn
		}
		home := Host("eth0", 2, lan1, gw1, true)
		other := Link{Index: 3, Name: "wlan0", Up: true}
		home.Links = append(home.Links, other)
		h := startHarness(t, withDowns(home, 2, 4), Config{})
		for _, step := range []struct {
			name  string
			sn    Snapshot
			major bool
		}{
			{"eth0 up again, carrier-down count unchanged", withDowns(home, 2, 4), false},
			{"another link's count grew", withDowns(withDowns(home, 2, 4), 3, 1), false},
			{"eth0's count grew, one 'up' notification", withDowns(withDowns(home, 2, 5), 3, 1), true},
		} {
			n := len(h.got())
			h.f.Publish(step.sn, linkMsgFor(step.sn, "eth0"))
			time.Sleep(time.Second)
			synctest.Wait()
			got := h.got()[n:]
			if !step.major {
				if len(got) != 0 {
					t.Fatalf("%s: reported %+v, want nothing", step.name, got)
				}
				continue
			}
			if len(got) != 1 || !got[0].Major || !strings.Contains(strings.Join(got[0].Reasons, ";"), "eth0 went down and up") {
				t.Fatalf("%s: %+v, want one major change 'went down and up'", step.name, got)
			}
		}
	})
}

func TestConfigErrors(t *testing.T) {
	if _, err := New(nil, Config{}); err == nil {
		t.Error("nil source accepted")
	}
	if _, err := New(&Fake{}, Config{Debounce: -time.Second}); err == nil || !strings.Contains(err.Error(), "negative") {
		t.Errorf("negative debounce: %v", err)
	}
}

type recorded struct {
	Name   string   `json:"name"`
	Before Snapshot `json:"before"`
	Msgs   []Msg    `json:"msgs"`
	After  Snapshot `json:"after"`
}

// TestReplayRecorded replays the notification sequences and snapshots that
// TestRecordedScenariosNetNS recorded on a real kernel (go test -run
// RecordedScenarios -args -netmon.record, as root) and expects the same
// verdicts from the Monitor.
func TestReplayRecorded(t *testing.T) {
	b, err := os.ReadFile("testdata/recorded.json")
	if err != nil {
		t.Fatal(err)
	}
	var recs []recorded
	if err := json.Unmarshal(b, &recs); err != nil {
		t.Fatal(err)
	}
	if len(recs) != len(scenarios) {
		t.Fatalf("%d recordings for %d scenarios: record again", len(recs), len(scenarios))
	}
	for i, sc := range scenarios {
		rec := recs[i]
		if rec.Name != sc.name {
			t.Fatalf("recording %d is %q, scenario is %q: record again", i, rec.Name, sc.name)
		}
		if len(rec.Msgs) == 0 && !sc.none {
			t.Fatalf("%s: recording has no notifications", sc.name)
		}
		t.Run(sc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				h := startHarness(t, rec.Before, Config{})
				h.f.Publish(rec.After, rec.Msgs...)
				time.Sleep(2 * DefaultDebounce)
				synctest.Wait()
				got := h.got()
				major, reasons := false, []string(nil)
				for _, c := range got {
					major = major || c.Major
					reasons = append(reasons, c.Reasons...)
				}
				check(t, sc, len(got), major, reasons)
			})
		})
	}
}
