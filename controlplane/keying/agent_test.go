package keying

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/btmm/btmm/controlplane"
)

var (
	ulaA  = netip.MustParseAddr("fd00::a")
	ulaB  = netip.MustParseAddr("fd00::b")
	addrA = netip.MustParseAddrPort("10.0.0.1:4500")
	addrB = netip.MustParseAddrPort("10.0.0.2:4500")
	psk1  = bytes.Repeat([]byte("0123456789abcdef"), 3)
	psk2  = bytes.Repeat([]byte("fedcba9876543210"), 3)
)

type node struct {
	agent *Agent
	rec   *recorder
	ep    *memEP
}

// startNode runs an agent on the in-memory network until the test ends.
func startNode(t *testing.T, n *memNet, name string, ula netip.Addr, addr netip.AddrPort, auth Auth, mod func(*Config)) *node {
	t.Helper()
	nd := &node{rec: newRecorder(name), ep: n.endpoint(addr.String())}
	cfg := Config{ULA: ula, Auth: auth, Transport: nd.ep, Installer: nd.rec, SALifetime: 10 * time.Minute}
	if mod != nil {
		mod(&cfg)
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	nd.agent = a
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done; nd.ep.Close() })
	return nd
}

func mustPSK(t *testing.T, b []byte) *PSK {
	t.Helper()
	p, err := NewPSK(b)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (nd *node) peers(t *testing.T, ps ...PeerConfig) {
	t.Helper()
	if err := nd.agent.SetPeers(context.Background(), ps); err != nil {
		t.Fatal(err)
	}
}

func (nd *node) status(t *testing.T) PeerStatus {
	t.Helper()
	st, err := nd.agent.Status(context.Background())
	if err != nil || len(st) != 1 {
		t.Fatalf("status: %v %v", st, err)
	}
	return st[0]
}

var (
	peerA = PeerConfig{Name: "a", ULA: ulaA, Outer: addrA}
	peerB = PeerConfig{Name: "b", ULA: ulaB, Outer: addrB}
)

// msgType is the type of the message a datagram carries (all or part of).
func msgType(b []byte) MsgType {
	var m Message
	if m.Unmarshal(b) != nil {
		return 0
	}
	if m.Type == MsgFragment {
		return m.Frag.Of
	}
	return m.Type
}

// firstPiece reports whether b is a whole message or its first fragment,
// so a tap counts each transmission once.
func firstPiece(b []byte) bool {
	var m Message
	return m.Unmarshal(b) == nil && (m.Type != MsgFragment || m.Frag.Index == 0)
}

// flipAt changes bit 0 of byte i of a message.
func flipAt(b []byte, i int) []byte { b[i] ^= 0x01; return b }

// TestSimultaneousStartConverges: both hosts start keying at the same
// instant; the tie-break keeps the lower ULA's exchange, so each side
// installs exactly one SA pair and the two views match.
func TestSimultaneousStartConverges(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		var mu sync.Mutex
		var inits []netip.AddrPort
		up := false
		n.tap = func(from, to netip.AddrPort, b []byte) []byte {
			mu.Lock()
			defer mu.Unlock()
			if !up {
				return nil // the network comes up after both have started
			}
			if msgType(b) == MsgInit {
				inits = append(inits, from)
			}
			return b
		}
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		a.peers(t, peerB)
		b.peers(t, peerA)
		time.Sleep(100 * time.Millisecond)
		mu.Lock()
		up = true // both retransmit their INIT at 500 ms: crossing INITs
		mu.Unlock()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		if !slices.Contains(inits, addrA) || !slices.Contains(inits, addrB) {
			t.Fatalf("not a simultaneous start: INITs from %v", inits)
		}
		if ca, cb := a.rec.Calls(), b.rec.Calls(); len(ca) != 1 || len(cb) != 1 {
			t.Fatalf("want one install each, got\na: %q\nb: %q", ca, cb)
		}
		pa, _ := a.rec.peer(ulaB)
		pb, _ := b.rec.peer(ulaA)
		pairOK(t, pa, pb)
		if pa.Outer != addrB || pb.Outer != addrA {
			t.Errorf("outer addresses %v / %v", pa.Outer, pb.Outer)
		}
		if sa, sb := a.status(t), b.status(t); !sa.Initiator || sb.Initiator || !sa.Established || !sb.Established {
			t.Errorf("lower ULA should be the initiator: a %+v, b %+v", sa, sb)
		}
	})
}

