package ebpf

import (
	"errors"
	"fmt"
	"github.com/btmm/btmm/xfrm"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/btmm/btmm/controlplane"
)

// XFRM objects of secure mode: ESP tunnel-mode states between the ULAs (outer
// IPv6 ULA -> ULA, no UDP encapsulation: the TC program adds IPv4/UDP) and
// the policies that send ULA -> peer ULA traffic through them. Everything
// carries reqid; nothing else is touched.

func hostNet(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
}

func wantState(src, dst netip.Addr, sa controlplane.SA) *netlink.XfrmState {
	s := &netlink.XfrmState{
		Src: src.AsSlice(), Dst: dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL,
		Spi: int(sa.SPI), Reqid: reqid, ReplayWindow: 32,
		Selector: &netlink.XfrmPolicy{Src: hostNet(src), Dst: hostNet(dst)},
	}
	switch sa.Cipher {
	case controlplane.CipherAESGCM:
		s.Aead = &netlink.XfrmStateAlgo{Name: string(sa.Cipher), Key: sa.Key, ICVLen: 128}
	case controlplane.CipherAESCBCHMAC:
		n := len(sa.Key) - 32
		s.Crypt = &netlink.XfrmStateAlgo{Name: "cbc(aes)", Key: sa.Key[:n]}
		s.Auth = &netlink.XfrmStateAlgo{Name: "hmac(sha256)", Key: sa.Key[n:], TruncateLen: 128}
	}
	return s
}

type stateKey struct {
	dst netip.Addr
	spi uint32
}

func sameKeys(a, b *netlink.XfrmState) bool {
	algo := func(x *netlink.XfrmStateAlgo) string {
		if x == nil {
			return ""
		}
		return x.Name + "\x00" + string(x.Key)
	}
	sa, _ := netip.AddrFromSlice(a.Src)
	sb, _ := netip.AddrFromSlice(b.Src)
	return sa.Unmap() == sb.Unmap() && algo(a.Aead) == algo(b.Aead) && algo(a.Crypt) == algo(b.Crypt) && algo(a.Auth) == algo(b.Auth)
}

