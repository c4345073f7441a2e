package xfrm

import (
	"context"
	"flag"
	"github.com/vishvananda/netlink"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/btmm/btmm/controlplane"
)

var (
	v6B  = controlplane.Tunnel{Kind: controlplane.PathIPv6, Remote: netip.MustParseAddrPort("[2001:db8:2::2]:0")}
	fouB = controlplane.Tunnel{Kind: controlplane.PathFOU, Remote: netip.MustParseAddrPort("11.2.0.2:6080")}
	sitB = controlplane.Tunnel{Kind: controlplane.PathSit, Remote: netip.MustParseAddrPort("11.2.0.2:0")}
)

func tunnelPeer(via controlplane.PathKind, fouRemote string, tunnels ...controlplane.Tunnel) controlplane.Peer {
	p := peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002))
	p.Via, p.Tunnels = via, tunnels
	for i, t := range p.Tunnels {
		if t.Kind == controlplane.PathFOU && fouRemote != "" {
			p.Tunnels[i].Remote = netip.MustParseAddrPort(fouRemote)
		}
	}
	return p
}

func tunnelState(fouPort uint16, peers ...controlplane.Peer) *controlplane.State {
	st := stateOf(peers...)
	st.Local.FOUPort = fouPort
	return st
}

// tunnelSteps: a peer gains tunnels, its traffic moves between paths, its
// NAT moves, the tunnels go. testdata/tunnels.golden has the whole rendered
// kernel after each step (go test -run TestTunnelSteps -update rewrites it);
// where noState is set the step's changes must touch no SA: a path change
// is no rekey.
var tunnelSteps = []struct {
	name    string
	in      *controlplane.State
	noState bool
}{
	{name: "esp-in-udp only", in: tunnelState(6080, tunnelPeer(controlplane.PathESPInUDP, ""))},
	{name: "tunnels known, still sent by esp-in-udp", in: tunnelState(6080, tunnelPeer(controlplane.PathESPInUDP, "", v6B, fouB))},
	{name: "sent by ipv6", in: tunnelState(6080, tunnelPeer(controlplane.PathIPv6, "", v6B, fouB)), noState: true},
	{name: "sent by fou", in: tunnelState(6080, tunnelPeer(controlplane.PathFOU, "", v6B, fouB)), noState: true},
	{name: "the peer's NAT moved: the sit device follows", in: tunnelState(6080, tunnelPeer(controlplane.PathFOU, "11.6.0.2:7000", v6B, fouB)), noState: true},
	{name: "sit instead of fou: the same device, no GUE", in: tunnelState(6080, tunnelPeer(controlplane.PathSit, "", v6B, sitB)), noState: true},
	{name: "back to esp-in-udp", in: tunnelState(6080, tunnelPeer(controlplane.PathESPInUDP, "", v6B, sitB)), noState: true},
	{name: "ipv6-only peer", in: tunnelState(6080, func() controlplane.Peer {
		p := tunnelPeer(controlplane.PathIPv6, "", v6B)
		p.Outer = netip.AddrPort{}
		return p
	}())},
	{name: "no tunnels, no fou port", in: tunnelState(0, tunnelPeer(controlplane.PathESPInUDP, ""))},
}

