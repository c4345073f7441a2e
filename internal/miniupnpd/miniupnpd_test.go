package miniupnpd

import (
	"strings"
	"testing"

	"github.com/btmm/btmm/internal/testenv"
)

// TestReferenceClient checks the gateway with miniupnp's own client,
// natpmpc, independently of package natpmp.
func TestReferenceClient(t *testing.T) {
	testenv.RequireNetNS(t)
	testenv.RequireBinary(t, "miniupnpd", "miniupnpd-nftables")
	testenv.RequireBinary(t, "natpmpc", "natpmpc")
	testenv.RequireBinary(t, "nft", "nftables")
	tp := NewTopology(t)
	d := StartT(t, tp.GW, tp.Options())
	out := tp.LAN.MustRun(t, "natpmpc", "-g", "192.168.1.1")
	if !strings.Contains(out, "Public IP address : 11.0.0.1") {
		t.Fatalf("natpmpc public address:\n%s", out)
	}
	out = tp.LAN.MustRun(t, "natpmpc", "-g", "192.168.1.1", "-a", "4600", "4600", "udp", "60")
	if !strings.Contains(out, "Mapped public port 4600 protocol UDP to local port 4600") {
		t.Fatalf("natpmpc map:\n%s", out)
	}
	rules, err := d.Rules()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(rules, "4600") {
		t.Fatalf("no rule for 4600:\n%s", rules)
	}
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if rules, _ := d.Rules(); rules != "" {
		t.Errorf("rules left after Stop:\n%s", rules)
	}
}

func TestKeepRulesetNeedsChains(t *testing.T) {
	testenv.RequireNetNS(t)
	testenv.RequireBinary(t, "miniupnpd", "miniupnpd-nftables")
	testenv.RequireBinary(t, "natpmpc", "natpmpc")
	testenv.RequireBinary(t, "nft", "nftables")
	tp := NewTopology(t)
	opts := tp.Options()
	opts.KeepRuleset = true
	if d, err := Start(tp.GW, opts); err == nil {
		d.Close()
		t.Fatal("Start with KeepRuleset and no ruleset succeeded")
	}
	// With the chains present (here from a first Start) it starts.
	d := StartT(t, tp.GW, tp.Options())
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	StartT(t, tp.GW, opts)
	if out := tp.LAN.MustRun(t, "natpmpc", "-g", "192.168.1.1"); !strings.Contains(out, "11.0.0.1") {
		t.Errorf("natpmpc: %s", out)
	}
}