// TestRekeyMakeBeforeBreak rekeys three times and checks after every
// dataplane change on either side that whatever each host sends with is
// accepted by the other: no instant exists at which a packet would be lost.
func TestRekeyMakeBeforeBreak(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		var mu sync.Mutex
		var violations []string
		checks := 0
		check := func() {
			pa, okA := a.rec.peer(ulaB)
			pb, okB := b.rec.peer(ulaA)
			if !okA || !okB {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			checks++
			if !accepts(pb, pa.Out) {
				violations = append(violations, "b would drop a's "+pa.Out.String())
			}
			if !accepts(pa, pb.Out) {
				violations = append(violations, "a would drop b's "+pb.Out.String())
			}
		}
		a.rec.onChange, b.rec.onChange = check, check
		a.peers(t, peerB)
		b.peers(t, peerA)
		time.Sleep(time.Minute)
		first := a.status(t)
		time.Sleep(30 * time.Minute) // rekeys at 8, 16 and 24 minutes (80% of 10)
		synctest.Wait()
		mu.Lock()
		if len(violations) > 0 {
			t.Errorf("make-before-break violated:\n%s", strings.Join(violations, "\n"))
		}
		mu.Unlock()
		last := a.status(t)
		if last.Out.SPI == first.Out.SPI || last.In.SPI == first.In.SPI {
			t.Fatalf("no rekey: %v / %v", first, last)
		}
		if want := first.At.Add(24 * time.Minute); !last.At.Equal(want) {
			t.Errorf("last keying at %v, want %v (three rekeys at 80%% of the lifetime)", last.At, want)
		}
		pa, _ := a.rec.peer(ulaB)
		pb, _ := b.rec.peer(ulaA)
		pairOK(t, pa, pb)
		if len(pa.PrevIn) != 0 || len(pb.PrevIn) != 0 {
			t.Errorf("old inbound SAs not released: a %v, b %v", pa.PrevIn, pb.PrevIn)
		}
		// b's sequence for a rekey: new In beside the old Out, then the switch.
		calls := b.rec.Calls()
		if len(calls) < 4 {
			t.Fatalf("b calls: %q", calls)
		}
		if checks < 12 {
			t.Errorf("only %d invariant checks ran", checks)
		}
		t.Logf("a: %q", a.rec.Calls())
		t.Logf("b: %q", calls)
	})
}

// TestRetransmitSchedule drops a's first two INITs: the third, 0.5 s + 1 s
// later, gets through.
func TestRetransmitSchedule(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		t0 := time.Now()
		n.tap = func(from, to netip.AddrPort, b []byte) []byte {
			if msgType(b) == MsgInit {
				if from == addrB {
					return nil // only a initiates in this test
				}
				if time.Since(t0) < time.Second {
					return nil // the transmissions at 0 and 0.5 s
				}
			}
			return b
		}
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		b.peers(t, peerA)
		a.peers(t, peerB)
		time.Sleep(10 * time.Second)
		synctest.Wait()
		st := a.status(t)
		if !st.Established || st.At.Sub(t0) != 1500*time.Millisecond {
			t.Fatalf("established=%v after %v, want 1.5s (%+v)", st.Established, st.At.Sub(t0), st)
		}
	})
}

// TestTimeoutAndBackoff: nobody answers. INITs go out at 0, .5, 1.5, 3.5,
// 7.5, 15.5 and 23.5 s; the attempt fails at 31.5 s with ErrTimeout and the
// next starts 2 s later.
func TestTimeoutAndBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		var mu sync.Mutex
		var sent []time.Duration
		t0 := time.Now()
		n.tap = func(from, to netip.AddrPort, b []byte) []byte {
			if firstPiece(b) {
				mu.Lock()
				sent = append(sent, time.Since(t0))
				mu.Unlock()
			}
			return b
		}
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		a.peers(t, peerB)
		time.Sleep(32 * time.Second)
		synctest.Wait()
		if err := a.status(t).LastError; !errors.Is(err, ErrTimeout) {
			t.Fatalf("LastError = %v, want ErrTimeout", err)
		}
		time.Sleep(1900 * time.Millisecond)
		synctest.Wait()
		mu.Lock()
		defer mu.Unlock()
		want := []time.Duration{0, 500 * time.Millisecond, 1500 * time.Millisecond, 3500 * time.Millisecond,
			7500 * time.Millisecond, 15500 * time.Millisecond, 23500 * time.Millisecond, 33500 * time.Millisecond}
		if !slices.Equal(sent, want) {
			t.Fatalf("INITs sent at %v, want %v", sent, want)
		}
	})
}

