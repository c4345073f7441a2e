package ebpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// Crafted packets for Program.Run. Builders produce Ethernet frames.

var (
	ulaA   = netip.MustParseAddr("fd00::a")
	ulaB   = netip.MustParseAddr("fd00::b")
	outerA = netip.MustParseAddr("10.0.0.1")
	outerB = netip.MustParseAddr("10.0.0.2")
	macB   = net.HardwareAddr{0x02, 0, 0, 0, 0, 0xb}
)

const (
	portA = 4500
	portB = 4501
)

func eth(proto uint16, payload []byte) []byte {
	b := make([]byte, 14, 14+len(payload))
	copy(b[0:6], []byte{0x02, 0, 0, 0, 0, 0xee})
	copy(b[6:12], []byte{0x02, 0, 0, 0, 0, 0xff})
	binary.BigEndian.PutUint16(b[12:], proto)
	return append(b, payload...)
}

func ipv6(src, dst netip.Addr, nh byte, payload []byte) []byte {
	b := make([]byte, 40, 40+len(payload))
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:], uint16(len(payload)))
	b[6] = nh
	b[7] = 64
	s, d := src.As16(), dst.As16()
	copy(b[8:], s[:])
	copy(b[24:], d[:])
	return append(b, payload...)
}

func ipv4(src, dst netip.Addr, proto byte, frag uint16, payload []byte) []byte {
	b := make([]byte, 20, 20+len(payload))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(20+len(payload)))
	binary.BigEndian.PutUint16(b[6:], frag)
	b[8] = 64
	b[9] = proto
	s, d := src.As4(), dst.As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	binary.BigEndian.PutUint16(b[10:], ipsum(b))
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

func udp(sport, dport uint16, payload []byte) []byte {
	b := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint16(b[4:], uint16(8+len(payload)))
	return append(b, payload...)
}

// esp is an ESP header (SPI, sequence) followed by opaque bytes.
func esp(spi uint32, n int) []byte {
	b := make([]byte, 8+n)
	binary.BigEndian.PutUint32(b[0:], spi)
	binary.BigEndian.PutUint32(b[4:], 1)
	for i := 8; i < len(b); i++ {
		b[i] = byte(i)
	}
	return b
}

// skbCtx is the prefix of struct __sk_buff that BPF_PROG_TEST_RUN accepts.
type skbCtx struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto, Priority, IngressIfindex, Ifindex uint32
}

// progEnv is a loaded (unattached) collection whose maps describe host A
// talking to peer B, run inside a namespace where A's veth has an IPv4
// route and a permanent ARP entry for B (so the FIB lookup succeeds).
type progEnv struct {
	objs    btmmObjects
	ns      *netns.NS
	ifindex int
	mac     net.HardwareAddr
}

func newProgEnv(t testing.TB, mode uint8) *progEnv {
	t.Helper()
	testenv.RequireNetNS(t)
	a := netns.New(t, "pa")
	b := netns.New(t, "pb")
	netns.MustVeth(t, a, "va", b, "vb")
	a.MustAddr(t, "va", "10.0.0.1/24")
	l, err := a.LinkByName("va")
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Handle.NeighSet(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: netlink.FAMILY_V4,
		State: netlink.NUD_PERMANENT, IP: outerB.AsSlice(), HardwareAddr: macB}); err != nil {
		t.Fatal(err)
	}
	// The FIB fast path wants forwarding on the device (else the program
	// hands the packet to bpf_redirect_neigh, which Program.Run cannot show).
	must(t, a.Sysctl("net.ipv4.conf.va.forwarding", "1"))
	e := &progEnv{ns: a, ifindex: l.Attrs().Index, mac: l.Attrs().HardwareAddr}
	if err := loadBtmmObjects(&e.objs, nil); err != nil {
		t.Fatalf("load: %v", err)
	}
	t.Cleanup(func() { e.objs.Close() })
	must(t, e.objs.Config.Put(uint32(0), btmmBtmmConfig{LocalUla: ulaA.As16(), Port: portA, Mode: mode}))
	must(t, e.objs.PeerByUla.Put(ulaKey(ulaB), btmmPeer{OuterAddr: outerB.As4(), LocalAddr: outerA.As4(), OuterPort: portB}))
	must(t, e.objs.PeerByOuter.Put(outerKey(netip.AddrPortFrom(outerB, portB)), ulaKey(ulaB)))
	must(t, e.objs.PeerStats.Put(ulaKey(ulaB), make([]btmmCounters, ebpf.MustPossibleCPU())))
	return e
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// run runs prog on pkt inside the namespace and returns the verdict and the
// packet as the program left it.
func (e *progEnv) run(t *testing.T, prog *ebpf.Program, pkt []byte) (uint32, []byte) {
	t.Helper()
	ret, out, err := e.tryRun(prog, pkt)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	return ret, out
}

