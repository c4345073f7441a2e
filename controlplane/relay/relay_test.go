package relay

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/pion/stun/v3"

	"github.com/btmm/btmm/dns/tsig"
)

// testHost is a host's tunnel socket: STUN answers go to the client, every
// other datagram to rx.
type testHost struct {
	conn *net.UDPConn
	cl   *Client
	rx   chan []byte
	from chan netip.AddrPort
}

func newTestHost(t *testing.T, host string, cred Credential) *testHost {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	h := &testHost{conn: c, rx: make(chan []byte, 64), from: make(chan netip.AddrPort, 64)}
	h.cl = &Client{Cred: cred, Host: host, RTO: 100 * time.Millisecond, Tries: 3,
		Send: func(b []byte, to netip.AddrPort) error {
			_, err := c.WriteToUDPAddrPort(append(bytes.Clone(NonESPMarker), b...), to)
			return err
		}}
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			b := bytes.Clone(buf[:n])
			if bytes.HasPrefix(b, NonESPMarker) && stun.IsMessage(b[4:]) {
				h.cl.Handle(b[4:], from)
				continue
			}
			h.rx <- b
			h.from <- from
		}
	}()
	return h
}

func (h *testHost) addr() netip.AddrPort { return h.conn.LocalAddr().(*net.UDPAddr).AddrPort() }