// TestRefusalsInstallNothing: an INIT or RESP changed on the way, or a
// wrong pre-shared key, install nothing and end in a clear error. What the
// responder sees depends on who changed it: a byte changed by someone
// without the MAC1 key (in PSK mode, anyone without the PSK) is dropped by
// the cheap check; one re-tagged by someone with it is refused by the
// INIT's MAC. Either way the initiator's attempt ends with ErrTimeout, the
// responder's unauthenticated refusal being only a hint in it.
func TestRefusalsInstallNothing(t *testing.T) {
	for _, tt := range []struct {
		name     string
		pskB     []byte
		tap      func(from, to netip.AddrPort, b []byte) []byte
		tamper   func(t MsgType, msg []byte) []byte // on a
		tamperB  func(t MsgType, msg []byte) []byte
		wantA    []error
		wantB    error  // nil: b saw nothing it could blame on a
		wantMAC1 bool   // b dropped a's INIT at the cheap check
		wantText string // in a's error
		reason   string // a's failures metric (Stats.Failures)
		wantBRec bool   // b (responder) legitimately installed
	}{
		{
			name: "INIT changed without the MAC1 key",
			pskB: psk1,
			tap: func(from, to netip.AddrPort, b []byte) []byte {
				if msgType(b) == MsgInit && firstPiece(b) {
					return flipAt(b, headerLen+12) // inside the first piece's data
				}
				return b
			},
			wantA: []error{ErrTimeout}, wantMAC1: true, reason: "timeout",
		},
		{
			name: "INIT changed and re-tagged",
			pskB: psk1,
			tamper: func(t MsgType, msg []byte) []byte {
				if t == MsgInit {
					return flipAt(msg, headerLen+3) // first nonce byte
				}
				return msg
			},
			wantA: []error{ErrTimeout, ErrPeerRefused, ErrTampered}, wantB: ErrTampered, reason: "tampered",
		},
		{name: "wrong PSK", pskB: psk2, wantA: []error{ErrTimeout}, wantMAC1: true, wantText: "do the PSK files differ?", reason: "timeout"},
		{
			name: "RESP changed",
			pskB: psk1,
			tamperB: func(t MsgType, msg []byte) []byte {
				if t == MsgResp {
					return flipAt(msg, headerLen+3)
				}
				return msg
			},
			wantA: []error{ErrTimeout, ErrTampered}, reason: "tampered",
			wantBRec: true, // unconfirmed, and dropped once the CONFIRM never comes
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				n := newMemNet()
				n.tap = func(from, to netip.AddrPort, b []byte) []byte {
					if msgType(b) == MsgInit && from == addrB {
						return nil // b only answers
					}
					if tt.tap != nil {
						return tt.tap(from, to, b)
					}
					return b
				}
				a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
				b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, tt.pskB), nil)
				a.agent.tamper, b.agent.tamper = tt.tamper, tt.tamperB
				b.peers(t, peerA)
				a.peers(t, peerB)
				time.Sleep(10 * time.Second) // b's own attempts (dropped) fail at 31.5 s
				synctest.Wait()
				errB := b.status(t).LastError
				t.Logf("b: %v", errB)
				if tt.wantB != nil && !errors.Is(errB, tt.wantB) {
					t.Errorf("b: LastError = %v, want %v", errB, tt.wantB)
				}
				if tt.wantB == nil && !tt.wantBRec && errB != nil {
					t.Errorf("b: LastError = %v, want none", errB)
				}
				time.Sleep(30 * time.Second)
				synctest.Wait()
				if c := a.rec.Calls(); len(c) != 0 {
					t.Errorf("a installed %q", c)
				}
				if c := b.rec.Calls(); len(c) != 0 && !tt.wantBRec {
					t.Errorf("b installed %q", c)
				}
				err := a.status(t).LastError
				for _, want := range tt.wantA {
					if !errors.Is(err, want) {
						t.Errorf("a: LastError = %v, want %v", err, want)
					}
				}
				t.Logf("a: %v", err)
				if err == nil || !strings.Contains(err.Error(), tt.wantText) {
					t.Errorf("a: LastError = %v, want it to say %q", err, tt.wantText)
				}
				if as, _ := a.agent.Stats(t.Context()); as.Attempts == 0 || as.Failures[tt.reason] == 0 {
					t.Errorf("a's stats: %d attempts, failures %v, want one by %q", as.Attempts, as.Failures, tt.reason)
				}
				st, _ := b.agent.Stats(t.Context())
				if tt.wantMAC1 && st.BadMAC1 == 0 {
					t.Errorf("b's cheap check dropped nothing: %+v", st)
				}
			})
		})
	}
}

