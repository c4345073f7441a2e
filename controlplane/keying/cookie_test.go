package keying

import (
	"bytes"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/btmm/btmm/internal/testenv"
)

// TestMAC1MAC2: MAC1 binds a datagram to the responder's ULA and identity;
// MAC2 to the cookie its sender's address got; a cookie survives one
// rotation of the responder's secret and no more, and opens only with the
// MAC1 it answers.
func TestMAC1MAC2(t *testing.T) {
	ula := netip.MustParseAddr("fd00::b")
	id := []byte("host/b.btmm.test@BTMM.TEST")
	k1, kc := mac1Key(ula, id), cookieKey(ula, id)
	msg, _ := (&Message{Type: MsgInit, Mode: ModeKerberos, Nonce: make([]byte, 32)}).Marshal()
	from := netip.MustParseAddrPort("192.0.2.7:4500")
	now := time.Unix(1000, 0)
	var jar cookieJar
	d := addMACs(bytes.Clone(msg), k1, nil)
	var m Message
	if err := m.Unmarshal(d); err != nil || !mac1OK(&m, d, k1) {
		t.Fatalf("MAC1: %v", err)
	}
	for name, k := range map[string][]byte{
		"other ULA":      mac1Key(netip.MustParseAddr("fd00::c"), id),
		"other identity": mac1Key(ula, []byte("host/c.btmm.test@BTMM.TEST")),
		"cookie key":     kc,
	} {
		if mac1OK(&m, d, k) {
			t.Errorf("MAC1 verifies with the %s", name)
		}
	}
	if jar.mac2OK(&m, d, from, now) {
		t.Error("MAC2 OK without a MAC2")
	}
	sealed := jar.seal(kc, from, m.MAC1, now)
	if len(sealed) != sealedLen {
		t.Fatalf("sealed cookie of %d bytes", len(sealed))
	}
	if _, err := openCookie(kc, sealed, bytes.Repeat([]byte{9}, 16)); err == nil {
		t.Error("a cookie opened with another datagram's MAC1")
	}
	cookie, err := openCookie(kc, sealed, m.MAC1)
	if err != nil {
		t.Fatal(err)
	}
	d2 := addMACs(bytes.Clone(msg), k1, cookie)
	var m2 Message
	if err := m2.Unmarshal(d2); err != nil || !mac1OK(&m2, d2, k1) {
		t.Fatalf("with MAC2: %v", err)
	}
	if !jar.mac2OK(&m2, d2, from, now.Add(time.Minute)) {
		t.Error("MAC2 with a fresh cookie refused")
	}
	if jar.mac2OK(&m2, d2, netip.MustParseAddrPort("192.0.2.7:4501"), now) {
		t.Error("a cookie works from another port")
	}
	if !jar.mac2OK(&m2, d2, from, now.Add(cookieRotate+time.Second)) {
		t.Error("a cookie from just before the rotation refused")
	}
	if jar.mac2OK(&m2, d2, from, now.Add(3*cookieRotate)) {
		t.Error("a cookie two rotations old accepted")
	}
}

// TestRateLimiter: a source gets Burst at once, then Rate a second; /64s
// share a bucket; the table stays within its bound and forgets idle
// sources.
func TestRateLimiter(t *testing.T) {
	now := time.Unix(1000, 0)
	r := newRateLimiter(10, 5, 3)
	a := netip.MustParseAddr("192.0.2.1")
	n := 0
	for range 20 {
		if r.allow(a, now) {
			n++
		}
	}
	if n != 5 {
		t.Errorf("burst: %d allowed, want 5", n)
	}
	if !r.allow(a, now.Add(110*time.Millisecond)) || r.allow(a, now.Add(110*time.Millisecond)) {
		t.Error("refill at 10/s wrong")
	}
	v6a, v6b := netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::ffff")
	for range 5 {
		r.allow(v6a, now)
	}
	if r.allow(v6b, now) {
		t.Error("two addresses of one /64 have separate buckets")
	}
	if !r.allow(netip.MustParseAddr("192.0.2.5"), now) {
		t.Error("a third source refused")
	}
	if r.allow(netip.MustParseAddr("192.0.2.9"), now) || !r.full() {
		t.Error("a fourth source was admitted to a table of 3")
	}
	later := now.Add(10 * time.Second)
	if !r.allow(netip.MustParseAddr("192.0.2.9"), later) || len(r.table) != 1 {
		t.Errorf("idle sources not forgotten: %d", len(r.table))
	}
}

