package natpmp

import (
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
)

type harness struct {
	c      *Client
	g      *fakeGateway
	ann    *fakeAnnouncer
	cancel context.CancelFunc
	done   chan error
}

// announce delivers a PCP ANNOUNCE (RFC 6887 §14.1.1) to the client.
func (h *harness) announce() {
	a, _ := PCPResponse{Opcode: PCPOpAnnounce}.MarshalBinary()
	h.ann.c <- a
}

func start(t *testing.T, g *fakeGateway, mod func(*Config)) *harness {
	t.Helper()
	h := &harness{g: g, ann: newFakeAnnouncer(), done: make(chan error, 1)}
	cfg := Config{
		Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})),
		Route: func() (Route, error) {
			return Route{Gateway: netip.MustParseAddr("192.168.1.1"), Local: netip.MustParseAddr("192.168.1.2")}, nil
		},
		Dial:                func(netip.AddrPort) (Conn, error) { return g.dial(), nil },
		ListenAnnouncements: func() (PacketConn, error) { return h.ann, nil },
		Mappings:            []MappingRequest{{UDP, 4500}},
	}
	if mod != nil {
		mod(&cfg)
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	h.c = c
	ctx, cancel := context.WithCancel(t.Context())
	h.cancel = cancel
	go func() { h.done <- c.Run(ctx) }()
	synctest.Wait()
	return h
}

// stop ends Run and checks it returned the context's error.
func (h *harness) stop(t *testing.T) {
	t.Helper()
	h.cancel()
	if err := <-h.done; !errors.Is(err, context.Canceled) {
		t.Errorf("Run = %v, want context.Canceled", err)
	}
}

func TestRetryScheduleThenNoGateway(t *testing.T) {
	for _, pcp := range []bool{true, false} {
		name := "NAT-PMP"
		if pcp {
			name = "PCP"
		}
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				g := newFakeGateway(true)
				g.silent = true
				t0 := time.Now()
				h := start(t, g, func(c *Config) { c.DisablePCP = !pcp })
				updates, unsub := h.c.Subscribe()
				defer unsub()
				<-updates // the current status
				time.Sleep(127*time.Second + 740*time.Millisecond)
				synctest.Wait()
				if st := h.c.Status(); st.State != StateStarting {
					t.Fatalf("gave up early: %v", st)
				}
				time.Sleep(20 * time.Millisecond)
				synctest.Wait()
				st := h.c.Status()
				if st.State != StateNoGateway || !strings.Contains(st.String(), "no gateway (treated as a public network)") {
					t.Errorf("status %q, want no gateway", st)
				}
				// RFC 6281 §4.1: proceed as on a public network.
				if ep, ok := st.Endpoint(UDP, 4500); !ok || ep != netip.MustParseAddrPort("192.168.1.2:4500") {
					t.Errorf("endpoint %v %v, want our own address", ep, ok)
				}
				select {
				case u := <-updates:
					if u.State != StateNoGateway {
						t.Errorf("update %v", u)
					}
				default:
					t.Error("no update for no gateway")
				}
				want := []time.Duration{0, 250, 750, 1750, 3750, 7750, 15750, 31750, 63750}
				var got []fakeReq
				var alsoNATPMP []time.Duration
				for _, r := range g.requests() {
					if pcp && r.version == VersionNATPMP {
						alsoNATPMP = append(alsoNATPMP, r.at.Sub(t0)/time.Millisecond)
						continue
					}
					got = append(got, r)
				}
				if len(got) != len(want) {
					t.Fatalf("%d tries, want %d", len(got), len(want))
				}
				wantV := uint8(VersionNATPMP)
				if pcp {
					wantV = VersionPCP
					// From the fourth try on, a NAT-PMP request goes along.
					if d := cmp.Diff(want[natpmpProbeAfter:], alsoNATPMP); d != "" {
						t.Errorf("NAT-PMP probes (ms) (-want +got):\n%s", d)
					}
				}
				for i, r := range got {
					if got := r.at.Sub(t0); got != want[i]*time.Millisecond || r.version != wantV {
						t.Errorf("try %d at %v version %d, want %v version %d", i, got, r.version, want[i]*time.Millisecond, wantV)
					}
				}
				nreq := len(g.requests())
				// It looks again after RetryInterval (5 min by default).
				time.Sleep(5 * time.Minute)
				synctest.Wait()
				if n := len(g.requests()); n != nreq+1 {
					t.Errorf("%d requests after the retry interval, want %d", n, nreq+1)
				}
				h.stop(t)
			})
		})
	}
}