// TestReplayedInit replays a's INIT to b: while the retransmission cache
// holds it, b resends its RESP (no new SAs); later it is refused as a
// replay (an authenticated ERROR: b verified the INIT's MAC); once older
// than the clock skew, as skewed. Nothing is installed.
func TestReplayedInit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		var mu sync.Mutex
		var captured [][]byte
		inits := map[[8]byte][][]byte{}
		var errorsToAttacker []ErrorCode
		var authenticated []bool
		attacker := netip.MustParseAddrPort("10.6.6.6:4500")
		n.tap = func(from, to netip.AddrPort, b []byte) []byte {
			mu.Lock()
			defer mu.Unlock()
			var m Message
			if m.Unmarshal(b) == nil {
				typ := msgType(b)
				// Capture the INIT b accepted (the one its first RESP answers).
				if typ == MsgInit && from == addrA {
					inits[m.Exchange] = append(inits[m.Exchange], bytes.Clone(b))
				}
				if typ == MsgResp && captured == nil {
					captured = inits[m.Exchange]
				}
				if typ == MsgInit && from == addrB {
					return nil
				}
				if m.Type == MsgError && to == attacker {
					errorsToAttacker = append(errorsToAttacker, m.Code)
					authenticated = append(authenticated, m.MAC != nil)
				}
			}
			return b
		}
		n.endpoint(attacker.String())
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		b.peers(t, peerA) // b knows a before a's first INIT: exactly one INIT is answered
		a.peers(t, peerB)
		time.Sleep(5 * time.Second)
		synctest.Wait()
		before := b.rec.Calls()
		mu.Lock()
		if captured == nil {
			t.Fatal("no INIT was answered")
		}
		mu.Unlock()
		if len(before) == 0 {
			t.Fatal("no keying")
		}
		replay := func() {
			for _, d := range captured {
				n.inject(attacker, addrB, d)
			}
			synctest.Wait()
		}
		replay() // within the cache: answered again
		time.Sleep(time.Minute)
		replay() // replay
		if err := b.status(t).LastError; !errors.Is(err, ErrReplay) {
			t.Errorf("b: LastError = %v, want ErrReplay", err)
		}
		time.Sleep(5 * time.Minute)
		replay() // too old
		if after := b.rec.Calls(); !slices.Equal(before, after[:len(before)]) || len(after) != len(before) {
			t.Errorf("replays changed b's SAs:\nbefore %q\nafter  %q", before, after)
		}
		mu.Lock()
		defer mu.Unlock()
		if !slices.Equal(errorsToAttacker, []ErrorCode{CodeReplay, CodeClockSkew}) || !slices.Equal(authenticated, []bool{true, false}) {
			t.Errorf("ERRORs to the attacker: %v (authenticated %v), want replay (authenticated), clock skew", errorsToAttacker, authenticated)
		}
		if st := b.status(t); !st.Established || st.LastError == nil {
			t.Errorf("b: %+v", st)
		}
	})
}

// TestDeleteOnShutdown: when a stops, b receives an authenticated DELETE
// and removes its SAs at once.
func TestDeleteOnShutdown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		ra := newRecorder("a")
		ep := n.endpoint(addrA.String())
		agentA, err := New(Config{ULA: ulaA, Auth: mustPSK(t, psk1), Transport: ep, Installer: ra})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { agentA.Run(ctx); close(done) }()
		if err := agentA.SetPeers(ctx, []PeerConfig{peerB}); err != nil {
			t.Fatal(err)
		}
		b.peers(t, peerA)
		time.Sleep(5 * time.Second)
		synctest.Wait()
		if _, ok := b.rec.peer(ulaA); !ok {
			t.Fatal("not keyed")
		}
		cancel()
		<-done
		ep.Close()
		synctest.Wait()
		if _, ok := b.rec.peer(ulaA); ok {
			t.Errorf("b kept SAs after a's DELETE: %q", b.rec.Calls())
		}
		if c := ra.Calls(); c[len(c)-1] != "remove fd00::a" && c[len(c)-1] != "remove "+ulaB.String() {
			t.Errorf("a did not remove its SAs: %q", c)
		}
		if c := b.rec.Calls(); c[len(c)-1] != "remove "+ulaA.String() {
			t.Errorf("b: %q", c)
		}
	})
}