func (e *progEnv) tryRun(prog *ebpf.Program, pkt []byte) (uint32, []byte, error) {
	out := make([]byte, len(pkt)+256)
	var ret uint32
	err := e.ns.Do(func() error {
		var err error
		opts := &ebpf.RunOptions{Data: pkt, DataOut: out, Context: skbCtx{Ifindex: uint32(e.ifindex)}}
		ret, err = prog.Run(opts)
		out = opts.DataOut
		return err
	})
	return ret, out, err
}

func (e *progEnv) drops(t *testing.T) map[DropReason]uint64 {
	t.Helper()
	d, err := readDrops(e.objs.Drops)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range d {
		if v == 0 {
			delete(d, k)
		}
	}
	return d
}

func (e *progEnv) stats(t *testing.T) btmmCounters {
	t.Helper()
	var per []btmmCounters
	must(t, e.objs.PeerStats.Lookup(ulaKey(ulaB), &per))
	var s btmmCounters
	for _, c := range per {
		s.TxPackets += c.TxPackets
		s.TxBytes += c.TxBytes
		s.RxPackets += c.RxPackets
		s.RxBytes += c.RxBytes
		s.Drops += c.Drops
	}
	return s
}

const (
	actOK       = 0
	actShot     = 2
	actRedirect = 7
)

// wantOuter is the frame the egress program must emit around inner.
func (e *progEnv) wantOuter(inner []byte, tos byte) []byte {
	ip := ipv4(outerA, outerB, 17, 0x4000, udp(portA, portB, inner))
	ip[1] = tos
	binary.BigEndian.PutUint16(ip[10:], 0)
	binary.BigEndian.PutUint16(ip[10:], ipsum(ip[:20]))
	f := eth(0x0800, ip)
	copy(f[0:6], macB)
	copy(f[6:12], e.mac)
	return f
}

func TestEgressSecure(t *testing.T) {
	e := newProgEnv(t, modeSecure)
	payload := esp(0x1001, 64)

	t.Run("normal", func(t *testing.T) {
		pkt := eth(0x86dd, ipv6(ulaA, ulaB, 50, payload))
		ret, out := e.run(t, e.objs.BtmmEgress, pkt)
		if ret != actOK {
			t.Fatalf("verdict %d, want TC_ACT_OK", ret)
		}
		if diff := cmp.Diff(e.wantOuter(payload, 0), out); diff != "" {
			t.Errorf("egress frame (-want +got):\n%s", diff)
		}
		if s := e.stats(t); s.TxPackets != 1 || s.TxBytes != uint64(len(out)) {
			t.Errorf("stats %+v, want 1 packet of %d bytes", s, len(out))
		}
	})
	cases := []struct {
		name string
		pkt  []byte
		ret  uint32
		drop DropReason // checked when ret is SHOT
	}{
		{"not esp (cleartext leak)", eth(0x86dd, ipv6(ulaA, ulaB, 58, make([]byte, 16))), actShot, DropNotESP},
		{"esp from another source", eth(0x86dd, ipv6(netip.MustParseAddr("fd00::99"), ulaB, 50, payload)), actShot, DropNotESP},
		{"unknown peer", eth(0x86dd, ipv6(ulaA, netip.MustParseAddr("fd00::c"), 50, payload)), actOK, 0},
		{"short (payload missing)", eth(0x86dd, ipv6(ulaA, ulaB, 50, payload)[:40]), actShot, DropMalformed},
		{"ipv4", eth(0x0800, ipv4(outerA, outerB, 17, 0, udp(1, 2, nil))), actOK, 0},
		{"not version 6", eth(0x86dd, append([]byte{0x40}, ipv6(ulaA, ulaB, 50, payload)[1:]...)), actOK, 0},
		{"payload length beyond packet", func() []byte {
			p := eth(0x86dd, ipv6(ulaA, ulaB, 50, payload))
			binary.BigEndian.PutUint16(p[14+4:], 2000)
			return p
		}(), actShot, DropMalformed},
		{"oversize", eth(0x86dd, ipv6(ulaA, ulaB, 50, esp(0x1001, 1500))), actShot, DropOversize},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := e.drops(t)
			ret, out := e.run(t, e.objs.BtmmEgress, c.pkt)
			if ret != c.ret {
				t.Fatalf("verdict %d, want %d", ret, c.ret)
			}
			if ret == actOK && !bytes.Equal(out, c.pkt) {
				t.Errorf("passed packet was modified")
			}
			if ret == actShot {
				if after := e.drops(t); after[c.drop] != before[c.drop]+1 {
					t.Errorf("drops[%s] %d -> %d, want +1 (all: %v)", c.drop, before[c.drop], after[c.drop], after)
				}
			}
		})
	}
}

