// Package testenv gates btmm's test tiers. Each gate probes the machine (it does
// not guess from a version number) and skips the test with a reason that names
// the tier and what is missing, so a skipped tier shows up in `go test -v`.
//
// Tiers:
//   - unit: plain tests, no gate.
//   - netns: RequireNetNS — root and the ability to create network namespaces;
//     skipped under -short so `make test-unit` stays root-free in effect.
//   - vm: Require(t, ESP) and friends — kernel features this host may lack;
//     the same test binaries run inside the Debian-kernel VM (hack/vmexec),
//     where the probes succeed.
//
// When BTMM_REQUIRE_ALL=1 (set by `make test` and CI), a missing external
// program is a test failure, not a skip: CI installs everything, so a missing
// binary there is a broken install step, not a reason to hide a test.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// RequireAll reports whether missing tools must fail tests instead of skipping.
func RequireAll() bool { return os.Getenv("BTMM_REQUIRE_ALL") == "1" }

// RequireRoot skips t unless the test runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("netns tier: needs root")
	}
}

// RequireBinary returns the path of the named program. If it is not
// installed the test is skipped (or fails under BTMM_REQUIRE_ALL=1) with a
// message naming the Debian package that provides it.
func RequireBinary(t testing.TB, name, debPackage string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		if p, err := exec.LookPath(dir + "/" + name); err == nil {
			return p
		}
	}
	msg := name + " not installed (apt-get install " + debPackage + ")"
	if RequireAll() {
		t.Fatal(msg + "; BTMM_REQUIRE_ALL=1 forbids skipping")
	}
	t.Skip(msg)
	return ""
}
