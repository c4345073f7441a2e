package register

import (
	"context"
	"errors"
	"math/rand/v2"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/miekg/dns"
)

func testKey(t testing.TB) *Key {
	k, err := NewKey("alice.btmm.example.", "hmac-sha256", "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==")
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func testConfig(t testing.TB) Config {
	return Config{
		Domain:       "alice.btmm.example.",
		Host:         "laptop",
		ULA:          netip.MustParseAddr("fd01:203:405:607:22:69ff:fe8e:345c"),
		Label:        "AutoTunnel-00-22-69-FF-FE-8E-34-5C",
		Outer:        netip.MustParseAddrPort("11.0.0.2:4500"),
		Capabilities: Capabilities{Version: 1, Dataplanes: []string{"xfrm"}, KeyingPort: 4500},
		Key:          testKey(t),
		Server:       "192.0.2.53:53",
		Rand:         rand.New(rand.NewPCG(1, 2)),
	}
}

func TestNewRefusesBadConfig(t *testing.T) {
	for name, mut := range map[string]func(*Config){
		"no key":       func(c *Config) { c.Key = nil },
		"not a ULA":    func(c *Config) { c.ULA = netip.MustParseAddr("2001:db8::1") },
		"dotted host":  func(c *Config) { c.Host = "a.b" },
		"outer v6":     func(c *Config) { c.Outer = netip.MustParseAddrPort("[2001:db8::1]:4500") },
		"zone outside": func(c *Config) { c.Zone = "bob.example." },
		"bad caps":     func(c *Config) { c.Capabilities.Dataplanes = []string{""} },
	} {
		cfg := testConfig(t)
		mut(&cfg)
		if _, err := New(cfg, nil); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestRecordsAndUpdateMessage(t *testing.T) {
	r, err := New(testConfig(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"laptop.alice.btmm.example.\t60\tIN\tAAAA\tfd01:203:405:607:22:69ff:fe8e:345c",
		"_autotunnel._udp.laptop.alice.btmm.example.\t60\tIN\tTXT\t\"txtvers=1\" \"proto=1\" \"dp=xfrm\" \"kport=4500\"",
		"_autotunnel._udp.alice.btmm.example.\t60\tIN\tPTR\t_autotunnel._udp.laptop.alice.btmm.example.",
		"_autotunnel._udp.laptop.alice.btmm.example.\t60\tIN\tSRV\t0 0 4500 AutoTunnel-00-22-69-FF-FE-8E-34-5C.alice.btmm.example.",
		"AutoTunnel-00-22-69-FF-FE-8E-34-5C.alice.btmm.example.\t60\tIN\tA\t11.0.0.2",
	}
	got := r.Records()
	if len(got) != len(want) {
		t.Fatalf("%d records, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i].String() != want[i] {
			t.Errorf("record %d:\n got %s\nwant %s", i, got[i], want[i])
		}
	}
	m := r.updateMsg(got, nil)
	if m.Opcode != dns.OpcodeUpdate || m.Question[0].Name != "alice.btmm.example." {
		t.Errorf("not an update of the zone: %v", m)
	}
	var ul *dns.EDNS0_UL
	for _, o := range m.IsEdns0().Option {
		ul, _ = o.(*dns.EDNS0_UL)
	}
	if ul == nil || ul.Lease != 5400 {
		t.Errorf("lease option = %v, want 5400 s", ul)
	}
	// RRset deletions for the 4 owned sets, never for the shared PTR set.
	dels := 0
	for _, rr := range m.Ns {
		if rr.Header().Class == dns.ClassANY {
			dels++
			if rr.Header().Rrtype == dns.TypePTR {
				t.Errorf("update deletes the shared browse PTR RRset: %v", rr)
			}
		}
	}
	if dels != 4 {
		t.Errorf("%d RRset deletions, want 4", dels)
	}
	// Moving outer keeps names; a vanished name (no SRV/A yet → later none)
	// is deleted specifically.
	old := got
	r.mu.Lock()
	r.outer = netip.AddrPort{}
	now := r.recordsLocked()
	r.mu.Unlock()
	m = r.updateMsg(now, old)
	if !strings.Contains(m.String(), "AutoTunnel-00-22-69-FF-FE-8E-34-5C.alice.btmm.example.\t0\tCLASS255\tA") {
		t.Errorf("stale A not deleted:\n%v", m)
	}
}

// fakeServer is the test seam for the update transport: it records when
// each update arrived and answers per its script.
type fakeServer struct {
	mu    sync.Mutex
	at    []time.Duration
	msgs  []*dns.Msg
	start time.Time
	fail  func(n int) error // nil: succeed
	lease uint32            // echoed lease; 0 = no option (BIND)
}

func (f *fakeServer) exchange(ctx context.Context, m *dns.Msg, server, network string) (*dns.Msg, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := len(f.at)
	f.at = append(f.at, time.Since(f.start))
	f.msgs = append(f.msgs, m.Copy())
	if f.fail != nil {
		if err := f.fail(n); err != nil {
			return nil, err
		}
	}
	reply := new(dns.Msg)
	reply.SetReply(m)
	if f.lease != 0 {
		reply.SetEdns0(dns.DefaultMsgSize, false)
		opt := reply.IsEdns0()
		opt.Option = append(opt.Option, &dns.EDNS0_UL{Code: dns.EDNS0UL, Lease: f.lease})
	}
	return reply, nil
}

func (f *fakeServer) times() []time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Duration(nil), f.at...)
}

func TestRefreshSchedule(t *testing.T) {
	for _, tc := range []struct {
		name  string
		echo  uint32
		lease time.Duration // what the refresh is based on
	}{
		{"server grants 30m", 1800, 30 * time.Minute},
		{"no lease echoed (BIND)", 0, 90 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f := &fakeServer{start: time.Now(), lease: tc.echo}
				r, err := New(testConfig(t), nil)
				if err != nil {
					t.Fatal(err)
				}
				r.exchange = f.exchange
				ctx, cancel := context.WithCancel(t.Context())
				done := make(chan error)
				go func() { done <- r.Run(ctx) }()
				time.Sleep(4 * tc.lease)
				synctest.Wait()
				at := f.times()
				if len(at) < 4 {
					t.Fatalf("only %d updates in 4 leases: %v", len(at), at)
				}
				for i := 1; i < len(at); i++ {
					gap := at[i] - at[i-1]
					if gap < tc.lease*3/4 || gap > tc.lease*85/100 {
						t.Errorf("refresh %d after %v, want within 75-85%% of %v", i, gap, tc.lease)
					}
				}
				st := r.Status()
				if !st.Published || st.Lease != tc.lease || st.LeaseEchoed != (tc.echo != 0) {
					t.Errorf("status = %+v", st)
				}
				cancel()
				if err := <-done; err != nil {
					t.Errorf("Run: %v", err)
				}
				// The last message deletes everything we published.
				last := f.msgs[len(f.msgs)-1]
				if len(last.Ns) != 5 {
					t.Errorf("shutdown update has %d deletions, want 5:\n%v", len(last.Ns), last)
				}
				for _, rr := range last.Ns {
					if c := rr.Header().Class; c != dns.ClassANY && c != dns.ClassNONE {
						t.Errorf("shutdown update adds %v", rr)
					}
				}
				if r.Status().Published {
					t.Error("still published after shutdown")
				}
			})
		})
	}
}

func TestBackoffScheduleAndRecovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeServer{start: time.Now(), lease: 3600}
		f.fail = func(n int) error {
			if n < 12 {
				return errors.New("connection refused")
			}
			return nil
		}
		cfg := testConfig(t)
		cfg.MaxBackoff = time.Minute
		r, err := New(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		r.exchange = f.exchange
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go r.Run(ctx)
		time.Sleep(30 * time.Minute)
		synctest.Wait()
		at := f.times()
		if len(at) != 13 {
			t.Fatalf("%d attempts, want 12 failures + 1 success: %v", len(at), at)
		}
		for i := 1; i <= 12; i++ {
			full := min(time.Second<<(i-1), time.Minute)
			gap := at[i] - at[i-1]
			if gap < full/2 || gap > full {
				t.Errorf("retry %d after %v, want in [%v, %v]", i, gap, full/2, full)
			}
		}
		if st := r.Status(); st.Failures != 0 || !st.Published || st.LastError != "" {
			t.Errorf("after recovery: %+v", st)
		}
	})
}

func TestChangePublishedAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeServer{start: time.Now(), lease: 3600}
		cfg := testConfig(t)
		cfg.Outer = netip.AddrPort{}
		r, err := New(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		r.exchange = f.exchange
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go r.Run(ctx)
		time.Sleep(time.Minute)
		if err := r.SetOuter(netip.MustParseAddrPort("[::1]:1")); err == nil {
			t.Error("SetOuter accepted an IPv6 outer address")
		}
		if err := r.SetOuter(netip.MustParseAddrPort("11.0.0.9:61000")); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		at := f.times()
		if len(at) != 2 || at[1] != time.Minute {
			t.Fatalf("updates at %v, want at 0 and 1m", at)
		}
		if s := f.msgs[1].String(); !strings.Contains(s, "SRV\t0 0 61000 AutoTunnel") || !strings.Contains(s, "A\t11.0.0.9") {
			t.Errorf("change update lacks the new SRV/A:\n%s", s)
		}
		// Same value again: nothing sent.
		r.SetOuter(netip.MustParseAddrPort("11.0.0.9:61000"))
		synctest.Wait()
		if n := len(f.times()); n != 2 {
			t.Errorf("unchanged SetOuter sent an update (%d total)", n)
		}
		r.SetCapabilities(Capabilities{Version: 1, Dataplanes: []string{"ebpf"}})
		synctest.Wait()
		if n := len(f.times()); n != 3 || !strings.Contains(f.msgs[2].String(), "dp=ebpf") {
			t.Errorf("capability change not published at once (%d updates)", n)
		}
	})
}