// Without forwarding on the device the FIB fast path is refused and the
// program leaves next-hop resolution to bpf_redirect_neigh.
func TestEgressRedirectNeigh(t *testing.T) {
	e := newProgEnv(t, modeSecure)
	must(t, e.ns.Sysctl("net.ipv4.conf.va.forwarding", "0"))
	ret, out := e.run(t, e.objs.BtmmEgress, eth(0x86dd, ipv6(ulaA, ulaB, 50, esp(0x1001, 64))))
	if ret != actRedirect {
		t.Fatalf("verdict %d, want TC_ACT_REDIRECT", ret)
	}
	// Headers are written; only the MAC addresses are left to the kernel.
	want := e.wantOuter(esp(0x1001, 64), 0)
	if diff := cmp.Diff(want[12:], out[12:]); diff != "" {
		t.Errorf("frame after the MAC addresses (-want +got):\n%s", diff)
	}
}

func TestEgressCleartext(t *testing.T) {
	e := newProgEnv(t, modeCleartext)
	inner := ipv6(ulaA, ulaB, 6, make([]byte, 32))
	inner[0], inner[1] = 0x6b, 0x80 // traffic class 0xb8 (EF)
	ret, out := e.run(t, e.objs.BtmmEgress, eth(0x86dd, inner))
	if ret != actOK {
		t.Fatalf("verdict %d", ret)
	}
	if diff := cmp.Diff(e.wantOuter(inner, 0xb8), out); diff != "" {
		t.Errorf("egress frame (-want +got):\n%s", diff)
	}
	// Another inner source: the peer would drop it as spoofed, so do we.
	if ret, _ := e.run(t, e.objs.BtmmEgress, eth(0x86dd, ipv6(netip.MustParseAddr("fe80::1"), ulaB, 6, nil))); ret != actShot {
		t.Errorf("foreign inner source: verdict %d, want SHOT", ret)
	}
	// Oversize: 1480-byte IPv6 packet + 28 does not fit a 1500 MTU.
	big := eth(0x86dd, ipv6(ulaA, ulaB, 17, make([]byte, 1440)))
	if ret, _ := e.run(t, e.objs.BtmmEgress, big); ret != actShot {
		t.Errorf("oversize verdict %d, want SHOT", ret)
	}
	if d := e.drops(t); d[DropOversize] != 1 || d[DropSpoofed] != 1 {
		t.Errorf("drops %v, want one oversize and one spoofed", d)
	}
	if s := e.stats(t); s.TxPackets != 1 || s.Drops != 2 {
		t.Errorf("stats %+v, want 1 tx packet and 2 drops", s)
	}
}