// TestUnderLoadCookies floods b with INIT datagrams that pass the cheap
// MAC1 check (the worst case: the flooder knows b's ULA and identity; in
// PSK mode, the PSK) from 300 source ports of one address and from 300
// spoofed addresses, for 20 seconds. b stays within its bounds
// (reassembly, rate-limiter table), asks for cookies, and a, whose INIT
// arrives in the middle of the flood, is keyed after one COOKIE round trip.
func TestUnderLoadCookies(t *testing.T) {
	testenv.HostTier(t, "synctest over an in-memory network, no kernel involved")
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), func(c *Config) { c.LoadThreshold = 16 })
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		var cookiesToA atomic.Int32
		n.tap = func(from, to netip.AddrPort, p []byte) []byte {
			if msgType(p) == MsgInit && from == addrB {
				return nil // b only answers
			}
			if msgType(p) == MsgCookie && to == addrA {
				cookiesToA.Add(1)
			}
			return p
		}
		b.peers(t, peerA)
		k1 := mac1Key(ulaB, mustPSK(t, psk1).identity(nil))
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := bigMessage(t, 1500)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				msg[5], msg[6] = byte(i), byte(i>>8) // exchange ID
				dgs, _ := datagrams(msg, k1, nil)
				var from netip.AddrPort
				if i%2 == 0 {
					from = netip.AddrPortFrom(netip.MustParseAddr("10.9.0.1"), uint16(20000+i%300))
				} else {
					from = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 8, byte(i % 300 >> 8), byte(i % 300)}), 4500)
				}
				n.inject(from, addrB, dgs[0]) // first pieces only: they hold reassembly slots
				time.Sleep(time.Millisecond)
			}
		}()
		time.Sleep(5 * time.Second)
		a.peers(t, peerB)
		time.Sleep(15 * time.Second)
		close(stop)
		wg.Wait()
		synctest.Wait()
		st, err := b.agent.Stats(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("b: %+v", st)
		if !a.status(t).Established || !b.status(t).Established {
			t.Fatalf("a was not keyed during the flood: a %+v, b %+v", a.status(t), b.status(t))
		}
		if cookiesToA.Load() == 0 {
			t.Error("a got no COOKIE: b was not under load")
		}
		if st.RateLimited == 0 || st.CookiesSent == 0 {
			t.Errorf("no rate limiting or cookies: %+v", st)
		}
		if err := b.agent.do(t.Context(), func() {
			if len(b.agent.reasm.bufs) > maxReassembly || len(b.agent.limiter.table) > maxSources {
				t.Errorf("bounds exceeded: %d in reassembly, %d sources", len(b.agent.reasm.bufs), len(b.agent.limiter.table))
			}
		}); err != nil {
			t.Fatal(err)
		}
		pa, _ := a.rec.peer(ulaB)
		pb, _ := b.rec.peer(ulaA)
		pairOK(t, pa, pb)
	})
}

// initiatorUnderTest is an agent a (PSK) that has sent its INIT to b and
// waits for the RESP, with what it sent.
func initiatorUnderTest(t testing.TB, psk []byte) (a *Agent, rec *recorder, n *memNet, init [][]byte) {
	n = newMemNet()
	n.tap = func(from, to netip.AddrPort, p []byte) []byte {
		if to == addrB {
			init = append(init, bytes.Clone(p))
		}
		return nil
	}
	rec = newRecorder("a")
	a, err := New(Config{ULA: ulaA, Auth: &PSK{secret: psk}, Transport: n.endpoint(addrA.String()), Installer: rec,
		Now: func() time.Time { return time.Unix(1000, 0) }})
	if err != nil {
		t.Fatal(err)
	}
	a.ctx = t.Context()
	a.setPeers([]PeerConfig{peerB})
	p := a.peers[ulaB]
	a.start(p, time.Unix(1000, 0))
	a.onAuth(<-a.authDone)
	if p.ex == nil || p.ex.phase != waitResp || len(init) == 0 {
		t.Fatalf("no INIT sent: %+v", p.ex)
	}
	return a, rec, n, init
}

// FuzzInitiatorInput feeds arbitrary datagrams to an initiator waiting for
// its RESP (the side that handles RESP, its FRAGMENTs, COOKIE and ERROR):
// it must never panic, never install anything (no input can be the
// genuine RESP without b's secret half), never end the attempt on anything
// unauthenticated, and never answer with more bytes than it received.
func FuzzInitiatorInput(f *testing.F) {
	psk := bytes.Repeat([]byte("0123456789abcdef"), 3)
	_, _, _, init := initiatorUnderTest(f, psk)
	var m Message
	if err := m.Unmarshal(init[0]); err != nil {
		f.Fatal(err)
	}
	ex := m.Exchange
	for _, seed := range []*Message{
		{Type: MsgError, Mode: ModePSK, Exchange: ex, Code: CodeUnknownPeer, Text: "x"},
		{Type: MsgError, Mode: ModePSK, Exchange: ex, Code: CodeReplay, MAC: make([]byte, macLen)},
		{Type: MsgCookie, Mode: ModePSK, Exchange: ex, Cookie: make([]byte, sealedLen)},
		{Type: MsgFragment, Mode: ModePSK, Exchange: ex, Frag: Fragment{Of: MsgResp, Count: 2}, Data: []byte("piece")},
		{Type: MsgResp, Mode: ModePSK, Exchange: ex, Nonce: make([]byte, 32), SPI: 0x999, ULA: ulaB, Cipher: CipherAES256GCM,
			X25519: make([]byte, 32), MLKEM: make([]byte, mlkemCTLen), MAC: make([]byte, macLen)},
	} {
		b, err := seed.Marshal()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		a, rec, n, _ := initiatorUnderTest(t, psk)
		n.tap = func(_, _ netip.AddrPort, p []byte) []byte {
			if len(p) > len(b) && msgType(p) != MsgInit { // a fresh INIT after a COOKIE is a retransmission, not an answer
				t.Errorf("answered %d bytes to a %d-byte datagram", len(p), len(b))
			}
			return nil
		}
		a.onDatagram(datagram{b: bytes.Clone(b), from: addrB})
		if c := rec.Calls(); len(c) > 0 {
			t.Errorf("installed %q", c)
		}
		if p := a.peers[ulaB]; p.ex == nil || p.lastErr != nil {
			t.Errorf("the attempt ended on unauthenticated input: %v", p.lastErr)
		}
	})
}