func TestHostFromInstance(t *testing.T) {
	for in, want := range map[string]string{
		"_autotunnel._udp.laptop.alice.btmm.example.": "laptop.alice.btmm.example.",
		"_autotunnel._udp.a.b.alice.btmm.example.":    "",
		"_autotunnel._udp.alice.btmm.example.":        "",
		"laptop.alice.btmm.example.":                  "",
	} {
		got, ok := HostFromInstance(in, "Alice.btmm.example")
		if got != want || ok != (want != "") {
			t.Errorf("HostFromInstance(%q) = %q, %v; want %q", in, got, ok, want)
		}
	}
}

// Republish (a network change) sends the records at once even when they did
// not change, and restarts a backoff that grew while the host was offline.
func TestRepublishAfterNetworkChange(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeServer{start: time.Now(), lease: 3600}
		offline := true
		f.fail = func(n int) error {
			if n > 0 && offline {
				return errors.New("network unreachable")
			}
			return nil
		}
		cfg := testConfig(t)
		cfg.MaxBackoff = 5 * time.Minute
		r, err := New(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		r.exchange = f.exchange
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go r.Run(ctx)
		time.Sleep(time.Minute)
		r.Republish() // the host went offline: this one fails, backoff starts
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		before := len(f.times())
		if st := r.Status(); st.Failures < 5 {
			t.Fatalf("setup: %d failures while offline, want the backoff grown (%+v)", st.Failures, st)
		}
		f.mu.Lock()
		offline = false
		f.mu.Unlock()
		back := time.Since(f.start)
		r.Republish() // back online
		synctest.Wait()
		at := f.times()
		if len(at) != before+1 || at[len(at)-1] != back {
			t.Fatalf("no update at once on Republish: updates at %v (back at %v)", at, back)
		}
		if st := r.Status(); st.Failures != 0 || !st.Published {
			t.Fatalf("after coming back: %+v", st)
		}
		// Unchanged records are sent again too.
		r.Republish()
		synctest.Wait()
		if n := len(f.times()); n != before+2 {
			t.Fatalf("Republish with unchanged records sent nothing (%d updates)", n)
		}
		// A failure right after coming back retries after ~1 s, not after
		// the backoff reached offline.
		f.mu.Lock()
		offline = true
		f.mu.Unlock()
		for range 6 {
			time.Sleep(2 * time.Minute)
		}
		f.mu.Lock()
		offline = false
		f.mu.Unlock()
		n0 := len(f.times())
		f.mu.Lock()
		f.fail = func(n int) error {
			if n == n0 {
				return errors.New("first try after the move is lost")
			}
			return nil
		}
		f.mu.Unlock()
		r.Republish()
		time.Sleep(1500 * time.Millisecond)
		synctest.Wait()
		if at := f.times(); len(at) != n0+2 || at[n0+1]-at[n0] > time.Second {
			t.Fatalf("retry after a failed republish: %v", at[n0:])
		}
	})
}