func (d *Dataplane) setXfrm(desired *controlplane.State) ([]controlplane.Change, error) {
	var changes []controlplane.Change
	var errs []error
	local := desired.Local.ULA
	want := map[stateKey]*netlink.XfrmState{}
	var order []stateKey
	names := map[stateKey]string{}
	add := func(src, dst netip.Addr, sa controlplane.SA, name string) {
		k := stateKey{dst, sa.SPI}
		want[k] = wantState(src, dst, sa)
		names[k] = name
		order = append(order, k)
	}
	for _, p := range desired.Peers {
		add(local, p.ULA, p.Out, p.Name)
		add(p.ULA, local, p.In, p.Name)
		for _, sa := range p.PrevIn {
			add(p.ULA, local, sa, p.Name)
		}
	}
	var tx map[int]uint64 // transmit counters before the dump: SeqGuard's bound
	if links, err := d.nl.LinkList(); err == nil {
		tx = xfrm.TxCounters(links)
	}
	states, err := xfrm.RetryDump(func() ([]netlink.XfrmState, error) { return d.nl.XfrmStateList(netlink.FAMILY_V6) })
	if err != nil {
		return nil, fmt.Errorf("list xfrm states: %w", err)
	}
	have := map[stateKey]netlink.XfrmState{}
	var ours []netlink.XfrmState
	for _, s := range states {
		if s.Reqid != reqid || s.Proto != netlink.XFRM_PROTO_ESP {
			continue
		}
		dst, _ := netip.AddrFromSlice(s.Dst)
		have[stateKey{dst.Unmap(), uint32(s.Spi)}] = s
		ours = append(ours, s)
	}
	d.guard.Observe(tx, ours)
	for _, k := range order {
		w := want[k]
		note := ""
		if h, ok := have[k]; ok {
			if sameKeys(&h, w) {
				continue
			}
			// Same SPI, other keys or source: replace (an SPI never changes keys
			// in normal operation; this is repair).
			d.nl.XfrmStateDel(&h)
		} else if out := k.dst != local; d.guard.Restore(w, out, tx) {
			// Someone deleted it: put it back with sequence numbers the
			// peer's replay window accepts.
			if out {
				note = fmt.Sprintf(", put back: sequence numbers continue from %d", w.Replay.OSeq)
			} else {
				note = fmt.Sprintf(", put back: replays up to %d refused", w.Replay.Seq)
			}
		}
		if err := d.nl.XfrmStateAdd(w); err != nil {
			errs = append(errs, fmt.Errorf("add xfrm state spi 0x%08x to %v: %w", k.spi, k.dst, err))
			continue
		}
		changes = append(changes, controlplane.Change{Op: "add", Object: "state",
			What: fmt.Sprintf("esp tunnel %s -> %v spi 0x%08x (%s%s)", net.IP(w.Src), k.dst, k.spi, names[k], note)})
	}

	// Policies: out local -> peer, in peer -> local.
	type polKey struct {
		dir      netlink.Dir
		src, dst netip.Addr
	}
	wantPol := map[polKey]*netlink.XfrmPolicy{}
	var polOrder []polKey
	for _, p := range desired.Peers {
		for _, x := range []struct {
			dir      netlink.Dir
			src, dst netip.Addr
		}{{netlink.XFRM_DIR_OUT, local, p.ULA}, {netlink.XFRM_DIR_IN, p.ULA, local}} {
			k := polKey{x.dir, x.src, x.dst}
			wantPol[k] = &netlink.XfrmPolicy{Src: hostNet(x.src), Dst: hostNet(x.dst), Dir: x.dir, Proto: 0,
				Tmpls: []netlink.XfrmPolicyTmpl{{Src: x.src.AsSlice(), Dst: x.dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
					Mode: netlink.XFRM_MODE_TUNNEL, Reqid: reqid}}}
			polOrder = append(polOrder, k)
		}
	}
	pols, err := xfrm.RetryDump(func() ([]netlink.XfrmPolicy, error) { return d.nl.XfrmPolicyList(netlink.FAMILY_V6) })
	if err != nil {
		errs = append(errs, fmt.Errorf("list xfrm policies: %w", err))
		return changes, errors.Join(errs...)
	}
	havePol := map[polKey]netlink.XfrmPolicy{}
	for _, p := range pols {
		if len(p.Tmpls) != 1 || p.Tmpls[0].Reqid != reqid || p.Src == nil || p.Dst == nil {
			continue
		}
		s, _ := netip.AddrFromSlice(p.Src.IP)
		t, _ := netip.AddrFromSlice(p.Dst.IP)
		havePol[polKey{p.Dir, s.Unmap(), t.Unmap()}] = p
	}
	for _, k := range polOrder {
		if _, ok := havePol[k]; ok {
			continue
		}
		if err := d.nl.XfrmPolicyUpdate(wantPol[k]); err != nil {
			errs = append(errs, fmt.Errorf("xfrm policy %v %v -> %v: %w", k.dir, k.src, k.dst, err))
			continue
		}
		changes = append(changes, controlplane.Change{Op: "add", Object: "policy", What: fmt.Sprintf("%v %v -> %v tmpl esp tunnel", k.dir, k.src, k.dst)})
	}
	// Deletes after adds.
	for k, p := range havePol {
		if _, ok := wantPol[k]; ok {
			continue
		}
		if err := d.nl.XfrmPolicyDel(&p); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete xfrm policy %v %v -> %v: %w", k.dir, k.src, k.dst, err))
			continue
		}
		changes = append(changes, controlplane.Change{Op: "delete", Object: "policy", What: fmt.Sprintf("%v %v -> %v", k.dir, k.src, k.dst)})
	}
	d.guard.Keep(func(spi uint32) bool {
		for k := range want {
			if k.spi == spi {
				return true
			}
		}
		return false
	})
	keys := make([]stateKey, 0, len(have))
	for k := range have {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b stateKey) int { return int(a.spi) - int(b.spi) })
	for _, k := range keys {
		if _, ok := want[k]; ok {
			continue
		}
		s := have[k]
		if err := d.nl.XfrmStateDel(&s); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete xfrm state spi 0x%08x: %w", k.spi, err))
			continue
		}
		changes = append(changes, controlplane.Change{Op: "delete", Object: "state", What: fmt.Sprintf("esp -> %v spi 0x%08x", k.dst, k.spi)})
	}
	return changes, errors.Join(errs...)
}
