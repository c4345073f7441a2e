package ebpf

import (
	"crypto/sha256"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/relay"
)

// loBridge is a stand-in for btmmd's relay-tcp bridge inside a's
// namespace: a's dataplane sends b's datagrams to local (127.0.0.1:P),
// the bridge forwards them from wire (a's veth address, another port) to
// b's tunnel port and the answers back from local to a's tunnel port on
// lo, completing checksums and splitting GSO segments as btmmd's bridge
// does (relay.CompleteCleartext). Only the kernel half is under test
// here; btmmd's bridge (package relay) carries the datagrams over TLS.
type loBridge struct {
	local, wire *net.UDPConn
	out, in     atomic.Int64 // datagrams a -> b, b -> a
}

func startLoBridge(t *testing.T, a, b *host, wirePort uint16) *loBridge {
	t.Helper()
	br := &loBridge{}
	must(t, a.ns.Do(func() (err error) {
		if br.local, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			return err
		}
		br.wire, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a.outer, wirePort)))
		return err
	}))
	t.Cleanup(func() { br.local.Close(); br.wire.Close() })
	toB := netip.AddrPortFrom(b.outer, b.port)
	toTunnel := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), a.port)
	go func() {
		buf := make([]byte, 65536)
		for {
			n, _, err := br.local.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			for _, d := range relay.CompleteCleartext(buf[:n], relay.MaxCleartextPacket) {
				br.out.Add(1)
				br.wire.WriteToUDPAddrPort(d, toB)
			}
		}
	}()
	go func() {
		buf := make([]byte, 65536)
		for {
			n, _, err := br.wire.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			for _, d := range relay.CompleteCleartext(buf[:n], relay.MaxCleartextPacket) {
				br.in.Add(1)
				br.local.WriteToUDPAddrPort(d, toTunnel)
			}
		}
	}()
	return br
}

// TestLoopbackOuterNetNS: a peer whose outer address is a loopback socket
// (the relay-tcp bridge) is reached through it in both directions: the
// egress program hands its datagrams to lo, the bridge socket receives
// them, and what the bridge writes to our tunnel port over lo is taken
// apart by the ingress program attached to lo for as long as such a peer
// exists. Pings and a byte-checked TCP stream pass; moving the peer back
// to a wire address detaches the program from lo; Close leaves nothing.
func TestLoopbackOuterNetNS(t *testing.T) {
	for _, force := range []bool{false, true} {
		t.Run(map[bool]string{false: "probe", true: "clsact"}[force], func(t *testing.T) {
			a, b := topology(t)
			a.start(t, Config{Cleartext: true, ForceClsact: force})
			b.start(t, Config{Cleartext: true, ForceClsact: force})
			const wirePort = 4600
			br := startLoBridge(t, a, b, wirePort)
			local := br.local.LocalAddr().(*net.UDPAddr).AddrPort()
			ch := a.set(t, a.state(b, local))
			if !slices.ContainsFunc(ch, func(c controlplane.Change) bool { return strings.Contains(c.What, "on lo") }) {
				t.Errorf("changes %v do not attach the ingress program on lo", ch)
			}
			b.set(t, b.state(a, netip.AddrPortFrom(a.outer, wirePort)))
			if got := loAttached(t, a); len(got) == 0 {
				t.Fatal("nothing attached on lo")
			} else {
				t.Logf("on lo: %v", got)
			}
			ping(t, a, b)
			ping(t, b, a)
			data := randomBytes(t, 4<<20)
			s := openStream(t, a, b)
			n, err := s.conn.Write(data)
			s.sent.Add(int64(n))
			if err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(data)
			s.finish(t, sum[:])
			if sa := peerStats(t, a); sa.TxBytes < 4<<20 || sa.RxPackets == 0 {
				t.Errorf("a's counters do not show the transfer through lo: %+v", sa)
			}
			if br.out.Load() < (4<<20)/1500 || br.in.Load() == 0 {
				t.Errorf("the bridge carried %d datagrams a -> b and %d b -> a", br.out.Load(), br.in.Load())
			}

			// Back on the wire: lo is left alone again.
			ch = a.set(t, a.state(b, netip.AddrPortFrom(b.outer, b.port)))
			b.set(t, b.state(a, netip.AddrPortFrom(a.outer, a.port)))
			if got := loAttached(t, a); len(got) > 0 {
				t.Errorf("still on lo after the peer left the bridge: %v (changes %v)", got, ch)
			}
			ping(t, a, b)

			// And once more through the bridge, then Close removes it.
			a.set(t, a.state(b, local))
			b.set(t, b.state(a, netip.AddrPortFrom(a.outer, wirePort)))
			ping(t, b, a)
			closeAndCheck(t, a, b)
			if got := loAttached(t, a); len(got) > 0 {
				t.Errorf("left on lo after Close: %v", got)
			}
			must(t, a.ns.Do(func() error {
				for _, k := range loSysctls {
					if v, err := os.ReadFile("/proc/sys/" + k); err != nil || strings.TrimSpace(string(v)) != "0" {
						t.Errorf("%s = %q (%v) after Close, want 0 as before", k, v, err)
					}
				}
				return nil
			}))
		})
	}
}

// loAttached lists our programs on a's lo (TCX and clsact).
func loAttached(t *testing.T, h *host) []string {
	t.Helper()
	saved := h.dev
	h.dev = "lo"
	defer func() { h.dev = saved }()
	var out []string
	for _, s := range attached(t, h) {
		if !strings.HasPrefix(s, "qdisc") || strings.Contains(s, "clsact") {
			out = append(out, s)
		}
	}
	return out
}

// TestEgressLoopbackOuter (Program.Run): a peer whose outer address is a
// loopback bridge socket gets the same IPv4/UDP header as any peer, with
// zero Ethernet addresses (lo's own), and the verdict is a redirect (to
// lo's ingress), in both modes; the counters count it.
func TestEgressLoopbackOuter(t *testing.T) {
	for _, mode := range []uint8{modeSecure, modeCleartext} {
		e := newProgEnv(t, mode)
		bridge := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 45678)
		lo := netip.MustParseAddr("127.0.0.1")
		must(t, e.objs.PeerByUla.Put(ulaKey(ulaB), btmmPeer{OuterAddr: bridge.Addr().As4(), LocalAddr: lo.As4(), OuterPort: bridge.Port()}))
		var inner, payload []byte
		if mode == modeSecure {
			payload = esp(0x1001, 64)
			inner = eth(0x86dd, ipv6(ulaA, ulaB, 50, payload))
		} else {
			payload = ipv6(ulaA, ulaB, 6, make([]byte, 32))
			inner = eth(0x86dd, payload)
		}
		ret, out := e.run(t, e.objs.BtmmEgress, inner)
		if ret != actRedirect {
			t.Fatalf("mode %d: verdict %d, want TC_ACT_REDIRECT", mode, ret)
		}
		ip := ipv4(lo, bridge.Addr(), 17, 0x4000, udp(portA, bridge.Port(), payload))
		binary.BigEndian.PutUint16(ip[10:], 0)
		binary.BigEndian.PutUint16(ip[10:], ipsum(ip[:20]))
		want := eth(0x0800, ip)
		clear(want[:12]) // Ethernet addresses zero: lo's own
		if diff := cmp.Diff(want, out); diff != "" {
			t.Errorf("mode %d: egress frame (-want +got):\n%s", mode, diff)
		}
		if s := e.stats(t); s.TxPackets != 1 {
			t.Errorf("mode %d: stats %+v, want 1 tx packet", mode, s)
		}
	}
}
