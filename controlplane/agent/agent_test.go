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
	"github.com/btmm/btmm/dns/register"
)

// updateServer is a DNS server on 127.0.0.1 that accepts every update and
// records the A records it was sent (it does not check TSIG: the registrar's
// own tests do that against BIND).
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
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
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
	key, err := register.NewKey("alice.btmm.example.", "hmac-sha256", "c2VjcmV0c2VjcmV0c2VjcmV0")
	if err != nil {
		t.Fatal(err)
	}
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
