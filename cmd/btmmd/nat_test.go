package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/btmm/btmm/natpmp"
)

// An IPv6-only host has no IPv4 default route: btmmctl status says so, not
// "failed".
func TestNATStatusIPv6Only(t *testing.T) {
	st := natpmp.Status{State: natpmp.StateFailed, Detail: fmt.Errorf("natpmp: default route: %w", natpmp.ErrNoRoute).Error()}
	if got := natStatus(st); !strings.HasPrefix(got, "no IPv4 default route") || strings.Contains(got, "failed") {
		t.Errorf("no route: %q", got)
	}
	st = natpmp.Status{State: natpmp.StateFailed, Detail: "pcp: refused"}
	if got := natStatus(st); got != st.String() {
		t.Errorf("other failure: %q, want %q", got, st.String())
	}
}