func TestIngressSecure(t *testing.T) {
	e := newProgEnv(t, modeSecure)
	payload := esp(0x2001, 80)
	in := func(src netip.Addr, sport uint16, frag uint16, p []byte) []byte {
		return eth(0x0800, ipv4(src, outerA, 17, frag, udp(sport, portA, p)))
	}

	t.Run("normal", func(t *testing.T) {
		ret, out := e.run(t, e.objs.BtmmIngress, in(outerB, portB, 0x4000, payload))
		if ret != actOK {
			t.Fatalf("verdict %d", ret)
		}
		want := eth(0x86dd, ipv6(ulaB, ulaA, 50, payload))
		if diff := cmp.Diff(want, out); diff != "" {
			t.Errorf("ingress frame (-want +got):\n%s", diff)
		}
		if s := e.stats(t); s.RxPackets != 1 {
			t.Errorf("stats %+v, want 1 rx packet", s)
		}
	})
	badsum := in(outerB, portB, 0, payload)
	badsum[14+10] ^= 0xff
	badlen := in(outerB, portB, 0, payload)
	binary.BigEndian.PutUint16(badlen[14+20+4:], 50)
	truncated := in(outerB, portB, 0, payload)[:14+20+8+20]
	options := eth(0x0800, func() []byte {
		p := ipv4(outerB, outerA, 17, 0, append([]byte{1, 1, 1, 0}, udp(portB, portA, payload)...))
		p[0] = 0x46
		binary.BigEndian.PutUint16(p[10:], 0)
		binary.BigEndian.PutUint16(p[10:], ipsum(p[:24]))
		return p
	}())
	cases := []struct {
		name string
		pkt  []byte
		ret  uint32
		drop DropReason
	}{
		{"keying message (non-ESP marker)", in(outerB, portB, 0, append([]byte{0, 0, 0, 0}, "AP-REQ..."...)), actOK, 0},
		{"keying from an unknown host", in(netip.MustParseAddr("10.0.0.9"), 999, 0, append([]byte{0, 0, 0, 0}, "hello"...)), actOK, 0},
		{"NAT keepalive", in(outerB, portB, 0, []byte{0xff}), actOK, 0},
		{"unknown peer address", in(netip.MustParseAddr("10.0.0.9"), portB, 0, payload), actShot, DropUnknownPeer},
		{"unknown peer port", in(outerB, 1234, 0, payload), actShot, DropUnknownPeer},
		{"other port", eth(0x0800, ipv4(outerB, outerA, 17, 0, udp(portB, 53, payload))), actOK, 0},
		{"tcp", eth(0x0800, ipv4(outerB, outerA, 6, 0, make([]byte, 20))), actOK, 0},
		{"first fragment", in(outerB, portB, 0x2000, payload), actShot, DropFragment},
		{"later fragment", eth(0x0800, ipv4(outerB, outerA, 17, 0x0010, payload)), actOK, 0},
		{"bad ip checksum", badsum, actShot, DropMalformed},
		{"udp length mismatch", badlen, actShot, DropMalformed},
		{"truncated", truncated, actShot, DropMalformed},
		{"ip options on our port", options, actShot, DropMalformed},
		{"esp too short", in(outerB, portB, 0, []byte{0, 0, 0x20, 1, 0}), actShot, DropMalformed},
		{"short: no udp header", eth(0x0800, ipv4(outerB, outerA, 17, 0, nil)), actOK, 0},
		{"ipv6", eth(0x86dd, ipv6(ulaB, ulaA, 50, payload)), actOK, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := e.drops(t)
			ret, out := e.run(t, e.objs.BtmmIngress, c.pkt)
			if ret != c.ret {
				t.Fatalf("verdict %d, want %d (drops %v)", ret, c.ret, e.drops(t))
			}
			if ret == actOK && !bytes.Equal(out, c.pkt) {
				t.Errorf("passed packet was modified")
			}
			if ret == actShot {
				if after := e.drops(t); after[c.drop] != before[c.drop]+1 {
					t.Errorf("drops[%s] %d -> %d, want +1 (all: %v)", c.drop, before[c.drop], after[c.drop], after)
				}
			}
		})
	}
}

func TestIngressCleartext(t *testing.T) {
	e := newProgEnv(t, modeCleartext)
	inner := ipv6(ulaB, ulaA, 17, udp(1, 2, []byte("hello")))
	ret, out := e.run(t, e.objs.BtmmIngress, eth(0x0800, ipv4(outerB, outerA, 17, 0, udp(portB, portA, inner))))
	if ret != actOK {
		t.Fatalf("verdict %d", ret)
	}
	if diff := cmp.Diff(eth(0x86dd, inner), out); diff != "" {
		t.Errorf("decapsulated (-want +got):\n%s", diff)
	}
	spoof := ipv6(netip.MustParseAddr("fd00::666"), ulaA, 17, udp(1, 2, nil))
	if ret, _ := e.run(t, e.objs.BtmmIngress, eth(0x0800, ipv4(outerB, outerA, 17, 0, udp(portB, portA, spoof)))); ret != actShot {
		t.Errorf("spoofed inner source: verdict %d, want SHOT", ret)
	}
	notv6 := append([]byte{0x45}, inner[1:]...)
	if ret, _ := e.run(t, e.objs.BtmmIngress, eth(0x0800, ipv4(outerB, outerA, 17, 0, udp(portB, portA, notv6)))); ret != actShot {
		t.Errorf("inner not IPv6: verdict %d, want SHOT", ret)
	}
	if d := e.drops(t); d[DropSpoofed] != 1 || d[DropMalformed] != 1 {
		t.Errorf("drops %v, want one spoofed and one malformed", d)
	}
}

