package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const rulesText = `# comment
netns vm    .*  vm tier: this kernel lacks .*; runs under ` + "`make test-vm`" + `  # host lacks ESP
vm    netns .*  host tier: .*  # TCX
vm    optin p\.TestBench  benchmark: set BTMM_BENCH=1  # opt-in
`

// stream renders go test -json lines: each test is "name action message".
func stream(pkg string, tests ...[3]string) string {
	var b strings.Builder
	for _, tc := range tests {
		fmt.Fprintf(&b, `{"Action":"run","Package":%q,"Test":%q}`+"\n", pkg, tc[0])
		if tc[2] != "" {
			fmt.Fprintf(&b, `{"Action":"output","Package":%q,"Test":%q,"Output":"    x_test.go:12: %s\n"}`+"\n", pkg, tc[0], tc[2])
		}
		fmt.Fprintf(&b, `{"Action":%q,"Package":%q,"Test":%q}`+"\n", tc[1], pkg, tc[0])
	}
	b.WriteString("not json: build noise\n")
	return b.String()
}

func mustRun(t *testing.T, s string) run {
	t.Helper()
	r, err := parseRun(strings.NewReader(s))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestCheck(t *testing.T) {
	rules, err := parseRules(strings.NewReader(rulesText))
	if err != nil {
		t.Fatal(err)
	}
	vmSkip := "vm tier: this kernel lacks esp4/esp6 (operation not supported); runs under `make test-vm`"
	netns := mustRun(t, stream("p",
		[3]string{"TestESP", "skip", vmSkip},
		[3]string{"TestSit", "skip", vmSkip},
		[3]string{"TestPlain", "pass", ""},
		[3]string{"TestTCX", "pass", ""},
	))
	vm := mustRun(t, stream("p",
		[3]string{"TestESP", "pass", ""},
		[3]string{"TestSit", "fail", ""},
		[3]string{"TestTCX", "skip", "host tier: the VM's 6.1 kernel has no tcx"},
		[3]string{"TestBench", "skip", "benchmark: set BTMM_BENCH=1"},
		[3]string{"TestV6", "skip", "no IPv6 loopback: address not available"},
	))
	for _, tc := range []struct {
		tier       string
		r, other   run
		want       []string
		wantCounts map[string]int
	}{
		{"netns", netns, nil, nil, map[string]int{"vm": 2}},
		{"netns", netns, vm, []string{"p.TestSit skipped as deferred to the vm tier (hack/skips.allow:2), but there it fail"}, map[string]int{"vm": 2}},
		{"vm", vm, netns, []string{`p.TestV6 skipped without an allowed reason: "no IPv6 loopback`}, map[string]int{"netns": 1, "optin": 1}},
		{"vm", vm, mustRun(t, stream("p", [3]string{"TestESP", "pass", ""})), []string{
			"p.TestTCX skipped as deferred to the netns tier (hack/skips.allow:3), but there it did not run",
			"p.TestV6 skipped without"}, map[string]int{"netns": 1, "optin": 1}},
	} {
		got, counts := check(tc.tier, tc.r, tc.other, rules)
		if len(got) != len(tc.want) {
			t.Errorf("%s: problems %q, want %d like %q", tc.tier, got, len(tc.want), tc.want)
			continue
		}
		for i := range got {
			if !strings.Contains(got[i], tc.want[i]) {
				t.Errorf("%s: problem %q, want it to contain %q", tc.tier, got[i], tc.want[i])
			}
		}
		if fmt.Sprint(counts) != fmt.Sprint(tc.wantCounts) {
			t.Errorf("%s: counts %v, want %v", tc.tier, counts, tc.wantCounts)
		}
	}
}

func TestParseRulesErrors(t *testing.T) {
	for _, bad := range []string{
		"netns vm .* msg",               // no reason
		"netns vm .* msg # ",            // empty reason
		"host vm .* msg # why",          // bad tier
		"netns maybe .* msg # why",      // bad category
		"vm vm .* msg # why",            // deferred to itself
		"netns vm ( msg # why",          // bad test regexp
		"netns vm .* # why",             // no message
		"netns vm .* unbalanced( # why", // bad message regexp
	} {
		if _, err := parseRules(strings.NewReader(bad)); err == nil {
			t.Errorf("%q: accepted", bad)
		}
	}
}

// TestRepoAllowList parses the real allow-list and checks that an empty run
// is refused: a tier that ran nothing must not pass the check.
func TestRepoAllowList(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty.json")
	if err := os.WriteFile(empty, []byte(`{"Action":"output","Package":"p","Output":"? p [no test files]\n"}`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := run1("../skips.allow", empty, "", &strings.Builder{}); err == nil || !strings.Contains(err.Error(), "no test results") {
		t.Fatalf("empty run: err = %v", err)
	}
	ok := filepath.Join(dir, "ok.json")
	if err := os.WriteFile(ok, []byte(stream("p", [3]string{"TestX", "pass", ""})), 0o644); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	if err := run1("../skips.allow", ok, "", &out); err != nil {
		t.Fatalf("clean run: %v", err)
	}
	if !strings.Contains(out.String(), "netns tier: 1 results") {
		t.Fatalf("summary: %q", out.String())
	}
}
