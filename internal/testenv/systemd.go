package testenv

import (
	"os"
	"testing"
)

// RequireSystemd skips t unless systemd runs as PID 1: the vm tier's systemd
// mode (BTMM_VM_INIT=systemd hack/vmexec) boots Debian's systemd in the guest
// for tests of units, sd_notify, systemctl and systemd-resolved. Inside that
// guest a missing systemd is a failure, not a skip.
func RequireSystemd(t testing.TB) {
	t.Helper()
	if _, err := os.Stat("/run/systemd/system"); err == nil {
		return
	}
	if os.Getenv("BTMM_VM_INIT") == "systemd" {
		t.Fatal("vm tier (systemd mode): systemd is not PID 1 in this guest")
	}
	t.Skip("vm tier (systemd): needs systemd as PID 1; runs under `make test-vm` (BTMM_VM_INIT=systemd)")
}