func TestNATPMPMapRenewDelete(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newFakeGateway(false)
		g.taken[4500] = true // someone else holds 4500: we get 4501
		t0 := time.Now()
		h := start(t, g, func(c *Config) { c.Mappings = append(c.Mappings, MappingRequest{TCP, 22}) })
		st := h.c.Status()
		if st.State != StateMapped || st.Protocol != "NAT-PMP" {
			t.Fatalf("status %v", st)
		}
		ep, ok := st.Endpoint(UDP, 4500)
		if want := netip.MustParseAddrPort("11.0.0.1:4501"); !ok || ep != want {
			t.Errorf("udp endpoint %v %v, want %v", ep, ok, want)
		}
		if ep, ok := st.Endpoint(TCP, 22); !ok || ep.Port() != 22 {
			t.Errorf("tcp endpoint %v %v", ep, ok)
		}
		if got := st.String(); got != "mapped via NAT-PMP gateway 192.168.1.1, external 11.0.0.1, tcp 22->22 (1h0m0s), udp 4501->4500 (1h0m0s)" {
			t.Errorf("String() = %q", got)
		}
		// PCP probe, external address, two mappings (asking internal = external, 3600 s).
		reqs := g.requests()
		if len(reqs) != 4 || reqs[0].version != VersionPCP || reqs[1].op != OpExternalAddress {
			t.Fatalf("requests %+v", reqs)
		}
		for _, r := range reqs[2:] {
			if r.suggest != r.internal || r.lifetime != 3600 {
				t.Errorf("mapping request %+v", r)
			}
		}
		// Renewal at half-life, suggesting the port we hold.
		time.Sleep(30*time.Minute - time.Millisecond)
		synctest.Wait()
		if n := len(g.requests()); n != 4 {
			t.Fatalf("renewed early: %d requests", n)
		}
		time.Sleep(time.Millisecond)
		synctest.Wait()
		reqs = g.requests()[4:]
		if len(reqs) != 2 {
			t.Fatalf("renewals %+v", reqs)
		}
		for _, r := range reqs {
			if r.at.Sub(t0) != 30*time.Minute {
				t.Errorf("renewal at %v", r.at.Sub(t0))
			}
			if r.internal == 4500 && r.suggest != 4501 {
				t.Errorf("renewal suggests %d, want the held 4501", r.suggest)
			}
		}
		// Remove deletes with lifetime 0 and external port 0.
		h.c.Remove(MappingRequest{TCP, 22})
		synctest.Wait()
		last := g.requests()[len(g.requests())-1]
		if last.op != OpMapTCP || last.lifetime != 0 || last.suggest != 0 {
			t.Errorf("delete request %+v", last)
		}
		if _, ok := g.mapping(TCP, 22); ok {
			t.Error("tcp/22 still mapped after Remove")
		}
		// Clean shutdown deletes the rest.
		h.stop(t)
		if _, ok := g.mapping(UDP, 4500); ok {
			t.Error("udp/4500 still mapped after shutdown")
		}
		if st := h.c.Status(); st.State != StateStopped {
			t.Errorf("status after Run: %v", st)
		}
	})
}

