package relay

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/pion/stun/v3"
	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane/nldump"
	ctlrelay "github.com/btmm/btmm/controlplane/relay"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

var (
	relayAddr = netip.MustParseAddr("10.9.0.1")
	hostA     = netip.MustParseAddrPort("10.1.0.2:4500")
	hostB     = netip.MustParseAddrPort("10.2.0.2:4500")
	hostC     = netip.MustParseAddrPort("10.3.0.3:4500")
	gwMAC     = net.HardwareAddr{0x02, 0, 0, 0, 0, 0xfe}
)

func frame(src, dst netip.AddrPort, ttl byte, payload []byte) []byte {
	b := make([]byte, 14+20+8, 14+28+len(payload))
	copy(b[0:6], []byte{0x02, 0, 0, 0, 0, 0x01})
	copy(b[6:12], []byte{0x02, 0, 0, 0, 0, 0x02})
	binary.BigEndian.PutUint16(b[12:], 0x0800)
	ip := b[14:34]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(28+len(payload)))
	ip[8], ip[9] = ttl, 17
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	binary.BigEndian.PutUint16(ip[10:], ipsum(ip))
	u := b[34:42]
	binary.BigEndian.PutUint16(u[0:], src.Port())
	binary.BigEndian.PutUint16(u[2:], dst.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(8+len(payload)))
	binary.BigEndian.PutUint16(u[6:], 0x1234)
	return append(b, payload...)
}

func ipsum(h []byte) uint16 {
	var s uint32
	for i := 0; i < len(h); i += 2 {
		s += uint32(binary.BigEndian.Uint16(h[i:]))
	}
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

type skbCtx struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto, Priority, IngressIfindex, Ifindex uint32
}

