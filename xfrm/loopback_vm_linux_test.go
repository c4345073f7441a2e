package xfrm

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane/nldump"
	"github.com/btmm/btmm/internal/testenv"
)

// loBridge stands in for btmmd's relay-tcp bridge (controlplane/relay.Bridge)
// inside host a's namespace: a's dataplane sends b's ESP-in-UDP to local
// (127.0.0.1:P); the bridge forwards each datagram from wire (a's outer
// address, another port) to b's tunnel port, and b's answers back from
// local to a's tunnel port on 127.0.0.1, as the real bridge writes what the
// relay's TLS stream brings. Only datagrams from a's tunnel port on a
// loopback address are taken, as the real bridge does. Only the kernel half
// is under test here; package relay tests the bridge and the stream.
type loBridge struct {
	local, wire *net.UDPConn
	out, in     atomic.Int64 // datagrams a -> b, b -> a
}

func startLoBridge(t *testing.T, a, b *labHost, wirePort uint16) *loBridge {
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
	toB := netip.AddrPortFrom(b.outer, 4500)
	tunnel := netip.MustParseAddrPort("127.0.0.1:4500")
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := br.local.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if from.Port() != tunnel.Port() || !from.Addr().Unmap().IsLoopback() {
				t.Errorf("bridge socket: a datagram from %v, want our tunnel port on a loopback address", from)
				continue
			}
			br.out.Add(1)
			br.wire.WriteToUDPAddrPort(buf[:n], toB)
		}
	}()
	go func() {
		buf := make([]byte, 65536)
		for {
			n, _, err := br.wire.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			br.in.Add(1)
			br.local.WriteToUDPAddrPort(buf[:n], tunnel)
		}
	}()
	return br
}

// TestVMLoopbackOuter (issue 14 item 5, relay-tcp on the xfrm dataplane): a
// peer whose outer address is a loopback bridge socket is reached through
// it both ways, with the xfrm interface and with the lo fallback. Its SAs
// run between 127.0.0.1 and the socket (the bridge takes only datagrams
// from our tunnel port on loopback and writes back to 127.0.0.1:4500, where
// the inbound SA must be found), whatever Local.Outer says; the ULA route
// stays a unicast route (IPv6 turns a route on lo into a reject route).
// Pings and a byte-checked TCP stream pass and the bridge carried them;
// moving the peer back to its wire address works.
func TestVMLoopbackOuter(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	for _, tc := range []struct {
		name   string
		cfg    Config
		outerA bool // a's desired state names its outer address (Local.Outer)
	}{
		{"xfrm interface", Config{}, true},
		{"lo fallback", Config{NoXfrmInterface: true}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t, 2)
			a, b := l.hosts[0], l.hosts[1]
			if tc.cfg.NoXfrmInterface {
				// Without the xfrm interface the ULA routes go by eth0,
				// which needs IPv6 (newLab leaves it off on the wire).
				for _, h := range l.hosts {
					must(t, h.ns.Sysctl("net.ipv6.conf.eth0.disable_ipv6", "0"))
				}
			}
			l.start(t, 0, tc.cfg)
			l.start(t, 1, tc.cfg)
			const wirePort = 4600
			br := startLoBridge(t, a, b, wirePort)
			local := br.local.LocalAddr().(*net.UDPAddr).AddrPort()
			sta := l.desired(0)
			sta.Peers[0].Outer = local
			if !tc.outerA {
				sta.Local.Outer = netip.Addr{} // btmmd's case: the route's source per peer
			}
			ch, err := a.dp.Set(t.Context(), sta)
			must(t, err)
			t.Logf("a: %q", changeStrings(ch))
			stb := l.desired(1)
			stb.Peers[0].Outer = netip.AddrPortFrom(a.outer, wirePort)
			_, err = b.dp.Set(t.Context(), stb)
			must(t, err)

			rs, err := nldump.Retry(func() ([]netlink.Route, error) {
				return a.ns.Handle.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Dst: host128(b.ula)}, netlink.RT_FILTER_DST)
			})
			must(t, err)
			if len(rs) != 1 || rs[0].Type != 1 /* RTN_UNICAST */ {
				t.Fatalf("a's route to b's ULA: %+v, want one unicast route", rs)
			}
			if lk, err := a.ns.Handle.LinkByIndex(rs[0].LinkIndex); err != nil || lk.Attrs().Flags&net.FlagLoopback != 0 {
				t.Errorf("a's route to b's ULA goes by %v (%v): a route on lo is a reject route for IPv6", lk, err)
			}
			ss, err := a.dp.states()
			must(t, err)
			for _, s := range ss {
				if !net.IP(s.Src).IsLoopback() || !net.IP(s.Dst).IsLoopback() {
					t.Errorf("a's SA spi 0x%x %v -> %v: want loopback addresses on both ends", s.Spi, s.Src, s.Dst)
				}
			}

			for _, p := range [][2]*labHost{{a, b}, {b, a}} {
				out, err := p[0].ns.Run("ping", "-6", "-c", "3", "-i", "0.2", "-w", "10", p[1].ula.String())
				if err != nil || !strings.Contains(out, " 0% packet loss") {
					t.Fatalf("%s -> %s through the bridge: %v\n%s", p[0].name, p[1].name, err, out)
				}
			}
			sent, got := tcpTransfer(t, a, b, 2<<20)
			if !bytes.Equal(sent, got) {
				t.Fatal("TCP stream through the bridge: bytes differ")
			}
			if br.out.Load() < (2<<20)/1500 || br.in.Load() == 0 {
				t.Errorf("the bridge carried %d datagrams a -> b and %d b -> a", br.out.Load(), br.in.Load())
			}
			st, err := a.dp.Stats(t.Context())
			must(t, err)
			t.Logf("bridge: %d datagrams a -> b, %d b -> a; a's stats %+v", br.out.Load(), br.in.Load(), st)

			// Back on the wire.
			l.set(t, 0)
			l.set(t, 1)
			out, err := a.ns.Run("ping", "-6", "-c", "3", "-i", "0.2", "-w", "10", b.ula.String())
			if err != nil || !strings.Contains(out, " 0% packet loss") {
				t.Fatalf("a -> b back on the wire: %v\n%s", err, out)
			}
		})
	}
}

// tcpTransfer sends n random bytes from a to b's ULA over TCP and returns
// what was sent and what b received (sha256 logged).
func tcpTransfer(t *testing.T, a, b *labHost, n int) (sent, got []byte) {
	t.Helper()
	sent = make([]byte, n)
	rand.Read(sent)
	var ln net.Listener
	must(t, b.ns.Do(func() (err error) { ln, err = net.Listen("tcp6", "["+b.ula.String()+"]:5002"); return err }))
	defer ln.Close()
	res := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			res <- nil
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(60 * time.Second))
		buf, _ := io.ReadAll(c)
		res <- buf
	}()
	var c net.Conn
	must(t, a.ns.Do(func() (err error) {
		d := net.Dialer{Timeout: 10 * time.Second}
		c, err = d.Dial("tcp6", "["+b.ula.String()+"]:5002")
		return err
	}))
	c.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err := c.Write(sent); err != nil {
		t.Fatal(err)
	}
	c.Close()
	got = <-res
	t.Logf("TCP: %d bytes sent (sha256 %x), %d received (sha256 %x)", len(sent), sha256.Sum256(sent), len(got), sha256.Sum256(got))
	return sent, got
}
