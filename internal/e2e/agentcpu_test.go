package e2e

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/benchrun"
	"github.com/btmm/btmm/internal/tcpbench"
	"github.com/btmm/btmm/internal/testenv"
)

// TestAgentCPU is issue 18's agent CPU benchmark (reported, never
// asserted; `make bench-vm` and `make bench`): how much CPU btmmd itself
// spends while the kernel carries a bulk transfer through its dataplane.
// Per dataplane, a lab of its own: btmmd on host1 (behind gw1's NAT, port
// mapped with PCP) and on pub (public), keyed with Kerberos; then, over
// benchrun.Rounds() alternated rounds, 10 s of TCP from host1 to pub's ULA
// ("bulk") and 10 s without traffic ("idle", the baseline of its lab). The
// CPU is read from /proc/<pid>/stat of the two btmmd processes (utime +
// stime, both ends summed, 10 ms ticks), not from the test process.
//
// In the VM (Debian 6.1 under TCG): xfrm and ebpf (secure mode); on the
// host kernel (no ESP): ebpf-cleartext.
//
//	BTMM_BENCH=1 BTMM_BIN_DIR="$PWD/bin" go test -exec "$PWD/hack/vmexec" -run TestAgentCPU -v ./internal/e2e/
//	BTMM_BENCH=1 go test -run TestAgentCPU -v ./internal/e2e/
func TestAgentCPU(t *testing.T) {
	if os.Getenv("BTMM_BENCH") != "1" {
		t.Skip("benchmark: set BTMM_BENCH=1 (make bench, make bench-vm)")
	}
	testenv.RequireNetNS(t)
	dataplanes := []string{"ebpf-cleartext"}
	where := "this kernel (" + kernelRelease() + "), no ESP"
	if testenv.InVM() {
		testenv.Require(t, testenv.ESP)
		dataplanes = []string{"xfrm", "ebpf"}
		where = "Debian " + kernelRelease() + " under qemu TCG"
	}
	const d = 10 * time.Second
	var cases []benchrun.Case
	for _, dp := range dataplanes {
		s := newSystem(t)
		l := s.l
		s.upnp(t, l.GW1)
		h1 := s.startHost(t, "host1", l.Host1, hostConf{dataplane: dp})
		pub := s.startHost(t, "pub", l.Pub, hostConf{dataplane: dp})
		sts := s.keyed(t, h1, pub)
		ula := sts["pub"].ULA
		reach(t, h1, ula, 60*time.Second)
		cpu := func() time.Duration { return btmmdCPU(t, h1) + btmmdCPU(t, pub) }
		round := func(bulk bool) func(testing.TB) []benchrun.Metric {
			return func(testing.TB) []benchrun.Metric {
				c0 := cpu()
				var r tcpbench.Result
				if bulk {
					var err error
					if r, err = tcpbench.Run(t.Context(), l.Host1, l.Pub, ula, d); err != nil {
						t.Fatalf("%s: %v", dp, err)
					}
				} else {
					time.Sleep(d)
				}
				used := cpu() - c0
				m := []benchrun.Metric{{Value: float64(used.Milliseconds()), Unit: "btmmd-cpu-ms"}}
				if bulk {
					m = append(m, benchrun.Metric{Value: r.Mbps(), Unit: "Mbit/s"}, benchrun.Metric{Value: float64(r.Bytes) / 1e9, Unit: "GB"})
				}
				return m
			}
		}
		cases = append(cases,
			benchrun.Case{Name: dp + "-idle", Run: round(false)},
			benchrun.Case{Name: dp + "-bulk", Run: round(true), Baseline: dp + "-idle"})
	}
	benchrun.Alternate(t, fmt.Sprintf("CPU of the two btmmd processes (/proc/<pid>/stat utime+stime, summed, 10 ms ticks) "+
		"over 10 s: a TCP bulk transfer from host1 (behind a NAT) to pub's ULA through the dataplane vs 10 s idle "+
		"in the same lab; one lab per dataplane, rounds alternated; %s; btmmd logs at debug level", where), "", cases...)
}

// btmmdCPU is the CPU time (user + system) h's btmmd has used, from
// /proc/<pid>/stat of that process (checked to be btmmd).
func btmmdCPU(t *testing.T, h *host) time.Duration {
	t.Helper()
	pid := h.d.cmd.Process.Pid
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatalf("btmmd on %s: %v", h.name, err)
	}
	// pid (comm) state ppid ... utime stime: comm may hold spaces.
	open, end := bytes.IndexByte(data, '('), bytes.LastIndexByte(data, ')')
	if open < 0 || end < open {
		t.Fatalf("/proc/%d/stat: %q", pid, data)
	}
	if comm := string(data[open+1 : end]); comm != "btmmd" {
		t.Fatalf("/proc/%d/stat is %q, not btmmd (started through a wrapper?)", pid, comm)
	}
	f := strings.Fields(string(data[end+1:]))
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		t.Fatalf("/proc/%d/stat: %q", pid, data)
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond // USER_HZ is 100 on Linux
}

func kernelRelease() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}
