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
//
// Inside the VM (hack/vmexec sets BTMM_IN_VM=1) a missing kernel feature is a
// failure too, never a skip. `make test` also checks every skip that remains
// against hack/skips.allow (hack/skipcheck).
package testenv

import (
	"flag"
	"os"
	"os/exec"
	"testing"
)

// RequireAll reports whether missing tools must fail tests instead of skipping.
func RequireAll() bool { return os.Getenv("BTMM_REQUIRE_ALL") == "1" }

// InVM reports whether the test runs inside hack/vmexec's VM.
func InVM() bool { return os.Getenv("BTMM_IN_VM") == "1" }

// HostTier skips t inside the VM: why says what makes the host kernel's run
// enough (it does not depend on the kernel's version or on what the host
// kernel lacks). hack/skipcheck checks that the netns tier ran it.
func HostTier(t testing.TB, why string) {
	t.Helper()
	if InVM() {
		t.Skipf("host tier: %s; runs under `make test-netns`", why)
	}
}

// RequireRoot skips t unless the test runs as root (in the VM, where tests
// always run as root, it fails).
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		if InVM() {
			t.Fatal("vm tier: not root inside the VM")
		}
		t.Skip("netns tier: needs root")
	}
}

// Unavailable skips t with reason, or fails it under BTMM_REQUIRE_ALL=1 or
// inside the VM, where the environment is ours and must provide it (an IPv6
// loopback address, a kernel that accepts a test input).
func Unavailable(t testing.TB, reason string) {
	t.Helper()
	if RequireAll() || InVM() {
		t.Fatal(reason + "; BTMM_REQUIRE_ALL=1 (or the VM) forbids skipping")
	}
	t.Skip(reason)
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

// Fuzzing reports whether the test binary runs with -test.fuzz (generating
// inputs), as opposed to running the seed corpus as a plain test.
func Fuzzing() bool {
	f := flag.Lookup("test.fuzz")
	return f != nil && f.Value.String() != ""
}
