package xfrm

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/internal/netns"
)

// labHost is one BTMM host in a namespace: outer IPv4 on eth0 behind a
// router namespace, a tunnel socket on :4500 and a Dataplane.
type labHost struct {
	name  string
	ns    *netns.NS
	outer netip.Addr
	ula   netip.Addr
	dp    *Dataplane
	conn  *Conn
	cfg   Config
}

// lab is n hosts, each on its own /24 behind router namespace r, with SA
// keys for every ordered pair.
type lab struct {
	r     *netns.NS
	hosts []*labHost
	keys  map[[2]int][]byte
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func newLab(t testing.TB, n int) *lab {
	t.Helper()
	l := &lab{r: netns.New(t, "r"), keys: map[[2]int][]byte{}}
	must(t, l.r.Sysctl("net.ipv4.ip_forward", "1"))
	must(t, l.r.Sysctl("net.ipv6.conf.default.disable_ipv6", "1"))
	for i := range n {
		h := &labHost{name: string(rune('a' + i)), ns: netns.New(t, string(rune('a'+i))),
			outer: netip.AddrFrom4([4]byte{10, 0, byte(i + 1), 2}),
			ula:   netip.MustParseAddr(fmt.Sprintf("fd00::%x", 0xa+i))}
		// No IPv6 on the veths: the wire carries only IPv4 (and ARP).
		must(t, h.ns.Sysctl("net.ipv6.conf.default.disable_ipv6", "1"))
		netns.MustVeth(t, h.ns, "eth0", l.r, fmt.Sprintf("r%d", i))
		must(t, h.ns.Sysctl("net.ipv6.conf.default.disable_ipv6", "0"))
		must(t, h.ns.Sysctl("net.ipv4.conf.all.promote_secondaries", "1"))
		must(t, h.ns.Sysctl("net.ipv4.conf.eth0.promote_secondaries", "1"))
		l.r.MustAddr(t, fmt.Sprintf("r%d", i), fmt.Sprintf("10.0.%d.1/24", i+1))
		h.ns.MustAddr(t, "eth0", h.outer.String()+"/24")
		h.ns.MustRoute(t, "default", fmt.Sprintf("10.0.%d.1", i+1), "")
		l.hosts = append(l.hosts, h)
	}
	for i := range n {
		for j := range n {
			if i != j {
				k := make([]byte, 20)
				rand.Read(k)
				l.keys[[2]int{i, j}] = k
			}
		}
	}
	return l
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// spi of the SA carrying traffic from host i to host j.
func spi(i, j int) uint32 { return uint32(0x1000 + i<<8 + j) }

// start opens host i's tunnel socket and Dataplane.
func (l *lab) start(t testing.TB, i int, cfg Config) {
	t.Helper()
	h := l.hosts[i]
	c, err := ListenAt(context.Background(), h.ns.NsHandle(), netip.MustParseAddrPort("0.0.0.0:4500"))
	must(t, err)
	h.conn = c
	t.Cleanup(func() { c.Close() })
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t).With("host", h.name)
	}
	h.cfg = cfg
	d, err := New(h.ns.NsHandle(), cfg)
	must(t, err)
	h.dp = d
	t.Cleanup(func() { d.Close() })
}

// desired is host i's complete desired state.
func (l *lab) desired(i int) *controlplane.State {
	h := l.hosts[i]
	st := &controlplane.State{Local: controlplane.Local{ULA: h.ula, Port: 4500, Outer: h.outer}}
	for j, p := range l.hosts {
		if j == i {
			continue
		}
		st.Peers = append(st.Peers, controlplane.Peer{Name: p.name, ULA: p.ula, Outer: netip.AddrPortFrom(p.outer, 4500),
			Out: controlplane.SA{SPI: spi(i, j), Cipher: controlplane.CipherAESGCM, Key: l.keys[[2]int{i, j}]},
			In:  controlplane.SA{SPI: spi(j, i), Cipher: controlplane.CipherAESGCM, Key: l.keys[[2]int{j, i}]}})
	}
	return st
}

func (l *lab) set(t testing.TB, i int) []controlplane.Change {
	t.Helper()
	ch, err := l.hosts[i].dp.Set(context.Background(), l.desired(i))
	if err != nil {
		t.Fatalf("host %s: Set: %v", l.hosts[i].name, err)
	}
	return ch
}

func host128(a netip.Addr) *net.IPNet { return prefix128(a) }

// foreignXfrm installs XFRM objects that belong to someone else (another
// IKE daemon): a policy always, and a state when the kernel has ESP.
func foreignXfrm(t *testing.T, h *netlink.Handle, withState bool) {
	t.Helper()
	must(t, h.XfrmPolicyAdd(&netlink.XfrmPolicy{Dir: netlink.XFRM_DIR_OUT,
		Src: host128(netip.MustParseAddr("fd99::1")), Dst: host128(netip.MustParseAddr("fd99::2")),
		Tmpls: []netlink.XfrmPolicyTmpl{{Src: net.ParseIP("192.0.2.1"), Dst: net.ParseIP("192.0.2.2"),
			Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: 7}}}))
	if withState {
		must(t, h.XfrmStateAdd(&netlink.XfrmState{Src: net.ParseIP("192.0.2.1"), Dst: net.ParseIP("192.0.2.2"),
			Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Spi: 0x9999, Reqid: 7,
			Aead: &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: make([]byte, 20), ICVLen: 128}}))
	}
}

func mustLinkObj(t *testing.T, h *labHost, dev string) netlink.Link {
	t.Helper()
	l, err := h.ns.LinkByName(dev)
	must(t, err)
	return l
}

func mustParseAddr(t *testing.T, cidr string) *netlink.Addr {
	t.Helper()
	a, err := netlink.ParseAddr(cidr)
	must(t, err)
	return a
}
