package peers_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llqclient"
	"github.com/btmm/btmm/dns/peers"
	"github.com/btmm/btmm/dns/register"
	"github.com/btmm/btmm/dns/server"
)

// lab is one btmm-dnsd (in-process, 127.0.0.1) and a user key file.
type lab struct {
	t       testing.TB
	dataDir string
	addr    string
	srv     *server.Server
	keyFile string
	llqMin  time.Duration
	tls     bool // also listen for DNS over TLS; agents then prefer it
	tlsAddr string
}

func startLab(t testing.TB, llqLease time.Duration) *lab { return startLabTLS(t, llqLease, false) }

func startLabTLS(t testing.TB, llqLease time.Duration, withTLS bool) *lab {
	if testing.Short() {
		t.Skip("integration with btmm-dnsd on 127.0.0.1; skipped under -short")
	}
	l := &lab{t: t, dataDir: t.TempDir(), addr: "127.0.0.1:0", llqMin: llqLease, tls: withTLS, tlsAddr: "127.0.0.1:0"}
	l.start()
	t.Cleanup(func() { l.srv.Close() }) // the current server, after the agents' cleanups
	k, err := l.srv.AddUser("alice", "hmac-sha256")
	if err != nil {
		t.Fatal(err)
	}
	// The agent reads the key `btmm-dnsd adduser` prints, from a 0600 file.
	l.keyFile = filepath.Join(t.TempDir(), "alice.key")
	if err := os.WriteFile(l.keyFile, []byte(k.BINDClause()), 0o600); err != nil {
		t.Fatal(err)
	}
	return l
}

func (l *lab) start() {
	cfg := server.Config{Zone: "btmm.example.", DataDir: l.dataDir, Listen: l.addr, ServerAddrs: []string{"127.0.0.1"}}
	if l.tls {
		cfg.ListenTLS = l.tlsAddr
	}
	if l.llqMin != 0 {
		cfg.LLQ.MinLease = server.Duration(l.llqMin)
		cfg.LLQ.MaxLease = server.Duration(l.llqMin)
	}
	srv, err := server.New(cfg, nil)
	if err != nil {
		l.t.Fatal(err)
	}
	var addrs server.Addrs
	for range 50 { // the old socket may linger for a moment after a restart
		if addrs, err = srv.Start(context.Background()); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		l.t.Fatal(err)
	}
	l.srv, l.addr, l.tlsAddr = srv, addrs.DNS, addrs.TLS
}

