package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/btmm/btmm/controlplane/dataplanetest"
	"github.com/btmm/btmm/controlplane/identity"
	"github.com/btmm/btmm/controlplane/keying"
	"github.com/btmm/btmm/controlplane/netmon"
	"github.com/btmm/btmm/dns/register"
)

// updateServer is a DNS server on 127.0.0.1 that accepts every update
// signed with testKey and records the A records it was sent.
type updateServer struct {
	addr string
	mu   sync.Mutex
	n    int
	a    []string // A record data of each update, "" when none
}

func startUpdateServer(t *testing.T) *updateServer {
	t.Helper()
	u := &updateServer{}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u.addr = pc.LocalAddr().String()
	srv := &dns.Server{PacketConn: pc, UDPSize: dns.MaxMsgSize, TsigSecret: testKey(t).Secrets(), MsgAcceptFunc: func(dns.Header) dns.MsgAcceptAction { return dns.MsgAccept }, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		a := ""
		for _, rr := range r.Ns {
			if x, ok := rr.(*dns.A); ok && rr.Header().Class == dns.ClassINET {
				a = x.A.String()
			}
		}
		u.mu.Lock()
		u.n++
		u.a = append(u.a, a)
		u.mu.Unlock()
		m := new(dns.Msg)
		m.SetReply(r)
		if ts := r.IsTsig(); ts != nil && w.TsigStatus() == nil {
			m.SetTsig(ts.Hdr.Name, ts.Algorithm, 300, time.Now().Unix())
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return u
}

func (u *updateServer) updates() (int, []string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.n, append([]string(nil), u.a...)
}

// testHost is one agent with a fake dataplane on a loopback UDP transport.
type testHost struct {
	name   string
	ula    netip.Addr
	dp     *dataplanetest.Fake
	tr     *keying.UDPTransport
	events chan PeerEvent
	a      *Agent
	cfg    Config
	stop   func() error // set by run
}

var testPSK = []byte("0123456789abcdef0123456789abcdef-test")

func newTestHost(t *testing.T, name string, ula string, dnsAddr string, mod func(*Config)) *testHost {
	t.Helper()
	tr, err := keying.ListenUDP(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	psk, err := keying.NewPSK(testPSK)
	if err != nil {
		t.Fatal(err)
	}
	key := testKey(t)
	h := &testHost{name: name, ula: netip.MustParseAddr(ula), dp: &dataplanetest.Fake{}, tr: tr, events: make(chan PeerEvent, 16)}
	h.cfg = Config{
		Identity:   identity.Identity{ULA: h.ula, EUI64: identity.EUI64{2, 0, 0, 0xff, 0xfe, 0, 0, 1}, Source: "test"},
		Host:       name,
		Domain:     "alice.btmm.example.",
		TunnelPort: tr.LocalAddr().Port(),
		Dataplane:  h.dp, DataplaneName: "fake", Transport: tr, Auth: psk,
		Register: register.Config{Key: key, Zone: "btmm.example.", Server: dnsAddr, Timeout: 500 * time.Millisecond, MaxBackoff: 2 * time.Second},
		External: tr.LocalAddr(),
		Peers: func(ctx context.Context, report func(PeerEvent)) error {
			for {
				select {
				case <-ctx.Done():
					return nil
				case ev := <-h.events:
					report(ev)
				}
			}
		},
		Logger: testLogger(t, name),
	}
	if mod != nil {
		mod(&h.cfg)
	}
	h.a, err = New(h.cfg)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func testLogger(t *testing.T, name string) *slog.Logger {
	if os.Getenv("BTMM_TEST_LOG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("host", name)
}

// run starts the agent; h.stop stops it and returns Run's error.
func (h *testHost) run(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.a.Run(ctx) }()
	var once sync.Once
	var err error
	h.stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case err = <-done:
			case <-time.After(30 * time.Second):
				err = errors.New("agent did not stop within 30 s")
			}
		})
		return err
	}
	t.Cleanup(func() { h.stop() })
}

func (h *testHost) sees(o *testHost) {
	h.events <- PeerEvent{Name: o.name, ULA: o.ula, Outer: o.tr.LocalAddr()}
}

func eventually(t *testing.T, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		if err = f(); err == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: %v", what, err)
}

func keyedPair(t *testing.T) (a, b *testHost) {
	t.Helper()
	dnsSrv := startUpdateServer(t)
	a = newTestHost(t, "a", "fd00::a", dnsSrv.addr, nil)
	b = newTestHost(t, "b", "fd00::b", dnsSrv.addr, nil)
	a.run(t)
	b.run(t)
	a.sees(b)
	b.sees(a)
	for _, h := range []*testHost{a, b} {
		eventually(t, h.name+" keyed", func() error {
			if r := h.dp.Render(); !strings.Contains(r, "state out") {
				return fmt.Errorf("dataplane: %q", r)
			}
			return nil
		})
	}
	return a, b
}

