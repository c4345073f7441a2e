package vmsmoke

import (
	"bufio"
	"context"
	"net"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

type host struct {
	ns    *netns.NS
	dev   string
	outer net.IP
	ula   net.IP
}

// TestESPInUDPPing installs tunnel-mode ESP SAs (outer IPv4 with UDP
// encapsulation on 4500, inner IPv6 ULA /128) in two namespaces, pings one ULA
// from the other, and checks that the wire carried only UDP/4500.
func TestESPInUDPPing(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	testenv.RequireBinary(t, "tcpdump", "tcpdump")
	testenv.RequireBinary(t, "ping", "iputils-ping")

	a := host{ns: netns.New(t, "a"), dev: "va", outer: net.ParseIP("10.0.0.1").To4(), ula: net.ParseIP("fd00::a")}
	b := host{ns: netns.New(t, "b"), dev: "vb", outer: net.ParseIP("10.0.0.2").To4(), ula: net.ParseIP("fd00::b")}
	netns.MustVeth(t, a.ns, a.dev, b.ns, b.dev)
	key := func(b byte) []byte { k := make([]byte, 20); k[0] = b; return k }
	for _, pair := range []struct {
		self, peer host
		outSPI     int
		inSPI      int
	}{{a, b, 0x1001, 0x1002}, {b, a, 0x1002, 0x1001}} {
		self, peer := pair.self, pair.peer
		self.ns.MustAddr(t, "lo", self.ula.String()+"/128")
		self.ns.MustAddr(t, self.dev, self.outer.String()+"/24")
		link, err := self.ns.LinkByName(self.dev)
		if err != nil {
			t.Fatal(err)
		}
		if err := self.ns.Handle.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: host128(peer.ula), Src: self.ula, MTU: 1400}); err != nil {
			t.Fatal(err)
		}
		h := self.ns.Handle
		for _, sa := range []struct {
			src, dst host
			spi      int
			keyByte  byte
		}{{self, peer, pair.outSPI, byte(pair.outSPI)}, {peer, self, pair.inSPI, byte(pair.inSPI)}} {
			if err := h.XfrmStateAdd(&netlink.XfrmState{
				Src: sa.src.outer, Dst: sa.dst.outer, Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL,
				Spi: sa.spi, Reqid: 1, ReplayWindow: 32,
				Aead:     &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: key(sa.keyByte), ICVLen: 128},
				Encap:    &netlink.XfrmStateEncap{Type: netlink.XFRM_ENCAP_ESPINUDP, SrcPort: 4500, DstPort: 4500, OriginalAddress: net.IPv4zero},
				Selector: &netlink.XfrmPolicy{Src: host128(sa.src.ula), Dst: host128(sa.dst.ula)},
			}); err != nil {
				t.Fatalf("%s: state add spi %#x: %v", self.ns.Name, sa.spi, err)
			}
		}
		for _, p := range []struct {
			dir      netlink.Dir
			src, dst host
		}{{netlink.XFRM_DIR_OUT, self, peer}, {netlink.XFRM_DIR_IN, peer, self}} {
			if err := h.XfrmPolicyAdd(&netlink.XfrmPolicy{
				Src: host128(p.src.ula), Dst: host128(p.dst.ula), Dir: p.dir,
				Tmpls: []netlink.XfrmPolicyTmpl{{Src: p.src.outer, Dst: p.dst.outer, Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: 1}},
			}); err != nil {
				t.Fatalf("%s: policy add: %v", self.ns.Name, err)
			}
		}
		// Inbound ESP-in-UDP is decapsulated only on a socket with UDP_ENCAP set.
		if err := self.ns.Do(func() error { return holdEncapSocket(t) }); err != nil {
			t.Fatal(err)
		}
	}

	// Capture what leaves each host on its veth while a pings b's ULA. Only
	// egress: decrypted inner packets are re-injected on the receiving veth
	// and would show up in an ingress capture. IPv4 and ULA traffic only
	// (the kernel's own link-local IPv6 chatter is not ours).
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	lines := make(chan string, 512)
	var caps []*exec.Cmd
	for _, h := range []host{a, b} {
		c := h.ns.Command(ctx, "tcpdump", "-n", "-l", "-Q", "out", "-i", h.dev, "ip", "or", "ip6", "net", "fd00::/8")
		out, err := c.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := h.ns.StartCmd(c); err != nil {
			t.Fatal(err)
		}
		caps = append(caps, c)
		go func() {
			s := bufio.NewScanner(out)
			for s.Scan() {
				lines <- s.Text()
			}
		}()
	}
	time.Sleep(1500 * time.Millisecond) // tcpdump needs a moment to attach
	res, err := a.ns.Run("ping", "-6", "-c", "3", "-i", "0.3", "-w", "10", b.ula.String())
	if err != nil || !strings.Contains(res, " 0% packet loss") {
		t.Fatalf("ping -6 %s over ESP-in-UDP: %v\n%s", b.ula, err, res)
	}
	time.Sleep(500 * time.Millisecond)
	for _, c := range caps {
		syscall.Kill(-c.Process.Pid, syscall.SIGINT)
		c.Wait()
	}
	close(lines)
	var udp, other []string
	for l := range lines {
		if strings.TrimSpace(l) == "" {
			continue
		}
		if strings.Contains(l, ".4500 > ") && strings.Contains(l, "UDP-encap") && strings.Contains(l, "ESP(spi=0x0000100") {
			udp = append(udp, l)
		} else {
			other = append(other, l)
		}
	}
	if len(udp) < 6 {
		t.Fatalf("captured %d ESP-in-UDP packets, want >= 6 (3 echo requests + 3 replies); other: %q", len(udp), other)
	}
	if len(other) > 0 {
		t.Fatalf("non-ESP-in-UDP packets crossed the wire: %q", other)
	}
	t.Logf("ping over ESP-in-UDP ok; %d encapsulated packets captured, e.g. %s", len(udp), udp[0])
}

func host128(ip net.IP) *net.IPNet { return &net.IPNet{IP: ip, Mask: net.CIDRMask(128, 128)} }

// holdEncapSocket opens a UDP socket on :4500 with UDP_ENCAP_ESPINUDP in the
// current namespace and keeps it open until the test ends.
func holdEncapSocket(t *testing.T) error {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Port: 4500}); err != nil {
		syscall.Close(fd)
		return err
	}
	const udpEncap, udpEncapESPInUDP = 100, 2
	if err := syscall.SetsockoptInt(fd, syscall.IPPROTO_UDP, udpEncap, udpEncapESPInUDP); err != nil {
		syscall.Close(fd)
		return err
	}
	t.Cleanup(func() { syscall.Close(fd) })
	return nil
}
