package testenv

import (
	"os"
	"testing"
)

// TestProbesReport logs what this kernel offers; it fails only if the netns
// probe contradicts the netns gate (root, not -short, yet no netns).
func TestProbesReport(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("netns tier: needs root to probe")
	}
	for f := Feature(0); f < numFeatures; f++ {
		t.Logf("%-32s %v", f, Probe(f))
	}
	if err := Probe(NetNS); err != nil && !testing.Short() {
		t.Fatalf("cannot make netns+veth as root: %v", err)
	}
}

func TestRequireBinaryFound(t *testing.T) {
	if p := RequireBinary(t, "sh", "dash"); p == "" {
		t.Fatal("sh not found by path")
	}
}