func TestTunnelSteps(t *testing.T) {
	golden := readGolden(t, "testdata/tunnels.golden")
	for _, mode := range []string{"in order", "random order"} {
		t.Run(mode, func(t *testing.T) {
			r := rand.New(rand.NewPCG(3, 4))
			for round := range 10 {
				order := make([]int, len(tunnelSteps))
				for i := range order {
					order[i] = i
				}
				if mode != "in order" {
					order = r.Perm(len(tunnelSteps))
				} else if round > 0 {
					break
				}
				k := newFakeKernel()
				d := newFake(t, k, Config{OutboundGrace: -1})
				prev := -1
				for _, i := range order {
					step := tunnelSteps[i]
					ch, err := d.Set(context.Background(), step.in)
					if err != nil {
						t.Fatalf("%s: Set: %v", step.name, err)
					}
					got := mustRender(t, k)
					if *updateGolden {
						golden[step.name] = got
					} else if diff := cmp.Diff(golden[step.name], got); diff != "" {
						t.Fatalf("%s: kernel (-want +got):\n%s", step.name, diff)
					}
					if step.noState && prev == i-1 {
						for _, c := range ch {
							if c.Object == "state" {
								t.Errorf("%s: path change touched an SA: %v", step.name, c)
							}
						}
					}
					if ch, err := d.Set(context.Background(), step.in); err != nil || len(ch) != 0 {
						t.Fatalf("%s: second Set = %v, %v; want no changes", step.name, ch, err)
					}
					prev = i
				}
				if mode == "in order" && *updateGolden {
					writeGolden(t, "testdata/tunnels.golden", golden)
				}
			}
		})
	}
}

var updateGolden = flag.Bool("update", false, "rewrite testdata/*.golden from what the code does now")

// readGolden reads sections "== key ==" followed by their text.
func readGolden(t *testing.T, path string) map[string]string {
	t.Helper()
	out := map[string]string{}
	b, err := os.ReadFile(path)
	if err != nil {
		if *updateGolden {
			return out
		}
		t.Fatal(err)
	}
	var key string
	for _, line := range strings.SplitAfter(string(b), "\n") {
		if k, ok := strings.CutPrefix(strings.TrimSpace(line), "== "); ok && strings.HasSuffix(k, " ==") {
			key = strings.TrimSuffix(k, " ==")
			out[key] = ""
			continue
		}
		if key != "" {
			out[key] += line
		}
	}
	return out
}

func writeGolden(t *testing.T, path string, g map[string]string) {
	t.Helper()
	keys := slices.Sorted(maps.Keys(g))
	var b strings.Builder
	for _, k := range keys {
		b.WriteString("== " + k + " ==\n" + g[k])
	}
	must(t, os.MkdirAll("testdata", 0o755))
	must(t, os.WriteFile(path, []byte(b.String()), 0o644))
}

