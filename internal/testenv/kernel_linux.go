package testenv

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/btmm/btmm/controlplane/nsthread"
)

// Feature is a kernel facility a test may need.
type Feature int

// Kernel features that tests probe for.
const (
	NetNS     Feature = iota // network namespaces + veth
	ESP                      // ESP states with rfc4106(gcm(aes)) and cbc(aes)+hmac(sha256)
	Sit                      // sit (6in4) tunnels
	IP6Tnl                   // ip6tnl (IPv6-in-IPv6 / IPv4-in-IPv6) tunnels
	XfrmIface                // xfrm interfaces (if_id)
	Dummy                    // dummy links
	TCX                      // TCX BPF attach (kernel >= 6.6)
	Wireguard                // kernel WireGuard links
	FOU                      // fou listeners with GUE encapsulation (ip fou add port N gue)
	numFeatures
)

var featureNames = [...]string{"netns+veth", "esp4/esp6 with gcm and cbc+hmac", "sit", "ip6tnl", "xfrm interfaces", "dummy links", "tcx", "wireguard", "fou (gue)"}

func (f Feature) String() string { return featureNames[f] }

var (
	probeOnce [numFeatures]sync.Once
	probeErr  [numFeatures]error
)

// Probe reports whether the running kernel has feature f (nil) or why not.
// Probes run once per process, in a throwaway network namespace, and need root.
func Probe(f Feature) error {
	probeOnce[f].Do(func() {
		if os.Geteuid() != 0 {
			probeErr[f] = errors.New("needs root to probe")
			return
		}
		probeErr[f] = inThrowawayNetNS(probers[f])
	})
	return probeErr[f]
}

// RequireNetNS skips t unless it runs as root, not under -short, on a kernel
// that can make network namespaces and veth pairs. Inside the VM (InVM) the
// missing capability is a failure: the VM tier exists to run these tests.
func RequireNetNS(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("netns tier: skipped under -short")
	}
	RequireRoot(t)
	if err := Probe(NetNS); err != nil {
		if InVM() {
			t.Fatalf("vm tier: the VM's kernel cannot make netns+veth: %v", err)
		}
		t.Skipf("netns tier: kernel cannot make netns+veth: %v", err)
	}
}

// Require skips t unless the kernel has every feature listed (and the netns
// gate passes). On this project's dev kernel ESP and tunnels are missing: the
// test then runs in the VM tier (make test-vm) instead. Inside the VM a
// missing feature fails the test (a module that did not load, a broken
// initramfs), except TCX, which the VM's 6.1 kernel lacks by design: such a
// test skips there and runs on the host (make test-netns).
func Require(t testing.TB, features ...Feature) {
	t.Helper()
	RequireNetNS(t)
	for _, f := range features {
		err := Probe(f)
		switch {
		case err == nil:
		case InVM() && f == TCX:
			t.Skipf("host tier: the VM's 6.1 kernel has no %s (%v); runs under `make test-netns`", f, err)
		case InVM():
			t.Fatalf("vm tier: the VM's kernel lacks %s (%v): a module missing from hack/vmexec's list?", f, err)
		default:
			t.Skipf("vm tier: this kernel lacks %s (%v); runs under `make test-vm`", f, err)
		}
	}
}

// Has reports whether the kernel has feature f, for tests that check
// something either way (with the feature or its clean absence). Inside the VM
// every feature but TCX must be present: a missing one fails t there.
func Has(t testing.TB, f Feature) bool {
	t.Helper()
	err := Probe(f)
	if err != nil && InVM() && f != TCX {
		t.Fatalf("vm tier: the VM's kernel lacks %s (%v): a module missing from hack/vmexec's list?", f, err)
	}
	return err == nil
}

var probers = [numFeatures]func(h *netlink.Handle) error{
	NetNS: func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "probe0"}, PeerName: "probe1"})
	},
	ESP: func(h *netlink.Handle) error {
		src, dst := net.ParseIP("10.255.0.1"), net.ParseIP("10.255.0.2")
		gcm := &netlink.XfrmState{Src: src, Dst: dst, Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL,
			Spi: 0x100, Aead: &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: make([]byte, 20), ICVLen: 128},
			Encap: &netlink.XfrmStateEncap{Type: netlink.XFRM_ENCAP_ESPINUDP, SrcPort: 4500, DstPort: 4500, OriginalAddress: net.IPv4zero}}
		if err := h.XfrmStateAdd(gcm); err != nil {
			return fmt.Errorf("gcm state: %w", err)
		}
		cbc := &netlink.XfrmState{Src: src, Dst: dst, Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL,
			Spi: 0x101, Crypt: &netlink.XfrmStateAlgo{Name: "cbc(aes)", Key: make([]byte, 16)},
			Auth: &netlink.XfrmStateAlgo{Name: "hmac(sha256)", Key: make([]byte, 32), TruncateLen: 128}}
		if err := h.XfrmStateAdd(cbc); err != nil {
			return fmt.Errorf("cbc+hmac state: %w", err)
		}
		return nil
	},
	Sit: func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Sittun{LinkAttrs: netlink.LinkAttrs{Name: "probesit"}, Local: net.ParseIP("10.255.0.1")})
	},
	IP6Tnl: func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Ip6tnl{LinkAttrs: netlink.LinkAttrs{Name: "probe6"}, Local: net.ParseIP("fd00::1")})
	},
	XfrmIface: func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Xfrmi{LinkAttrs: netlink.LinkAttrs{Name: "probexi"}, Ifid: 7})
	},
	Dummy: func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "probed"}})
	},
	TCX: probeTCX,
	Wireguard: func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: "probewg"}})
	},
	FOU: func(h *netlink.Handle) error {
		// The fou module registers this generic netlink family; it
		// carries GUE since it exists (Linux 4.0).
		_, err := h.GenlFamilyGet("fou")
		return err
	},
}

// inThrowawayNetNS runs f with a handle in a fresh, unnamed network namespace
// (controlplane/nsthread: on a locked OS thread, not reused if it cannot
// return to its original namespace).
func inThrowawayNetNS(f func(h *netlink.Handle) error) error {
	return nsthread.Do(func() error {
		ns, err := netns.New() // enters it
		if err != nil {
			return fmt.Errorf("new netns: %w", err)
		}
		defer ns.Close()
		h, err := netlink.NewHandleAt(ns)
		if err != nil {
			return err
		}
		defer h.Close()
		return f(h)
	})
}
