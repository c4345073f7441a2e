package xfrm

import (
	"sync"

	"github.com/vishvananda/netlink"
)

// SeqGuard keeps ESP sequence numbers going forward when an SA that someone
// else deleted (`ip xfrm state flush`) is put back with the same SPI and
// keys. Counting from 1 again would be useless: the peer's replay window
// (RFC 4303 §3.4.3) has seen higher numbers and drops everything below them.
//
// The guard remembers each SA's counters as last dumped, together with
// every link's transmitted-packet counter at that time. An outbound SA can
// have sent at most as many packets since as the namespace transmitted
// (each ESP packet leaves through some link, and with an xfrm interface it
// is counted twice), so a put-back outbound SA starts above
// oseq + packets transmitted since + a margin. A link that vanished or
// whose counter went back costs a fixed jump instead. ESP hardware offload,
// whose drivers may count a GSO super-packet once, is not used by btmm.
// A put-back inbound SA starts at the last sequence number seen, so old
// packets replayed at it are still refused.
//
// The package xfrm and ebpf dataplanes both use it; it is safe for
// concurrent use.
type SeqGuard struct {
	mu   sync.Mutex
	seen map[seqKey]seqMark
}

// seqKey tells apart the SAs of one SPI: package xfrm keeps a tunnel-mode
// SA (ESP-in-UDP) and a transport-mode one (tunnel devices) with the same
// SPI and keys, each with its own counters.
type seqKey struct {
	spi  uint32
	mode netlink.Mode
}

func keyOf(s *netlink.XfrmState) seqKey { return seqKey{uint32(s.Spi), s.Mode} }

type seqMark struct {
	oseq, seq uint32
	tx        map[int]uint64 // per ifindex, shared by one observation
}

const (
	seqMargin      = 1024    // packets in flight between a dump and a counter read
	seqUnknownJump = 1 << 24 // a link's packets since the dump are unknown
)

// TxCounters returns every link's transmitted-packet counter by ifindex.
func TxCounters(links []netlink.Link) map[int]uint64 {
	tx := make(map[int]uint64, len(links))
	for _, l := range links {
		if s := l.Attrs().Statistics; s != nil {
			tx[l.Attrs().Index] = s.TxPackets
		}
	}
	return tx
}

// Observe records the counters of states just dumped; tx was read before
// the dump.
func (g *SeqGuard) Observe(tx map[int]uint64, states []netlink.XfrmState) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.seen == nil {
		g.seen = map[seqKey]seqMark{}
	}
	for _, s := range states {
		if s.Replay == nil {
			continue
		}
		g.seen[keyOf(&s)] = seqMark{oseq: s.Replay.OSeq, seq: s.Replay.Seq, tx: tx}
	}
}

// Restore prepares s, about to be added, when an SA with its SPI was seen
// before: outbound SAs continue above any number they can have used,
// inbound ones refuse what they had seen. It reports whether it did.
func (g *SeqGuard) Restore(s *netlink.XfrmState, outbound bool, tx map[int]uint64) bool {
	g.mu.Lock()
	m, ok := g.seen[keyOf(s)]
	g.mu.Unlock()
	if !ok {
		return false
	}
	r := &netlink.XfrmReplayState{}
	if outbound {
		r.OSeq = uint32(min(uint64(m.oseq)+txSince(m.tx, tx)+seqMargin, 1<<32-1))
	} else {
		r.Seq, r.BitMap = m.seq, ^uint32(0)
	}
	s.Replay = r
	return true
}

// txSince bounds the packets transmitted between two counter readings.
func txSince(then, now map[int]uint64) uint64 {
	var n uint64
	unknown := false
	for i, a := range then {
		b, ok := now[i]
		if !ok || b < a {
			unknown = true
			continue
		}
		n += b - a
	}
	for i, b := range now {
		if _, ok := then[i]; !ok {
			n += b // a link that appeared since: all of it
		}
	}
	if unknown {
		n += seqUnknownJump
	}
	return n
}

// Keep forgets the SPIs keep refuses (SAs no longer desired).
func (g *SeqGuard) Keep(keep func(spi uint32) bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for k := range g.seen {
		if !keep(k.spi) {
			delete(g.seen, k)
		}
	}
}