// TestUnknownPeer: b has no peer with a's ULA and says so.
func TestUnknownPeer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		a.peers(t, peerB)
		time.Sleep(time.Second)
		synctest.Wait()
		// b cannot authenticate a, so its ERROR is only a hint: a keeps
		// retransmitting, and the hint shows in the timeout's error.
		if err := a.status(t).LastError; err != nil {
			t.Errorf("an unauthenticated ERROR ended the attempt: %v", err)
		}
		time.Sleep(31 * time.Second)
		synctest.Wait()
		if err := a.status(t).LastError; !errors.Is(err, ErrTimeout) || !errors.Is(err, ErrPeerRefused) || !errors.Is(err, ErrUnknownPeer) {
			t.Errorf("LastError = %v, want ErrTimeout with ErrPeerRefused + ErrUnknownPeer", err)
		}
		if len(a.rec.Calls())+len(b.rec.Calls()) != 0 {
			t.Errorf("installed: %q %q", a.rec.Calls(), b.rec.Calls())
		}
	})
}

// TestInstallFailure: when b's dataplane refuses the SAs, b answers ERROR,
// a installs nothing, and a later attempt succeeds.
func TestInstallFailure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		n.tap = func(from, to netip.AddrPort, b []byte) []byte {
			if msgType(b) == MsgInit && from == addrB {
				return nil // only a initiates
			}
			return b
		}
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		b.rec.fail = errors.New("kernel says no")
		b.peers(t, peerA)
		a.peers(t, peerB)
		time.Sleep(time.Second)
		synctest.Wait()
		if err := a.status(t).LastError; !errors.Is(err, ErrInstall) {
			t.Errorf("a: LastError = %v, want ErrInstall", err)
		}
		if len(a.rec.Calls()) != 0 {
			t.Errorf("a installed %q", a.rec.Calls())
		}
		b.rec.mu.Lock()
		b.rec.fail = nil
		b.rec.mu.Unlock()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		pa, okA := a.rec.peer(ulaB)
		pb, okB := b.rec.peer(ulaA)
		if !okA || !okB {
			t.Fatalf("no recovery: %q %q", a.rec.Calls(), b.rec.Calls())
		}
		pairOK(t, pa, pb)
	})
}

// genuineInit returns a signed PSK INIT from a (fd00::a) to b as one
// datagram with MAC1 for b, and the message alone.
func genuineInit(t testing.TB, psk []byte) (dgram, msg []byte) {
	eph, err := newEphemeral()
	if err != nil {
		t.Fatal(err)
	}
	x, ek := eph.shares()
	init := &Message{Type: MsgInit, Mode: ModePSK, Exchange: [8]byte{1}, Nonce: bytes.Repeat([]byte{1}, 32), SPI: 0x1000,
		ULA: ulaA, Proposal: []CipherID{CipherAES256GCM}, Time: 1, X25519: x, MLKEM: ek}
	p := &PSK{secret: psk}
	msg, err = sign(init, initKey(psk, init.Nonce, MsgInit), nil)
	if err != nil {
		t.Fatal(err)
	}
	return addMACs(bytes.Clone(msg), mac1Key(ulaB, p.identity(nil)), nil), msg
}

