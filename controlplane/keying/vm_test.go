//go:build linux

package keying

import (
	"context"
	"fmt"
	"github.com/btmm/btmm/internal/udpflood"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// xfrmInstaller is a test-only Installer that applies keying results as
// tunnel-mode ESP-in-UDP states and policies with netlink in one namespace.
// (The product dataplane is package xfrm; this stand-in exists so the
// keying package can prove make-before-break on a real kernel by itself.)
// Order matters and is the point: inbound SAs first, then the new outbound
// SA, and only then the old outbound SA and expired inbound SAs go. The old
// outbound SA goes outGrace after the new one is in place, not at once: a
// packet whose route (xfrm bundle) the kernel resolved to it just before the
// new SA appeared is encrypted with it a moment later, and the kernel drops
// that packet (XfrmOutStateInvalid) if the SA was deleted in between.
type xfrmInstaller struct {
	h                    *netlink.Handle
	localOuter, localULA net.IP
	mu                   sync.Mutex
	states               map[uint32]*netlink.XfrmState
	policies             bool
	outSPIs              []uint32 // every outbound SPI used, in order
	logf                 func(format string, args ...any)
	outGrace             time.Duration          // how long a replaced outbound SA stays (default 1 s)
	retiring             map[uint32]*time.Timer // replaced outbound SAs waiting out outGrace
}

func (x *xfrmInstaller) log(format string, args ...any) {
	if x.logf != nil {
		x.logf(format, args...)
	}
}

func (x *xfrmInstaller) state(sa controlplane.SA, src, dst net.IP, sport, dport int, srcULA, dstULA net.IP) (*netlink.XfrmState, error) {
	if sa.Cipher != controlplane.CipherAESGCM {
		return nil, fmt.Errorf("test installer handles only %s", controlplane.CipherAESGCM)
	}
	return &netlink.XfrmState{
		Src: src, Dst: dst, Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL,
		Spi: int(sa.SPI), Reqid: 1, ReplayWindow: 128,
		Aead:     &netlink.XfrmStateAlgo{Name: string(sa.Cipher), Key: sa.Key, ICVLen: 128},
		Encap:    &netlink.XfrmStateEncap{Type: netlink.XFRM_ENCAP_ESPINUDP, SrcPort: sport, DstPort: dport, OriginalAddress: net.IPv4zero},
		Selector: &netlink.XfrmPolicy{Src: host128(srcULA), Dst: host128(dstULA)},
	}, nil
}

func host128(ip net.IP) *net.IPNet { return &net.IPNet{IP: ip, Mask: net.CIDRMask(128, 128)} }

func (x *xfrmInstaller) Install(_ context.Context, p controlplane.Peer) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.states == nil {
		x.states = map[uint32]*netlink.XfrmState{}
		x.retiring = map[uint32]*time.Timer{}
	}
	peerOuter, peerULA := net.IP(p.Outer.Addr().AsSlice()), net.IP(p.ULA.AsSlice())
	port := int(p.Outer.Port())
	want := map[uint32]*netlink.XfrmState{}
	for _, sa := range append([]controlplane.SA{p.In}, p.PrevIn...) {
		s, err := x.state(sa, peerOuter, x.localOuter, port, controlplane.DefaultTunnelPort, peerULA, x.localULA)
		if err != nil {
			return err
		}
		want[sa.SPI] = s
	}
	out, err := x.state(p.Out, x.localOuter, peerOuter, controlplane.DefaultTunnelPort, port, x.localULA, peerULA)
	if err != nil {
		return err
	}
	want[p.Out.SPI] = out
	for spi, tm := range x.retiring {
		if want[spi] != nil { // wanted again: it stays
			tm.Stop()
			delete(x.retiring, spi)
		}
	}
	for _, spi := range append(keysExcept(want, p.Out.SPI), p.Out.SPI) { // inbound first
		if x.states[spi] == nil {
			if err := x.h.XfrmStateAdd(want[spi]); err != nil {
				return fmt.Errorf("add state spi 0x%08x: %w", spi, err)
			}
			x.states[spi] = want[spi]
			x.log("add state spi 0x%08x out=%v", spi, spi == p.Out.SPI)
			if spi == p.Out.SPI {
				x.outSPIs = append(x.outSPIs, spi)
			}
		}
	}
	for spi, s := range x.states {
		if want[spi] == nil && s.Src.Equal(x.localOuter) {
			x.retire(spi, s)
			continue
		}
		if want[spi] == nil {
			if err := x.h.XfrmStateDel(s); err != nil {
				return fmt.Errorf("delete state spi 0x%08x: %w", spi, err)
			}
			delete(x.states, spi)
			x.log("deleted state spi 0x%08x", spi)
		}
	}
	if !x.policies {
		for _, pol := range []*netlink.XfrmPolicy{
			{Src: host128(x.localULA), Dst: host128(peerULA), Dir: netlink.XFRM_DIR_OUT,
				Tmpls: []netlink.XfrmPolicyTmpl{{Src: x.localOuter, Dst: peerOuter, Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: 1}}},
			{Src: host128(peerULA), Dst: host128(x.localULA), Dir: netlink.XFRM_DIR_IN,
				Tmpls: []netlink.XfrmPolicyTmpl{{Src: peerOuter, Dst: x.localOuter, Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: 1}}},
		} {
			if err := x.h.XfrmPolicyAdd(pol); err != nil {
				return fmt.Errorf("add policy: %w", err)
			}
		}
		x.policies = true
	}
	return nil
}

