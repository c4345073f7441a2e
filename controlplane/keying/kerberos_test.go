package keying

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/krbtest"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/jcmturner/gokrb5/v8/keytab"
)

const (
	realm  = "BTMM.TEST"
	princA = "host/a.btmm.test"
	princB = "host/b.btmm.test"
)

// offsetClock is a host clock that tests can set wrong.
type offsetClock struct{ off atomic.Int64 }

func (c *offsetClock) Now() time.Time      { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *offsetClock) Set(d time.Duration) { c.off.Store(int64(d)) }

// tapTransport wraps a UDP transport: tap may rewrite or drop (nil) what is sent.
type tapTransport struct {
	*UDPTransport
	mu  sync.Mutex
	tap func(to netip.AddrPort, b []byte) []byte
}

func (tt *tapTransport) WriteKeying(b []byte, to netip.AddrPort) error {
	tt.mu.Lock()
	tap := tt.tap
	tt.mu.Unlock()
	if tap != nil {
		if b = tap(to, bytes.Clone(b)); b == nil {
			return nil
		}
	}
	return tt.UDPTransport.WriteKeying(b, to)
}

type krbNode struct {
	agent *Agent
	rec   *recorder
	tr    *tapTransport
	clock *offsetClock
	peer  PeerConfig // how the other node sees this one
	log   *logWriter
}