// FuzzAgentInput feeds arbitrary datagrams (and mutated genuine ones) to a
// responder: it must never panic, never install anything without a valid
// MAC, and never answer with more bytes than it received.
func FuzzAgentInput(f *testing.F) {
	psk := bytes.Repeat([]byte("0123456789abcdef"), 3)
	signed, msg := genuineInit(f, psk)
	f.Add(signed)
	pieces, err := datagrams(msg, mac1Key(ulaB, (&PSK{secret: psk}).identity(nil)), nil)
	if err != nil {
		f.Fatal(err)
	}
	for _, p := range pieces {
		f.Add(p)
	}
	for _, g := range golden {
		f.Add(unhex(f, g.hex))
	}
	f.Add(unhex(f, "01 01 02 00 0102030405060708 03 0010 fd00000000000000000000000000000a"))
	f.Fuzz(func(t *testing.T, b []byte) {
		n := newMemNet()
		n.tap = func(from, to netip.AddrPort, p []byte) []byte {
			if len(p) > len(b) {
				t.Errorf("answered %d bytes to a %d-byte datagram", len(p), len(b))
			}
			return nil
		}
		ep := n.endpoint(addrB.String())
		rec := newRecorder("b")
		a, err := New(Config{ULA: ulaB, Auth: &PSK{secret: psk, MaxClockSkew: 1 << 62}, Transport: ep, Installer: rec,
			Now: func() time.Time { return time.Unix(1, 0) }})
		if err != nil {
			t.Fatal(err)
		}
		a.ctx = context.Background()
		a.setPeers([]PeerConfig{peerA})
		a.peers[ulaA].nextAttempt = time.Time{} // responder only
		a.onDatagram(datagram{b: bytes.Clone(b), from: addrA})
		if calls := rec.Calls(); len(calls) > 0 && !bytes.Equal(b, signed) {
			var m Message
			if m.Unmarshal(b) != nil || verify(&m, messagePart(&m, b), initKey(psk, m.Nonce, MsgInit), nil) != nil {
				t.Errorf("installed %q from a datagram without a valid MAC", calls)
			}
		}
	})
}

// TestSetPeersMoveAndRemove: a new outer address for a keyed peer moves its
// SAs (same SPIs, no rekey); removing the peer sends DELETE, so the other
// side drops its SAs too.
func TestSetPeersMoveAndRemove(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		b.peers(t, peerA)
		a.peers(t, peerB)
		time.Sleep(5 * time.Second)
		synctest.Wait()
		before, ok := a.rec.peer(ulaB)
		if !ok {
			t.Fatal("not keyed")
		}
		moved := peerB
		moved.Outer = netip.MustParseAddrPort("10.0.9.9:4500")
		a.peers(t, moved)
		after, _ := a.rec.peer(ulaB)
		if after.Outer != moved.Outer || after.Out.SPI != before.Out.SPI || after.In.SPI != before.In.SPI {
			t.Errorf("move: before %v %v, after %v %v (want same SPIs, new outer)", before.Outer, before.Out, after.Outer, after.Out)
		}
		// Put it back so the DELETE reaches b, then remove b from a's peers.
		a.peers(t, peerB)
		a.peers(t)
		synctest.Wait()
		if _, ok := a.rec.peer(ulaB); ok {
			t.Error("a kept SAs for a removed peer")
		}
		if _, ok := b.rec.peer(ulaA); ok {
			t.Errorf("b kept SAs after a's DELETE: %q", b.rec.Calls())
		}
	})
}

// TestFailedRekeyBacksOff: when the peer refuses rekeys, the retries back
// off (2, 4, 8, ... s) although the rekey time has passed, and the current
// SAs stay in place meanwhile.
func TestFailedRekeyBacksOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		var mu sync.Mutex
		inits := 0
		n.tap = func(from, to netip.AddrPort, b []byte) []byte {
			if msgType(b) == MsgInit {
				if from == addrB {
					return nil // a initiates
				}
				if firstPiece(b) {
					mu.Lock()
					inits++
					mu.Unlock()
				}
			}
			return b
		}
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		b.peers(t, peerA)
		a.peers(t, peerB)
		time.Sleep(time.Second)
		synctest.Wait()
		keyed, ok := a.rec.peer(ulaB)
		if !ok {
			t.Fatal("not keyed")
		}
		b.rec.mu.Lock()
		b.rec.fail = errors.New("kernel says no")
		b.rec.mu.Unlock()
		mu.Lock()
		inits = 0
		mu.Unlock()
		time.Sleep(8*time.Minute + 61*time.Second) // rekey due at 8 min; then one minute of refusals
		synctest.Wait()
		mu.Lock()
		got := inits
		mu.Unlock()
		// Attempts at +0, 2, 6, 14, 30 s (and 62 s is beyond the minute).
		if got < 4 || got > 6 {
			t.Errorf("%d rekey attempts in the minute after the refusal started, want 5 (backoff 2, 4, 8, 16 s)", got)
		}
		if now, _ := a.rec.peer(ulaB); now.Out.SPI != keyed.Out.SPI {
			t.Errorf("a's SAs changed although every rekey was refused")
		}
		if err := a.status(t).LastError; !errors.Is(err, ErrInstall) {
			t.Errorf("LastError = %v, want ErrPeerRefused + ErrInstall", err)
		}
	})
}