// retire deletes the replaced outbound SA s after outGrace, unless an
// Install wants it again or Remove takes it first. Called with x.mu held.
func (x *xfrmInstaller) retire(spi uint32, s *netlink.XfrmState) {
	if x.retiring[spi] != nil {
		return
	}
	grace := x.outGrace
	if grace <= 0 {
		grace = time.Second
	}
	var tm *time.Timer
	tm = time.AfterFunc(grace, func() {
		x.mu.Lock()
		defer x.mu.Unlock()
		if x.retiring[spi] != tm || x.states[spi] != s {
			return
		}
		delete(x.retiring, spi)
		if err := x.h.XfrmStateDel(s); err != nil {
			x.log("delete retired outbound state spi 0x%08x: %v", spi, err)
			return
		}
		delete(x.states, spi)
		x.log("deleted retired outbound state spi 0x%08x", spi)
	})
	x.retiring[spi] = tm
	x.log("outbound state spi 0x%08x retires in %v", spi, grace)
}

func keysExcept(m map[uint32]*netlink.XfrmState, skip uint32) []uint32 {
	var out []uint32
	for k := range m {
		if k != skip {
			out = append(out, k)
		}
	}
	return out
}

func (x *xfrmInstaller) Remove(context.Context, netip.Addr) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	for spi, tm := range x.retiring {
		tm.Stop()
		delete(x.retiring, spi)
	}
	for spi, s := range x.states {
		x.h.XfrmStateDel(s)
		delete(x.states, spi)
	}
	return nil
}

// listenEncap opens the tunnel port with UDP_ENCAP_ESPINUDP in the current
// namespace: the kernel decapsulates ESP on it and passes keying messages
// (non-ESP marker) up to us.
func listenEncap() (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			const udpEncap, udpEncapESPInUDP = 100, 2
			serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_UDP, udpEncap, udpEncapESPInUDP)
		}); err != nil {
			return err
		}
		return serr
	}}
	c, err := lc.ListenPacket(context.Background(), "udp4", fmt.Sprintf("0.0.0.0:%d", controlplane.DefaultTunnelPort))
	if err != nil {
		return nil, err
	}
	return c.(*net.UDPConn), nil
}