func startKrbNode(t *testing.T, k *krbtest.KDC, name, principal string, ula netip.Addr, kt *keytab.Keytab, mod func(*Config)) *krbNode {
	t.Helper()
	u, err := ListenUDP(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	nd := &krbNode{rec: newRecorder(name), tr: &tapTransport{UDPTransport: u}, clock: &offsetClock{}}
	nd.peer = PeerConfig{Name: name, ULA: ula, Outer: u.LocalAddr(), Principal: principal}
	var logger *slog.Logger
	logger, nd.log = testLogger(t)
	cfg := Config{
		ULA:       ula,
		Auth:      &Kerberos{Principal: principal, Realm: realm, Keytab: kt, Krb5Conf: k.Config(t)},
		Transport: nd.tr, Installer: nd.rec, Now: nd.clock.Now,
		Logger: logger,
	}
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
	t.Cleanup(func() { cancel(); <-done; u.Close() })
	return nd
}

func (nd *krbNode) status(t *testing.T) PeerStatus {
	t.Helper()
	st, err := nd.agent.Status(context.Background())
	if err != nil || len(st) != 1 {
		t.Fatalf("status: %v %v", st, err)
	}
	return st[0]
}

func (nd *krbNode) setPeers(t *testing.T, ps ...PeerConfig) {
	t.Helper()
	if err := nd.agent.SetPeers(context.Background(), ps); err != nil {
		t.Fatal(err)
	}
}

// dropOwnInits makes nd a pure responder.
func (nd *krbNode) dropOwnInits() {
	nd.tr.mu.Lock()
	defer nd.tr.mu.Unlock()
	nd.tr.tap = func(_ netip.AddrPort, b []byte) []byte {
		if msgType(b) == MsgInit {
			return nil
		}
		return b
	}
}

// k1 is the MAC1 key of INITs to nd (anybody can compute it in Kerberos
// mode from nd's ULA and principal).
func (nd *krbNode) k1() []byte {
	return mac1Key(nd.peer.ULA, nd.agent.cfg.Auth.identity(nil))
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func newRealm(t *testing.T, bOpts ...string) (k *krbtest.KDC, ktA, ktB *keytab.Keytab) {
	k = krbtest.Start(t, realm)
	k.AddPrincipal(t, princA)
	k.AddPrincipal(t, princB, bOpts...)
	_, ktA = k.Keytab(t, "a.keytab", princA)
	_, ktB = k.Keytab(t, "b.keytab", princB)
	return k, ktA, ktB
}

// TestKerberosKeying runs two agents against a real krb5kdc: they start at
// the same moment (crossing INITs), converge on one SA pair with identical
// keys, and rekey (short SA lifetime) with a fresh AP-REQ each time.
func TestKerberosKeying(t *testing.T) {
	testenv.HostTier(t, "Kerberos keying against a real KDC over UDP sockets, kernel-independent (the VM keys with ESP in TestVMPingFloodAcrossRekey*)")
	k, ktA, ktB := newRealm(t)
	short := func(c *Config) { c.SALifetime = 3 * time.Second }
	a := startKrbNode(t, k, "a", princA, ulaA, ktA, short)
	b := startKrbNode(t, k, "b", princB, ulaB, ktB, short)
	var up atomic.Bool
	var initsFrom sync.Map
	gate := func(name string) func(netip.AddrPort, []byte) []byte {
		return func(_ netip.AddrPort, p []byte) []byte {
			if !up.Load() {
				return nil
			}
			if msgType(p) == MsgInit {
				initsFrom.Store(name, true)
			}
			return p
		}
	}
	a.tr.tap, b.tr.tap = gate("a"), gate("b")
	a.setPeers(t, b.peer)
	b.setPeers(t, a.peer)
	time.Sleep(300 * time.Millisecond) // both have sent a (dropped) INIT
	up.Store(true)
	waitFor(t, "keying", func() bool {
		_, okA := a.rec.peer(ulaB)
		_, okB := b.rec.peer(ulaA)
		return okA && okB
	})
	_, fromA := initsFrom.Load("a")
	_, fromB := initsFrom.Load("b")
	if !fromA || !fromB {
		t.Logf("INITs did not cross (a %v, b %v): KDC slower than 500 ms?", fromA, fromB)
	}
	if ca, cb := a.rec.Calls(), b.rec.Calls(); len(ca) != 1 || len(cb) != 1 {
		t.Fatalf("want one SA pair, got\na: %q\nb: %q", ca, cb)
	}
	pa, _ := a.rec.peer(ulaB)
	pb, _ := b.rec.peer(ulaA)
	pairOK(t, pa, pb)
	first := a.status(t)
	if !first.Initiator {
		t.Errorf("a (lower ULA) should have stayed initiator")
	}
	// Rekey at 80% of 3 s.
	waitFor(t, "rekey", func() bool { return a.status(t).In.SPI != first.In.SPI })
	waitFor(t, "rekey settles", func() bool {
		pa, _ := a.rec.peer(ulaB)
		pb, _ := b.rec.peer(ulaA)
		return pa.Out.SPI == pb.In.SPI && pb.Out.SPI == pa.In.SPI
	})
	pa, _ = a.rec.peer(ulaB)
	pb, _ = b.rec.peer(ulaA)
	pairOK(t, pa, pb)
	noKeysLogged(t, a.log, a.rec, b.rec)
	noKeysLogged(t, b.log, a.rec, b.rec)
	kept := fmt.Sprintf("prev=[%08x]", first.In.SPI)
	if !slices.ContainsFunc(a.rec.Calls(), func(c string) bool { return strings.HasSuffix(c, kept) }) {
		t.Errorf("old inbound SA %08x not kept after the rekey: %q", first.In.SPI, a.rec.Calls())
	}
}

// fastRetransmit gives up an attempt after about a second.
func fastRetransmit(c *Config) {
	c.RetransmitBase, c.RetransmitMax, c.Retransmits = 100*time.Millisecond, 200*time.Millisecond, 4
}

// attrOffset returns where attribute typ starts in an encoded message.
func attrOffset(t testing.TB, msg []byte, typ byte) int {
	for off := headerLen; off+3 <= len(msg); off += 3 + int(msg[off+1])<<8 + int(msg[off+2]) {
		if msg[off] == typ {
			return off
		}
	}
	t.Fatalf("no attribute %d", typ)
	return 0
}

// TestKerberosRefusals: each failure is refused with an error naming the
// cause (errors.Is on our sentinels) and installs nothing on either host.
// b is a pure responder here (its own INITs are dropped).
func TestKerberosRefusals(t *testing.T) {
	testenv.HostTier(t, "Kerberos refusals against a real KDC over UDP sockets, kernel-independent")
	for _, tt := range []struct {
		name    string
		bOpts   []string                                          // addprinc options for b's principal
		keytabB func(t *testing.T, k *krbtest.KDC) *keytab.Keytab // b's keytab, if not the good one
		setup   func(t *testing.T, k *krbtest.KDC, a, b *krbNode, peerB *PeerConfig)
		wantA   error // in a's LastError
		wantB   error // in b's LastError (nil: b saw nothing)
	}{
		{
			name: "tampered INIT",
			setup: func(t *testing.T, k *krbtest.KDC, a, b *krbNode, _ *PeerConfig) {
				// An on-path attacker who knows b's ULA and principal
				// (MAC1 is re-computed over the change).
				a.agent.tamper = func(typ MsgType, msg []byte) []byte {
					if typ == MsgInit {
						msg[headerLen+3] ^= 1 // a nonce bit: the AP-REQ is fine, the MAC is not
					}
					return msg
				}
			},
			wantA: ErrTampered, wantB: ErrTampered,
		},
		{
			name: "tampered AP-REQ",
			setup: func(t *testing.T, k *krbtest.KDC, a, b *krbNode, _ *PeerConfig) {
				a.agent.tamper = func(typ MsgType, msg []byte) []byte {
					if typ == MsgInit {
						msg[attrOffset(t, msg, attrX25519)-20] ^= 1 // inside the AP-REQ's authenticator ciphertext
					}
					return msg
				}
			},
			wantA: ErrTampered, wantB: ErrTampered,
		},
		{
			name: "wrong keytab",
			keytabB: func(t *testing.T, k *krbtest.KDC) *keytab.Keytab {
				_, stale := k.Keytab(t, "b-stale.keytab", princB)
				k.Keytab(t, "b-new.keytab", princB) // bumps the kvno: "stale" is now wrong
				return stale
			},
			wantA: ErrWrongKeytab, wantB: ErrWrongKeytab,
		},
		{
			name:  "expired ticket",
			bOpts: []string{"-maxlife", "1 minute"},
			setup: func(t *testing.T, k *krbtest.KDC, a, b *krbNode, _ *PeerConfig) {
				// Both clocks agree, 10 minutes ahead of the KDC's: a's
				// one-minute ticket has ended 9 minutes ago by b's clock.
				a.clock.Set(10 * time.Minute)
				b.clock.Set(10 * time.Minute)
			},
			wantA: ErrTicketExpired, wantB: ErrTicketExpired,
		},
		{
			name: "clock skew",
			setup: func(t *testing.T, k *krbtest.KDC, a, b *krbNode, _ *PeerConfig) {
				a.clock.Set(-10 * time.Minute)
			},
			wantA: ErrClockSkew, wantB: ErrClockSkew,
		},
		{
			name: "unknown principal",
			setup: func(t *testing.T, k *krbtest.KDC, a, b *krbNode, peerB *PeerConfig) {
				peerB.Principal = "host/nobody.btmm.test"
			},
			wantA: ErrUnknownPrincipal,
		},
		{
			name: "peer is not who the ULA says",
			setup: func(t *testing.T, k *krbtest.KDC, a, b *krbNode, peerB *PeerConfig) {
				k.AddPrincipal(t, "host/c.btmm.test")
				b.setPeers(t, PeerConfig{Name: "a", ULA: ulaA, Outer: a.peer.Outer, Principal: "host/c.btmm.test"})
			},
			wantA: ErrUnknownPeer, wantB: ErrUnknownPrincipal,
		},
		{
			name: "KDC down",
			setup: func(t *testing.T, k *krbtest.KDC, a, b *krbNode, _ *PeerConfig) {
				k.Stop()
			},
			wantA: ErrKDCUnreachable,
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			k, ktA, ktB := newRealm(t, tt.bOpts...)
			if tt.keytabB != nil {
				ktB = tt.keytabB(t, k)
			}
			// b's refusals cannot be authenticated (it could not verify
			// the INIT): a gives up when its retransmissions run out.
			a := startKrbNode(t, k, "a", princA, ulaA, ktA, fastRetransmit)
			b := startKrbNode(t, k, "b", princB, ulaB, ktB, nil)
			b.dropOwnInits()
			peerB := b.peer
			b.setPeers(t, a.peer)
			if tt.setup != nil {
				tt.setup(t, k, a, b, &peerB)
			}
			a.setPeers(t, peerB)
			waitFor(t, "a's error", func() bool { return a.status(t).LastError != nil })
			errA := a.status(t).LastError
			t.Logf("a: %v", errA)
			if !errors.Is(errA, tt.wantA) {
				t.Errorf("a: LastError = %v, want %v", errA, tt.wantA)
			}
			if tt.wantB != nil {
				errB := b.status(t).LastError
				t.Logf("b: %v", errB)
				if !errors.Is(errB, tt.wantB) {
					t.Errorf("b: LastError = %v, want %v", errB, tt.wantB)
				}
			}
			if ca, cb := a.rec.Calls(), b.rec.Calls(); len(ca)+len(cb) != 0 {
				t.Errorf("installed:\na: %q\nb: %q", ca, cb)
			}
		})
	}
}

// TestKerberosReplay replays a captured INIT (AP-REQ) to b after the
// retransmission cache has let it go: b refuses it as a replay with an
// authenticated ERROR and changes no SA.
func TestKerberosReplay(t *testing.T) {
	testenv.HostTier(t, "replays against a real KDC over UDP sockets, kernel-independent")
	k, ktA, ktB := newRealm(t)
	a := startKrbNode(t, k, "a", princA, ulaA, ktA, nil)
	b := startKrbNode(t, k, "b", princB, ulaB, ktB, nil)
	b.dropOwnInits()
	var captured atomic.Pointer[[]byte]
	a.agent.tamper = func(typ MsgType, msg []byte) []byte {
		if typ == MsgInit {
			c := bytes.Clone(msg)
			captured.CompareAndSwap(nil, &c)
		}
		return msg
	}
	b.setPeers(t, a.peer)
	a.setPeers(t, b.peer)
	waitFor(t, "keying", func() bool { return b.status(t).Established })
	before := b.rec.Calls()
	attacker, err := ListenUDP(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer attacker.Close()
	b.clock.Set(time.Minute) // past the retransmission cache, inside the skew window
	dgs, err := datagrams(*captured.Load(), b.k1(), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range dgs {
		if err := attacker.WriteKeying(d, b.peer.Outer); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, MaxMessageLen)
	attacker.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _, err := attacker.ReadKeying(buf)
	if err != nil {
		t.Fatalf("no answer to the replay: %v", err)
	}
	var m Message
	if err := m.Unmarshal(buf[:n]); err != nil || m.Type != MsgError || m.Code != CodeReplay || m.MAC == nil {
		t.Fatalf("answer to the replay: %+v %v, want an authenticated ERROR replay", m, err)
	}
	if err := b.status(t).LastError; !errors.Is(err, ErrReplay) {
		t.Errorf("b: LastError = %v, want ErrReplay", err)
	}
	if after := b.rec.Calls(); !slices.Equal(after, before) {
		t.Errorf("replay changed b's SAs:\nbefore %q\nafter  %q", before, after)
	}
}

// TestKerberosRekeyBeforeTicketExpiry: b's principal only gets 6-second
// tickets; with an hour-long SA lifetime the SA pair is still rekeyed before
// the ticket ends (at 80% of it), with a new ticket from the KDC.
func TestKerberosRekeyBeforeTicketExpiry(t *testing.T) {
	testenv.HostTier(t, "Kerberos rekeys against a real KDC over UDP sockets, kernel-independent")
	k, ktA, ktB := newRealm(t, "-maxlife", "6 seconds")
	a := startKrbNode(t, k, "a", princA, ulaA, ktA, nil)
	b := startKrbNode(t, k, "b", princB, ulaB, ktB, nil)
	b.dropOwnInits() // a initiates, so its ticket for b drives the rekey
	b.setPeers(t, a.peer)
	a.setPeers(t, b.peer)
	waitFor(t, "keying", func() bool { return a.status(t).Established })
	first := a.status(t)
	if d := first.RekeyAt.Sub(first.At); d > 6*time.Second {
		t.Fatalf("rekey planned %v after keying, not before the 6 s ticket ends", d)
	}
	waitFor(t, "rekey", func() bool { return a.status(t).In.SPI != first.In.SPI })
	second := a.status(t)
	if d := second.At.Sub(first.At); d < 3*time.Second || d > 6*time.Second {
		t.Errorf("rekeyed %v after the first keying, want ~4.8 s (80%% of the ticket)", d)
	}
	tickets := func() int { return strings.Count(k.Log(), "for host/b.btmm.test@"+realm) }
	for i := 0; i < 100 && tickets() < 2; i++ {
		time.Sleep(10 * time.Millisecond) // the KDC's log line may trail its reply
	}
	if n := tickets(); n < 2 {
		t.Errorf("KDC issued %d tickets for b, want a fresh one for the rekey:\n%s", n, k.Log())
	}
}
