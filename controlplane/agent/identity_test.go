package agent

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/btmm/btmm/controlplane/keying"
	"github.com/btmm/btmm/dns/register"
)

// TestPeerBookPrincipalsAndConflicts: the principal comes from the name
// (or the local override), never from the peer's TXT; a ULA claimed by two
// names is keyed with neither and reported; when one claim goes, the other
// name is keyed again; a name that moves to a new ULA drops the old one.
func TestPeerBookPrincipalsAndConflicts(t *testing.T) {
	u := netip.MustParseAddr
	out := netip.MustParseAddrPort("192.0.2.1:4500")
	override := map[string]string{"nas": "host/nas.example.org@OTHER.REALM"}
	principalFor := func(h string) string {
		if p, ok := override[h]; ok {
			return p
		}
		return keying.DefaultPrincipal(h, "alice.btmm.example.", "")
	}
	var b peerBook
	evil := register.Capabilities{Principal: "host/mallory.alice.btmm.example"}
	b.apply(PeerEvent{Name: "laptop", ULA: u("fd00::b"), Outer: out, Capabilities: evil})
	b.apply(PeerEvent{Name: "nas", ULA: u("fd00::d"), Outer: out})
	kp, conflicts := b.keying(principalFor)
	want := []keying.PeerConfig{
		{Name: "laptop", ULA: u("fd00::b"), Outer: out, Principal: "host/laptop.alice.btmm.example"},
		{Name: "nas", ULA: u("fd00::d"), Outer: out, Principal: "host/nas.example.org@OTHER.REALM"},
	}
	if !slices.Equal(kp, want) || len(conflicts) != 0 {
		t.Fatalf("keying %+v conflicts %+v", kp, conflicts)
	}
	// mallory publishes laptop's ULA under its own name.
	b.apply(PeerEvent{Name: "mallory", ULA: u("fd00::b"), Outer: out})
	kp, conflicts = b.keying(principalFor)
	if len(kp) != 1 || kp[0].Name != "nas" {
		t.Errorf("keyed during the conflict: %+v", kp)
	}
	if len(conflicts) != 1 || conflicts[0].ULA != u("fd00::b") || !slices.Equal(conflicts[0].Names, []string{"laptop", "mallory"}) {
		t.Errorf("conflicts %+v", conflicts)
	}
	if _, ok := b.holder(u("fd00::b")); ok {
		t.Error("a ULA in conflict has a holder")
	}
	b.apply(PeerEvent{Removed: true, Name: "mallory", ULA: u("fd00::b")})
	if kp, conflicts = b.keying(principalFor); len(kp) != 2 || len(conflicts) != 0 {
		t.Errorf("after the claim went: %+v %+v", kp, conflicts)
	}
	// laptop reboots: Added with the new ULA may come before Removed of the old.
	b.apply(PeerEvent{Name: "laptop", ULA: u("fd00::bb"), Outer: out})
	b.apply(PeerEvent{Removed: true, Name: "laptop", ULA: u("fd00::b")})
	if p, ok := b.holder(u("fd00::bb")); !ok || p.Name != "laptop" {
		t.Errorf("laptop's new ULA: %+v %v", p, ok)
	}
	if _, ok := b.holder(u("fd00::b")); ok {
		t.Error("laptop's old ULA still held")
	}
}

// TestULAConflictInStatus: with two agents keyed, a third name claiming b's
// ULA makes a remove b's SAs and show the conflict in its status (what
// btmmctl status prints); when the claim goes, a keys with b again.
func TestULAConflictInStatus(t *testing.T) {
	a, b := keyedPair(t)
	a.events <- PeerEvent{Name: "mallory", ULA: b.ula, Outer: netip.MustParseAddrPort("127.0.0.1:9")}
	eventually(t, "conflict shown and b's SAs gone", func() error {
		st := a.a.Status(context.Background())
		if len(st.Conflicts) != 1 || st.Conflicts[0].ULA != b.ula || !slices.Equal(st.Conflicts[0].Names, []string{"b", "mallory"}) {
			return fmt.Errorf("conflicts %+v", st.Conflicts)
		}
		if r := a.dp.Render(); strings.Contains(r, "state") {
			return fmt.Errorf("a still has SAs: %q", r)
		}
		return nil
	})
	a.events <- PeerEvent{Removed: true, Name: "mallory", ULA: b.ula}
	eventually(t, "b keyed again", func() error {
		st := a.a.Status(context.Background())
		if len(st.Conflicts) != 0 {
			return fmt.Errorf("conflicts %+v", st.Conflicts)
		}
		if r := a.dp.Render(); !strings.Contains(r, "state out") {
			return fmt.Errorf("dataplane: %q", r)
		}
		return nil
	})
}