func TestEpochResetRecreates(t *testing.T) {
	for _, pcp := range []bool{false, true} {
		t.Run(map[bool]string{false: "NAT-PMP", true: "PCP"}[pcp], func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				g := newFakeGateway(pcp)
				h := start(t, g, nil)
				if _, ok := g.mapping(UDP, 4500); !ok {
					t.Fatalf("not mapped: %v", h.c.Status())
				}
				time.Sleep(10 * time.Minute)
				g.reboot()
				// Announcement (NAT-PMP version 0 or PCP ANNOUNCE) -> re-query.
				var a []byte
				if pcp {
					a, _ = PCPResponse{Opcode: PCPOpAnnounce, Epoch: 0}.MarshalBinary()
				} else {
					a, _ = Response{Op: 128, External: g.external}.MarshalBinary()
				}
				h.ann.c <- a
				synctest.Wait()
				if r := h.c.Status().Resets; r != 0 {
					t.Errorf("acted on the announcement at once, not after a random wait")
				}
				time.Sleep(5*time.Second + time.Nanosecond) // the default AnnounceDelay
				synctest.Wait()
				if r := h.c.Status().Resets; r != 1 {
					t.Errorf("resets %d, want 1", r)
				}
				if m, ok := g.mapping(UDP, 4500); !ok || m.ext != 4500 {
					t.Errorf("mapping not restored (same port) after reboot + announcement: %v", h.c.Status())
				}
				// Without an announcement, the next renewal notices too.
				time.Sleep(5 * time.Minute)
				g.reboot()
				time.Sleep(30 * time.Minute)
				synctest.Wait()
				if _, ok := g.mapping(UDP, 4500); !ok {
					t.Errorf("mapping not restored at renewal: %v", h.c.Status())
				}
				h.stop(t)
			})
		})
	}
}

func TestEpochResetFunctions(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		prev, cur uint32
		elapsed   time.Duration
		natpmp    bool
		pcp       bool
	}{
		{100, 200, 100 * time.Second, false, false},
		{100, 100, 0, false, false},
		{100, 99, 0, false, false}, // within tolerance
		{100, 5, 10 * time.Second, true, true},
		{100, 150, 100 * time.Second, true, true},   // gateway clock far behind ours
		{100, 1000, 100 * time.Second, false, true}, // far ahead: only PCP checks
		{0, 0, time.Hour, true, true},
	} {
		now := t0.Add(tc.elapsed)
		if got := NATPMPEpochReset(tc.prev, t0, tc.cur, now); got != tc.natpmp {
			t.Errorf("NATPMPEpochReset(%d, +%v, %d) = %v", tc.prev, tc.elapsed, tc.cur, got)
		}
		if got := PCPEpochReset(tc.prev, t0, tc.cur, now); got != tc.pcp {
			t.Errorf("PCPEpochReset(%d, +%v, %d) = %v", tc.prev, tc.elapsed, tc.cur, got)
		}
	}
}

func TestPCPNonceKept(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newFakeGateway(true)
		g.taken[4500] = true
		h := start(t, g, nil)
		st := h.c.Status()
		if ep, ok := st.Endpoint(UDP, 4500); st.Protocol != "PCP" || !ok || ep != netip.MustParseAddrPort("11.0.0.1:4501") {
			t.Fatalf("status %v", st)
		}
		time.Sleep(31 * time.Minute)
		synctest.Wait()
		reqs := g.requests()
		if len(reqs) != 3 || reqs[0].op != PCPOpAnnounce || reqs[1].nonce != reqs[2].nonce || reqs[2].suggest != 4501 {
			t.Fatalf("requests %+v", reqs)
		}
		if st := h.c.Status(); len(st.Mappings) != 1 || st.Mappings[0].Err != "" {
			t.Errorf("after renewal %v", st) // a changed nonce would be NOT_AUTHORIZED
		}
		h.stop(t)
		reqs = g.requests()
		if last := reqs[len(reqs)-1]; last.lifetime != 0 || last.nonce != reqs[1].nonce {
			t.Errorf("delete %+v", last)
		}
		if _, ok := g.mapping(UDP, 4500); ok {
			t.Error("still mapped after shutdown")
		}
	})
}

