package xfrm

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/benchrun"
	"github.com/btmm/btmm/internal/tcpbench"
	"github.com/btmm/btmm/internal/testenv"
)

// BenchmarkVMThroughput: TCP between two hosts behind a router in one VM,
// alternated over benchrun.Rounds() rounds: plain IPv4 between the outer
// addresses (the baseline), ESP-in-UDP between the ULAs (this package's
// dataplane, rfc4106(gcm(aes))) and kernel WireGuard between fd01::a/b.
// Under qemu TCG only the ratios within the run mean something; with
// BTMM_VM_CPU=max (make bench-vm) the guest CPU emulates AES-NI and PCLMUL
// and the kernel's AES-NI GCM driver is the one used.
//
//	BTMM_VM_CPU=max go test -exec "$PWD/hack/vmexec" -run '^$' -bench VMThroughput -benchtime 1x ./xfrm/
func BenchmarkVMThroughput(b *testing.B) {
	testenv.Require(b, testenv.ESP, testenv.XfrmIface, testenv.Wireguard)
	testenv.RequireBinary(b, "wg", "wireguard-tools")
	l := newLab(b, 2)
	for i := range l.hosts {
		l.start(b, i, Config{Logger: slog.New(slog.DiscardHandler)})
		l.set(b, i)
	}
	a, c := l.hosts[0], l.hosts[1]
	setupWireguard(b, l)
	drv, _ := os.ReadFile("/proc/crypto")
	gcm := "unknown"
	if m := regexp.MustCompile(`(?m)^name\s*: rfc4106\(gcm\(aes\)\)\ndriver\s*: (\S+)`).FindSubmatch(drv); m != nil {
		gcm = string(m[1]) // instantiated by the dataplane's SAs
	}
	model := "unknown"
	if m := regexp.MustCompile(`(?m)^model name\s*: (.+)$`).FindSubmatch(must2(os.ReadFile("/proc/cpuinfo"))); m != nil {
		model = string(m[1])
	}
	run := func(dst netip.Addr) func(testing.TB) []benchrun.Metric {
		return func(testing.TB) []benchrun.Metric {
			r, err := tcpbench.Run(b.Context(), a.ns, c.ns, dst, 3*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			return []benchrun.Metric{{Value: r.Mbps(), Unit: "Mbit/s"}}
		}
	}
	benchrun.Alternate(b, fmt.Sprintf("TCP (3 s a round) between two hosts behind a router in one VM (Debian %s under qemu TCG, "+
		"CPU %q, ESP driver %s): plain IPv4 vs ESP-in-UDP between the ULAs (package xfrm) vs kernel WireGuard",
		kernelRelease(), model, gcm), "plain-ipv4",
		benchrun.Case{Name: "plain-ipv4", Run: run(c.outer)},
		benchrun.Case{Name: "esp-in-udp", Run: run(c.ula)},
		benchrun.Case{Name: "wireguard", Run: run(netip.MustParseAddr("fd01::b"))},
	)
}

func must2[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func kernelRelease() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}

func setupWireguard(t testing.TB, l *lab) {
	t.Helper()
	dir := t.TempDir()
	pub := make([]string, len(l.hosts))
	for i := range l.hosts {
		key, err := exec.Command("wg", "genkey").Output()
		must(t, err)
		kf := filepath.Join(dir, fmt.Sprintf("k%d", i))
		must(t, os.WriteFile(kf, key, 0o600))
		c := exec.Command("wg", "pubkey")
		c.Stdin = strings.NewReader(string(key))
		p, err := c.Output()
		must(t, err)
		pub[i] = strings.TrimSpace(string(p))
	}
	for i, h := range l.hosts {
		j := 1 - i
		peer := l.hosts[j]
		h.ns.MustRun(t, "ip", "link", "add", "wg0", "type", "wireguard")
		h.ns.MustRun(t, "wg", "set", "wg0", "private-key", filepath.Join(dir, fmt.Sprintf("k%d", i)), "listen-port", "51820",
			"peer", pub[j], "allowed-ips", fmt.Sprintf("fd01::%x/128", 0xa+j), "endpoint", peer.outer.String()+":51820")
		h.ns.MustRun(t, "ip", "-6", "addr", "add", fmt.Sprintf("fd01::%x/128", 0xa+i), "dev", "wg0", "nodad")
		h.ns.MustRun(t, "ip", "link", "set", "wg0", "up")
		h.ns.MustRun(t, "ip", "-6", "route", "add", fmt.Sprintf("fd01::%x/128", 0xa+j), "dev", "wg0")
	}
}