// TestRekeyOnDemand: Rekey replaces the SA pair at once (make-before-break
// as for a timed rekey); an unknown ULA is an error.
func TestRekeyOnDemand(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		b.peers(t, peerA)
		a.peers(t, peerB)
		time.Sleep(time.Second)
		synctest.Wait()
		first := a.status(t)
		if err := a.agent.Rekey(context.Background(), ulaB); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		second := a.status(t)
		if second.In.SPI == first.In.SPI || !second.At.After(first.At) {
			t.Fatalf("no rekey: %v -> %v", first.In, second.In)
		}
		pa, _ := a.rec.peer(ulaB)
		pb, _ := b.rec.peer(ulaA)
		pairOK(t, pa, pb)
		if err := a.agent.Rekey(context.Background(), netip.MustParseAddr("fd00::99")); !errors.Is(err, ErrUnknownPeer) {
			t.Errorf("Rekey(unknown) = %v, want ErrUnknownPeer", err)
		}
	})
}

// TestRekeyKeepsRetiredOutAccepted checks the in-flight half of
// make-before-break, which a snapshot of the current SAs cannot: a packet
// sent with an outbound SA just before that SA was replaced must still be
// accepted when it arrives. So every outbound SA either side stops using
// must stay among the other side's inbound SAs for PrevInHold after the
// switch. Rekeys run on schedule (a initiates), on demand from b (b
// initiates) and from both at once (simultaneous start).
func TestRekeyKeepsRetiredOutAccepted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const hold = 30 * time.Second // the default PrevInHold
		n := newMemNet()
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		type retired struct {
			sa controlplane.SA
			at time.Time
		}
		var mu sync.Mutex
		var violations []string
		var retiredA, retiredB []retired
		var lastOutA, lastOutB controlplane.SA
		switches := 0
		check := func() {
			mu.Lock()
			defer mu.Unlock()
			now := time.Now()
			pa, okA := a.rec.peer(ulaB)
			pb, okB := b.rec.peer(ulaA)
			if okA && lastOutA.SPI != 0 && pa.Out.SPI != lastOutA.SPI {
				retiredA = append(retiredA, retired{lastOutA, now})
				switches++
			}
			if okB && lastOutB.SPI != 0 && pb.Out.SPI != lastOutB.SPI {
				retiredB = append(retiredB, retired{lastOutB, now})
				switches++
			}
			if okA {
				lastOutA = pa.Out
			}
			if okB {
				lastOutB = pb.Out
			}
			if !okA || !okB {
				return
			}
			for _, r := range retiredA {
				if now.Sub(r.at) < hold && !accepts(pb, r.sa) {
					violations = append(violations, fmt.Sprintf("%v after a retired its Out %v, b no longer accepts it", now.Sub(r.at), r.sa))
				}
			}
			for _, r := range retiredB {
				if now.Sub(r.at) < hold && !accepts(pa, r.sa) {
					violations = append(violations, fmt.Sprintf("%v after b retired its Out %v, a no longer accepts it", now.Sub(r.at), r.sa))
				}
			}
		}
		a.rec.onChange, b.rec.onChange = check, check
		a.peers(t, peerB)
		b.peers(t, peerA)
		time.Sleep(20 * time.Minute) // scheduled rekeys at 8 and 16 minutes
		if err := b.agent.Rekey(t.Context(), ulaA); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Minute)
		for _, nd := range []*node{a, b} {
			if err := nd.agent.Rekey(t.Context(), map[*node]netip.Addr{a: ulaB, b: ulaA}[nd]); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(time.Minute)
		synctest.Wait()
		mu.Lock()
		defer mu.Unlock()
		if len(violations) > 0 {
			t.Errorf("a retired outbound SA was dropped by the peer while its packets could be in flight:\n%s", strings.Join(violations, "\n"))
		}
		if switches < 8 {
			t.Errorf("only %d outbound switches observed, want at least 8 (4 rekeys)", switches)
		}
		pa, _ := a.rec.peer(ulaB)
		pb, _ := b.rec.peer(ulaA)
		pairOK(t, pa, pb)
	})
}