// TestTunnelOwnership: an administrator's sit/ip6tnl devices and fou ports
// stay through New, Set and Close; ours left by a killed agent go at New;
// a GUE listener on our port is taken over, a non-GUE one is refused;
// Close leaves nothing of ours.
func TestTunnelOwnership(t *testing.T) {
	k := newFakeKernel()
	admin := []netlink.Link{
		&netlink.Sittun{LinkAttrs: netlink.LinkAttrs{Name: "he-ipv6"}, Remote: net.ParseIP("192.0.2.1").To4(), Ttl: 64, Proto: 41},
		&netlink.Ip6tnl{LinkAttrs: netlink.LinkAttrs{Name: "bt6-admin", Group: 7}, Remote: net.ParseIP("2001:db8:9::1"), Local: net.ParseIP("2001:db8:1::2"), Proto: 41},
	}
	for _, l := range admin {
		must(t, k.LinkAdd(l))
	}
	must(t, k.FouAdd(netlink.Fou{Family: netlink.FAMILY_V4, Port: 5555, EncapType: netlink.FOU_ENCAP_GUE}))
	// A killed agent's device and GUE listener.
	must(t, k.LinkAdd(&netlink.Sittun{LinkAttrs: netlink.LinkAttrs{Name: "bts-deadbeef", Group: DefaultTag}, Remote: net.ParseIP("11.9.9.9").To4(), Ttl: 64, Proto: 41}))
	must(t, k.FouAdd(netlink.Fou{Family: netlink.FAMILY_V4, Port: 6080, EncapType: netlink.FOU_ENCAP_GUE}))
	before := mustRender(t, k)
	if !strings.Contains(before, "bts-deadbeef") {
		t.Fatalf("setup:\n%s", before)
	}
	d := newFake(t, k, Config{OutboundGrace: -1})
	if got := mustRender(t, k); strings.Contains(got, "bts-deadbeef") || !strings.Contains(got, "he-ipv6") || !strings.Contains(got, "bt6-admin") {
		t.Fatalf("after New (leftovers out, the administrator's in):\n%s", got)
	}
	ch, err := d.Set(context.Background(), tunnelState(6080, tunnelPeer(controlplane.PathFOU, "", v6B, fouB)))
	must(t, err)
	if slices.ContainsFunc(ch, func(c controlplane.Change) bool { return c.Object == "fou" }) {
		t.Errorf("the GUE listener on our port was added again instead of taken over: %v", changeStrings(ch))
	}
	got := mustRender(t, k)
	for _, w := range []string{"fou port 5555 gue", "fou port 6080 gue", "link he-ipv6 sit", "link bt6-admin ip6tnl", "link bt6-8e025359", "link bts-8e025359"} {
		if !strings.Contains(got, w) {
			t.Errorf("after Set: no %q in\n%s", w, got)
		}
	}
	must(t, d.Close())
	want := strings.ReplaceAll(before, "link bts-deadbeef sit remote 11.9.9.9 local any ttl 64 group 0x6281 alias \"\" down\n", "")
	want = strings.ReplaceAll(want, "fou port 6080 gue\n", "")
	if diff := cmp.Diff(want, mustRender(t, k)); diff != "" {
		t.Errorf("after Close, only the administrator's (-want +got):\n%s", diff)
	}

	// A listener on our port that is not GUE is someone else's: refused, kept.
	k = newFakeKernel()
	must(t, k.FouAdd(netlink.Fou{Family: netlink.FAMILY_V4, Port: 6080, Protocol: 4, EncapType: netlink.FOU_ENCAP_DIRECT}))
	d = newFake(t, k, Config{OutboundGrace: -1})
	if _, err := d.Set(context.Background(), tunnelState(6080, tunnelPeer(controlplane.PathESPInUDP, ""))); err == nil || !strings.Contains(err.Error(), "not btmm's") {
		t.Errorf("Set with a foreign listener on the FOU port: %v", err)
	}
	must(t, d.Close())
	if got := mustRender(t, k); !strings.Contains(got, "fou port 6080 ipproto 4") {
		t.Errorf("the foreign listener went:\n%s", got)
	}

	// A device of one of our names that is not ours: refused, kept.
	k = newFakeKernel()
	must(t, k.LinkAdd(&netlink.Sittun{LinkAttrs: netlink.LinkAttrs{Name: "bts-8e025359"}, Remote: net.ParseIP("192.0.2.7").To4(), Proto: 41}))
	d = newFake(t, k, Config{OutboundGrace: -1})
	if _, err := d.Set(context.Background(), tunnelState(6080, tunnelPeer(controlplane.PathFOU, "", fouB))); err == nil || !strings.Contains(err.Error(), "not btmm's") {
		t.Errorf("Set over a foreign device of our name: %v", err)
	}
	if got := mustRender(t, k); !strings.Contains(got, "remote 192.0.2.7") || strings.Contains(got, "route fd00::b/128 dev bts") {
		t.Errorf("the foreign device was changed or routed into:\n%s", got)
	}
	must(t, d.Close())
}

// TestTunnelsNeedXfrmInterface: without xfrm interfaces the policies of
// both kinds would collide (no if_id tells them apart): tunnels are
// refused with a clear error, ESP-in-UDP still works.
func TestTunnelsNeedXfrmInterface(t *testing.T) {
	k := newFakeKernel()
	k.noXfrmi = true
	d := newFake(t, k, Config{OutboundGrace: -1})
	_, err := d.Set(context.Background(), tunnelState(6080, tunnelPeer(controlplane.PathESPInUDP, "", v6B)))
	if err == nil || !strings.Contains(err.Error(), "need xfrm interfaces") {
		t.Fatalf("Set: %v", err)
	}
	if got := mustRender(t, k); !strings.Contains(got, "route fd00::b/128 dev eth0") || strings.Contains(got, "bt6-") {
		t.Errorf("ESP-in-UDP not set up, or a device made:\n%s", got)
	}
}
