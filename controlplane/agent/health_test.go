package agent

import (
	"context"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/btmm/btmm/controlplane/netmon"
	"github.com/btmm/btmm/dns/register"
)

func TestJudge(t *testing.T) {
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	up := healthInput{outerKnown: true, keyed: true, inKernel: true, handshake: now.Add(-time.Hour)}
	with := func(f func(*healthInput)) healthInput {
		in := up
		f(&in)
		return in
	}
	for _, tc := range []struct {
		name   string
		in     healthInput
		state  string
		reason string
	}{
		{"idle tunnel", up, HealthOK, ""},
		{"receiving", with(func(in *healthInput) { in.lastRx = now.Add(-time.Second) }), HealthOK, ""},
		{"no outer address", healthInput{}, HealthUnreachable, "no outer address known"},
		{"keying failed", healthInput{outerKnown: true, keyingErr: "keying with desk (fd00::2): peer did not answer\n(after 6 tries)"},
			HealthUnreachable, "not keyed: keying with desk (fd00::2): peer did not answer (after 6 tries)"},
		{"keying", healthInput{outerKnown: true}, HealthUnreachable, "not keyed yet (keying in progress)"},
		{"not in kernel", with(func(in *healthInput) { in.inKernel, in.dataErr = false, "add state: EINVAL" }), HealthUnreachable,
			"keyed, but the SAs are not in the kernel: add state: EINVAL"},
		{"sending briefly", with(func(in *healthInput) { in.sendingSince = now.Add(-StaleAfter + time.Second) }), HealthOK, ""},
		{"sending, nothing back", with(func(in *healthInput) {
			in.sendingSince, in.lastRx, in.probes = now.Add(-20*time.Second), now.Add(-30*time.Second), 2
		}), HealthStale, "sending for 20s with no packet back (last packet received 30s ago; 2 echoes through the tunnel unanswered)"},
		{"sending for long", with(func(in *healthInput) { in.sendingSince = now.Add(-UnreachableAfter) }), HealthUnreachable,
			"sending for 1m30s with no packet back (last packet received 1h0m0s ago)"},
	} {
		state, reason := judge(tc.in, now)
		if state != tc.state || !strings.Contains(reason, tc.reason) || strings.Contains(reason, "\n") || (tc.reason == "" && reason != "") {
			t.Errorf("%s: %s %q, want %s %q", tc.name, state, reason, tc.state, tc.reason)
		}
	}
}

type echoRecorder struct {
	mu sync.Mutex
	at []time.Time
}

func (e *echoRecorder) echo(netip.Addr) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.at = append(e.at, time.Now())
}

func (e *echoRecorder) n() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.at)
}

// TestPeerHealth drives a keyed pair's counters: idle is ok; sending with
// nothing back turns stale after StaleAfter (echoes go through the tunnel
// meanwhile) and unreachable after UnreachableAfter; a packet back makes it
// ok at once. With keepalives off the counters are still sampled.
func TestPeerHealth(t *testing.T) {
	for _, keepalive := range []time.Duration{0, -1} {
		synctest.Test(t, func(t *testing.T) {
			n := &memNet{log: &eventLog{}}
			off := func(c *Config) { c.Keepalive = keepalive }
			a := newMemHost(t, n, "a", "fd00::a", "11.1.0.2:4500", netmon.Host("eth0", 2, lanA, gwA, true), off)
			b := newMemHost(t, n, "b", "fd00::b", "11.3.0.2:4500", netmon.Host("eth0", 2, netip.MustParsePrefix("11.3.0.2/24"), netip.MustParseAddr("11.3.0.1"), true), off)
			var echoes echoRecorder
			a.a.echo = echoes.echo
			health := func() PeerHealth {
				t.Helper()
				st := a.a.Status(context.Background())
				if len(st.Peers) != 1 {
					t.Fatalf("peers: %+v", st.Peers)
				}
				return st.Peers[0].Health
			}
			a.sees(b, register.Capabilities{})
			if h := health(); h.State != HealthUnreachable || !strings.Contains(h.Reason, "not keyed yet") {
				t.Fatalf("before keying: %+v", h)
			}
			b.sees(a, register.Capabilities{})
			time.Sleep(5 * time.Second)
			synctest.Wait()
			keyed := time.Now()
			time.Sleep(2 * time.Minute)
			synctest.Wait()
			h := health()
			if h.State != HealthOK || h.LastHandshake.IsZero() || h.LastHandshake.After(keyed) || echoes.n() != 0 {
				t.Fatalf("idle: %+v, %d echoes", h, echoes.n())
			}

			// Sending every second, nothing back.
			start := time.Now()
			var stale, unreachable time.Duration
			for range 120 {
				a.dp.CountTx(b.ula, 1)
				time.Sleep(time.Second)
				synctest.Wait()
				switch h := health(); {
				case h.State == HealthStale && stale == 0:
					stale = time.Since(start)
					if !strings.Contains(h.Reason, "with no packet back") {
						t.Errorf("stale reason %q", h.Reason)
					}
				case h.State == HealthUnreachable && unreachable == 0:
					unreachable = time.Since(start)
				}
			}
			every := DefaultKeepalive / 4 // the sampling period
			t.Logf("keepalive %v: stale after %v, unreachable after %v, %d echoes", keepalive, stale, unreachable, echoes.n())
			if stale < StaleAfter || stale > StaleAfter+2*every {
				t.Errorf("stale after %v, want %v (+ up to two samples)", stale, StaleAfter)
			}
			if unreachable < UnreachableAfter || unreachable > UnreachableAfter+2*every {
				t.Errorf("unreachable after %v, want %v (+ up to two samples)", unreachable, UnreachableAfter)
			}
			if n := echoes.n(); n < 15 || n > 25 {
				t.Errorf("%d liveness echoes in 2 minutes of silence, want one every %v", n, livenessEvery)
			}
			if h := health(); h.State != HealthUnreachable || h.Since.IsZero() || !strings.Contains(h.Reason, "echoes through the tunnel unanswered") {
				t.Errorf("after 2 minutes: %+v", h)
			}
			// A packet back: ok at the next sample, no more echoes.
			a.dp.CountRx(b.ula, 1)
			time.Sleep(every)
			synctest.Wait()
			before := echoes.n()
			if h := health(); h.State != HealthOK || time.Since(h.LastReceived) > every {
				t.Errorf("after a packet back: %+v", h)
			}
			time.Sleep(time.Minute)
			synctest.Wait()
			if echoes.n() != before {
				t.Errorf("echoes went on after the peer answered")
			}
			if keepalive < 0 && len(a.ka.sent()) != 0 {
				t.Errorf("keepalives off, yet %d sent", len(a.ka.sent()))
			}
		})
	}
}