// TestVMPingFloodAcrossRekey keys two namespaces with Kerberos against a real
// KDC, installs the SAs as ESP-in-UDP in the kernel, and pings one ULA from
// the other every 10 ms while the SAs are rekeyed every 2 s: not one echo
// may be lost. Needs ESP (the VM tier: make test-vm).
func TestVMPingFloodAcrossRekey(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	k, ktA, ktB := newRealm(t)

	type side struct {
		ns    *netns.NS
		dev   string
		outer netip.Addr
		ula   netip.Addr
		princ string
		inst  *xfrmInstaller
		agent *Agent
	}
	a := &side{ns: netns.New(t, "ka"), dev: "va", outer: netip.MustParseAddr("10.0.0.1"), ula: ulaA, princ: princA}
	b := &side{ns: netns.New(t, "kb"), dev: "vb", outer: netip.MustParseAddr("10.0.0.2"), ula: ulaB, princ: princB}
	netns.MustVeth(t, a.ns, a.dev, b.ns, b.dev)
	for _, pair := range [][2]*side{{a, b}, {b, a}} {
		s, peer := pair[0], pair[1]
		s.ns.MustAddr(t, "lo", s.ula.String()+"/128")
		s.ns.MustAddr(t, s.dev, s.outer.String()+"/24")
		link, err := s.ns.LinkByName(s.dev)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.ns.Handle.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: host128(peer.ula.AsSlice()),
			Src: s.ula.AsSlice(), MTU: 1400}); err != nil {
			t.Fatal(err)
		}
		name := s.ns.Name
		s.inst = &xfrmInstaller{h: s.ns.Handle, localOuter: s.outer.AsSlice(), localULA: s.ula.AsSlice(),
			logf: func(f string, args ...any) {
				t.Logf("%s %s installer: %s", time.Now().Format("15:04:05.000"), name, fmt.Sprintf(f, args...))
			}}
	}
	logger, _ := testLogger(t)
	for _, s := range []*side{a, b} {
		var conn *net.UDPConn
		if err := s.ns.Do(func() (err error) { conn, err = listenEncap(); return err }); err != nil {
			t.Fatalf("%s: encap socket: %v", s.ns.Name, err)
		}
		kt := ktA
		if s == b {
			kt = ktB
		}
		ag, err := New(Config{
			ULA:       s.ula,
			Auth:      &Kerberos{Principal: s.princ, Realm: realm, Keytab: kt, Krb5Conf: k.Config(t)},
			Transport: NewUDPTransport(conn), Installer: s.inst,
			Logger:     logger.With("host", s.ns.Name),
			SALifetime: 2500 * time.Millisecond, PrevInHold: time.Second,
			HardLifetime: time.Minute, // rekeys are the subject here, not the hard end (TCG is slow)
		})
		if err != nil {
			t.Fatal(err)
		}
		s.agent = ag
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { ag.Run(ctx); close(done) }()
		t.Cleanup(func() { cancel(); <-done; conn.Close() })
	}
	peerOf := func(s *side) PeerConfig {
		return PeerConfig{Name: s.ns.Name, ULA: s.ula, Outer: netip.AddrPortFrom(s.outer, controlplane.DefaultTunnelPort), Principal: s.princ}
	}
	ctx := context.Background()
	if err := b.agent.SetPeers(ctx, []PeerConfig{peerOf(a)}); err != nil {
		t.Fatal(err)
	}
	if err := a.agent.SetPeers(ctx, []PeerConfig{peerOf(b)}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "first keying", func() bool {
		a.inst.mu.Lock()
		defer a.inst.mu.Unlock()
		b.inst.mu.Lock()
		defer b.inst.mu.Unlock()
		return len(a.inst.outSPIs) > 0 && len(b.inst.outSPIs) > 0
	})
	const count = 800
	t.Logf("%s ping starts", time.Now().Format("15:04:05.000"))
	out, err := a.ns.Run("ping", "-6", "-D", "-i", "0.01", "-c", fmt.Sprint(count), "-W", "2", b.ula.String())
	t.Logf("%s ping ends", time.Now().Format("15:04:05.000"))
	if err != nil {
		t.Fatalf("ping: %v", err)
	}
	if !strings.Contains(out, fmt.Sprintf("%d packets transmitted, %d received", count, count)) {
		t.Errorf("echoes lost across rekeys:\n%s", pingSummary(out, count))
	} else {
		t.Logf("ping: %s", pingSummary(out, count))
	}
	for _, s := range []*side{a, b} {
		t.Logf("%s xfrm_stat (non-zero):\n%s", s.ns.Name, udpflood.NonZero(udpflood.XfrmStat(t, s.ns)))
	}
	a.inst.mu.Lock()
	rekeysA := len(a.inst.outSPIs) - 1
	a.inst.mu.Unlock()
	b.inst.mu.Lock()
	rekeysB := len(b.inst.outSPIs) - 1
	b.inst.mu.Unlock()
	t.Logf("outbound SA changes during the flood: a %d, b %d", rekeysA, rekeysB)
	if rekeysA < 2 || rekeysB < 2 {
		t.Errorf("want at least 2 rekeys on each side during the flood, got a %d, b %d", rekeysA, rekeysB)
	}
}

// pingSummary keeps ping's statistics lines and names the sequence numbers
// that got no echo reply, with the timestamps of the replies around them.
func pingSummary(out string, count int) string {
	got := map[int]string{}
	var stats []string
	for _, l := range strings.Split(out, "\n") {
		if i := strings.Index(l, "icmp_seq="); i >= 0 {
			var seq int
			fmt.Sscanf(l[i+len("icmp_seq="):], "%d", &seq)
			got[seq] = strings.Fields(l)[0]
			continue
		}
		if strings.Contains(l, "transmitted") || strings.Contains(l, "rtt") || strings.Contains(l, "---") {
			stats = append(stats, l)
		}
	}
	var missing []string
	for seq := 1; seq <= count; seq++ {
		if _, ok := got[seq]; !ok {
			missing = append(missing, fmt.Sprintf("seq %d (replies around it at %s and %s)", seq, got[seq-1], got[seq+1]))
		}
	}
	return strings.Join(stats, "\n") + "\nmissing: " + strings.Join(missing, ", ")
}
