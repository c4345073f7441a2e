//go:build linux

package keying

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// floodEnv makes the test binary a flooder instead of running tests (see
// TestMain): "target=IP:PORT k1=HEX ports=N seconds=S".
const floodEnv = "BTMM_KEYING_FLOOD"

func TestMain(m *testing.M) {
	if spec := os.Getenv(floodEnv); spec != "" {
		os.Exit(flood(spec))
	}
	os.Exit(m.Run())
}

// flood sends, from N source ports at once and as fast as it can for S
// seconds, the datagrams of INITs that pass the target's cheap check (the
// flooder knows its ULA and principal, as any host of the user's domain
// may): fresh exchange IDs, a junk AP-REQ, valid MAC1. It prints how many
// it sent.
func flood(spec string) int {
	kv := map[string]string{}
	for _, f := range strings.Fields(spec) {
		k, v, _ := strings.Cut(f, "=")
		kv[k] = v
	}
	target, err := netip.ParseAddrPort(kv["target"])
	k1, err2 := hex.DecodeString(kv["k1"])
	ports, err3 := strconv.Atoi(kv["ports"])
	secs, err4 := strconv.Atoi(kv["seconds"])
	if err != nil || err2 != nil || err3 != nil || err4 != nil {
		fmt.Fprintln(os.Stderr, "flood: bad spec", spec)
		return 2
	}
	var conns []*net.UDPConn
	for range ports {
		c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(target))
		if err != nil {
			fmt.Fprintln(os.Stderr, "flood:", err)
			return 1
		}
		conns = append(conns, c)
	}
	eph, _ := newEphemeral()
	x, ek := eph.shares()
	m := &Message{Type: MsgInit, Mode: ModeKerberos, Nonce: make([]byte, 32), SPI: 0x1000, ULA: ulaA,
		Proposal: []CipherID{CipherAES256GCM}, APReq: bytes.Repeat([]byte{0x6e}, 700), X25519: x, MLKEM: ek, MAC: make([]byte, macLen)}
	end := time.Now().Add(time.Duration(secs) * time.Second)
	var mu sync.Mutex
	sent := 0
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			mm := *m
			n := 0
			for i := w; time.Now().Before(end); i += 4 {
				mm.Exchange = [8]byte{byte(w), byte(i), byte(i >> 8), byte(i >> 16), byte(i >> 24)}
				msg, _ := mm.Marshal()
				dgs, _ := datagrams(msg, k1, nil)
				c := conns[i%len(conns)]
				for _, d := range dgs {
					if _, err := c.Write(append(NonESPMarker[:], d...)); err == nil {
						n++
					}
				}
			}
			mu.Lock()
			sent += n
			mu.Unlock()
		}()
	}
	wg.Wait()
	fmt.Println("sent", sent)
	return 0
}