// btmmctl status must answer while the dataplane is stuck in a kernel call,
// and shutdown must end the stuck work (issue 12 item 6).
func TestStatusAndShutdownWhileSetStalled(t *testing.T) {
	a, b := keyedPair(t)
	waiting, release := a.dp.Stall()
	defer release()
	// b moved: a's reconciler applies it and hangs in Set; keying's
	// goroutine follows it into the same install.
	moved := b.tr.LocalAddr()
	moved = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), moved.Port())
	a.events <- PeerEvent{Name: "b", ULA: b.ula, Outer: moved}
	<-waiting

	got := make(chan Status, 1)
	go func() { got <- a.a.Status(context.Background()) }()
	select {
	case st := <-got:
		if len(st.Peers) != 1 || st.Peers[0].Name != "b" {
			t.Fatalf("status while stalled: %+v", st.Peers)
		}
		if st.CountersError == "" && st.Counters == nil {
			t.Fatalf("status has neither counters nor a reason: %+v", st)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Status did not answer while Dataplane.Set was stalled")
	}

	// SIGTERM while stalled: Run ends within its shutdown deadline
	// (keying's DELETE + remove is bounded by 5 s), and the dataplane is
	// closed.
	start := time.Now()
	if err := a.stop(); err != nil {
		t.Fatalf("stop while stalled: %v", err)
	}
	t.Logf("stopped in %v", time.Since(start).Round(time.Millisecond))
	release()
	if _, err := a.dp.Set(context.Background(), a.a.rec.Desired()); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Fatalf("dataplane not closed after Run: %v", err)
	}
}

// A peer that appears while keying's goroutine is stuck (here in an install
// whose Dataplane.Set hangs) past updateKeyingPeers' deadline is handed to
// keying again once it is free, with no further event: on a settled host
// nothing else comes (no path change, no other peer event). Before, the
// failed SetPeers was only logged: in the VM, host1 refused an IPv6-only
// host's INITs ("unknown peer") for 81 s until a path change of its own
// handed keying the peers again, and with nothing changing, never.
func TestKeyingPeersAfterBusyKeying(t *testing.T) {
	a, b := keyedPair(t)
	waiting, release := a.dp.Stall()
	defer release()
	// A rekey with b: its install, in keying's goroutine, hangs in Set.
	// (Rekey does nothing while an exchange is in flight, e.g. the first
	// one still waiting for its ACK: asked again until one starts.)
	deadline := time.After(20 * time.Second)
	for reached := false; !reached; {
		// Bounded: keying's goroutine may already be stuck in the Set.
		rctx, cancel := context.WithTimeout(t.Context(), time.Second)
		err := a.a.keyer.Rekey(rctx, b.ula)
		cancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatal(err)
		}
		select {
		case <-waiting:
			reached = true
		case <-time.After(500 * time.Millisecond):
		case <-deadline:
			t.Fatal("no rekey's install reached Dataplane.Set")
		}
	}
	c := netip.MustParseAddr("fd00::c")
	a.events <- PeerEvent{Name: "c", ULA: c, Outer: netip.MustParseAddrPort("127.0.0.3:4500")}
	// updateKeyingPeers gives up after 10 s; then the Set is let go.
	time.Sleep(11 * time.Second)
	release()
	eventually(t, "c handed to keying", func() error {
		ks, err := a.a.keyer.Status(t.Context())
		if err != nil {
			return err
		}
		for _, k := range ks {
			if k.ULA == c {
				return nil
			}
		}
		return fmt.Errorf("keying's peers: %+v", ks)
	})
}

// A major change of the host's network re-registers at once (not at the
// lease refresh); offline sends nothing; coming back re-registers again.
func TestMoveRepublishes(t *testing.T) {
	dnsSrv := startUpdateServer(t)
	src := &netmon.Fake{}
	home := netmon.Host("eth0", 2, netip.MustParsePrefix("192.168.1.2/24"), netip.MustParseAddr("192.168.1.1"), true)
	src.Publish(home)
	mon, err := netmon.New(src, netmon.Config{Debounce: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	a := newTestHost(t, "a", "fd00::a", dnsSrv.addr, func(c *Config) { c.NetMon = mon })
	a.run(t)
	eventually(t, "first registration", func() error {
		if n, _ := dnsSrv.updates(); n < 1 {
			return errors.New("no update yet")
		}
		return nil
	})
	n0, _ := dnsSrv.updates()
	moved := netmon.Host("eth0", 2, netip.MustParsePrefix("192.168.2.3/24"), netip.MustParseAddr("192.168.2.1"), true)
	src.Publish(moved, netmon.Msg{Kind: netmon.RouteAdded, Route: &moved.Routes[0]})
	eventually(t, "re-registration after the move", func() error {
		if n, _ := dnsSrv.updates(); n <= n0 {
			return errors.New("no update after the move")
		}
		return nil
	})
	off := netmon.Host("eth0", 2, netip.MustParsePrefix("192.168.2.3/24"), netip.Addr{}, false)
	src.Publish(off, netmon.Msg{Kind: netmon.LinkChanged, Link: &off.Links[1]})
	eventually(t, "offline seen", func() error {
		if a.a.Network().Online {
			return errors.New("still online")
		}
		return nil
	})
	n1, _ := dnsSrv.updates()
	time.Sleep(300 * time.Millisecond)
	if n, _ := dnsSrv.updates(); n != n1 {
		t.Fatalf("offline sent %d updates", n-n1)
	}
	src.Publish(moved, netmon.Msg{Kind: netmon.LinkChanged, Link: &moved.Links[1]})
	eventually(t, "re-registration when back", func() error {
		if n, _ := dnsSrv.updates(); n <= n1 {
			return errors.New("no update after coming back")
		}
		return nil
	})
	if st := a.a.Status(context.Background()); !st.Network.Following || !st.Network.Online || st.Network.Changes != 3 {
		t.Fatalf("status: %+v", st.Network)
	}
}

func testKey(t *testing.T) *register.Key {
	t.Helper()
	key, err := register.NewKey("alice.btmm.example.", "hmac-sha256", "c2VjcmV0c2VjcmV0c2VjcmV0")
	if err != nil {
		t.Fatal(err)
	}
	return key
}
