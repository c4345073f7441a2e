package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/dataplanetest"
	"github.com/btmm/btmm/controlplane/identity"
	"github.com/btmm/btmm/controlplane/keying"
	"github.com/btmm/btmm/controlplane/netmon"
	"github.com/btmm/btmm/dns/register"
)

// memNet is an in-memory datagram network (usable in synctest bubbles).
type memNet struct {
	mu  sync.Mutex
	eps map[netip.AddrPort]*memEP
	log *eventLog
}

type memEP struct {
	n    *memNet
	name string
	addr netip.AddrPort
	ch   chan memPkt
	done chan struct{}
}

type memPkt struct {
	b    []byte
	from netip.AddrPort
}

func (n *memNet) endpoint(name, addr string) *memEP {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.eps == nil {
		n.eps = map[netip.AddrPort]*memEP{}
	}
	e := &memEP{n: n, name: name, addr: netip.MustParseAddrPort(addr), ch: make(chan memPkt, 64), done: make(chan struct{})}
	n.eps[e.addr] = e
	return e
}

func (n *memNet) move(e *memEP, to string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.eps, e.addr)
	e.addr = netip.MustParseAddrPort(to)
	n.eps[e.addr] = e
}

func (e *memEP) WriteKeying(b []byte, to netip.AddrPort) error {
	e.n.mu.Lock()
	dst, from := e.n.eps[to], e.addr
	e.n.mu.Unlock()
	var m keying.Message
	if m.Unmarshal(b) == nil && e.n.log != nil {
		e.n.log.add(fmt.Sprintf("%s sends %v", e.name, m.Type))
	}
	if dst != nil {
		select {
		case dst.ch <- memPkt{bytes.Clone(b), from}:
		default:
		}
	}
	return nil
}

func (e *memEP) ReadKeying(b []byte) (int, netip.AddrPort, error) {
	select {
	case p := <-e.ch:
		return copy(b, p.b), p.from, nil
	case <-e.done:
		return 0, netip.AddrPort{}, errors.New("closed")
	}
}

// eventLog records what happened, and when, in order.
type eventLog struct {
	mu     sync.Mutex
	events []string
	at     []time.Time
}

func (l *eventLog) add(e string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, e)
	l.at = append(l.at, time.Now())
}

func (l *eventLog) since(i int) ([]string, []time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.events[i:]...), append([]time.Time(nil), l.at[i:]...)
}

func (l *eventLog) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.events)
}

// loggedDP records Set calls in the event log.
type loggedDP struct {
	*dataplanetest.Fake
	name string
	log  *eventLog
}

func (d loggedDP) Set(ctx context.Context, s *controlplane.State) ([]controlplane.Change, error) {
	d.log.add(d.name + " dataplane set")
	return d.Fake.Set(ctx, s)
}

type kaRecorder struct {
	mu  sync.Mutex
	at  []time.Time
	to  []netip.AddrPort
	err error
}

func (k *kaRecorder) SendKeepalive(to netip.AddrPort) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.at = append(k.at, time.Now())
	k.to = append(k.to, to)
	return k.err
}

func (k *kaRecorder) sent() []time.Time {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]time.Time(nil), k.at...)
}

// memHost is an agent whose parts (keying, follow, netmon, keepalives) run
// in a synctest bubble on a memNet; registration, NAT and the peer tracker
// are not started (onPeer is called directly).
type memHost struct {
	name string
	ula  netip.Addr
	ep   *memEP
	dp   *dataplanetest.Fake
	src  *netmon.Fake
	ka   *kaRecorder
	a    *Agent
}

func newMemHost(t *testing.T, n *memNet, name, ula, addr string, sn netmon.Snapshot, mod func(*Config)) *memHost {
	t.Helper()
	h := &memHost{name: name, ula: netip.MustParseAddr(ula), ep: n.endpoint(name, addr), dp: &dataplanetest.Fake{}, src: &netmon.Fake{}, ka: &kaRecorder{}}
	h.src.Publish(sn)
	mon, err := netmon.New(h.src, netmon.Config{})
	if err != nil {
		t.Fatal(err)
	}
	psk, _ := keying.NewPSK(testPSK)
	key, _ := register.NewKey("alice.btmm.example.", "hmac-sha256", "c2VjcmV0c2VjcmV0c2VjcmV0")
	cfg := Config{
		Identity: identityFor(h.ula), Host: name, Domain: "alice.btmm.example.", TunnelPort: 4500,
		Dataplane: loggedDP{h.dp, name, n.log}, DataplaneName: "fake", Transport: h.ep, Auth: psk,
		Register: register.Config{Key: key, Zone: "btmm.example.", Server: "127.0.0.1:1"},
		External: h.ep.addr, Peers: func(context.Context, func(PeerEvent)) error { return nil },
		NetMon: mon, KeepaliveSender: h.ka,
		Rediscover: func() { n.log.add(name + " rediscover") },
		Rebind:     func() { n.log.add(name + " rebind") },
	}
	if mod != nil {
		mod(&cfg)
	}
	if h.a, err = New(cfg); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.a.ctx = ctx
	var wg sync.WaitGroup
	for _, f := range []func(context.Context) error{h.a.keyer.Run, h.a.follow, mon.Run, h.a.keepalives} {
		wg.Add(1)
		go func() { defer wg.Done(); f(ctx) }()
	}
	unregister := mon.RegisterChangeCallback(h.a.onNetChange)
	t.Cleanup(func() { unregister(); cancel(); close(h.ep.done); wg.Wait() })
	return h
}