func cpuTime() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestNetnsInitFlood: b (a real Kerberos responder in its namespace) is
// flooded for 10 s, from 256 source ports of a third namespace, with INIT
// datagrams that pass its cheap MAC1 check; 2 s into the flood a (another
// namespace) keys with b. a is keyed during the flood; b's reassembly,
// rate-limiter and reply caches stay within their bounds; the test process
// (both agents) reports its CPU time and heap during the flood. Figures are
// logged, not asserted against a clock.
func TestNetnsInitFlood(t *testing.T) {
	testenv.RequireNetNS(t)
	k, ktA, ktB := newRealm(t)
	nsA, nsB, nsF, nsR := netns.New(t, "kla"), netns.New(t, "klb"), netns.New(t, "klf"), netns.New(t, "klr")
	netns.MustVeth(t, nsA, "va", nsR, "ra")
	netns.MustVeth(t, nsF, "vf", nsR, "rf")
	netns.MustVeth(t, nsB, "vb", nsR, "rb")
	for _, s := range []struct {
		ns        *netns.NS
		dev, addr string
		net, gw   string
	}{{nsA, "va", "10.1.0.1/24", "10.0.0.0/8", "10.1.0.254"}, {nsF, "vf", "10.3.0.1/24", "10.0.0.0/8", "10.3.0.254"}, {nsB, "vb", "10.2.0.1/24", "10.0.0.0/8", "10.2.0.254"}} {
		s.ns.MustAddr(t, s.dev, s.addr)
		s.ns.MustRoute(t, s.net, s.gw, s.dev)
	}
	nsR.MustAddr(t, "ra", "10.1.0.254/24")
	nsR.MustAddr(t, "rf", "10.3.0.254/24")
	nsR.MustAddr(t, "rb", "10.2.0.254/24")
	if err := nsR.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
		t.Fatal(err)
	}
	addrA, addrB := netip.MustParseAddrPort("10.1.0.1:4500"), netip.MustParseAddrPort("10.2.0.1:4500")
	recA, recB := newRecorder("a"), newRecorder("b")
	authB := &Kerberos{Principal: princB, Realm: realm, Keytab: ktB, Krb5Conf: k.Config(t)}
	agentB := runAgent(t, Config{ULA: ulaB, Auth: authB, Transport: listenIn(t, nsB, addrB), Installer: recB},
		PeerConfig{Name: "a", ULA: ulaA, Outer: addrA, Principal: princA})

	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	const seconds, ports = 10, 256
	cmd := nsF.Command(context.Background(), exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=target=%v k1=%x ports=%d seconds=%d", floodEnv, addrB,
		mac1Key(ulaB, authB.identity(nil)), ports, seconds))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	cpu0, t0 := cpuTime(), time.Now()
	if err := nsF.StartCmd(cmd); err != nil {
		t.Fatal(err)
	}
	var peakHeap uint64
	var bounds []string
	sample := func() {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		peakHeap = max(peakHeap, ms.HeapInuse)
		agentB.do(t.Context(), func() {
			if len(agentB.reasm.bufs) > maxReassembly || len(agentB.limiter.table) > maxSources || len(agentB.answered) > maxAnswered {
				bounds = append(bounds, fmt.Sprintf("%d reassembling, %d sources, %d replies", len(agentB.reasm.bufs), len(agentB.limiter.table), len(agentB.answered)))
			}
		})
	}
	time.Sleep(2 * time.Second)
	sample()
	start := time.Now()
	agentA := runAgent(t, Config{ULA: ulaA, Auth: &Kerberos{Principal: princA, Realm: realm, Keytab: ktA, Krb5Conf: k.Config(t)},
		Transport: listenIn(t, nsA, addrA), Installer: recA}, PeerConfig{Name: "b", ULA: ulaB, Outer: addrB, Principal: princB})
	var keyedAfter time.Duration
	for time.Since(t0) < 60*time.Second {
		sample()
		_, okA := recA.peer(ulaB)
		_, okB := recB.peer(ulaA)
		if okA && okB && keyedAfter == 0 {
			keyedAfter = time.Since(start)
		}
		if keyedAfter > 0 && cmd.ProcessState != nil || keyedAfter > 0 && time.Since(t0) > seconds*time.Second+time.Second {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	cmd.Wait()
	cpu, wall := cpuTime()-cpu0, time.Since(t0)
	st, err := agentB.Stats(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	stA, _ := agentA.Status(t.Context())
	t.Logf("flooder: %s", strings.TrimSpace(out.String()))
	t.Logf("b received %d datagrams: %d over the per-source limit, %d cookies sent, %d bad MAC1, %d pieces refused by reassembly, %d INITs refused, %d accepted",
		st.Datagrams, st.RateLimited, st.CookiesSent, st.BadMAC1, st.FragmentsBad, st.InitsRefused, st.InitsAccepted)
	t.Logf("test process (both agents): %v CPU in %v wall (%.0f%% of one core); heap in use %.1f MiB before, peak %.1f MiB",
		cpu.Round(time.Millisecond), wall.Round(time.Millisecond), 100*cpu.Seconds()/wall.Seconds(),
		float64(before.HeapInuse)/(1<<20), float64(peakHeap)/(1<<20))
	if keyedAfter == 0 {
		t.Fatalf("a was not keyed with b during the flood: %+v", stA)
	}
	t.Logf("a keyed with b %v after it started, during the flood", keyedAfter.Round(time.Millisecond))
	if len(bounds) > 0 {
		t.Errorf("bounds exceeded: %v", bounds)
	}
	if st.Datagrams < 1000 || st.RateLimited == 0 {
		t.Errorf("the flood did not reach b or was not limited: %+v", st)
	}
	if peakHeap > 256<<20 {
		t.Errorf("heap grew to %d MiB under the flood", peakHeap>>20)
	}
	pa, _ := recA.peer(ulaB)
	pb, _ := recB.peer(ulaA)
	pairOK(t, pa, pb)
}