// tlsConfig trusts the server's generated certificate.
func (l *lab) tlsConfig() *tls.Config {
	if !l.tls {
		return nil
	}
	pem, err := os.ReadFile(filepath.Join(l.dataDir, "tls", "cert.pem"))
	if err != nil {
		l.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	return &tls.Config{RootCAs: pool, ServerName: "ns.btmm.example"}
}

func (l *lab) restart(down time.Duration) {
	l.srv.Close()
	time.Sleep(down)
	l.start()
}

// agent is one host: registrar + LLQ client + tracker, all found by SRV
// discovery through the lab's server.
type agent struct {
	reg     *register.Registrar
	llq     *llqclient.Client
	tracker *peers.Tracker
	cancel  context.CancelFunc
	regDone chan error
	events  chan peers.Event
}

// hostKeyFile returns a 0600 file with the host's own key (`btmm-dnsd
// addhost alice HOST`), creating the key on first use.
func (l *lab) hostKeyFile(host string) string {
	k, err := server.NewUsers(l.dataDir, "btmm.example.").GetHost("alice", host)
	if err != nil {
		if k, err = l.srv.AddHost("alice", host, "hmac-sha256"); err != nil {
			l.t.Fatal(err)
		}
	}
	f := filepath.Join(l.dataDir, host+"-client.key")
	if err := os.WriteFile(f, []byte(k.BINDClause()), 0o600); err != nil {
		l.t.Fatal(err)
	}
	return f
}

func startAgent(t testing.TB, l *lab, host string, n byte, llqLease time.Duration, settle time.Duration) *agent {
	key, err := register.LoadKeyFile(l.hostKeyFile(host), "")
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(testWriter{t, host}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	reg, err := register.New(register.Config{
		Domain: "alice.btmm.example.", Zone: "btmm.example.", Host: host,
		ULA:          netip.AddrFrom16([16]byte{0xfd, 1, 2, 3, 4, 5, 6, 7, 0x02, 0, 0, 0xff, 0xfe, 0, 0, n}),
		Label:        fmt.Sprintf("AutoTunnel-02-00-00-FF-FE-00-00-%02X", n),
		Outer:        netip.AddrPortFrom(netip.AddrFrom4([4]byte{11, 0, 0, n}), 4500),
		Capabilities: register.Capabilities{Version: register.ProtocolVersion, Dataplanes: []string{"xfrm"}, KeyingPort: 4500},
		Key:          key, Resolver: l.addr, Lease: 30 * time.Minute, MaxBackoff: time.Second, TLS: l.tlsConfig(),
	}, log)
	if err != nil {
		t.Fatal(err)
	}
	lc, err := llqclient.New(llqclient.Config{Domain: "alice.btmm.example.", Resolver: l.addr, Key: key,
		Lease: llqLease, PollInterval: time.Hour, Timeout: 300 * time.Millisecond, TLS: l.tlsConfig()}, log)
	if err != nil {
		t.Fatal(err)
	}
	tr := peers.New(peers.Config{Domain: "alice.btmm.example.", Self: reg.Names().Host, Settle: settle}, lc, log)
	ctx, cancel := context.WithCancel(context.Background())
	a := &agent{reg: reg, llq: lc, tracker: tr, cancel: cancel, regDone: make(chan error, 1), events: make(chan peers.Event, 1000)}
	var wg sync.WaitGroup
	wg.Go(func() { a.regDone <- reg.Run(ctx) })
	wg.Go(func() { lc.Run(ctx) })
	wg.Go(func() { tr.Run(ctx) })
	wg.Go(func() {
		for ev := range tr.Events() {
			a.events <- ev
		}
	})
	// Stop the agent (deleting its records) before the server goes away
	// and before the test ends (the agents log through t).
	t.Cleanup(func() { cancel(); wg.Wait() })
	return a
}

func (a *agent) next(t testing.TB, what string) peers.Event {
	t.Helper()
	select {
	case ev := <-a.events:
		return ev
	case <-time.After(15 * time.Second):
		t.Fatalf("no peer event (%s); llq status %+v", what, a.llq.Status())
		return peers.Event{}
	}
}

// waitPeer reads events until want(ev) holds.
func (a *agent) waitFor(t testing.TB, what string, want func(peers.Event) bool) peers.Event {
	t.Helper()
	for {
		if ev := a.next(t, what); want(ev) {
			return ev
		}
	}
}

func TestTwoHostsThroughBtmmDnsd(t *testing.T) {
	l := startLab(t, 0)
	a := startAgent(t, l, "laptop", 1, time.Hour, 0)
	b := startAgent(t, l, "desktop", 2, time.Hour, 0)

	ev := b.next(t, "B discovers A")
	if ev.Kind != peers.Added || ev.Peer.Name != "laptop.alice.btmm.example." ||
		ev.Peer.Outer != netip.MustParseAddrPort("11.0.0.1:4500") || ev.Peer.ULA != netip.MustParseAddr("fd01:203:405:607:200:ff:fe00:1") ||
		!slices.Equal(ev.Peer.Capabilities.Dataplanes, []string{"xfrm"}) {
		t.Fatalf("B got %v %v", ev.Kind, ev.Peer)
	}
	if ev := a.next(t, "A discovers B"); ev.Kind != peers.Added || ev.Peer.Name != "desktop.alice.btmm.example." {
		t.Fatalf("A got %v %v", ev.Kind, ev.Peer)
	}
	if r := a.reg.Status(); !r.LeaseEchoed || r.Lease != 30*time.Minute {
		t.Errorf("registrar status %+v: want the server's echoed 30m lease", r)
	}

	// A's NAT mapping changes: B hears it pushed (polling is 1 h away).
	start := time.Now()
	if err := a.reg.SetOuter(netip.MustParseAddrPort("11.0.0.100:61000")); err != nil {
		t.Fatal(err)
	}
	// Under load the SRV and A events of the one update may be emitted
	// apart (Config.Settle); only Changed events may come before the final one.
	b.waitFor(t, "A moved", func(ev peers.Event) bool {
		if ev.Kind != peers.Changed {
			t.Fatalf("B got %v %v, want changed", ev.Kind, ev.Peer)
		}
		return ev.Peer.Outer == netip.MustParseAddrPort("11.0.0.100:61000")
	})
	t.Logf("A's move reached B in %v", time.Since(start))
	st := b.llq.Status()
	if st.Polling != 0 || len(st.Queries) != 5 {
		t.Errorf("B's LLQs: %+v; want 5 LLQs (browse, AAAA, SRV, TXT, A), none polled", st)
	}
	for _, q := range st.Queries {
		if q.Mode != llqclient.ModeLLQ {
			t.Errorf("B's %s %s is %s (%s), want llq", q.Name, q.Type, q.Mode, q.Reason)
		}
	}

	// A shuts down cleanly: its records are deleted and B sees it go.
	a.cancel()
	if err := <-a.regDone; err != nil {
		t.Fatalf("A's registrar: %v", err)
	}
	if ev := b.next(t, "A left"); ev.Kind != peers.Removed || ev.Peer.Name != "laptop.alice.btmm.example." {
		t.Fatalf("B got %v %v, want A removed", ev.Kind, ev.Peer)
	}
}

func TestServerRestartReestablishesLLQs(t *testing.T) {
	// LLQ leases of 3 s, so the restored LLQs have expired after 4 s of
	// downtime and the client must set them up again.
	l := startLab(t, 3*time.Second)
	a := startAgent(t, l, "laptop", 1, 3*time.Second, 0)
	b := startAgent(t, l, "desktop", 2, 3*time.Second, 0)
	b.next(t, "B discovers A")
	a.next(t, "A discovers B")
	setups := func() int {
		n := 0
		for _, q := range b.llq.Status().Queries {
			n += q.Setups
		}
		return n
	}
	before := setups()

	l.restart(4 * time.Second)
	// A moves right after the restart.
	if err := a.reg.SetOuter(netip.MustParseAddrPort("11.0.0.101:61001")); err != nil {
		t.Fatal(err)
	}
	ev := b.waitFor(t, "A moved after restart", func(ev peers.Event) bool {
		return ev.Kind == peers.Changed && ev.Peer.Outer == netip.MustParseAddrPort("11.0.0.101:61001")
	})
	_ = ev
	deadline := time.Now().Add(10 * time.Second)
	for setups() <= before && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if setups() <= before {
		t.Errorf("no LLQ was set up again after the restart: %+v", b.llq.Status())
	}
	// And pushes flow on the new LLQs.
	if err := a.reg.SetOuter(netip.MustParseAddrPort("11.0.0.102:61002")); err != nil {
		t.Fatal(err)
	}
	b.waitFor(t, "A moved again", func(ev peers.Event) bool {
		return ev.Kind == peers.Changed && ev.Peer.Outer == netip.MustParseAddrPort("11.0.0.102:61002")
	})
	if got := b.tracker.Peers(); len(got) != 1 || got[0].Outer != netip.MustParseAddrPort("11.0.0.102:61002") {
		t.Errorf("B's peers after restart: %v", got)
	}
	if st := b.llq.Status(); st.Polling != 0 {
		t.Errorf("B fell back to polling: %+v", st)
	}
}

// btmm-dnsd keeps UDP LLQs across a quick restart: pushes go on without the
// client noticing.
func TestServerQuickRestartKeepsLLQs(t *testing.T) {
	l := startLab(t, 0)
	a := startAgent(t, l, "laptop", 1, time.Hour, 0)
	b := startAgent(t, l, "desktop", 2, time.Hour, 0)
	b.next(t, "B discovers A")
	l.restart(100 * time.Millisecond)
	if err := a.reg.SetOuter(netip.MustParseAddrPort("11.0.0.60:63000")); err != nil {
		t.Fatal(err)
	}
	b.waitFor(t, "A moved after restart", func(ev peers.Event) bool {
		return ev.Kind == peers.Changed && ev.Peer.Outer == netip.MustParseAddrPort("11.0.0.60:63000")
	})
	if st := b.llq.Status(); st.Polling != 0 {
		t.Errorf("B polls after a quick restart: %+v", st)
	}
}

func TestOverTLSAndReconnect(t *testing.T) {
	l := startLabTLS(t, 0, true)
	a := startAgent(t, l, "laptop", 1, time.Hour, 0)
	b := startAgent(t, l, "desktop", 2, time.Hour, 0)
	b.next(t, "B discovers A")
	if st := a.reg.Status(); st.Server != l.tlsAddr {
		t.Errorf("A updates via %s, want DNS over TLS at %s", st.Server, l.tlsAddr)
	}
	if st := b.llq.Status(); st.Server != l.tlsAddr || st.Polling != 0 {
		t.Errorf("B's LLQs via %s (%d polled), want TLS at %s", st.Server, st.Polling, l.tlsAddr)
	}
	if err := a.reg.SetOuter(netip.MustParseAddrPort("11.0.0.50:62000")); err != nil {
		t.Fatal(err)
	}
	b.waitFor(t, "A moved", func(ev peers.Event) bool {
		return ev.Kind == peers.Changed && ev.Peer.Outer == netip.MustParseAddrPort("11.0.0.50:62000")
	})
	// The restart breaks the TLS connection the LLQs live on: B reconnects
	// and sets them up again; a change made meanwhile is not lost.
	l.restart(200 * time.Millisecond)
	if err := a.reg.SetOuter(netip.MustParseAddrPort("11.0.0.51:62001")); err != nil {
		t.Fatal(err)
	}
	b.waitFor(t, "A moved after restart", func(ev peers.Event) bool {
		return ev.Kind == peers.Changed && ev.Peer.Outer == netip.MustParseAddrPort("11.0.0.51:62001")
	})
	if err := a.reg.SetOuter(netip.MustParseAddrPort("11.0.0.52:62002")); err != nil {
		t.Fatal(err)
	}
	b.waitFor(t, "pushes flow on the new connection", func(ev peers.Event) bool {
		return ev.Kind == peers.Changed && ev.Peer.Outer == netip.MustParseAddrPort("11.0.0.52:62002")
	})
}

type testWriter struct {
	t    testing.TB
	host string
}

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(w.host + ": " + strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

var _ peers.Runner = (*llqclient.Client)(nil)
