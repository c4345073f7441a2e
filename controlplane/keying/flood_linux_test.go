//go:build linux

package keying

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jcmturner/gokrb5/v8/config"
	"github.com/jcmturner/gokrb5/v8/keytab"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/internal/krbtest"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// floodEnv makes the test binary a flooder instead of running tests (see
// TestMain): "target=IP:PORT k1=HEX ports=N seconds=S".
const floodEnv = "BTMM_KEYING_FLOOD"

// responderEnv makes the test binary the flooded responder (see
// TestNetnsInitFlood), so that its CPU and memory are its own:
// "peer=IP:PORT keytab=PATH krb5conf=PATH", its tunnel socket (made in b's
// namespace by the test) as file descriptor 3; the process itself stays in
// the root namespace, where the test's KDC is.
const responderEnv = "BTMM_KEYING_RESPONDER"

func TestMain(m *testing.M) {
	if spec := os.Getenv(floodEnv); spec != "" {
		os.Exit(flood(spec))
	}
	if spec := os.Getenv(responderEnv); spec != "" {
		os.Exit(responder(spec))
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

// responderResult is what the responder process reports when its stdin
// closes: its keys only as hashes.
type responderResult struct {
	Keyed           bool
	OutSPI, InSPI   uint32
	OutKey, InKey   string // SHA-256, hex
	Stats           Stats
	HeapBefore      uint64 // Go heap in use once listening
	PeakHeap        uint64 // its peak while running
	Bounds          []string
	CPU, Wall       time.Duration
	MaxRSSKiB       int64
	MaxRSSBeforeKiB int64
}

// responder runs b, a Kerberos responder with a's principal as its one
// peer, on its own process until its stdin closes; it samples its heap and
// its bounded tables every 100 ms and prints a responderResult as JSON.
func responder(spec string) int {
	kv := map[string]string{}
	for _, f := range strings.Fields(spec) {
		k, v, _ := strings.Cut(f, "=")
		kv[k] = v
	}
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "responder:", err); return 1 }
	peer, err := netip.ParseAddrPort(kv["peer"])
	if err != nil {
		return fail(err)
	}
	kt, err := keytab.Load(kv["keytab"])
	if err != nil {
		return fail(err)
	}
	conf, err := config.Load(kv["krb5conf"])
	if err != nil {
		return fail(err)
	}
	pc, err := net.FilePacketConn(os.NewFile(3, "tunnel socket"))
	if err != nil {
		return fail(err)
	}
	c, ok := pc.(*net.UDPConn)
	if !ok {
		return fail(fmt.Errorf("fd 3 is a %T, not a UDP socket", pc))
	}
	rec := newRecorder("b")
	ag, err := New(Config{ULA: ulaB, Auth: &Kerberos{Principal: princB, Realm: realm, Keytab: kt, Krb5Conf: conf},
		Transport: NewUDPTransport(c), Installer: rec})
	if err != nil {
		return fail(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { ag.Run(ctx); close(done) }()
	if err := ag.SetPeers(ctx, []PeerConfig{{Name: "a", ULA: ulaA, Outer: peer, Principal: princA}}); err != nil {
		return fail(err)
	}
	var res responderResult
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	res.HeapBefore, res.MaxRSSBeforeKiB = ms.HeapInuse, maxRSS()
	cpu0, t0 := cpuTime(), time.Now()
	stdinClosed := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(stdinClosed) }()
	fmt.Println("ready")
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for running := true; running; {
		select {
		case <-stdinClosed:
			running = false
		case <-tick.C:
		}
		runtime.ReadMemStats(&ms)
		res.PeakHeap = max(res.PeakHeap, ms.HeapInuse)
		ag.do(ctx, func() {
			if len(ag.reasm.bufs) > maxReassembly || len(ag.limiter.table) > maxSources || len(ag.answered) > maxAnswered {
				res.Bounds = append(res.Bounds, fmt.Sprintf("%d reassembling, %d sources, %d replies", len(ag.reasm.bufs), len(ag.limiter.table), len(ag.answered)))
			}
		})
	}
	res.CPU, res.Wall, res.MaxRSSKiB = cpuTime()-cpu0, time.Since(t0), maxRSS()
	res.Stats, _ = ag.Stats(ctx)
	st, _ := ag.Status(ctx)
	p, ok := rec.peer(ulaA)
	res.Keyed = ok && len(st) == 1 && st[0].Established
	hash := func(b []byte) string { h := sha256.Sum256(b); return hex.EncodeToString(h[:]) }
	res.OutSPI, res.InSPI, res.OutKey, res.InKey = p.Out.SPI, p.In.SPI, hash(p.Out.Key), hash(p.In.Key)
	cancel()
	<-done
	json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

func cpuTime() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func maxRSS() int64 {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return ru.Maxrss
}

// TestNetnsInitFlood: b, a real Kerberos responder running as its own
// process in its namespace, is flooded for 10 s, from 256 source ports of a
// third namespace, with INIT datagrams that pass its cheap MAC1 check; 2 s
// into the flood a (another namespace, in the test process) keys with b.
// a is keyed during the flood; b's reassembly, rate-limiter and reply
// caches stay within their bounds, and b reports its own CPU time, heap and
// peak RSS over the run (logged, and in docs/keying.md; only the memory has
// a generous ceiling, nothing is asserted against a clock):
//
//	go test -count=1 -run TestNetnsInitFlood -v ./controlplane/keying/
func TestNetnsInitFlood(t *testing.T) {
	testenv.HostTier(t, "a UDP flood between namespaces measuring the responder process, no kernel feature the host lacks (and its CPU figures mean nothing under TCG)")
	testenv.RequireNetNS(t)
	k := krbtest.Start(t, realm)
	k.AddPrincipal(t, princA)
	k.AddPrincipal(t, princB)
	_, ktA := k.Keytab(t, "a.keytab", princA)
	ktPathB, _ := k.Keytab(t, "b.keytab", princB)
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
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}

	// b: its own process, its socket in nsB.
	var sockB *net.UDPConn
	if err := nsB.Do(func() (err error) {
		sockB, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(addrB))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	fileB, err := sockB.File()
	sockB.Close()
	if err != nil {
		t.Fatal(err)
	}
	bCmd := exec.Command(exe, "-test.run=^$")
	bCmd.Env = append(os.Environ(), fmt.Sprintf("%s=peer=%v keytab=%s krb5conf=%s", responderEnv, addrA, ktPathB, k.Krb5Conf))
	bCmd.ExtraFiles = []*os.File{fileB}
	bIn, err := bCmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var bOut, bErr bytes.Buffer
	bPipe, err := bCmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	bCmd.Stderr = &bErr
	if err := bCmd.Start(); err != nil {
		t.Fatal(err)
	}
	fileB.Close()
	t.Cleanup(func() { bIn.Close(); bCmd.Process.Kill(); bCmd.Wait() })
	br := bufio.NewReader(bPipe)
	if line, err := br.ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("responder did not start: %q %v\n%s", line, err, bErr.String())
	}
	bDone := make(chan struct{})
	go func() { io.Copy(&bOut, br); close(bDone) }()

	const seconds, ports = 10, 256
	cmd := nsF.Command(context.Background(), exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=target=%v k1=%x ports=%d seconds=%d", floodEnv, addrB,
		mac1Key(ulaB, []byte(princB+"@"+realm)), ports, seconds))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	t0 := time.Now()
	if err := nsF.StartCmd(cmd); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	start := time.Now()
	recA := newRecorder("a")
	agentA := runAgent(t, Config{ULA: ulaA, Auth: &Kerberos{Principal: princA, Realm: realm, Keytab: ktA, Krb5Conf: k.Config(t)},
		Transport: listenIn(t, nsA, addrA), Installer: recA}, PeerConfig{Name: "b", ULA: ulaB, Outer: addrB, Principal: princB})
	var keyedAfter time.Duration
	for keyedAfter == 0 && time.Since(t0) < 60*time.Second {
		if _, ok := recA.peer(ulaB); ok {
			keyedAfter = time.Since(start)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Read before b stops (its DELETE removes a's SAs); the flooder stops
	// itself at t0 + seconds.
	pa, _ := recA.peer(ulaB)
	floodEnded := start.Add(keyedAfter).After(t0.Add(seconds * time.Second))
	cmd.Wait()
	bIn.Close()
	<-bDone
	if err := bCmd.Wait(); err != nil {
		t.Fatalf("responder: %v\n%s", err, bErr.String())
	}
	var res responderResult
	if err := json.Unmarshal(bOut.Bytes(), &res); err != nil {
		t.Fatalf("responder's report %q: %v\n%s", bOut.String(), err, bErr.String())
	}
	st := res.Stats
	t.Logf("flooder: %s", strings.TrimSpace(out.String()))
	t.Logf("b received %d datagrams: %d over the per-source limit, %d cookies sent, %d bad MAC1, %d pieces refused by reassembly, %d INITs refused, %d accepted",
		st.Datagrams, st.RateLimited, st.CookiesSent, st.BadMAC1, st.FragmentsBad, st.InitsRefused, st.InitsAccepted)
	t.Logf("b (the responder's own process): %v CPU in %v wall (%.0f%% of one core); Go heap in use %.1f MiB once listening, peak %.1f MiB; peak RSS %.1f MiB (%.1f MiB once listening)",
		res.CPU.Round(time.Millisecond), res.Wall.Round(time.Millisecond), 100*res.CPU.Seconds()/res.Wall.Seconds(),
		float64(res.HeapBefore)/(1<<20), float64(res.PeakHeap)/(1<<20), float64(res.MaxRSSKiB)/1024, float64(res.MaxRSSBeforeKiB)/1024)
	stA, _ := agentA.Status(t.Context())
	if keyedAfter == 0 {
		t.Fatalf("a was not keyed with b during the flood: %+v", stA)
	}
	if floodEnded {
		t.Errorf("the flood had ended before a was keyed (%v after a started): the test did not key under the flood", keyedAfter)
	}
	t.Logf("a keyed with b %v after it started, during the flood", keyedAfter.Round(time.Millisecond))
	if len(res.Bounds) > 0 {
		t.Errorf("bounds exceeded: %v", res.Bounds)
	}
	if st.Datagrams < 1000 || st.RateLimited == 0 {
		t.Errorf("the flood did not reach b or was not limited: %+v", st)
	}
	if res.PeakHeap > 256<<20 || res.MaxRSSKiB > 512<<10 {
		t.Errorf("b's memory grew under the flood: heap %d MiB, RSS %d MiB", res.PeakHeap>>20, res.MaxRSSKiB>>10)
	}
	hash := func(b []byte) string { h := sha256.Sum256(b); return hex.EncodeToString(h[:]) }
	if !res.Keyed || res.OutSPI != pa.In.SPI || res.InSPI != pa.Out.SPI || res.OutKey != hash(pa.In.Key) || res.InKey != hash(pa.Out.Key) {
		t.Errorf("b's SA pair (keyed %v, out %08x in %08x) does not match a's (out %08x in %08x)", res.Keyed, res.OutSPI, res.InSPI, pa.Out.SPI, pa.In.SPI)
	}
}
