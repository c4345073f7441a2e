package e2e

import (
	"fmt"
	"os"
	"testing"

	"github.com/btmm/btmm/internal/testenv"
)

// benchStart is the start of an opt-in e2e benchmark run per dataplane
// that times echoes of `ping -i 0.01` (TestVMPathEstablishment /
// TestPathEstablishmentCleartext, TestVMReconvergence /
// TestReconvergenceCleartext): it skips unless BTMM_BENCH=1, and puts the
// run in its tier: xfrm needs ESP (the VM, `make bench-vm`); ebpf-cleartext
// is the host kernel's (`make bench`), skipped inside the VM, where TCG
// would only blur its times. what names the benchmark in the skip. It
// returns the number of repetitions: the environment variable countEnv
// (BTMM_BENCH_TRIES, BTMM_BENCH_MOVES), 20 when unset.
func benchStart(t *testing.T, dp, what, countEnv string) int {
	t.Helper()
	benchTier(t, dp, what)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	n := 20
	if v := os.Getenv(countEnv); v != "" {
		fmt.Sscan(v, &n)
	}
	return n
}

func benchTier(t *testing.T, dp, what string) {
	t.Helper()
	target := "make bench"
	if dp == "xfrm" {
		target = "make bench-vm"
	}
	if os.Getenv("BTMM_BENCH") != "1" {
		t.Skip("benchmark: set BTMM_BENCH=1 (" + target + ")")
	}
	if dp == "xfrm" {
		testenv.Require(t, testenv.ESP)
		return
	}
	testenv.RequireNetNS(t)
	if testenv.InVM() {
		t.Skipf("host tier: the cleartext %s benchmark runs on the host kernel (make bench); runs under `make test-netns`", what)
	}
}