// TestProgram runs the program on crafted frames (Program.Run) in a
// namespace where the relay's device has a route and a permanent ARP entry
// for host A, so the FIB lookup succeeds and the rewritten frame is shown.
func TestProgram(t *testing.T) {
	testenv.RequireNetNS(t)
	r := netns.New(t, "rp")
	o := netns.New(t, "ro")
	netns.MustVeth(t, r, "r0", o, "o0")
	r.MustAddr(t, "r0", "10.9.0.1/24")
	r.MustRoute(t, "10.0.0.0/8", "10.9.0.254", "r0")
	must(t, r.Sysctl("net.ipv4.conf.r0.forwarding", "1"))
	l, err := r.LinkByName("r0")
	must(t, err)
	must(t, r.Handle.NeighSet(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: netlink.FAMILY_V4,
		State: netlink.NUD_PERMANENT, IP: net.IPv4(10, 9, 0, 254), HardwareAddr: gwMAC}))
	var objs relayObjects
	must(t, loadRelayObjects(&objs, nil))
	defer objs.Close()
	must(t, objs.Config.Put(uint32(0), relayRelayConfig{Addr: relayAddr.As4(), PortMin: 40000, PortMax: 40999}))
	f := &Forwarder{objs: objs, flows: map[relayFlowKey]relayRewrite{}}
	// B sends to A's port 40000 from hostB; A is bound at B's port 40001 from hostA.
	must(t, f.Set(map[ctlrelay.Flow]ctlrelay.Rewrite{
		{InPort: 40000, From: hostB}: {OutPort: 40001, To: hostA, Limit: 2000},
		{InPort: 40001, From: hostA}: {OutPort: 40000, To: hostB},
		// hostC's datagrams at A's port 40000 are for a host attached by a
		// stream (relay-tcp): passed up for Go to frame.
		{InPort: 40000, From: hostC}: {OutPort: 40002, ToStack: true},
	}))
	if err := f.Set(map[ctlrelay.Flow]ctlrelay.Rewrite{{InPort: 40000, From: hostB}: {OutPort: 40001}}); err == nil {
		t.Error("Set accepted a rewrite without a destination")
	}
	run := func(pkt []byte) (uint32, []byte) {
		t.Helper()
		out := make([]byte, len(pkt)+64)
		var ret uint32
		must(t, r.Do(func() error {
			opts := &ebpf.RunOptions{Data: pkt, DataOut: out, Context: skbCtx{Ifindex: uint32(l.Attrs().Index)}}
			var err error
			ret, err = objs.RelayIngress.Run(opts)
			out = opts.DataOut
			return err
		}))
		return ret, out
	}
	esp := append([]byte{0, 0, 0x10, 0x01, 0, 0, 0, 1}, bytes.Repeat([]byte{0xab}, 1000)...)
	ret, out := run(frame(hostB, netip.AddrPortFrom(relayAddr, 40000), 64, esp))
	if ret != 7 { // TC_ACT_REDIRECT
		t.Fatalf("bound ESP: verdict %d, want redirect", ret)
	}
	want := frame(netip.AddrPortFrom(relayAddr, 40001), hostA, 63, esp)
	copy(want[0:6], gwMAC)
	copy(want[6:12], l.Attrs().HardwareAddr)
	binary.BigEndian.PutUint16(want[40:], 0) // UDP checksum zero (RFC 3948 §2.1)
	if !bytes.Equal(out, want) {
		t.Fatalf("rewritten frame\n got %x\nwant %x", out, want)
	}
	for _, tc := range []struct {
		name string
		pkt  []byte
		want uint32
	}{
		{"unbound source", frame(netip.MustParseAddrPort("10.3.0.9:4500"), netip.AddrPortFrom(relayAddr, 40000), 64, esp), 2},
		{"marker (control/keying) to the stack", frame(hostB, netip.AddrPortFrom(relayAddr, 40000), 64, make([]byte, 40)), 0},
		{"keepalive to the stack (too short to judge)", frame(hostB, netip.AddrPortFrom(relayAddr, 40000), 64, []byte{0xff}), 0},
		{"not an allocation port", frame(hostB, netip.AddrPortFrom(relayAddr, 3478), 64, esp), 0},
		{"another address", frame(hostB, netip.MustParseAddrPort("10.9.0.7:40000"), 64, esp), 0},
		{"TTL 1 to the stack", frame(hostB, netip.AddrPortFrom(relayAddr, 40000), 1, esp), 0},
		{"ESP for a stream-attached owner to the stack", frame(hostC, netip.AddrPortFrom(relayAddr, 40000), 64, esp), 0},
		{"over the byte limit", frame(hostB, netip.AddrPortFrom(relayAddr, 40000), 64, esp), 2},
	} {
		if ret, _ := run(tc.pkt); ret != tc.want {
			t.Errorf("%s: verdict %d, want %d", tc.name, ret, tc.want)
		}
	}
	v, err := f.Verdicts()
	must(t, err)
	if v.Forwarded != 1 || v.Unbound != 1 || v.OverQuota != 1 || v.ToStack != 3 {
		t.Errorf("verdicts %+v", v)
	}
	st, _ := f.Stats()
	if c := st[ctlrelay.Flow{InPort: 40000, From: hostB}]; c.Packets != 1 || c.Dropped != 1 {
		t.Errorf("flow counters %+v", c)
	}
	// Removing a flow stops forwarding.
	must(t, f.Set(map[ctlrelay.Flow]ctlrelay.Rewrite{{InPort: 40001, From: hostA}: {OutPort: 40000, To: hostB}}))
	if ret, _ := run(frame(hostB, netip.AddrPortFrom(relayAddr, 40000), 64, esp)); ret != 2 {
		t.Errorf("removed flow: verdict %d, want drop", ret)
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// host is a tunnel socket in a namespace with a relay client.
type host struct {
	ns   *netns.NS
	conn *net.UDPConn
	cl   *ctlrelay.Client
	rx   chan []byte
}

func newHost(t testing.TB, ns *netns.NS, addr netip.AddrPort, name string, cred ctlrelay.Credential) *host {
	var c *net.UDPConn
	must(t, ns.Do(func() (err error) {
		c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(addr))
		return err
	}))
	t.Cleanup(func() { c.Close() })
	h := &host{ns: ns, conn: c, rx: make(chan []byte, 4096)}
	h.cl = &ctlrelay.Client{Cred: cred, Host: name, Send: func(b []byte, to netip.AddrPort) error {
		_, err := c.WriteToUDPAddrPort(append([]byte{0, 0, 0, 0}, b...), to)
		return err
	}}
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if n > 4 && bytes.Equal(buf[:4], []byte{0, 0, 0, 0}) && stun.IsMessage(buf[4:n]) {
				h.cl.Handle(buf[4:n], from)
				continue
			}
			h.rx <- append([]byte(from.String()+"|"), buf[:n]...)
		}
	}()
	return h
}

