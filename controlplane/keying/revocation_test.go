package keying

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/krbtest"
	"github.com/btmm/btmm/internal/testenv"
)

// TestDelprincCutsHostOff: three hosts keyed with each other on a real MIT
// KDC (hard lifetime 20 s, soft 10 s). `kadmin.local delprinc` of c's
// principal cuts c off: before 20 s have passed, a and b have removed
// their SAs with c and c its SAs with them, and every attempt after that
// fails; a and b stay keyed with each other all along (their SA pair is
// never removed, only rekeyed).
func TestDelprincCutsHostOff(t *testing.T) {
	testenv.HostTier(t, "Kerberos keying against a real KDC over UDP, no kernel feature the host lacks (internal/e2e TestDelprincCutsHostOffE2E covers delprinc in the VM)")
	const hard = 20 * time.Second
	const princC = "host/c.btmm.test"
	ulaC := netip.MustParseAddr("fd00::c")
	k := krbtest.Start(t, realm)
	for _, p := range []string{princA, princB, princC} {
		k.AddPrincipal(t, p)
	}
	_, ktA := k.Keytab(t, "a.keytab", princA)
	_, ktB := k.Keytab(t, "b.keytab", princB)
	_, ktC := k.Keytab(t, "c.keytab", princC)
	life := func(c *Config) { c.SALifetime, c.HardLifetime = 10*time.Second, hard }
	a := startKrbNode(t, k, "a", princA, ulaA, ktA, life)
	b := startKrbNode(t, k, "b", princB, ulaB, ktB, life)
	c := startKrbNode(t, k, "c", princC, ulaC, ktC, life)
	a.setPeers(t, b.peer, c.peer)
	b.setPeers(t, a.peer, c.peer)
	c.setPeers(t, a.peer, b.peer)
	keyed := func(nd *krbNode, ula netip.Addr) bool {
		_, ok := nd.rec.peer(ula)
		st, _ := nd.agent.Status(context.Background())
		for _, s := range st {
			if s.ULA == ula {
				return ok && s.Established
			}
		}
		return false
	}
	waitFor(t, "all three keyed", func() bool {
		return keyed(a, ulaB) && keyed(a, ulaC) && keyed(b, ulaA) && keyed(b, ulaC) && keyed(c, ulaA) && keyed(c, ulaB)
	})
	time.Sleep(5 * time.Second) // some rekeys with the KDC
	t0 := time.Now()
	if out := k.Kadmin(t, "delprinc -force "+princC); !strings.Contains(out, "deleted") {
		t.Fatalf("delprinc: %s", out)
	}
	// Every SA pair with c that exists after the deletion must end before
	// delprinc + hard: it was made from a login before the deletion. The
	// agents' own hard ends say so; when they act on them is up to the
	// scheduler (generous wait below), not asserted against a clock.
	var lastEnd time.Time
	cutOff := func() bool {
		done := true
		for _, pair := range []struct {
			nd  *krbNode
			ula netip.Addr
		}{{a, ulaC}, {b, ulaC}, {c, ulaA}, {c, ulaB}} {
			st, _ := pair.nd.agent.Status(context.Background())
			for _, s := range st {
				if s.ULA == pair.ula && s.Established {
					done = false
					if s.HardEnd.After(lastEnd) {
						lastEnd = s.HardEnd
					}
				}
			}
			if _, ok := pair.nd.rec.peer(pair.ula); ok {
				done = false
			}
		}
		return done
	}
	var cutAt time.Time
	for time.Since(t0) < hard+time.Minute {
		if cutOff() {
			cutAt = time.Now()
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if cutAt.IsZero() {
		t.Fatalf("c not cut off %v after delprinc", time.Since(t0))
	}
	t.Logf("c cut off %v after delprinc (hard lifetime %v); the latest hard end of a pair with c was delprinc + %v",
		cutAt.Sub(t0).Round(10*time.Millisecond), hard, lastEnd.Sub(t0).Round(10*time.Millisecond))
	if lastEnd.After(t0.Add(hard)) {
		t.Errorf("a pair with c had its hard end %v after delprinc, beyond the hard lifetime %v", lastEnd.Sub(t0), hard)
	}
	time.Sleep(5 * time.Second) // c keeps trying; nobody lets it in
	if keyed(a, ulaC) || keyed(b, ulaC) || keyed(c, ulaA) || keyed(c, ulaB) {
		t.Error("c was keyed again after its principal was deleted")
	}
	for _, nd := range []*krbNode{a, b} {
		st, _ := nd.agent.Status(context.Background())
		for _, s := range st {
			if s.ULA == ulaC {
				t.Logf("%s about c: %v", nd.peer.Name, s.LastError)
				if s.LastError == nil || !errors.Is(s.LastError, ErrExpired) && !errors.Is(s.LastError, ErrUnknownPrincipal) &&
					!errors.Is(s.LastError, ErrTicketExpired) && !errors.Is(s.LastError, ErrTimeout) {
					t.Errorf("%s: c's error %v does not say why", nd.peer.Name, s.LastError)
				}
			}
		}
	}
	if !keyed(a, ulaB) || !keyed(b, ulaA) {
		t.Error("a and b lost each other")
	}
	for _, call := range append(a.rec.Calls(), b.rec.Calls()...) {
		if call == "remove "+ulaB.String() || call == "remove "+ulaA.String() {
			t.Errorf("a-b SAs were removed: %q", call)
		}
	}
}
