package peers

import (
	"context"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/btmm/btmm/dns/register"
	"github.com/miekg/dns"
)

// fakeZone is a Watcher over an in-memory record set: every watch gets the
// current answer at once and again after each change (like an LLQ).
type fakeZone struct {
	mu      sync.Mutex
	rrs     []dns.RR
	watches map[int]fakeWatch
	n       int
}

type fakeWatch struct {
	name  string
	qtype uint16
	fn    func([]dns.RR)
}

func (z *fakeZone) Watch(name string, qtype uint16, fn func([]dns.RR)) func() {
	z.mu.Lock()
	z.n++
	id := z.n
	if z.watches == nil {
		z.watches = map[int]fakeWatch{}
	}
	w := fakeWatch{dns.CanonicalName(name), qtype, fn}
	z.watches[id] = w
	ans := z.answerLocked(w)
	z.mu.Unlock()
	go fn(ans)
	return func() { z.mu.Lock(); delete(z.watches, id); z.mu.Unlock() }
}

func (z *fakeZone) answerLocked(w fakeWatch) []dns.RR {
	var out []dns.RR
	for _, rr := range z.rrs {
		if strings.EqualFold(rr.Header().Name, w.name) && rr.Header().Rrtype == w.qtype {
			out = append(out, rr)
		}
	}
	return out
}

func (z *fakeZone) watching() int {
	z.mu.Lock()
	defer z.mu.Unlock()
	return len(z.watches)
}

func (z *fakeZone) set(add []string, del ...string) {
	z.mu.Lock()
	for _, d := range del {
		rr, _ := dns.NewRR(d)
		var keep []dns.RR
		for _, x := range z.rrs {
			if !dns.IsDuplicate(x, rr) {
				keep = append(keep, x)
			}
		}
		z.rrs = keep
	}
	for _, a := range add {
		rr, err := dns.NewRR(a)
		if err != nil {
			panic(err)
		}
		z.rrs = append(z.rrs, rr)
	}
	var calls []func()
	for _, w := range z.watches {
		ans := z.answerLocked(w)
		fn := w.fn
		calls = append(calls, func() { fn(ans) })
	}
	z.mu.Unlock()
	for _, c := range calls {
		c()
	}
}

func hostRecords(host, ula, target, a string, port string, txt string) []string {
	d := "alice.btmm.example."
	return []string{
		"_autotunnel._udp." + d + " 60 IN PTR _autotunnel._udp." + host + "." + d,
		host + "." + d + " 60 IN AAAA " + ula,
		"_autotunnel._udp." + host + "." + d + " 60 IN SRV 0 0 " + port + " " + target + "." + d,
		"_autotunnel._udp." + host + "." + d + " 60 IN TXT " + txt,
		target + "." + d + " 60 IN A " + a,
	}
}

func next(t *testing.T, tr *Tracker) Event {
	t.Helper()
	time.Sleep(time.Second) // past Config.Settle
	synctest.Wait()
	select {
	case ev := <-tr.Events():
		return ev
	default:
		t.Fatal("no event")
		return Event{}
	}
}