func (h *memHost) sees(o *memHost, caps register.Capabilities) {
	h.a.onPeer(PeerEvent{Name: o.name, ULA: o.ula, Outer: o.ep.addr, Capabilities: caps})
}

var (
	lanA = netip.MustParsePrefix("192.168.1.2/24")
	gwA  = netip.MustParseAddr("192.168.1.1")
	lanB = netip.MustParsePrefix("192.168.2.3/24")
	gwB  = netip.MustParseAddr("192.168.2.1")
)

// TestFollowMove: a major change of the host's network triggers, at once
// and in order, NAT rediscovery, LLQ rebind, the dataplane's move and a
// MOVED to the peers; the peer follows without rekeying. Offline changes
// nothing; coming back is followed like a move.
func TestFollowMove(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := &memNet{log: &eventLog{}}
		a := newMemHost(t, n, "a", "fd00::a", "11.1.0.2:4500", netmon.Host("eth0", 2, lanA, gwA, true), nil)
		b := newMemHost(t, n, "b", "fd00::b", "11.3.0.2:4500", netmon.Host("eth0", 2, netip.MustParsePrefix("11.3.0.2/24"), netip.MustParseAddr("11.3.0.1"), true), nil)
		a.sees(b, register.Capabilities{})
		b.sees(a, register.Capabilities{})
		time.Sleep(5 * time.Second)
		synctest.Wait()
		before := b.dp.Render()
		if !strings.Contains(before, "encap 11.1.0.2:4500") {
			t.Fatalf("not keyed:\n%s", before)
		}

		// a moves behind another NAT.
		mark := n.log.len()
		n.move(a.ep, "11.2.0.2:61001")
		moved := netmon.Host("eth0", 2, lanB, gwB, true)
		start := time.Now()
		a.src.Publish(moved, netmon.Msg{Kind: netmon.RouteAdded, Route: &moved.Routes[0]})
		time.Sleep(netmon.DefaultDebounce)
		synctest.Wait()
		events, at := n.log.since(mark)
		want := []string{"a rediscover", "a rebind", "a dataplane set", "a sends MOVED", "b dataplane set", "b sends MOVED_ACK"}
		if strings.Join(events, "\n") != strings.Join(want, "\n") {
			t.Fatalf("after the move:\n%s\nwant:\n%s", strings.Join(events, "\n"), strings.Join(want, "\n"))
		}
		for i, e := range at {
			if d := e.Sub(start); d != netmon.DefaultDebounce {
				t.Errorf("%q after %v, want all at the debounce (%v): nothing may wait for a timer", events[i], d, netmon.DefaultDebounce)
			}
		}
		after := b.dp.Render()
		if strings.ReplaceAll(before, "11.1.0.2:4500", "11.2.0.2:61001") != after {
			t.Fatalf("b did not just move a's SAs:\nbefore\n%s\nafter\n%s", before, after)
		}
		if st := a.a.Network(); st.Changes != 1 || !st.Online || st.Took != "250ms" {
			t.Fatalf("network status: %+v", st)
		}

		// Offline: nothing is torn down or sent.
		mark = n.log.len()
		aState := a.dp.Render()
		off := netmon.Host("eth0", 2, lanB, netip.Addr{}, false)
		a.src.Publish(off, netmon.Msg{Kind: netmon.LinkChanged, Link: &off.Links[1]})
		time.Sleep(time.Minute)
		synctest.Wait()
		if ev, _ := n.log.since(mark); len(ev) != 0 {
			t.Fatalf("offline triggered %q", ev)
		}
		if a.dp.Render() != aState || b.dp.Render() != after {
			t.Fatal("offline changed the SAs")
		}
		if st := a.a.Network(); st.Online || st.Changes != 2 {
			t.Fatalf("offline status: %+v", st)
		}
		// Back on the same network: followed again (records, LLQs, MOVED).
		mark = n.log.len()
		a.src.Publish(moved, netmon.Msg{Kind: netmon.LinkChanged, Link: &moved.Links[1]})
		time.Sleep(netmon.DefaultDebounce)
		synctest.Wait()
		if ev, _ := n.log.since(mark); len(ev) < 4 || ev[0] != "a rediscover" || ev[1] != "a rebind" || !strings.Contains(strings.Join(ev, ","), "a sends MOVED") {
			t.Fatalf("coming back triggered %q", ev)
		}
	})
}