// refused handles BPF_PROG_TEST_RUN's EINVAL for an input too short for its
// protocol: generated inputs are skipped, but a seed the kernel refuses tests
// nothing, so under BTMM_REQUIRE_ALL=1 (make test) it fails. The VM's 6.1
// kernel refuses some seeds the host's accepts: there they skip as deferred to
// the host, and make test checks that they passed on the host.
func refused(t *testing.T) {
	t.Helper()
	const msg = "BPF_PROG_TEST_RUN refuses this input (EINVAL: too short for its protocol)"
	switch {
	case testenv.Fuzzing():
		t.Skip(msg)
	case testenv.InVM():
		t.Skip("host tier: the VM kernel's " + msg + "; runs under `make test-netns`")
	}
	testenv.Unavailable(t, msg+": a seed that tests nothing")
}

// FuzzIngress runs the ingress program on arbitrary UDP payloads from a
// known peer and on arbitrary frames: it must answer OK or SHOT, leave
// passed packets unchanged unless it decapsulated them, and produce IPv6
// when it did.
func FuzzIngress(f *testing.F) {
	f.Add(udp(portB, portA, esp(0x2001, 8)), false)
	f.Add(udp(portB, portA, []byte{0, 0, 0, 0, 1}), false)
	f.Add(udp(portB, portA, []byte{0xff}), false)
	f.Add(udp(portB, portA, nil), false)
	// A bare IPv4 header claiming UDP and 60 bytes: the UDP header is missing.
	// (A header cut short is refused by BPF_PROG_TEST_RUN itself: EINVAL.)
	f.Add([]byte{0x45, 0, 0, 60, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1}, true)
	f.Add(ipv6(ulaB, ulaA, 50, nil), true)
	e := newProgEnv(f, modeSecure)
	f.Fuzz(func(t *testing.T, b []byte, raw bool) {
		var pkt []byte
		if raw {
			pkt = eth(0x0800, b)
		} else {
			pkt = eth(0x0800, ipv4(outerB, outerA, 17, 0, b))
		}
		ret, out, err := e.tryRun(e.objs.BtmmIngress, pkt)
		if errors.Is(err, unix.EINVAL) {
			refused(t)
		}
		if err != nil {
			t.Fatal(err)
		}
		switch ret {
		case actShot:
		case actOK:
			if !bytes.Equal(out, pkt) && (len(out) < 14+40 || binary.BigEndian.Uint16(out[12:]) != 0x86dd || out[14]>>4 != 6) {
				t.Fatalf("changed packet is not IPv6: % x", out)
			}
		default:
			t.Fatalf("verdict %d", ret)
		}
	})
}

// FuzzEgress runs the egress program (secure mode) on IPv6 packets from our
// ULA to the peer with arbitrary next header and payload, and on arbitrary
// frames: OK or SHOT only, passed packets untouched unless encapsulated, and
// an encapsulated packet is IPv4 with a valid header checksum and UDP to the
// peer's port carrying exactly the old IPv6 payload.
func FuzzEgress(f *testing.F) {
	f.Add(byte(50), esp(0x1001, 16), false)
	f.Add(byte(58), []byte{128, 0, 0, 0}, false)
	f.Add(byte(50), []byte{}, false)
	f.Add(byte(0), ipv6(ulaA, ulaB, 50, nil), true)
	e := newProgEnv(f, modeSecure)
	f.Fuzz(func(t *testing.T, nh byte, b []byte, raw bool) {
		pkt := eth(0x86dd, ipv6(ulaA, ulaB, nh, b))
		if raw {
			pkt = eth(0x86dd, b)
		}
		ret, out, err := e.tryRun(e.objs.BtmmEgress, pkt)
		if errors.Is(err, unix.EINVAL) {
			refused(t)
		}
		if err != nil {
			t.Fatal(err)
		}
		switch ret {
		case actShot:
		case actOK:
			if bytes.Equal(out, pkt) {
				return
			}
			if len(out) < 14+28 || binary.BigEndian.Uint16(out[12:]) != 0x0800 || ipsum(out[14:34]) != 0 ||
				binary.BigEndian.Uint16(out[14+20+2:]) != portB || !bytes.Equal(out[14+28:], pkt[14+40:]) {
				t.Fatalf("bad encapsulation:\nin  % x\nout % x", pkt, out)
			}
		default:
			t.Fatalf("verdict %d", ret)
		}
	})
}
