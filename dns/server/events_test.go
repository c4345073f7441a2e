package server

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llq"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/miekg/dns"
)

// TestSendEventsSignsAndBatches drives the event sender directly: 1,200
// events for 300 keys to three sockets, enough for the split over workers
// and for several sendmmsg batches. Every datagram arrives and verifies with
// its LLQ's key; after a key is replaced its events verify with the new
// secret only; an event whose key is gone goes unsigned.
func TestSendEventsSignsAndBatches(t *testing.T) {
	var calls []int // OnEvents: the events of each SendEvents
	var took time.Duration
	s, err := New(Config{Zone: "btmm.example.", DataDir: t.TempDir(), Listen: "127.0.0.1:0",
		OnEvents: func(n int, d time.Duration) { calls = append(calls, n); took += d }}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var keys []tsig.Key
	for i := range 300 {
		k, err := tsig.NewKey(fmt.Sprintf("h%d.u.btmm.example.", i), "")
		if err != nil {
			t.Fatal(err)
		}
		s.keys.Add(k)
		keys = append(keys, k)
	}
	var socks []*net.UDPConn
	for range 3 {
		c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadBuffer(4 << 20)
		defer c.Close()
		socks = append(socks, c)
	}
	event := func(i int, key string) llq.Event {
		m := new(dns.Msg)
		m.Id = uint16(i)
		m.Response = true
		m.Question = []dns.Question{{Name: "n.u.btmm.example.", Qtype: dns.TypeAAAA, Qclass: dns.ClassINET}}
		llq.SetOption(m, dns.EDNS0_LLQ{Version: llq.Version, Opcode: llq.OpEvent, Id: uint64(i)})
		wire, err := m.Pack()
		if err != nil {
			t.Fatal(err)
		}
		return llq.Event{Peer: llq.Peer{Net: "udp", Addr: socks[i%3].LocalAddr().String()}, Key: key, Wire: wire, LLQ: uint64(i)}
	}
	// receive reads n datagrams and returns them by message ID.
	receive := func(n int) map[uint16][]byte {
		got := map[uint16][]byte{}
		for _, c := range socks {
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
		}
		for _, c := range socks {
			for range n / 3 {
				buf := make([]byte, 1500)
				k, err := c.Read(buf)
				if err != nil {
					t.Fatalf("%d of %d events arrived: %v", len(got), n, err)
				}
				got[uint16(buf[0])<<8|uint16(buf[1])] = buf[:k]
			}
		}
		return got
	}
	send := newEventSender(s)
	var evs []llq.Event
	for i := range 1200 {
		evs = append(evs, event(i, keys[i%300].Name))
	}
	if err := send.SendEvents(evs); err != nil {
		t.Fatal(err)
	}
	got := receive(1200)
	for i := range 1200 {
		raw := got[uint16(i)]
		if raw == nil {
			t.Fatalf("event %d missing", i)
		}
		if _, err := keys[i%300].VerifyResponse(raw, ""); err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
	}

	// Key 0 replaced (same name, new secret), key 1 removed.
	fresh, _ := tsig.NewKey(keys[0].Name, "")
	s.keys.Add(fresh)
	s.keys.Remove(keys[1].Name)
	if err := send.SendEvents([]llq.Event{event(0, keys[0].Name), event(1, keys[1].Name), event(2, keys[2].Name)}); err != nil {
		t.Fatal(err)
	}
	got = receive(3)
	if _, err := fresh.VerifyResponse(got[0], ""); err != nil {
		t.Errorf("after the key was replaced: %v", err)
	}
	if _, err := keys[0].VerifyResponse(got[0], ""); err == nil {
		t.Error("signed with the replaced secret")
	}
	if m := new(dns.Msg); m.Unpack(got[1]) != nil || m.IsTsig() != nil {
		t.Errorf("event for a removed key: want it unsigned, got %v", m)
	}
	if _, err := keys[2].VerifyResponse(got[2], ""); err != nil {
		t.Errorf("unchanged key: %v", err)
	}
	if fmt.Sprint(calls) != "[1200 3]" || took <= 0 {
		t.Errorf("OnEvents: calls %v, took %v; want [1200 3], > 0", calls, took)
	}
}
