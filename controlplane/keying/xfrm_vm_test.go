//go:build linux

package keying_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/keying"
	"github.com/btmm/btmm/internal/krbtest"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/btmm/btmm/xfrm"
)

// countingDP counts the outbound SPIs a Dataplane is given.
type countingDP struct {
	controlplane.Dataplane
	mu   sync.Mutex
	outs map[uint32]bool
}

func (c *countingDP) Set(ctx context.Context, st *controlplane.State) ([]controlplane.Change, error) {
	c.mu.Lock()
	for _, p := range st.Peers {
		c.outs[p.Out.SPI] = true
	}
	c.mu.Unlock()
	return c.Dataplane.Set(ctx, st)
}

func (c *countingDP) outSPIs() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.outs)
}

type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// TestVMPingFloodAcrossRekeyXfrm is the product path end to end: Kerberos
// keying (real KDC) over xfrm's ESP-in-UDP tunnel socket, results applied by
// keying.DataplaneInstaller to the xfrm Dataplane, and a 10 ms ping flood
// across several rekeys that must lose nothing.
func TestVMPingFloodAcrossRekeyXfrm(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	const realm = "BTMM.TEST"
	k := krbtest.Start(t, realm)
	type host struct {
		name, princ string
		ns          *netns.NS
		dev         string
		outer, ula  netip.Addr
		dp          *countingDP
		agent       *keying.Agent
	}
	a := &host{name: "a", princ: "host/a.btmm.test", dev: "va", outer: netip.MustParseAddr("10.0.0.1"), ula: netip.MustParseAddr("fd00::a")}
	b := &host{name: "b", princ: "host/b.btmm.test", dev: "vb", outer: netip.MustParseAddr("10.0.0.2"), ula: netip.MustParseAddr("fd00::b")}
	a.ns, b.ns = netns.New(t, "xa"), netns.New(t, "xb")
	netns.MustVeth(t, a.ns, a.dev, b.ns, b.dev)
	logger := slog.New(slog.NewTextHandler(logWriter{t}, nil))
	for _, h := range []*host{a, b} {
		k.AddPrincipal(t, h.princ)
	}
	for _, h := range []*host{a, b} {
		h.ns.MustAddr(t, h.dev, h.outer.String()+"/24")
		_, kt := k.Keytab(t, h.name+".keytab", h.princ)
		conn, err := xfrm.ListenAt(context.Background(), h.ns.NsHandle(), netip.MustParseAddrPort("0.0.0.0:4500"))
		if err != nil {
			t.Fatal(err)
		}
		d, err := xfrm.New(h.ns.NsHandle(), xfrm.Config{Logger: logger.With("host", h.name, "pkg", "xfrm")})
		if err != nil {
			t.Fatal(err)
		}
		h.dp = &countingDP{Dataplane: d, outs: map[uint32]bool{}}
		inst := &keying.DataplaneInstaller{DP: h.dp, Local: controlplane.Local{ULA: h.ula, Port: 4500, Outer: h.outer}}
		ag, err := keying.New(keying.Config{
			ULA:       h.ula,
			Auth:      &keying.Kerberos{Principal: h.princ, Realm: realm, Keytab: kt, Krb5Conf: k.Config(t)},
			Transport: conn, Installer: inst,
			Logger:     logger.With("host", h.name, "pkg", "keying"),
			SALifetime: 2500 * time.Millisecond, PrevInHold: time.Second,
			HardLifetime: time.Minute, // rekeys are the subject here, not the hard end (TCG is slow)
		})
		if err != nil {
			t.Fatal(err)
		}
		h.agent = ag
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { ag.Run(ctx); close(done) }()
		t.Cleanup(func() { cancel(); <-done; conn.Close(); d.Close() })
	}
	peer := func(h *host) keying.PeerConfig {
		return keying.PeerConfig{Name: h.name, ULA: h.ula, Outer: netip.AddrPortFrom(h.outer, 4500), Principal: h.princ}
	}
	ctx := context.Background()
	if err := b.agent.SetPeers(ctx, []keying.PeerConfig{peer(a)}); err != nil {
		t.Fatal(err)
	}
	if err := a.agent.SetPeers(ctx, []keying.PeerConfig{peer(b)}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for a.dp.outSPIs() == 0 || b.dp.outSPIs() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no keying within 20 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	const count = 800
	out, err := a.ns.Run("ping", "-6", "-q", "-i", "0.01", "-c", fmt.Sprint(count), "-W", "2", b.ula.String())
	t.Logf("ping:\n%s", out)
	if err != nil {
		t.Fatalf("ping: %v", err)
	}
	if !strings.Contains(out, fmt.Sprintf("%d packets transmitted, %d received", count, count)) {
		t.Errorf("echoes lost across rekeys:\n%s", out)
	}
	ra, rb := a.dp.outSPIs()-1, b.dp.outSPIs()-1
	t.Logf("outbound SA changes during the flood: a %d, b %d", ra, rb)
	if ra < 2 || rb < 2 {
		t.Errorf("want at least 2 rekeys on each side, got a %d, b %d", ra, rb)
	}
}