// TestKeepalives: NAT keepalives go to a peer only after a whole interval
// without ESP to it, never more than 1.25 intervals after the last packet,
// and not at all between two hosts without NAT.
func TestKeepalives(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := &memNet{log: &eventLog{}}
		a := newMemHost(t, n, "a", "fd00::a", "11.1.0.2:4500", netmon.Host("eth0", 2, lanA, gwA, true), nil)
		b := newMemHost(t, n, "b", "fd00::b", "11.3.0.2:4500", netmon.Host("eth0", 2, netip.MustParsePrefix("11.3.0.2/24"), netip.MustParseAddr("11.3.0.1"), true), nil)
		a.sees(b, register.Capabilities{NAT: "none"})
		b.sees(a, register.Capabilities{})
		time.Sleep(5 * time.Second)
		synctest.Wait()
		keyedAt := time.Now()

		// a is behind a NAT (its static external address is not its own):
		// idle, it sends keepalives every interval.
		time.Sleep(5 * time.Minute)
		synctest.Wait()
		sent := a.ka.sent()
		if len(sent) < 14 || len(sent) > 16 {
			t.Fatalf("%d keepalives in 5 idle minutes, want about 15", len(sent))
		}
		last := keyedAt.Add(-DefaultKeepalive)
		for _, at := range sent {
			if gap := at.Sub(last); gap > DefaultKeepalive*5/4 {
				t.Fatalf("keepalive %v after the previous one, want at most 1.25 intervals", gap)
			}
			last = at
		}
		// b is public and a says nothing about its NAT: b sends too
		// (conservative for peers that do not publish nat=).
		if nb := len(b.ka.sent()); nb < 14 {
			t.Fatalf("b sent %d keepalives to a peer of unknown NAT, want ~15", nb)
		}
		// ESP flowing: no keepalives while it does.
		quiet := len(a.ka.sent())
		for range 120 {
			a.dp.CountTx(b.ula, 1)
			time.Sleep(time.Second)
		}
		synctest.Wait()
		if got := len(a.ka.sent()) - quiet; got > 1 {
			t.Fatalf("%d keepalives while ESP was sent every second", got)
		}
		stopped := time.Now()
		time.Sleep(30 * time.Second)
		synctest.Wait()
		s := a.ka.sent()
		if len(s) <= quiet || s[len(s)-1].Sub(stopped) > DefaultKeepalive*5/4 {
			t.Fatalf("no keepalive within 1.25 intervals after ESP stopped: %v", s[quiet:])
		}
		acts := a.a.PeerActivity()
		if len(acts) != 1 || acts[0].ULA != b.ula || acts[0].LastTx.IsZero() || acts[0].Keepalives == 0 {
			t.Fatalf("activity: %+v", acts)
		}
	})
	// Two hosts without NAT: no keepalives.
	synctest.Test(t, func(t *testing.T) {
		n := &memNet{log: &eventLog{}}
		pubA := netmon.Host("eth0", 2, netip.MustParsePrefix("11.4.0.2/24"), netip.MustParseAddr("11.4.0.1"), true)
		pubB := netmon.Host("eth0", 2, netip.MustParsePrefix("11.3.0.2/24"), netip.MustParseAddr("11.3.0.1"), true)
		a := newMemHost(t, n, "a", "fd00::a", "11.4.0.2:4500", pubA, nil)
		b := newMemHost(t, n, "b", "fd00::b", "11.3.0.2:4500", pubB, nil)
		a.sees(b, register.Capabilities{NAT: "none"})
		b.sees(a, register.Capabilities{NAT: "none"})
		time.Sleep(3 * time.Minute)
		synctest.Wait()
		if na, nb := len(a.ka.sent()), len(b.ka.sent()); na+nb != 0 {
			t.Fatalf("public hosts sent %d+%d keepalives", na, nb)
		}
		if a.a.Network().BehindNAT {
			t.Fatal("a on its own public address counts as behind a NAT")
		}
	})
}

func identityFor(ula netip.Addr) identity.Identity {
	return identity.Identity{ULA: ula, EUI64: identity.EUI64{2, 0, 0, 0xff, 0xfe, 0, 0, ula.As16()[15]}, Source: "test"}
}
