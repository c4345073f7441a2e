package ebpf

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/testenv"
)

// iperf runs an iperf3 client from a to dst (server in b) for secs seconds
// and returns the receiver's bits per second.
func iperf(b testing.TB, from, to *host, dst netip.Addr, secs int) float64 {
	b.Helper()
	srv, err := to.ns.Start("iperf3", "-s", "-1", "-B", dst.String(), "-p", "5201")
	if err != nil {
		b.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	var out string
	for range 50 { // wait for the server to listen
		out, err = from.ns.Run("iperf3", "-c", dst.String(), "-p", "5201", "-t", fmt.Sprint(secs), "-J")
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		b.Fatalf("iperf3: %v", err)
	}
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil || r.End.SumReceived.BitsPerSecond == 0 {
		b.Logf("iperf3 output: %s", out)
		b.Fatalf("iperf3 json: %v", err)
	}
	return r.End.SumReceived.BitsPerSecond
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// BenchmarkThroughput reports TCP throughput through the eBPF path
// (cleartext mode; ULA -> ULA in IPv4/UDP) as a ratio of the raw veth
// (IPv4 TCP, same namespaces) measured in the same run. Nothing is asserted.
//
//	go test -run XXX -bench Throughput -benchtime 1x ./ebpf/
func BenchmarkThroughput(b *testing.B) {
	testenv.RequireBinary(b, "iperf3", "iperf3")
	a, c := topology(b)
	connect(b, a, c, Config{Cleartext: true})
	for b.Loop() {
		raw := iperf(b, a, c, c.outer, 3)
		tun := iperf(b, a, c, c.ula, 3)
		b.ReportMetric(raw/1e6, "raw-Mbit/s")
		b.ReportMetric(tun/1e6, "ebpf-Mbit/s")
		b.ReportMetric(tun/raw, "ebpf/raw")
	}
}

// BenchmarkAgentCPU reports the CPU seconds this process (which owns the
// dataplane, like the agent) uses while iperf3 pushes 10 s of TCP through
// the tunnel. Go writes maps only on change, so this should be ~0.
func BenchmarkAgentCPU(b *testing.B) {
	testenv.RequireBinary(b, "iperf3", "iperf3")
	a, c := topology(b)
	connect(b, a, c, Config{Cleartext: true})
	for b.Loop() {
		srv, err := c.ns.Start("iperf3", "-s", "-1", "-B", c.ula.String(), "-p", "5202")
		if err != nil {
			b.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		cl := a.ns.Command(b.Context(), "iperf3", "-c", c.ula.String(), "-p", "5202", "-t", "10")
		before := cpuSeconds()
		if out, err := cl.CombinedOutput(); err != nil {
			b.Fatalf("iperf3: %v: %s", err, out)
		}
		b.ReportMetric(cpuSeconds()-before, "agent-cpu-s/10s")
		srv.Wait()
		st := peerStats(b, a)
		b.ReportMetric(float64(st.TxBytes)/1e9, "tunnel-GB")
	}
}

// BenchmarkSecureVM reports TCP throughput between ULAs on this dataplane in
// secure mode (XFRM ESP between ULAs + TC header swap) against two hosts on
// plain XFRM ESP-in-UDP, in the same VM run (absolute numbers under TCG
// mean nothing; the ratio does).
//
//	CGO_ENABLED=0 go test -exec "$PWD/hack/vmexec" -run XXX -bench SecureVM -benchtime 1x ./ebpf/
func BenchmarkSecureVM(b *testing.B) {
	testenv.Require(b, testenv.ESP)
	testenv.RequireBinary(b, "iperf3", "iperf3")
	for b.Loop() {
		a, c := topology(b)
		connect(b, a, c, Config{})
		ebpfBPS := iperf(b, a, c, c.ula, 3)
		closeAndCheck(b, a, c)

		st := a.state(c, netip.AddrPortFrom(c.outer, c.port))
		xfrmHost(b, a, c, st.Peers[0].Out, st.Peers[0].In)
		xfrmHost(b, c, a, st.Peers[0].In, st.Peers[0].Out)
		xfrmBPS := iperf(b, a, c, c.ula, 3)
		b.ReportMetric(ebpfBPS/1e6, "ebpf-secure-Mbit/s")
		b.ReportMetric(xfrmBPS/1e6, "xfrm-espinudp-Mbit/s")
		b.ReportMetric(ebpfBPS/xfrmBPS, "ebpf/xfrm")
	}
}