func TestTrackerEvents(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		z := &fakeZone{}
		// Our own records are ignored.
		z.set(hostRecords("laptop", "fd00::1", "AutoTunnel-00-00-00-FF-FE-00-00-01", "11.0.0.1", "4500", `"txtvers=1" "proto=1"`))
		tr := New(Config{Domain: "alice.btmm.example", Self: "laptop.alice.btmm.example."}, z, nil)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		go func() { done <- tr.Run(ctx) }()
		time.Sleep(time.Second)
		synctest.Wait()
		if len(tr.Events()) != 0 || z.watching() != 1 {
			t.Fatalf("self tracked: %d events, %d watches", len(tr.Events()), z.watching())
		}
		z.set(hostRecords("desktop", "fd00::2", "AutoTunnel-00-00-00-FF-FE-00-00-02", "11.0.0.2", "61000", `"txtvers=1" "proto=1" "dp=xfrm,ebpf" "kport=4500"`))
		ev := next(t, tr)
		want := Peer{Name: "desktop.alice.btmm.example.", ULA: netip.MustParseAddr("fd00::2"), Outer: netip.MustParseAddrPort("11.0.0.2:61000"),
			Capabilities: register.Capabilities{Version: 1, Dataplanes: []string{"xfrm", "ebpf"}, KeyingPort: 4500}}
		if ev.Kind != Added || !ev.Peer.Equal(want) {
			t.Errorf("got %v %v, want added %v", ev.Kind, ev.Peer, want)
		}
		if z.watching() != 5 {
			t.Errorf("%d watches, want browse + AAAA/SRV/TXT/A of one peer", z.watching())
		}
		// NAT moved: new A.
		z.set([]string{"AutoTunnel-00-00-00-FF-FE-00-00-02.alice.btmm.example. 60 IN A 11.0.0.20"},
			"AutoTunnel-00-00-00-FF-FE-00-00-02.alice.btmm.example. 60 IN A 11.0.0.2")
		ev = next(t, tr)
		if ev.Kind != Changed || ev.Peer.Outer != netip.MustParseAddrPort("11.0.0.20:61000") {
			t.Errorf("got %v %v, want changed outer", ev.Kind, ev.Peer)
		}
		// Target renamed: the old A watch goes, the new one comes.
		z.set([]string{"_autotunnel._udp.desktop.alice.btmm.example. 60 IN SRV 0 0 61001 t2.alice.btmm.example.", "t2.alice.btmm.example. 60 IN A 11.0.0.30"},
			"_autotunnel._udp.desktop.alice.btmm.example. 60 IN SRV 0 0 61000 AutoTunnel-00-00-00-FF-FE-00-00-02.alice.btmm.example.")
		ev = next(t, tr)
		if ev.Kind != Changed || ev.Peer.Outer != netip.MustParseAddrPort("11.0.0.30:61001") {
			t.Errorf("got %v %v, want changed to the new target", ev.Kind, ev.Peer)
		}
		if z.watching() != 5 {
			t.Errorf("%d watches after target change, want 5", z.watching())
		}
		// A non-ULA AAAA is not a peer identity: removed.
		z.set([]string{"desktop.alice.btmm.example. 60 IN AAAA 2001:db8::1"}, "desktop.alice.btmm.example. 60 IN AAAA fd00::2")
		if ev = next(t, tr); ev.Kind != Removed {
			t.Errorf("got %v, want removed", ev.Kind)
		}
		z.set([]string{"desktop.alice.btmm.example. 60 IN AAAA fd00::2"})
		if ev = next(t, tr); ev.Kind != Added {
			t.Errorf("got %v, want added", ev.Kind)
		}
		// Bad TXT: still a peer, no capabilities.
		z.set([]string{`_autotunnel._udp.desktop.alice.btmm.example. 60 IN TXT "txtvers=9"`},
			`_autotunnel._udp.desktop.alice.btmm.example. 60 IN TXT "txtvers=1" "proto=1" "dp=xfrm,ebpf" "kport=4500"`)
		if ev = next(t, tr); ev.Kind != Changed || len(ev.Peer.Capabilities.Dataplanes) != 0 {
			t.Errorf("got %v %+v", ev.Kind, ev.Peer)
		}
		// The peer rebooted: new ULA = removed + added.
		z.set([]string{"desktop.alice.btmm.example. 60 IN AAAA fd00::3"}, "desktop.alice.btmm.example. 60 IN AAAA fd00::2")
		time.Sleep(time.Second)
		synctest.Wait()
		if len(tr.Events()) != 2 {
			t.Fatalf("%d events for a ULA change, want 2", len(tr.Events()))
		}
		if ev1, ev2 := <-tr.Events(), <-tr.Events(); ev1.Kind != Removed || ev1.Peer.ULA != netip.MustParseAddr("fd00::2") ||
			ev2.Kind != Added || ev2.Peer.ULA != netip.MustParseAddr("fd00::3") {
			t.Errorf("ULA change gave %v %v, %v %v", ev1.Kind, ev1.Peer, ev2.Kind, ev2.Peer)
		}
		// PTR gone (host shut down): removed, and its watches stopped.
		z.set(nil, "_autotunnel._udp.alice.btmm.example. 60 IN PTR _autotunnel._udp.desktop.alice.btmm.example.")
		if ev = next(t, tr); ev.Kind != Removed || ev.Peer.Name != "desktop.alice.btmm.example." {
			t.Errorf("got %v %v, want removed", ev.Kind, ev.Peer)
		}
		if z.watching() != 1 || len(tr.Peers()) != 0 {
			t.Errorf("after removal: %d watches, peers %v", z.watching(), tr.Peers())
		}
		cancel()
		<-done
		if _, ok := <-tr.Events(); ok {
			t.Error("Events not closed after Run")
		}
		if z.watching() != 0 {
			t.Errorf("%d watches left after Run", z.watching())
		}
	})
}

type runZone struct{ *fakeZone }

func (runZone) Run(ctx context.Context) error { <-ctx.Done(); return nil }