func (h *testHost) expect(t *testing.T, want []byte, from netip.AddrPort) {
	t.Helper()
	select {
	case got := <-h.rx:
		f := <-h.from
		if !bytes.Equal(got, want) || f != from {
			t.Fatalf("received %x from %v, want %x from %v", got, f, want, from)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("nothing received, want %x from %v", want, from)
	}
}

func (h *testHost) expectNothing(t *testing.T) {
	t.Helper()
	select {
	case got := <-h.rx:
		t.Fatalf("received %x, want nothing", got)
	case <-time.After(300 * time.Millisecond):
	}
}

var (
	alice = Credential{Name: "alice.btmm.example.", Secret: bytes.Repeat([]byte{1}, 32)}
	bob   = Credential{Name: "bob.btmm.example.", Secret: bytes.Repeat([]byte{2}, 32)}
	hostA = Credential{Name: "a.alice.btmm.example.", Secret: bytes.Repeat([]byte{4}, 32)}
)

func keys(cs ...Credential) KeyFunc {
	return func(name string) (Credential, bool) {
		for _, c := range cs {
			if c.Name == name {
				return c, true
			}
		}
		return Credential{}, false
	}
}

func startServer(t *testing.T, cfg Config) *Server {
	t.Helper()
	if cfg.Listen == nil {
		cfg.Listen = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")}
	}
	if cfg.Keys == nil {
		cfg.Keys = keys(alice, bob, hostA)
	}
	if cfg.PortMin == 0 {
		cfg.PortMin, cfg.PortMax = 41000, 41999
	}
	s, err := Listen(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return s
}

// TestRelayGoForwarding: two hosts of one user allocate, bind at each
// other's port, and exchange ESP-like datagrams and keying messages through
// the relay; each sees the other at the other's relay port.
func TestRelayGoForwarding(t *testing.T) {
	s := startServer(t, Config{})
	srv := s.Addrs()[0]
	ctx := context.Background()
	a := newTestHost(t, "a.alice.btmm.example.", alice)
	b := newTestHost(t, "b.alice.btmm.example.", alice)

	mapped, err := a.cl.Binding(ctx, srv)
	if err != nil || mapped != a.addr() {
		t.Fatalf("Binding = %v, %v; want %v", mapped, err, a.addr())
	}
	aa, err := a.cl.Allocate(ctx, srv, 0)
	if err != nil {
		t.Fatal(err)
	}
	ba, err := b.cl.Allocate(ctx, srv, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if aa.Relayed == ba.Relayed || aa.Mapped != a.addr() || ba.Lifetime != time.Minute || aa.Lifetime != 10*time.Minute {
		t.Fatalf("allocations %+v %+v", aa, ba)
	}
	// Before both have bound nothing is forwarded.
	esp := []byte{0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1, 0x55}
	if err := a.cl.Bind(ctx, ba.Relayed, aa); err != nil {
		t.Fatal(err)
	}
	a.conn.WriteToUDPAddrPort(esp, ba.Relayed)
	b.expectNothing(t)
	if err := b.cl.Bind(ctx, aa.Relayed, ba); err != nil {
		t.Fatal(err)
	}
	a.conn.WriteToUDPAddrPort(esp, ba.Relayed)
	b.expect(t, esp, aa.Relayed)
	back := []byte{0xca, 0xfe, 0, 2, 9, 9}
	b.conn.WriteToUDPAddrPort(back, aa.Relayed)
	a.expect(t, back, ba.Relayed)
	keyingMsg := append(bytes.Clone(NonESPMarker), 1, 1, 1, 0, 7)
	a.conn.WriteToUDPAddrPort(keyingMsg, ba.Relayed)
	b.expect(t, keyingMsg, aa.Relayed)
	if st := s.Stats(); st.GoForwardedESP != 2 || st.GoForwarded != 3 || st.Flows != 2 {
		t.Errorf("stats %+v", st)
	}
	// B's NAT mapping changes: it binds again from its new source, and
	// only that one receives (the old bind is gone, not picked at random).
	b2 := newTestHost(t, "b.alice.btmm.example.", alice)
	if err := b2.cl.Bind(ctx, aa.Relayed, ba); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		a.conn.WriteToUDPAddrPort(esp, ba.Relayed)
		b2.expect(t, esp, aa.Relayed)
	}
	b.expectNothing(t)
	if st := s.Stats(); st.Flows != 2 {
		t.Errorf("flows after the re-bind: %+v", st)
	}
	b = b2
	if al := s.Allocations(); len(al) != 2 || len(al[0].Peers) != 1 {
		t.Errorf("allocations %+v", al)
	}
	// Refresh with lifetime 0 deletes: forwarding stops.
	if _, err := b.cl.Refresh(ctx, ba, 0); err != nil {
		t.Fatal(err)
	}
	a.conn.WriteToUDPAddrPort(esp, ba.Relayed)
	b.expectNothing(t)
	if _, err := b.cl.Refresh(ctx, ba, time.Minute); !errors.Is(err, ErrMismatch) {
		t.Errorf("refresh of a deleted allocation: %v", err)
	}
	// Expiry.
	s.expire(time.Now().Add(time.Hour))
	if n := len(s.Allocations()); n != 0 {
		t.Errorf("%d allocations after expiry", n)
	}
}

// TestRelayRefusals: bad input gets a clear refusal and changes nothing.
func TestRelayRefusals(t *testing.T) {
	s := startServer(t, Config{MaxPerUser: 2})
	srv := s.Addrs()[0]
	ctx := context.Background()
	forged := Credential{Name: alice.Name, Secret: bytes.Repeat([]byte{9}, 32)}
	stranger := Credential{Name: "eve.btmm.example.", Secret: bytes.Repeat([]byte{3}, 32)}
	for _, tc := range []struct {
		name string
		host string
		cred Credential
		want error
	}{
		{"unknown key", "e.eve.btmm.example.", stranger, ErrUnauthorized},
		{"wrong secret", "a.alice.btmm.example.", forged, ErrUnauthorized},
		{"another user's host", "a.alice.btmm.example.", bob, ErrForbidden},
		{"the zone itself", "btmm.example.", alice, ErrForbidden},
		{"a host key for another host", "b.alice.btmm.example.", hostA, ErrForbidden},
	} {
		h := newTestHost(t, tc.host, tc.cred)
		if _, err := h.cl.Allocate(ctx, srv, 0); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	if n := len(s.Allocations()); n != 0 {
		t.Fatalf("refused requests made %d allocations", n)
	}
	// Quota: two hosts of alice, the third refused; a re-allocation by the
	// same host replaces its own.
	a := newTestHost(t, "a.alice.btmm.example.", alice)
	b := newTestHost(t, "b.alice.btmm.example.", alice)
	c := newTestHost(t, "c.alice.btmm.example.", alice)
	aa, err := a.cl.Allocate(ctx, srv, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.cl.Allocate(ctx, srv, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.cl.Allocate(ctx, srv, 0); !errors.Is(err, ErrQuota) {
		t.Errorf("third allocation: %v, want ErrQuota", err)
	}
	if again, err := a.cl.Allocate(ctx, srv, 0); err != nil || again.Relayed != aa.Relayed {
		t.Errorf("re-allocation by the same host: %v, %v; want the same port %v", again.Relayed, err, aa.Relayed)
	}
	// Bob's host cannot bind at alice's port, nor name alice's allocation.
	bb := newTestHost(t, "x.bob.btmm.example.", bob)
	bx, err := bb.cl.Allocate(ctx, srv, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := bb.cl.Bind(ctx, aa.Relayed, bx); !errors.Is(err, ErrForbidden) {
		t.Errorf("cross-user bind: %v, want ErrForbidden", err)
	}
	if err := bb.cl.Bind(ctx, aa.Relayed, aa); !errors.Is(err, ErrMismatch) {
		t.Errorf("bind naming another user's allocation: %v, want ErrMismatch", err)
	}
	if err := b.cl.Bind(ctx, aa.Relayed, bx); !errors.Is(err, ErrMismatch) {
		t.Errorf("bind naming someone else's allocation: %v, want ErrMismatch", err)
	}
	// Stale time and replay.
	r := request{method: stun.MethodAllocate, txid: stun.NewTransactionID(), host: "c.alice.btmm.example.", time: time.Now().Add(-time.Hour)}
	raw, _ := buildRequest(alice, r)
	if m, err := c.cl.exchange(ctx, r.txid, raw, srv); err != nil || m.Type.Class != stun.ClassErrorResponse {
		t.Errorf("stale request: %v %v", m, err)
	}
	r.time, r.txid = time.Now(), stun.NewTransactionID()
	r.host = "a.alice.btmm.example."
	raw, _ = buildRequest(alice, r)
	if _, err := c.cl.exchange(ctx, r.txid, raw, srv); err != nil {
		t.Fatalf("fresh request: %v", err)
	}
	c.cl.Tries = 2
	if _, err := c.cl.exchange(ctx, r.txid, raw, srv); !errors.Is(err, ErrNoAnswer) {
		t.Errorf("replayed request answered: %v", err)
	}
	// Garbage and a flood from an unbound source: nothing forwarded.
	before := s.Stats()
	g, _ := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	defer g.Close()
	for i := range 2000 {
		g.WriteToUDPAddrPort([]byte{byte(i), 1, 2, 3, 4, 5, 6, 7}, aa.Relayed)
		g.WriteToUDPAddrPort(append(bytes.Clone(NonESPMarker), 0, 1, 0, 0, 0x21, 0x12), srv)
	}
	a.expectNothing(t)
	after := s.Stats()
	if after.GoForwarded != before.GoForwarded || after.Dropped == before.Dropped {
		t.Errorf("flood: before %+v after %+v", before, after)
	}
}

func TestDirKeys(t *testing.T) {
	dir := t.TempDir()
	k, _ := tsig.NewKey("alice.btmm.example.", "")
	if err := tsig.WriteFile(filepath.Join(dir, "alice.key"), k); err != nil {
		t.Fatal(err)
	}
	hk, _ := tsig.NewKey("laptop.alice.btmm.example.", "")
	os.MkdirAll(filepath.Join(dir, "alice"), 0o700)
	if err := tsig.WriteFile(filepath.Join(dir, "alice", "laptop.key"), hk); err != nil {
		t.Fatal(err)
	}
	kf := DirKeys(dir, "btmm.example", time.Minute)
	if c, ok := kf("Alice.btmm.example"); !ok || !bytes.Equal(c.Secret, k.Secret) {
		t.Errorf("alice: %v %v", c, ok)
	}
	if c, ok := kf("laptop.alice.btmm.example."); !ok || !bytes.Equal(c.Secret, hk.Secret) {
		t.Errorf("host key: %v %v", c, ok)
	}
	for _, n := range []string{"bob.btmm.example.", "btmm.example.", "../alice.btmm.example.", "x.alice.btmm.example.", "a.b.alice.btmm.example."} {
		if _, ok := kf(n); ok {
			t.Errorf("%q found", n)
		}
	}
}

// TestDetectNAT: two responder addresses; without a NAT the reflexive
// address is our own; a silent server is "UDP blocked".
func TestDetectNAT(t *testing.T) {
	s := startServer(t, Config{Listen: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0"), netip.MustParseAddrPort("127.0.0.2:0")}})
	h := newTestHost(t, "a.alice.btmm.example.", alice)
	ctx := context.Background()
	nat, seen := h.cl.DetectNAT(ctx, s.Addrs(), []netip.Addr{h.addr().Addr()})
	if nat != NATNone || len(seen) != 2 || seen[0] != h.addr() {
		t.Errorf("DetectNAT = %v %v, want none", nat, seen)
	}
	if nat, _ := h.cl.DetectNAT(ctx, s.Addrs(), nil); nat != NATIndependent {
		t.Errorf("same mapping from both: %v, want eim", nat)
	}
	silent, _ := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	defer silent.Close()
	silent2, _ := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)})
	defer silent2.Close()
	quiet := []netip.AddrPort{silent.LocalAddr().(*net.UDPAddr).AddrPort(), silent2.LocalAddr().(*net.UDPAddr).AddrPort()}
	// Two silent responders, 5 tries of RTO 100 ms (3.1 s each, 6.2 s one
	// after the other as it was): blocked after BlockedAfter.
	h.cl.Tries, h.cl.BlockedAfter = 5, time.Second
	t0 := time.Now()
	if nat, _ := h.cl.DetectNAT(ctx, quiet, nil); nat != NATBlocked {
		t.Errorf("no answer: %v, want blocked", nat)
	}
	took := time.Since(t0)
	t.Logf("two silent responders: blocked after %v", took.Round(time.Millisecond))
	if took < time.Second || took > 2500*time.Millisecond {
		t.Errorf("blocked after %v, want BlockedAfter (1 s)", took)
	}
	// One silent responder and one that answers: not blocked, the silent
	// one given its whole schedule (Tries 2: 750 ms) and left out.
	h.cl.Tries = 2
	if nat, seen := h.cl.DetectNAT(ctx, []netip.AddrPort{quiet[0], s.Addrs()[0]}, nil); nat != NATUnknown || len(seen) != 1 {
		t.Errorf("one of two answers: %v %v, want unknown with one reflexive endpoint", nat, seen)
	}
	if nat, _ := h.cl.DetectNAT(ctx, quiet[:1], nil); nat != NATBlocked {
		t.Errorf("no answer (Tries 2): %v, want blocked", nat)
	}
}

// FuzzControl: the relay's control path never panics on any datagram and
// answers only well-formed requests.
func FuzzControl(f *testing.F) {
	r := request{method: stun.MethodAllocate, txid: [12]byte{1}, host: "a.alice.btmm.example.", time: time.Unix(1e9, 0), hasLife: true, lifetime: time.Minute}
	b, _ := buildRequest(alice, r)
	f.Add(b)
	m, _ := stun.Build(stun.TransactionID, stun.BindingRequest)
	f.Add(m.Raw)
	s, err := Listen(Config{Listen: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")}, Keys: keys(alice)})
	if err != nil {
		f.Fatal(err)
	}
	defer s.closeAll()
	from := netip.MustParseAddrPort("127.0.0.9:4500")
	f.Fuzz(func(t *testing.T, b []byte) {
		if resp := s.control(0, b, from); resp != nil {
			if _, err := decode(resp); err != nil {
				t.Fatalf("answer does not decode: %v", err)
			}
		}
	})
}