// TestPCPErrorAnswersNeedTheNonce: error answers that do not carry our
// nonce, protocol and internal port (an attacker's guesses, or a header cut
// short) arrive ahead of every real answer, for the MAP and for the delete
// at shutdown; none is taken as the gateway's answer, so the mapping is
// made, renewed and deleted as if they were not there.
func TestPCPErrorAnswersNeedTheNonce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newFakeGateway(true)
		var forged int
		g.forge = func(b []byte) [][]byte {
			if len(b) != 60 || b[1] != PCPOpMap {
				return nil
			}
			var nonce [12]byte
			copy(nonce[:], b[24:36])
			internal := binary.BigEndian.Uint16(b[40:])
			wrong := nonce
			wrong[0] ^= 0xff
			var out [][]byte
			for _, r := range []PCPResponse{
				{Opcode: PCPOpMap, Result: PCPNotAuthorized}, // header only
				{Opcode: PCPOpMap, Result: PCPNoResources, Map: PCPMap{Nonce: wrong, Protocol: UDP, InternalPort: internal}},
				{Opcode: PCPOpMap, Result: PCPNotAuthorized, Map: PCPMap{Nonce: nonce, Protocol: TCP, InternalPort: internal}},
				{Opcode: PCPOpMap, Result: PCPNotAuthorized, Map: PCPMap{Nonce: nonce, Protocol: UDP, InternalPort: internal + 1}},
				// A forged success for someone else's nonce must not be taken either.
				{Opcode: PCPOpMap, Lifetime: 7200, Map: PCPMap{Nonce: wrong, Protocol: UDP, InternalPort: internal,
					ExternalPort: 9999, External: netip.MustParseAddr("6.6.6.6")}},
			} {
				f, err := r.MarshalBinary()
				if err != nil {
					t.Error(err)
				}
				out = append(out, f)
			}
			forged += len(out)
			return out
		}
		h := start(t, g, nil)
		st := h.c.Status()
		ep, ok := st.Endpoint(UDP, 4500)
		if !ok || ep != netip.MustParseAddrPort("11.0.0.1:4500") || st.Mappings[0].Err != "" {
			t.Fatalf("status after forged answers: %v", st)
		}
		time.Sleep(31 * time.Minute) // a renewal, forged answers again
		synctest.Wait()
		if st := h.c.Status(); len(st.Mappings) != 1 || st.Mappings[0].Err != "" {
			t.Errorf("after renewal: %v", st)
		}
		h.stop(t)
		if _, ok := g.mapping(UDP, 4500); ok {
			t.Error("still mapped after shutdown: a forged answer ended the delete")
		}
		if forged < 15 {
			t.Errorf("only %d forged answers sent; the test did not exercise MAP, renewal and delete", forged)
		}
	})
}

func TestDoubleNAT(t *testing.T) {
	for _, ext := range []string{"10.9.8.7", "100.64.1.2"} {
		synctest.Test(t, func(t *testing.T) {
			g := newFakeGateway(false)
			g.external = netip.MustParseAddr(ext)
			h := start(t, g, nil)
			st := h.c.Status()
			if st.State != StateDoubleNAT || st.External.IsValid() || !strings.HasPrefix(st.String(), "double NAT: no direct inbound path") {
				t.Errorf("status %q", st)
			}
			if ep, ok := st.Endpoint(UDP, 4500); ok {
				t.Errorf("published %v under double NAT", ep)
			}
			h.stop(t)
		})
	}
}

func TestPublicAddressNeedsNoGateway(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newFakeGateway(true)
		h := start(t, g, func(c *Config) {
			c.Route = func() (Route, error) {
				return Route{Gateway: netip.MustParseAddr("11.0.0.1"), Local: netip.MustParseAddr("11.0.0.9")}, nil
			}
		})
		st := h.c.Status()
		if ep, ok := st.Endpoint(UDP, 4500); st.State != StatePublic || !ok || ep != netip.MustParseAddrPort("11.0.0.9:4500") {
			t.Errorf("status %v", st)
		}
		if n := len(g.requests()); n != 0 {
			t.Errorf("%d requests to a gateway on a public network", n)
		}
		h.stop(t)
	})
}

