package xfrm

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/testenv"
)

// TestVMThroughputRatios measures TCP throughput (iperf3, 3 s each) between
// two hosts behind a router over plain IPv4, over ESP-in-UDP between ULAs
// (this package's dataplane) and over kernel WireGuard, in the same VM run,
// and logs ESP and WireGuard as ratios of plain. Nothing is asserted but
// that each path carries data. Run it with
//
//	BTMM_BENCH=1 CGO_ENABLED=0 go test -exec "$PWD/hack/vmexec" -run TestVMThroughputRatios -v ./xfrm/
//
// Under the VM's TCG emulation (no AES-NI) the ratios say how much each
// encapsulation costs relative to the others on that CPU, not real speeds.
func TestVMThroughputRatios(t *testing.T) {
	if os.Getenv("BTMM_BENCH") != "1" {
		t.Skip("benchmark: set BTMM_BENCH=1")
	}
	testenv.Require(t, testenv.ESP, testenv.XfrmIface, testenv.Wireguard)
	testenv.RequireBinary(t, "iperf3", "iperf3")
	testenv.RequireBinary(t, "wg", "wireguard-tools")
	l := newLab(t, 2)
	for i := range l.hosts {
		l.start(t, i, Config{})
		l.set(t, i)
	}
	a, b := l.hosts[0], l.hosts[1]
	setupWireguard(t, l)
	if _, err := b.ns.Start("iperf3", "-s"); err != nil {
		t.Fatal(err)
	}
	measure := func(dst string) float64 {
		var out string
		var err error
		for range 20 { // until the server listens
			if out, err = a.ns.Run("iperf3", "-c", dst, "-t", "3", "-J"); err == nil {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("iperf3 -c %s: %v", dst, err)
		}
		var r struct {
			End struct {
				SumReceived struct {
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			} `json:"end"`
		}
		if err := json.Unmarshal([]byte(out), &r); err != nil || r.End.SumReceived.BitsPerSecond == 0 {
			t.Fatalf("iperf3 -c %s: no result (%v)", dst, err)
		}
		return r.End.SumReceived.BitsPerSecond
	}
	plain := measure(b.outer.String())
	esp := measure(b.ula.String())
	wg := measure("fd01::b")
	t.Logf("TCP throughput, same VM run: plain IPv4 %.0f Mb/s; ESP-in-UDP (rfc4106 gcm) %.0f Mb/s = %.3f x plain; WireGuard %.0f Mb/s = %.3f x plain; ESP/WireGuard = %.2f",
		plain/1e6, esp/1e6, esp/plain, wg/1e6, wg/plain, esp/wg)
}

func setupWireguard(t *testing.T, l *lab) {
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
