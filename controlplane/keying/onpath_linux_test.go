//go:build linux

package keying

import (
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// rawUDP sends IPv4/UDP datagrams with any source address (IP_HDRINCL).
type rawUDP struct{ fd int }

func openRawUDP(ns *netns.NS) (*rawUDP, error) {
	var fd int
	err := ns.Do(func() (err error) {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
		return err
	})
	if err != nil {
		return nil, err
	}
	return &rawUDP{fd}, nil
}

func (r *rawUDP) send(src, dst netip.AddrPort, payload []byte) error {
	b := make([]byte, 28, 28+len(payload))
	b[0], b[8], b[9] = 0x45, 64, unix.IPPROTO_UDP
	binary.BigEndian.PutUint16(b[2:], uint16(28+len(payload)))
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(b[10:], ^uint16(sum))
	binary.BigEndian.PutUint16(b[20:], src.Port())
	binary.BigEndian.PutUint16(b[22:], dst.Port())
	binary.BigEndian.PutUint16(b[24:], uint16(8+len(payload)))
	b = append(b, payload...) // UDP checksum 0: none (IPv4)
	return unix.Sendto(r.fd, b, 0, &unix.SockaddrInet4{Addr: d})
}

func (r *rawUDP) close() { unix.Close(r.fd) }

// sniffUDP reads the IPv4/UDP datagrams (to or from port) that cross dev in
// ns and calls f with them until stop.
func sniffUDP(t *testing.T, ns *netns.NS, dev string, port uint16, f func(src, dst netip.AddrPort, payload []byte)) (stop func()) {
	t.Helper()
	var fd int
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM, int(htons(unix.ETH_P_IP)))
		if err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: ifi.Index})
	})
	if err != nil {
		t.Fatalf("sniff %s: %v", dev, err)
	}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
	var done atomic.Bool
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 65536)
		for !done.Load() {
			n, from, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				continue
			}
			if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
				continue
			}
			p := buf[:n]
			if len(p) < 28 || p[0]>>4 != 4 || p[9] != unix.IPPROTO_UDP {
				continue
			}
			hl := int(p[0]&0xf) * 4
			if len(p) < hl+8 {
				continue
			}
			src := netip.AddrPortFrom(netip.AddrFrom4([4]byte(p[12:16])), binary.BigEndian.Uint16(p[hl:]))
			dst := netip.AddrPortFrom(netip.AddrFrom4([4]byte(p[16:20])), binary.BigEndian.Uint16(p[hl+2:]))
			if src.Port() != port && dst.Port() != port {
				continue
			}
			f(src, dst, append([]byte(nil), p[hl+8:]...))
		}
	}()
	return func() { done.Store(true); wg.Wait(); unix.Close(fd) }
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// TestNetnsForgedErrorOnPath: a and b key across a router namespace that
// an attacker controls (on path: it sees every datagram and holds b's
// answers back a moment). For every INIT of a it sees, it sends a forged
// ERROR of every code from b's address (plus one with a made-up MAC, a
// forged COOKIE and a forged RESP piece) before it lets b's genuine answer
// through. Keying completes anyway on the first attempt: the unauthenticated
// ERRORs are hints, the rest fails its checks.
func TestNetnsForgedErrorOnPath(t *testing.T) {
	testenv.HostTier(t, "forged keying ERRORs from an nftables router in netns, no kernel feature the host lacks")
	testenv.RequireNetNS(t)
	testenv.RequireBinary(t, "nft", "nftables")
	k, ktA, ktB := newRealm(t)
	nsA, nsM, nsB := netns.New(t, "kfa"), netns.New(t, "kfm"), netns.New(t, "kfb")
	netns.MustVeth(t, nsA, "va", nsM, "ma")
	netns.MustVeth(t, nsM, "mb", nsB, "vb")
	nsA.MustAddr(t, "va", "10.1.0.1/24")
	nsM.MustAddr(t, "ma", "10.1.0.254/24")
	nsM.MustAddr(t, "mb", "10.2.0.254/24")
	nsB.MustAddr(t, "vb", "10.2.0.1/24")
	nsA.MustRoute(t, "10.2.0.0/24", "10.1.0.254", "va")
	nsB.MustRoute(t, "10.1.0.0/24", "10.2.0.254", "vb")
	if err := nsM.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
		t.Fatal(err)
	}
	// The attacker's router does not forward b's keying datagrams; its
	// program relays them itself, after its forgeries.
	nsM.MustRun(t, "nft", "add table inet onpath")
	nsM.MustRun(t, "nft", "add chain inet onpath relay { type filter hook forward priority 0; }")
	nsM.MustRun(t, "nft", "add rule inet onpath relay ip saddr 10.2.0.1 udp sport 4500 drop")
	raw, err := openRawUDP(nsM)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.close()
	addrA, addrB := netip.MustParseAddrPort("10.1.0.1:4500"), netip.MustParseAddrPort("10.2.0.1:4500")
	var mu sync.Mutex
	forgedFor := map[[8]byte]chan struct{}{} // closed once the forgeries for an exchange are out
	var forged, relayed atomic.Int32
	forge := func(id [8]byte) {
		send := func(m *Message) {
			b, err := m.Marshal()
			if err != nil {
				t.Error(err)
				return
			}
			if raw.send(addrB, addrA, append(NonESPMarker[:], b...)) == nil {
				forged.Add(1)
			}
		}
		for c := CodeAuthFailed; c <= CodeWrongMode; c++ {
			send(&Message{Type: MsgError, Mode: ModeKerberos, Exchange: id, Code: c, Text: "forged"})
		}
		send(&Message{Type: MsgError, Mode: ModeKerberos, Exchange: id, Code: CodeReplay, MAC: make([]byte, macLen)})
		send(&Message{Type: MsgCookie, Mode: ModeKerberos, Exchange: id, Cookie: make([]byte, sealedLen)})
		send(&Message{Type: MsgFragment, Mode: ModeKerberos, Exchange: id, Frag: Fragment{Of: MsgResp, Index: 0, Count: 2}, Data: []byte("forged")})
	}
	stopA := sniffUDP(t, nsM, "ma", 4500, func(src, dst netip.AddrPort, p []byte) {
		var m Message
		if src != addrA || len(p) < 4 || m.Unmarshal(p[4:]) != nil || msgType(p[4:]) != MsgInit {
			return
		}
		mu.Lock()
		done, seen := forgedFor[m.Exchange]
		if !seen {
			done = make(chan struct{})
			forgedFor[m.Exchange] = done
		}
		mu.Unlock()
		if !seen {
			forge(m.Exchange)
			close(done)
		}
	})
	defer stopA()
	stopB := sniffUDP(t, nsM, "mb", 4500, func(src, dst netip.AddrPort, p []byte) {
		if src != addrB || dst != addrA {
			return
		}
		// The forgeries for this exchange go first (b answers only once
		// it got a's INIT, which the attacker saw on its way).
		var m Message
		if len(p) > 4 && m.Unmarshal(p[4:]) == nil {
			mu.Lock()
			done := forgedFor[m.Exchange]
			mu.Unlock()
			if done != nil {
				select {
				case <-done:
				case <-time.After(10 * time.Second):
				}
			}
		}
		time.Sleep(20 * time.Millisecond)
		if raw.send(src, dst, p) == nil {
			relayed.Add(1)
		}
	})
	defer stopB()

	// The KDC listens on the host's loopback; the agents reach it from
	// the test process (their KDC round trips run outside the namespaces).
	recA, recB := newRecorder("a"), newRecorder("b")
	logger, logs := testLogger(t)
	agentA := runAgent(t, Config{ULA: ulaA, Auth: &Kerberos{Principal: princA, Realm: realm, Keytab: ktA, Krb5Conf: k.Config(t)},
		Transport: listenIn(t, nsA, addrA), Installer: recA, Logger: logger.With("host", "a")},
		PeerConfig{Name: "b", ULA: ulaB, Outer: addrB, Principal: princB})
	runAgent(t, Config{ULA: ulaB, Auth: &Kerberos{Principal: princB, Realm: realm, Keytab: ktB, Krb5Conf: k.Config(t)},
		Transport: listenIn(t, nsB, addrB), Installer: recB, Logger: logger.With("host", "b")},
		PeerConfig{Name: "a", ULA: ulaA, Outer: addrA, Principal: princA})
	waitFor(t, "keying through the attacker", func() bool {
		_, okA := recA.peer(ulaB)
		_, okB := recB.peer(ulaA)
		return okA && okB
	})
	pa, _ := recA.peer(ulaB)
	pb, _ := recB.peer(ulaA)
	pairOK(t, pa, pb)
	st, err := agentA.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d forged datagrams sent ahead of %d genuine ones; a: established=%v err=%v", forged.Load(), relayed.Load(), st[0].Established, st[0].LastError)
	if forged.Load() < 13 || relayed.Load() == 0 {
		t.Fatalf("the attacker forged %d and relayed %d datagrams: the test did not run as designed", forged.Load(), relayed.Load())
	}
	if st[0].LastError != nil {
		t.Errorf("a recorded a failure: %v", st[0].LastError)
	}
	logs.mu.Lock()
	hinted := strings.Count(logs.buf.String(), "unauthenticated ERROR (a hint")
	logs.mu.Unlock()
	if hinted == 0 {
		t.Error("a's log shows no forged ERROR taken as a hint: none arrived while a waited for the RESP")
	}
	noKeysLogged(t, logs, recA, recB)
}