func TestRefusalIsTypedError(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newFakeGateway(false)
		g.refuse = ResultNotAuthorized
		h := start(t, g, nil)
		st := h.c.Status()
		if len(st.Mappings) != 1 || !strings.Contains(st.Mappings[0].Err, "NOT_AUTHORIZED") {
			t.Fatalf("status %v", st)
		}
		if _, ok := st.Endpoint(UDP, 4500); ok {
			t.Error("refused mapping published")
		}
		// Retried after RetryInterval; succeeds once the gateway allows it.
		g.mu.Lock()
		g.refuse = 0
		g.mu.Unlock()
		time.Sleep(5 * time.Minute)
		synctest.Wait()
		if _, ok := h.c.Status().Endpoint(UDP, 4500); !ok {
			t.Errorf("not mapped after retry: %v", h.c.Status())
		}
		h.stop(t)
	})
}

func TestConcurrentUse(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newFakeGateway(true)
		h := start(t, g, nil)
		updates, unsub := h.c.Subscribe()
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Go(func() {
				m := MappingRequest{UDP, uint16(5000 + i)}
				for range 5 {
					h.c.Add(m)
					_ = h.c.Status().String()
					h.c.Remove(m)
				}
				h.c.Add(m)
			})
		}
		wg.Wait()
		synctest.Wait()
		st := <-updates
		if len(st.Mappings) != 9 {
			t.Errorf("latest update has %d mappings, want 9: %v", len(st.Mappings), st)
		}
		for _, m := range st.Mappings {
			if m.ExternalPort == 0 {
				t.Errorf("unmapped %+v", m)
			}
		}
		unsub()
		unsub()
		if err := h.c.Add(MappingRequest{Protocol(1), 1}); err == nil {
			t.Error("Add(icmp) succeeded")
		}
		h.stop(t)
		if err := h.c.Run(t.Context()); !errors.Is(err, ErrClosed) {
			t.Errorf("second Run = %v", err)
		}
	})
}

func TestRediscoverAndAnnouncementAfterNoGateway(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newFakeGateway(true)
		g.silent = true
		var mu sync.Mutex
		local := netip.MustParseAddr("192.168.1.2")
		h := start(t, g, func(c *Config) {
			c.Schedule = []time.Duration{time.Second}
			c.Route = func() (Route, error) {
				mu.Lock()
				defer mu.Unlock()
				return Route{Gateway: netip.MustParseAddr("192.168.1.1"), Local: local}, nil
			}
		})
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if st := h.c.Status(); st.State != StateNoGateway {
			t.Fatalf("status %v", st)
		}
		// The gateway comes up and announces itself: looked for at once,
		// not after RetryInterval.
		g.answer()
		h.announce()
		synctest.Wait()
		if _, ok := h.c.Status().Endpoint(UDP, 4500); !ok {
			t.Fatalf("not mapped after the announcement: %v", h.c.Status())
		}
		// The host moves to a public address: Rediscover sees no NAT.
		mu.Lock()
		local = netip.MustParseAddr("11.0.0.9")
		mu.Unlock()
		h.c.Rediscover()
		synctest.Wait()
		if st := h.c.Status(); st.State != StatePublic || st.External != local {
			t.Errorf("after Rediscover: %v", st)
		}
		h.stop(t)
	})
}

// A NAT-PMP gateway that drops PCP without a word is found by the NAT-PMP
// request that goes along from the fourth try.
func TestSilentPCPFallsBackToNATPMP(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newFakeGateway(false)
		g.dropPCP = true
		t0 := time.Now()
		h := start(t, g, nil)
		time.Sleep(2 * time.Second)
		synctest.Wait()
		st := h.c.Status()
		if _, ok := st.Endpoint(UDP, 4500); !ok || st.Protocol != "NAT-PMP" {
			t.Fatalf("status %v", st)
		}
		if at := st.Answered.Sub(t0); at != 1750*time.Millisecond {
			t.Errorf("found at %v, want 1.75 s", at)
		}
		h.stop(t)
	})
}