func TestFollow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		z := &fakeZone{}
		ctx, cancel := context.WithCancel(t.Context())
		var got []Event
		done := make(chan error)
		go func() {
			done <- Follow(ctx, runZone{z}, Config{Domain: "alice.btmm.example."}, nil, func(ev Event) { got = append(got, ev) })
		}()
		synctest.Wait()
		z.set(hostRecords("desktop", "fd00::2", "t2", "11.0.0.2", "4500", `"txtvers=1"`))
		time.Sleep(time.Second)
		synctest.Wait()
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0].Kind != Added || got[0].Peer.Outer != netip.MustParseAddrPort("11.0.0.2:4500") {
			t.Errorf("events = %v", got)
		}
		if z.watching() != 0 {
			t.Errorf("%d watches left", z.watching())
		}
	})
}

// An IPv6-only host publishes no SRV or A (it has no IPv4 endpoint): it is a
// peer with an invalid Outer as long as its TXT carries a global c-v6
// endpoint, and not a peer without one.
func TestTrackerIPv6Only(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := "alice.btmm.example."
		v6only := func(host, ula, txt string) []string {
			return []string{
				"_autotunnel._udp." + d + " 60 IN PTR _autotunnel._udp." + host + "." + d,
				host + "." + d + " 60 IN AAAA " + ula,
				"_autotunnel._udp." + host + "." + d + " 60 IN TXT " + txt,
			}
		}
		z := &fakeZone{}
		tr := New(Config{Domain: "alice.btmm.example", Self: "laptop.alice.btmm.example."}, z, nil)
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go func() { _ = tr.Run(ctx) }()
		// No c-v6 (only an IPv4 LAN candidate, no SRV): nowhere to reach it.
		z.set(v6only("nov6", "fd00::5", `"txtvers=1" "proto=1" "c-lan=192.168.1.5:4500"`))
		// A c-v6 with a ULA is no outer address either.
		z.set(v6only("ulav6", "fd00::6", `"txtvers=1" "proto=1" "c-v6=[fd00::6]:4500"`))
		time.Sleep(time.Second)
		synctest.Wait()
		if n := len(tr.Events()); n != 0 {
			t.Fatalf("%d events for hosts with no endpoint, want none: %v", n, <-tr.Events())
		}
		z.set(v6only("v6only", "fd00::4", `"txtvers=1" "proto=1" "kport=4500" "c-v6=[2001:db8:4::2]:4500"`))
		ev := next(t, tr)
		want := Peer{Name: "v6only." + d, ULA: netip.MustParseAddr("fd00::4"),
			Capabilities: register.Capabilities{Version: 1, KeyingPort: 4500,
				Candidates: []register.Candidate{{Kind: CandidateIPv6, Addr: netip.MustParseAddrPort("[2001:db8:4::2]:4500")}}}}
		if ev.Kind != Added || !ev.Peer.Equal(want) || ev.Peer.Outer.IsValid() {
			t.Fatalf("got %v %v, want added %v", ev.Kind, ev.Peer, want)
		}
		// It gains IPv4 (SRV + A): same peer, now with its ESP-in-UDP endpoint.
		tgt := "AutoTunnel-00-00-00-FF-FE-00-00-04." + d
		z.set([]string{"_autotunnel._udp.v6only." + d + " 60 IN SRV 0 0 4500 " + tgt, tgt + " 60 IN A 11.0.0.4"})
		if ev = next(t, tr); ev.Kind != Changed || ev.Peer.Outer != netip.MustParseAddrPort("11.0.0.4:4500") {
			t.Fatalf("got %v %v, want changed to 11.0.0.4:4500", ev.Kind, ev.Peer)
		}
		// And loses it again: back to IPv6 only, not removed.
		z.set(nil, "_autotunnel._udp.v6only."+d+" 60 IN SRV 0 0 4500 "+tgt, tgt+" 60 IN A 11.0.0.4")
		if ev = next(t, tr); ev.Kind != Changed || ev.Peer.Outer.IsValid() || ev.Peer.ULA != want.ULA {
			t.Fatalf("got %v %v, want changed to no IPv4 endpoint", ev.Kind, ev.Peer)
		}
		// Its c-v6 goes: nothing left to reach it by.
		z.set([]string{`_autotunnel._udp.v6only.` + d + ` 60 IN TXT "txtvers=1" "proto=1"`},
			`_autotunnel._udp.v6only.`+d+` 60 IN TXT "txtvers=1" "proto=1" "kport=4500" "c-v6=[2001:db8:4::2]:4500"`)
		if ev = next(t, tr); ev.Kind != Removed || ev.Peer.ULA != want.ULA {
			t.Fatalf("got %v %v, want removed", ev.Kind, ev.Peer)
		}
	})
}