// TestKernelForwarding: a relay namespace runs the Go server with the TC
// forwarder attached; two hosts in their own namespaces allocate, bind and
// exchange 500 ESP-like datagrams each way. The kernel forwards every one
// (the Go server forwarded none), each host sees the other at the other's
// relay port, and unbound ESP is dropped in the kernel.
func TestKernelForwarding(t *testing.T) {
	for _, clsact := range []bool{false, true} {
		name := "tcx-or-clsact"
		if clsact {
			name = "clsact"
		}
		t.Run(name, func(t *testing.T) { testKernelForwarding(t, clsact) })
	}
}

func testKernelForwarding(t *testing.T, clsact bool) {
	testenv.Require(t, testenv.NetNS) // also in the VM tier: Debian's 6.1 has no TCX (clsact path)
	tp := newTopo(t, "kernel", clsact)
	fw, srv, a, b, rl := tp.fw, tp.srv, tp.a, tp.b, tp.rl
	ctx := t.Context()
	defer func() {
		must(t, fw.Close())
		l, err := rl.LinkByName("r0")
		must(t, err)
		if fs, err := nldump.Retry(func() ([]netlink.Filter, error) { return rl.Handle.FilterList(l, netlink.HANDLE_MIN_INGRESS) }); err != nil || len(fs) != 0 {
			t.Errorf("filters left after Close: %v %v", fs, err)
		}
	}()
	t.Logf("forwarder attached with %s", fw.Attachment())
	alice := tp.cred
	ha := newHost(t, a, hostA, "a.alice.btmm.example.", alice)
	hb := newHost(t, b, hostB, "b.alice.btmm.example.", alice)
	server := netip.AddrPortFrom(relayAddr, 3478)
	aa, err := ha.cl.Allocate(ctx, server, 0)
	must(t, err)
	ba, err := hb.cl.Allocate(ctx, server, 0)
	must(t, err)
	must(t, ha.cl.Bind(ctx, ba.Relayed, aa))
	must(t, hb.cl.Bind(ctx, aa.Relayed, ba))

	const n = 500
	send := func(from *host, to netip.AddrPort, tag byte) {
		for i := range n {
			p := make([]byte, 200)
			binary.BigEndian.PutUint32(p, 0x1000+uint32(tag))
			binary.BigEndian.PutUint32(p[4:], uint32(i))
			from.conn.WriteToUDPAddrPort(p, to)
			if i%50 == 49 {
				time.Sleep(5 * time.Millisecond)
			}
		}
	}
	recv := func(h *host, from netip.AddrPort, tag byte) {
		t.Helper()
		got := 0
		deadline := time.After(10 * time.Second)
		for got < n {
			select {
			case p := <-h.rx:
				src, body, _ := bytes.Cut(p, []byte("|"))
				if string(src) != from.String() || binary.BigEndian.Uint32(body) != 0x1000+uint32(tag) {
					t.Fatalf("datagram from %s: %x", src, body[:8])
				}
				got++
			case <-deadline:
				t.Fatalf("received %d of %d from %v", got, n, from)
			}
		}
	}
	send(ha, ba.Relayed, 'a')
	recv(hb, aa.Relayed, 'a')
	send(hb, aa.Relayed, 'b')
	recv(ha, ba.Relayed, 'b')

	st := srv.Stats()
	if st.GoForwardedESP != 0 || st.KernelForwarded != 2*n {
		t.Errorf("Go forwarded %d ESP datagrams, the kernel %d; want 0 and %d", st.GoForwardedESP, st.KernelForwarded, 2*n)
	}
	// ESP from an unbound source: dropped by the program, nothing arrives.
	var g *net.UDPConn
	must(t, a.Do(func() (err error) {
		g, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 1, 0, 2), Port: 4999})
		return err
	}))
	defer g.Close()
	for range 100 {
		g.WriteToUDPAddrPort([]byte{1, 2, 3, 4, 5, 6, 7, 8}, ba.Relayed)
	}
	select {
	case p := <-hb.rx:
		t.Errorf("unbound datagram forwarded: %q", p)
	case <-time.After(500 * time.Millisecond):
	}
	v, err := fw.Verdicts()
	must(t, err)
	if v.Unbound < 100 || v.Forwarded != 2*n {
		t.Errorf("verdicts %+v", v)
	}
	t.Logf("verdicts %+v, relay stats %+v", v, srv.Stats())
}

