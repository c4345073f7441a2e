package ebpf

import (
	"cmp"
	"errors"
	"fmt"
	"github.com/btmm/btmm/controlplane/nldump"
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
//
// A peer with tunnel devices (docs/tunnels.md) also has transport-mode SAs
// between the ULAs, as package xfrm makes them (same SPI and keys, their
// own counters): what a route sends into a sit/ip6tnl device. Both kinds of
// inbound SA have the same (our ULA, SPI), which XFRM allows only with
// different marks: ESP-in-UDP, which the ingress program decapsulated and
// marked with ESPInUDPMark, finds the tunnel-mode SA and policy marked so;
// ESP that came through a device (mark bit clear) the transport-mode ones.
// Outbound there is one SA, in the mode of the peer's path (Peer.Via): a
// change of path replaces it with the same SPI and keys, its sequence
// numbers continuing (xfrm.SeqGuard), and updates the policy's template.

// ESPInUDPMark is the skb mark bit the ingress program sets on ESP it
// decapsulated from UDP (ESP_IN_UDP_MARK in bpf/btmm.c).
const ESPInUDPMark = 0x04000000

var (
	markUDP    = &netlink.XfrmMark{Value: ESPInUDPMark, Mask: ESPInUDPMark}
	markDevice = &netlink.XfrmMark{Value: 0, Mask: ESPInUDPMark}
)

func hostNet(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
}

func wantStateMode(src, dst netip.Addr, sa controlplane.SA, mode netlink.Mode, mark *netlink.XfrmMark) *netlink.XfrmState {
	s := &netlink.XfrmState{
		Src: src.AsSlice(), Dst: dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: mode,
		Spi: int(sa.SPI), Reqid: reqid, ReplayWindow: 32, Mark: mark,
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
	dst  netip.Addr
	spi  uint32
	mode netlink.Mode
}

func sameMark(a, b *netlink.XfrmMark) bool {
	if a == nil || b == nil {
		return (a == nil || *a == netlink.XfrmMark{}) && (b == nil || *b == netlink.XfrmMark{})
	}
	return *a == *b
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
	return sa.Unmap() == sb.Unmap() && algo(a.Aead) == algo(b.Aead) && algo(a.Crypt) == algo(b.Crypt) && algo(a.Auth) == algo(b.Auth) &&
		sameMark(a.Mark, b.Mark)
}

func modeName(m netlink.Mode) string {
	if m == netlink.XFRM_MODE_TRANSPORT {
		return "transport"
	}
	return "tunnel"
}

func markWhat(m *netlink.XfrmMark) string {
	if m == nil || m.Mask == 0 {
		return ""
	}
	return fmt.Sprintf(" mark 0x%x/0x%x", m.Value, m.Mask)
}

// outMode is the mode of the outbound SA and policy for peer p's path.
func outMode(p controlplane.Peer) netlink.Mode {
	if p.Via == controlplane.PathESPInUDP {
		return netlink.XFRM_MODE_TUNNEL
	}
	return netlink.XFRM_MODE_TRANSPORT
}

func (d *Dataplane) setXfrm(desired *controlplane.State) ([]controlplane.Change, error) {
	var changes []controlplane.Change
	var errs []error
	local := desired.Local.ULA
	want := map[stateKey]*netlink.XfrmState{}
	var order []stateKey
	names := map[stateKey]string{}
	add := func(src, dst netip.Addr, sa controlplane.SA, name string, mode netlink.Mode, mark *netlink.XfrmMark) {
		k := stateKey{dst, sa.SPI, mode}
		want[k] = wantStateMode(src, dst, sa, mode, mark)
		names[k] = name
		order = append(order, k)
	}
	for _, p := range desired.Peers {
		if len(p.Tunnels) == 0 {
			add(local, p.ULA, p.Out, p.Name, netlink.XFRM_MODE_TUNNEL, nil)
			add(p.ULA, local, p.In, p.Name, netlink.XFRM_MODE_TUNNEL, nil)
			for _, sa := range p.PrevIn {
				add(p.ULA, local, sa, p.Name, netlink.XFRM_MODE_TUNNEL, nil)
			}
			continue
		}
		// With tunnel devices: the outbound SA in the path's mode; both
		// inbound ones, told apart by the mark (tunnel mode first: it
		// replaces an unmarked one before the transport SA could clash).
		add(local, p.ULA, p.Out, p.Name, outMode(p), nil)
		for _, mode := range []netlink.Mode{netlink.XFRM_MODE_TUNNEL, netlink.XFRM_MODE_TRANSPORT} {
			mark := markUDP
			if mode == netlink.XFRM_MODE_TRANSPORT {
				mark = markDevice
			}
			for _, sa := range append([]controlplane.SA{p.In}, p.PrevIn...) {
				add(p.ULA, local, sa, p.Name, mode, mark)
			}
		}
	}
	var tx map[int]uint64 // transmit counters before the dump: SeqGuard's bound
	if links, err := nldump.Retry(d.nl.LinkList); err == nil {
		tx = xfrm.TxCounters(links)
	}
	states, err := nldump.Retry(func() ([]netlink.XfrmState, error) { return d.nl.XfrmStateList(netlink.FAMILY_V6) })
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
		have[stateKey{dst.Unmap(), uint32(s.Spi), s.Mode}] = s
		ours = append(ours, s)
	}
	d.guard.Observe(tx, ours)
	del := func(k stateKey) {
		s := have[k]
		if err := d.nl.XfrmStateDel(&s); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete xfrm state spi 0x%08x: %w", k.spi, err))
			return
		}
		delete(have, k)
		changes = append(changes, controlplane.Change{Op: "delete", Object: "state",
			What: fmt.Sprintf("esp %s -> %v spi 0x%08x%s", modeName(k.mode), k.dst, k.spi, markWhat(s.Mark))})
	}
	// Transport-mode SAs no longer desired go first: an inbound one would
	// clash with an unmarked tunnel-mode SA of its SPI (a peer that lost its
	// tunnels).
	for _, k := range sortedKeys(have) {
		if _, ok := want[k]; !ok && k.mode == netlink.XFRM_MODE_TRANSPORT {
			del(k)
		}
	}
	for _, k := range order {
		w := want[k]
		out := k.dst != local
		other := stateKey{k.dst, k.spi, netlink.XFRM_MODE_TUNNEL + netlink.XFRM_MODE_TRANSPORT - k.mode}
		note := ""
		if h, ok := have[k]; ok {
			if sameKeys(&h, w) {
				continue
			}
			// Same SPI, other keys, source or mark: replace (an SPI never
			// changes keys in normal operation; this is repair, or a peer
			// that gained or lost tunnel devices).
			d.nl.XfrmStateDel(&h)
			delete(have, k)
			d.guard.Restore(w, out, tx)
			note = ", replaced"
		} else if _, ok := d.seenOut(ours, other); out && ok {
			// The peer's path changed between ESP-in-UDP and a tunnel
			// device: one outbound SA, the other mode, same SPI and keys;
			// its sequence numbers continue.
			if _, still := have[other]; still {
				del(other)
			}
			tmp := *w
			tmp.Mode = other.mode
			var now map[int]uint64
			if links, err := nldump.Retry(d.nl.LinkList); err == nil {
				now = xfrm.TxCounters(links)
			}
			if d.guard.Restore(&tmp, true, now) {
				w.Replay = tmp.Replay
				note = fmt.Sprintf(", path changed: sequence numbers continue from %d", w.Replay.OSeq)
			}
		} else if d.guard.Restore(w, out, tx) {
			// Someone deleted it: put it back with sequence numbers the
			// peer's replay window accepts.
			if out {
				note = fmt.Sprintf(", put back: sequence numbers continue from %d", w.Replay.OSeq)
			} else {
				note = fmt.Sprintf(", put back: replays up to %d refused", w.Replay.Seq)
			}
		}
		if err := d.nl.XfrmStateAdd(w); err != nil {
			errs = append(errs, fmt.Errorf("add xfrm state spi 0x%08x to %v (%s): %w", k.spi, k.dst, modeName(k.mode), err))
			continue
		}
		changes = append(changes, controlplane.Change{Op: "add", Object: "state",
			What: fmt.Sprintf("esp %s %s -> %v spi 0x%08x%s (%s%s)", modeName(k.mode), net.IP(w.Src), k.dst, k.spi, markWhat(w.Mark), names[k], note)})
	}

	// Policies: out local -> peer, in peer -> local; with tunnel devices
	// the outbound template follows the path and there are two inbound
	// policies, one per mark.
	type polKey struct {
		dir      netlink.Dir
		src, dst netip.Addr
		mark     netlink.XfrmMark
	}
	keyMark := func(m *netlink.XfrmMark) netlink.XfrmMark {
		if m == nil {
			return netlink.XfrmMark{}
		}
		return *m
	}
	wantPol := map[polKey]*netlink.XfrmPolicy{}
	var polOrder []polKey
	addPol := func(dir netlink.Dir, src, dst netip.Addr, mode netlink.Mode, mark *netlink.XfrmMark) {
		k := polKey{dir, src, dst, keyMark(mark)}
		wantPol[k] = &netlink.XfrmPolicy{Src: hostNet(src), Dst: hostNet(dst), Dir: dir, Proto: 0, Mark: mark,
			Tmpls: []netlink.XfrmPolicyTmpl{{Src: src.AsSlice(), Dst: dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
				Mode: mode, Reqid: reqid}}}
		polOrder = append(polOrder, k)
	}
	for _, p := range desired.Peers {
		if len(p.Tunnels) == 0 {
			addPol(netlink.XFRM_DIR_OUT, local, p.ULA, netlink.XFRM_MODE_TUNNEL, nil)
			addPol(netlink.XFRM_DIR_IN, p.ULA, local, netlink.XFRM_MODE_TUNNEL, nil)
			continue
		}
		addPol(netlink.XFRM_DIR_OUT, local, p.ULA, outMode(p), nil)
		addPol(netlink.XFRM_DIR_IN, p.ULA, local, netlink.XFRM_MODE_TUNNEL, markUDP)
		addPol(netlink.XFRM_DIR_IN, p.ULA, local, netlink.XFRM_MODE_TRANSPORT, markDevice)
	}
	pols, err := nldump.Retry(func() ([]netlink.XfrmPolicy, error) { return d.nl.XfrmPolicyList(netlink.FAMILY_V6) })
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
		havePol[polKey{p.Dir, s.Unmap(), t.Unmap(), keyMark(p.Mark)}] = p
	}
	for _, k := range polOrder {
		w := wantPol[k]
		op := "add"
		if h, ok := havePol[k]; ok {
			if h.Tmpls[0].Mode == w.Tmpls[0].Mode {
				continue
			}
			op = "update"
		}
		if err := d.nl.XfrmPolicyUpdate(w); err != nil {
			errs = append(errs, fmt.Errorf("xfrm policy %v %v -> %v: %w", k.dir, k.src, k.dst, err))
			continue
		}
		changes = append(changes, controlplane.Change{Op: op, Object: "policy",
			What: fmt.Sprintf("%v %v -> %v tmpl esp %s%s", k.dir, k.src, k.dst, modeName(w.Tmpls[0].Mode), markWhat(w.Mark))})
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
		changes = append(changes, controlplane.Change{Op: "delete", Object: "policy", What: fmt.Sprintf("%v %v -> %v%s", k.dir, k.src, k.dst, markWhat(p.Mark))})
	}
	d.guard.Keep(func(spi uint32) bool {
		for k := range want {
			if k.spi == spi {
				return true
			}
		}
		return false
	})
	for _, k := range sortedKeys(have) {
		if _, ok := want[k]; !ok {
			del(k)
		}
	}
	return changes, errors.Join(errs...)
}

// seenOut finds the outbound SA of key k in this Set's dump.
func (d *Dataplane) seenOut(states []netlink.XfrmState, k stateKey) (netlink.XfrmState, bool) {
	for _, s := range states {
		dst, _ := netip.AddrFromSlice(s.Dst)
		if dst.Unmap() == k.dst && uint32(s.Spi) == k.spi && s.Mode == k.mode {
			return s, true
		}
	}
	return netlink.XfrmState{}, false
}

func sortedKeys(m map[stateKey]netlink.XfrmState) []stateKey {
	keys := make([]stateKey, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b stateKey) int {
		if a.spi != b.spi {
			return cmp.Compare(a.spi, b.spi)
		}
		return cmp.Compare(a.mode, b.mode)
	})
	return keys
}