// Rediscover during a discovery that is still waiting (up to 128 s) starts
// it again at once: the network it was about is gone, and a gateway that
// came up meanwhile (a replaced router, now with PCP) is found within the
// new schedule's first tries, not at the old schedule's last one. A wake
// that is no Rediscover (Add) leaves the discovery alone.
func TestRediscoverDuringDiscovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newFakeGateway(true)
		g.silent = true
		t0 := time.Now()
		h := start(t, g, nil)
		time.Sleep(10 * time.Second) // tries at 0 .. 7.75 s, the next at 15.75 s
		synctest.Wait()
		if err := h.c.Add(MappingRequest{UDP, 4501}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		n := len(g.requests())
		if st := h.c.Status(); st.State != StateStarting || n == 0 {
			t.Fatalf("after Add: %v, %d requests: discovery should go on", st, n)
		}
		g.answer()
		h.c.Rediscover()
		synctest.Wait()
		st := h.c.Status()
		if _, ok := st.Endpoint(UDP, 4500); !ok || st.State != StateMapped {
			t.Fatalf("Rediscover during discovery: %v, want mapped at once", st)
		}
		if _, ok := st.Endpoint(UDP, 4501); !ok {
			t.Errorf("the mapping added during discovery is missing: %v", st)
		}
		if took := time.Since(t0); took != 10*time.Second {
			t.Errorf("mapped %v after start, want at the Rediscover (10 s)", took)
		}
		h.stop(t)
	})
}

// A gateway that starts answering and announces itself (RFC 6887 §14.1.1)
// while a discovery waits between two tries is asked again at once, not at
// the next try of the schedule (up to 64 s later).
func TestAnnouncementDuringDiscovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newFakeGateway(true)
		g.silent = true
		t0 := time.Now()
		h := start(t, g, nil)
		time.Sleep(20 * time.Second) // tries at 0 .. 15.75 s, the next at 31.75 s
		synctest.Wait()
		g.answer()
		h.announce()
		synctest.Wait()
		st := h.c.Status()
		if _, ok := st.Endpoint(UDP, 4500); !ok || st.State != StateMapped {
			t.Fatalf("announcement during discovery: %v, want mapped at once", st)
		}
		if took := time.Since(t0); took != 20*time.Second {
			t.Errorf("mapped %v after start, want at the announcement (20 s)", took)
		}
		h.stop(t)
	})
}

// An announcement from a gateway that still does not answer, during the
// last wait of a discovery, neither ends the discovery early nor is lost:
// the try is sent again and the schedule runs to its end.
func TestAnnouncementDuringLastWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newFakeGateway(true)
		g.silent = true
		t0 := time.Now()
		h := start(t, g, func(c *Config) { c.Schedule = []time.Duration{time.Second, 4 * time.Second} })
		time.Sleep(2 * time.Second) // in the last wait (1 s .. 5 s)
		synctest.Wait()
		n := len(g.requests())
		h.announce()
		synctest.Wait()
		if st := h.c.Status(); st.State != StateStarting {
			t.Fatalf("after an announcement in the last wait: %v, want still discovering", st)
		}
		if got := len(g.requests()); got != n+1 {
			t.Errorf("%d requests after the announcement, want %d (the try again)", got, n+1)
		}
		time.Sleep(4*time.Second + 10*time.Millisecond)
		synctest.Wait()
		if st := h.c.Status(); st.State != StateNoGateway || time.Since(t0) < 6*time.Second {
			t.Errorf("status %v at %v, want no gateway after the whole last wait", st, time.Since(t0))
		}
		h.stop(t)
	})
}