// topo is the four-namespace relay setup: rl (relay), rt (router), a and b
// (hosts); mode "kernel" attaches the forwarder, "go" runs the server
// without it.
type topo struct {
	rl, rt, a, b *netns.NS
	fw           *Forwarder
	srv          *ctlrelay.Server
	cred         ctlrelay.Credential
}

func newTopo(t testing.TB, mode string, clsact bool) *topo {
	tp := &topo{}
	rl, rt := netns.New(t, "rl"), netns.New(t, "rt")
	a, b := netns.New(t, "ra"), netns.New(t, "rb")
	tp.rl, tp.rt, tp.a, tp.b = rl, rt, a, b
	netns.MustVeth(t, rl, "r0", rt, "t0")
	netns.MustVeth(t, a, "a0", rt, "t1")
	netns.MustVeth(t, b, "b0", rt, "t2")
	rl.MustAddr(t, "r0", "10.9.0.1/24")
	rt.MustAddr(t, "t0", "10.9.0.254/24")
	rt.MustAddr(t, "t1", "10.1.0.1/24")
	rt.MustAddr(t, "t2", "10.2.0.1/24")
	a.MustAddr(t, "a0", "10.1.0.2/24")
	b.MustAddr(t, "b0", "10.2.0.2/24")
	rl.MustRoute(t, "0.0.0.0/0", "10.9.0.254", "r0")
	a.MustRoute(t, "0.0.0.0/0", "10.1.0.1", "a0")
	b.MustRoute(t, "0.0.0.0/0", "10.2.0.1", "b0")
	must(t, rt.Sysctl("net.ipv4.ip_forward", "1"))
	tp.cred = ctlrelay.Credential{Name: "alice.btmm.example.", Secret: bytes.Repeat([]byte{7}, 32)}
	cfg := ctlrelay.Config{
		Listen: []netip.AddrPort{netip.AddrPortFrom(relayAddr, 3478)}, PortMin: 40000, PortMax: 40099,
		Keys: func(n string) (ctlrelay.Credential, bool) { return tp.cred, n == tp.cred.Name },
		ListenPacket: func(ap netip.AddrPort) (c *net.UDPConn, err error) {
			err = rl.Do(func() error { c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(ap)); return err })
			return c, err
		},
	}
	if mode == "kernel" {
		must(t, rl.Do(func() (err error) {
			tp.fw, err = New(Config{Device: "r0", Addr: relayAddr, PortMin: 40000, PortMax: 40099, ForceClsact: clsact})
			return err
		}))
		cfg.Forwarder = tp.fw
	}
	srv, err := ctlrelay.Listen(cfg)
	must(t, err)
	tp.srv = srv
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return tp
}
