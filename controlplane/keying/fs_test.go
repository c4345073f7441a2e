package keying

import (
	"bytes"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/testenv"
)

// TestKerberosForwardSecrecy runs three exchanges between two agents on a
// real KDC, with a's authenticator subkey forced to the same value every
// time (as if an attacker had it: from a's keytab or the KDC's database the
// subkey follows from a recording of the AP-REQ). The ESP keys differ in
// every exchange and the agents still agree on them: they come from the
// ephemeral X25519 and ML-KEM secrets too. Every ephemeral key made is
// erased once its exchange is done, and no keying datagram exceeds
// MaxDatagramLen (no IP fragmentation on a 1280-byte path).
func TestKerberosForwardSecrecy(t *testing.T) {
	testenv.HostTier(t, "Kerberos keying against a real KDC over UDP sockets, kernel-independent")
	var mu sync.Mutex
	var ephs []*ephemeral
	ephemeralHook = func(e *ephemeral) { mu.Lock(); ephs = append(ephs, e); mu.Unlock() }
	t.Cleanup(func() { ephemeralHook = nil })

	k, ktA, ktB := newRealm(t)
	short := func(c *Config) { c.SALifetime = 3 * time.Second }
	a := startKrbNode(t, k, "a", princA, ulaA, ktA, short)
	b := startKrbNode(t, k, "b", princB, ulaB, ktB, short)
	fixed := bytes.Repeat([]byte{0x42}, 32)
	a.agent.cfg.Auth.(*Kerberos).subkeyHook = func() []byte { return bytes.Clone(fixed) }
	b.dropOwnInits() // a initiates every exchange, with the fixed subkey
	var largest, datagramsSeen int
	var sizeMu sync.Mutex
	for _, nd := range []*krbNode{a, b} {
		prev := nd.tr.tap
		nd.tr.tap = func(to netip.AddrPort, p []byte) []byte {
			sizeMu.Lock()
			largest, datagramsSeen = max(largest, len(p)), datagramsSeen+1
			sizeMu.Unlock()
			if prev != nil {
				return prev(to, p)
			}
			return p
		}
	}
	b.setPeers(t, a.peer)
	a.setPeers(t, b.peer)
	var outKeys [][]byte
	for len(outKeys) < 3 {
		waitFor(t, "a new keying", func() bool {
			pa, okA := a.rec.peer(ulaB)
			pb, okB := b.rec.peer(ulaA)
			if !okA || !okB || pa.Out.SPI != pb.In.SPI || len(outKeys) > 0 && bytes.Equal(pa.Out.Key, outKeys[len(outKeys)-1]) {
				return false
			}
			return bytes.Equal(pa.Out.Key, pb.In.Key)
		})
		pa, _ := a.rec.peer(ulaB)
		outKeys = append(outKeys, bytes.Clone(pa.Out.Key))
	}
	for i := range outKeys {
		for j := range i {
			if bytes.Equal(outKeys[i], outKeys[j]) {
				t.Errorf("exchanges %d and %d with the same subkey derived the same ESP key", j, i)
			}
		}
	}
	// Every ephemeral of a finished exchange is wiped; at most the one of
	// an exchange still running is not.
	waitFor(t, "ephemerals erased", func() bool {
		mu.Lock()
		defer mu.Unlock()
		live := 0
		for _, e := range ephs {
			if !e.erased() {
				live++
			}
		}
		return live <= 1
	})
	var running bool
	if err := a.agent.do(t.Context(), func() {
		p := a.agent.peers[ulaB]
		if p.ex != nil && p.ex.eph != nil {
			running = true
		}
		if p.cur != nil && p.ex != nil && p.ex.phase == waitAck && p.ex.eph != nil {
			t.Error("a kept its ephemeral key after deriving the keys")
		}
	}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	t.Logf("%d ephemeral keys made, exchange running now: %v", len(ephs), running)
	mu.Unlock()
	sizeMu.Lock()
	defer sizeMu.Unlock()
	t.Logf("%d keying datagrams, largest %d bytes (limit %d)", datagramsSeen, largest, MaxDatagramLen)
	if largest > MaxDatagramLen {
		t.Errorf("a %d-byte keying datagram: IP would fragment it on a 1280-byte path", largest)
	}
}
