package kernelprobe_test

import (
	"errors"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane/kernelprobe"
	"github.com/btmm/btmm/internal/testenv"
)

// TestProbeESPInTCP: the espintcp probe answers yes or ENOENT (nothing
// else: a setup failure would be a wrong "no"), and the answer agrees with
// the kernel's symbols (espintcp_init_sk is there once the ULP exists:
// built in, or the module the probe's request loaded). On this host (6.18)
// and Debian 6.1 the answer is no (CONFIG_INET_ESPINTCP unset).
func TestProbeESPInTCP(t *testing.T) {
	testenv.RequireNetNS(t)
	err := kernelprobe.Probe(kernelprobe.ESPInTCP)
	t.Logf("espintcp: %v", err)
	if err != nil && !errors.Is(err, unix.ENOENT) {
		t.Fatalf("probe failed otherwise than ENOENT: %v", err)
	}
	syms, rerr := os.ReadFile("/proc/kallsyms")
	if rerr != nil {
		t.Fatal(rerr)
	}
	if has := strings.Contains(string(syms), " espintcp_init_sk"); has != (err == nil) {
		t.Errorf("probe says %v but espintcp_init_sk in /proc/kallsyms: %v", err, has)
	}
}
