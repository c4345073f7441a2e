package testenv

import (
	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

// probeTCX attaches a trivial SCHED_CLS program with TCX to a veth in the
// throwaway namespace: the only honest test of TCX support.
func probeTCX(h *netlink.Handle) error {
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
