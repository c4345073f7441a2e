// Package kernelprobe asks the running Linux kernel, not its version number,
// whether it has the facilities btmm's dataplanes need: XFRM ESP states with
// the AEAD and the CBC+HMAC transforms (esp4/esp6, RFC 4106 GCM), xfrm
// interfaces. Each probe creates the object in a fresh, unnamed network
// namespace on a locked OS thread and throws the namespace away, so the
// caller's own kernel state is never touched.
package kernelprobe

import (
	"fmt"
	"net"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane/nldump"
	"github.com/btmm/btmm/controlplane/nsthread"
)

// Feature is a kernel facility.
type Feature string

// Features probed.
const (
	ESP       Feature = "esp"             // ESP states (esp4/esp6) with cbc(aes)+hmac(sha256), UDP-encapsulated
	GCM       Feature = "gcm"             // the rfc4106(gcm(aes)) AEAD for ESP
	XfrmIface Feature = "xfrm-interfaces" // xfrm interfaces (if_id)
	TCX       Feature = "tcx"             // TCX BPF attachment (6.6+; the eBPF dataplane uses clsact without it)
	// Tunnel devices (issue 15): btmmd uses a tunnel kind only when the
	// kernel has its device.
	Sit    Feature = "sit"    // sit (6in4, IP protocol 41)
	IP6Tnl Feature = "ip6tnl" // ip6tnl (ip6ip6)
	FOU    Feature = "fou"    // fou listeners with GUE (generic netlink family fou)
	// ESPInTCP is RFC 8229 ESP in TCP (CONFIG_INET_ESPINTCP: the TCP
	// upper-layer protocol "espintcp"), which would keep the relay-tcp
	// path in the kernel (docs/paths.md).
	ESPInTCP Feature = "espintcp"
)

// All lists every feature, in the order netcheck shows them.
var All = []Feature{ESP, GCM, XfrmIface, TCX}

var probers = map[Feature]func(h *netlink.Handle) error{
	ESP: func(h *netlink.Handle) error {
		return h.XfrmStateAdd(&netlink.XfrmState{Src: net.ParseIP("10.255.0.1"), Dst: net.ParseIP("10.255.0.2"),
			Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Spi: 0x101,
			Crypt: &netlink.XfrmStateAlgo{Name: "cbc(aes)", Key: make([]byte, 16)},
			Auth:  &netlink.XfrmStateAlgo{Name: "hmac(sha256)", Key: make([]byte, 32), TruncateLen: 128},
			Encap: &netlink.XfrmStateEncap{Type: netlink.XFRM_ENCAP_ESPINUDP, SrcPort: 4500, DstPort: 4500, OriginalAddress: net.IPv4zero}})
	},
	GCM: func(h *netlink.Handle) error {
		return h.XfrmStateAdd(&netlink.XfrmState{Src: net.ParseIP("10.255.0.1"), Dst: net.ParseIP("10.255.0.2"),
			Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Spi: 0x100,
			Aead: &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: make([]byte, 20), ICVLen: 128}})
	},
	XfrmIface: func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Xfrmi{LinkAttrs: netlink.LinkAttrs{Name: "probexi"}, Ifid: 7})
	},
	Sit: func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Sittun{LinkAttrs: netlink.LinkAttrs{Name: "probesit"}, Remote: net.ParseIP("192.0.2.1"), Ttl: 64})
	},
	IP6Tnl: func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Ip6tnl{LinkAttrs: netlink.LinkAttrs{Name: "probe6tnl"}, Local: net.ParseIP("2001:db8::1"),
			Remote: net.ParseIP("2001:db8::2"), Ttl: 64, Proto: 41})
	},
	FOU: func(h *netlink.Handle) error {
		// Listing resolves the generic netlink family (the kernel loads
		// the module on that request where it can).
		_, err := nldump.Retry(func() ([]netlink.Fou, error) { return h.FouList(netlink.FAMILY_V4) })
		return err
	},
	TCX:      ProbeTCX,
	ESPInTCP: probeESPInTCP,
}

// probeESPInTCP sets TCP_ULP "espintcp" on a connected TCP socket over lo
// in the probe's namespace: ENOENT when the kernel has no espintcp.
func probeESPInTCP(h *netlink.Handle) error {
	lo, err := h.LinkByName("lo")
	if err != nil {
		return err
	}
	if err := h.LinkSetUp(lo); err != nil {
		return err
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		return err
	}
	defer c.Close()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_ULP, "espintcp")
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("TCP_ULP espintcp: %w", serr)
	}
	return nil
}

// ProbeTCX attaches a trivial SCHED_CLS program with TCX to a veth made
// with h (the calling thread must be in h's namespace): the only honest
// test of TCX support.
func ProbeTCX(h *netlink.Handle) error {
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "probe0"}, PeerName: "probe1"}); err != nil {
		return err
	}
	l, err := h.LinkByName("probe0")
	if err != nil {
		return err
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SchedCLS,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, -1), // TC_ACT_UNSPEC / TCX_NEXT
			asm.Return(),
		},
	})
	if err != nil {
		return err
	}
	defer prog.Close()
	tl, err := link.AttachTCX(link.TCXOptions{Interface: l.Attrs().Index, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		return err
	}
	return tl.Close()
}

// Probe reports whether the kernel has f (nil) or the kernel's refusal.
// It needs CAP_SYS_ADMIN (a new namespace) and CAP_NET_ADMIN.
func Probe(f Feature) error {
	p, ok := probers[f]
	if !ok {
		return fmt.Errorf("kernelprobe: unknown feature %q", f)
	}
	return nsthread.Do(func() error {
		ns, err := netns.New() // enters it: a throwaway namespace
		if err != nil {
			return fmt.Errorf("probe %s: new network namespace: %w", f, err)
		}
		defer ns.Close()
		h, err := netlink.NewHandleAt(ns)
		if err != nil {
			return err
		}
		defer h.Close()
		return p(h)
	})
}
