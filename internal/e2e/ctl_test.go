package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/internal/testenv"
)

// TestLivenessAndCtlCleartext runs btmmctl against real btmmd hosts behind
// two miniupnpd NATs on the host kernel (ebpf-cleartext dataplane): `ping`
// by name goes through the tunnel, `peers --json` shows both healthy, and
// when host2's gateway drops everything while host1 keeps sending (rx
// frozen, tx rising: what `IN KERNEL true` used to hide) host1 shows host2
// stale with the reason, `btmmctl watch` reports the change, and the peer
// is ok again once packets come back. (The VM runs the same btmmctl checks
// over ESP in TestTwoHostsBehindNATs.)
func TestLivenessAndCtlCleartext(t *testing.T) {
	testenv.RequireNetNS(t)
	if testenv.InVM() {
		t.Skip("host tier: the ebpf-cleartext liveness test is the host kernel's run (the VM runs btmmctl ping/watch over ESP in TestTwoHostsBehindNATs); runs under `make test-netns`")
	}
	testenv.RequireBinary(t, "ping", "iputils-ping")
	testenv.RequireBinary(t, "nft", "nftables")
	t.Parallel()
	s := newSystem(t)
	l := s.l
	s.upnp(t, l.GW1, l.GW2)
	h1 := s.startHost(t, "host1", l.Host1, hostConf{dataplane: "ebpf-cleartext"})
	h2 := s.startHost(t, "host2", l.Host2, hostConf{dataplane: "ebpf-cleartext"})
	sts := s.keyed(t, h1, h2)
	ctl := func(h *host, args ...string) (string, error) {
		return h.ns.Run(filepath.Join(s.bins, "btmmctl"), append([]string{"-socket", h.sock}, args...)...)
	}

	out, err := ctl(h1, "ping", "-c", "2", "-i", "0.2", "host2")
	show(t, "btmmctl ping -c 2 host2   # on host1", out)
	if err != nil || !strings.Contains(out, "pong from host2 ("+sts["host2"].ULA.String()+")") || !strings.Contains(out, "via direct") ||
		strings.Contains(out, "did not move") {
		t.Fatalf("btmmctl ping host2: %v\n%s", err, out)
	}
	health := func(h *host, name string) (agent.PeerHealth, error) {
		st, err := h.status(t, s.bins)
		if err != nil {
			return agent.PeerHealth{}, err
		}
		return peer(t, st, name).Health, nil
	}
	for _, h := range []*host{h1, h2} {
		out, err := ctl(h, "peers", "--json")
		var ps struct {
			Schema int `json:"schema"`
			Peers  []struct {
				Health struct {
					State string `json:"state"`
				} `json:"health"`
			} `json:"peers"`
		}
		if err != nil || json.Unmarshal([]byte(out), &ps) != nil || ps.Schema != 1 || len(ps.Peers) != 1 || ps.Peers[0].Health.State != "ok" {
			t.Fatalf("btmmctl peers --json on %s: %v\n%s", h.name, err, out)
		}
	}

	watch := &testenv.SyncBuffer{}
	wcmd := l.Host1.Command(context.Background(), filepath.Join(s.bins, "btmmctl"), "-socket", h1.sock, "watch")
	wcmd.Stdout, wcmd.Stderr = watch, watch
	if err := l.Host1.StartCmd(wcmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { wcmd.Process.Kill(); wcmd.Wait() })
	testenv.WaitFor(t, "btmmctl watch is connected", 10*time.Second, func() error {
		if !strings.Contains(watch.String(), "watching: host1.") {
			return fmt.Errorf("watch printed %q", watch.String())
		}
		return nil
	})

	say(t, "host1 pings host2 every 0.2 s; gw2 drops everything it would forward: host1's rx freezes, tx rises")
	startPingEvery(t, l.Host1, sts["host2"].ULA, 200*time.Millisecond)
	l.GW2.MustRun(t, "nft", "add table inet btmmtest; add chain inet btmmtest cut { type filter hook forward priority -10; policy drop; }")
	cut := time.Now()
	testenv.WaitFor(t, "host1 sees host2 stale", 60*time.Second, func() error {
		h, err := health(h1, "host2")
		if err != nil {
			return err
		}
		if h.State != agent.HealthStale || !strings.Contains(h.Reason, "with no packet back") {
			return fmt.Errorf("host2 is %+v", h)
		}
		return nil
	})
	stale := time.Since(cut)
	out, _ = ctl(h1, "peers")
	show(t, fmt.Sprintf("btmmctl peers   # on host1, %v after gw2 began dropping", stale.Round(time.Second)), out)
	if !strings.Contains(out, "stale: sending for") {
		t.Errorf("btmmctl peers does not show host2 stale:\n%s", out)
	}
	if stale < agent.StaleAfter {
		t.Errorf("stale after %v, before %v of silence", stale, agent.StaleAfter)
	}

	l.GW2.MustRun(t, "nft", "delete table inet btmmtest")
	testenv.WaitFor(t, "host1 sees host2 ok again", 30*time.Second, func() error {
		h, err := health(h1, "host2")
		if err != nil {
			return err
		}
		if h.State != agent.HealthOK || time.Since(h.LastReceived) > 10*time.Second {
			return fmt.Errorf("host2 is %+v", h)
		}
		return nil
	})
	testenv.WaitFor(t, "btmmctl watch reports both changes", 10*time.Second, func() error {
		w := watch.String()
		if !strings.Contains(w, "peer_health host2: ok -> stale (sending for") || !strings.Contains(w, "peer_health host2: stale -> ok") {
			return fmt.Errorf("watch printed:\n%s", w)
		}
		return nil
	})
	show(t, "btmmctl watch   # on host1, through the cut", watch.String())
}
