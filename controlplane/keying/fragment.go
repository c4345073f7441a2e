package keying

import (
	"bytes"
	"fmt"
	"net/netip"
	"time"
)

// Keying-level fragmentation (in the spirit of RFC 7383): an INIT carries an
// ML-KEM-768 encapsulation key (1184 bytes) and, in Kerberos mode, an AP-REQ,
// so it does not fit one datagram on a 1280-byte path. Rather than let IP
// fragment it (fragments are often dropped by NATs and firewalls, and
// reassembly in the kernel is a DoS target), a message longer than
// MaxDatagramLen is sent as FRAGMENT datagrams, each at most MaxDatagramLen
// bytes:
//
//	FRAGMENT: header(type 9, mode and exchange ID of the message)
//	          FRAGMENT(of-type, index, count) DATA(piece) [MAC1 MAC2]
//
// The pieces of the message's encoding are concatenated in index order. A
// piece is not authenticated on its own: the reassembled message is, by its
// MAC, and the FRAGMENTs of an INIT carry MAC1/MAC2 like an INIT so the
// responder checks each piece cheaply before buffering it. Reassembly state
// is bounded: maxReassembly messages in progress in all, maxReassemblyPer
// per source, each dropped reassemblyTTL after its first piece, and a piece
// that contradicts one already held drops the whole message.

const (
	fragOverhead     = headerLen + 3 + 3 + 3 + 2*(3+cookieMACLen) // header, FRAGMENT, DATA header, MAC1, MAC2
	fragPiece        = MaxDatagramLen - fragOverhead
	maxReassembly    = 64
	maxReassemblyPer = 4
	reassemblyTTL    = 5 * time.Second
)

// datagrams returns the datagrams that carry the encoded message msg: msg
// itself if it fits, else FRAGMENTs. With k1 set (INIT), every datagram
// gets MAC1, and MAC2 when cookie is set.
func datagrams(msg []byte, k1, cookie []byte) ([][]byte, error) {
	var m Message
	if err := m.Unmarshal(msg); err != nil {
		return nil, fmt.Errorf("fragment: %w", err)
	}
	macs := 0
	if k1 != nil {
		macs = 2 * attrLen(cookieMACLen)
	}
	if len(msg)+macs <= MaxDatagramLen {
		if k1 != nil {
			return [][]byte{addMACs(bytes.Clone(msg), k1, cookie)}, nil
		}
		return [][]byte{msg}, nil
	}
	if m.Type != MsgInit && m.Type != MsgResp {
		return nil, fmt.Errorf("fragment: a %v of %d bytes does not fit a datagram", m.Type, len(msg))
	}
	count := (len(msg) + fragPiece - 1) / fragPiece
	if count > maxFragments {
		return nil, fmt.Errorf("fragment: %v of %d bytes needs %d fragments, at most %d", m.Type, len(msg), count, maxFragments)
	}
	var out [][]byte
	for i := range count {
		piece := msg[i*fragPiece : min(len(msg), (i+1)*fragPiece)]
		f := Message{Type: MsgFragment, Mode: m.Mode, Exchange: m.Exchange,
			Frag: Fragment{Of: m.Type, Index: uint8(i), Count: uint8(count)}, Data: piece}
		b, err := f.Marshal()
		if err != nil {
			return nil, fmt.Errorf("fragment: %w", err)
		}
		if k1 != nil {
			b = addMACs(b, k1, cookie)
		}
		out = append(out, b)
	}
	return out, nil
}

type reasmKey struct {
	from netip.AddrPort
	ex   [8]byte
	of   MsgType
}

type reasmBuf struct {
	mode    Mode
	count   uint8
	parts   [maxFragments][]byte
	have    int
	size    int
	started time.Time
}

// reassembler holds messages arriving in pieces.
type reassembler struct {
	bufs      map[reasmKey]*reasmBuf
	perSource map[netip.Prefix]int
}

func newReassembler() *reassembler {
	return &reassembler{bufs: map[reasmKey]*reasmBuf{}, perSource: map[netip.Prefix]int{}}
}

func (r *reassembler) drop(k reasmKey) {
	if _, ok := r.bufs[k]; !ok {
		return
	}
	delete(r.bufs, k)
	s := sourceKey(k.from.Addr())
	if r.perSource[s]--; r.perSource[s] <= 0 {
		delete(r.perSource, s)
	}
}

// expire drops messages whose first piece came reassemblyTTL ago.
func (r *reassembler) expire(now time.Time) {
	for k, b := range r.bufs {
		if now.Sub(b.started) >= reassemblyTTL {
			r.drop(k)
		}
	}
}

// busy reports whether at least half the reassembly slots are taken.
func (r *reassembler) busy() bool { return len(r.bufs) >= maxReassembly/2 }

// add files one FRAGMENT from from. When it completes a message, add
// returns the message's encoding (and forgets it).
func (r *reassembler) add(m *Message, from netip.AddrPort, now time.Time) ([]byte, error) {
	r.expire(now)
	k := reasmKey{from, m.Exchange, m.Frag.Of}
	b := r.bufs[k]
	if b == nil {
		s := sourceKey(from.Addr())
		if r.perSource[s] >= maxReassemblyPer {
			return nil, fmt.Errorf("%d messages from %v already in reassembly", r.perSource[s], s)
		}
		if len(r.bufs) >= maxReassembly {
			var oldest reasmKey
			var at time.Time
			for ok, ob := range r.bufs {
				if at.IsZero() || ob.started.Before(at) {
					oldest, at = ok, ob.started
				}
			}
			r.drop(oldest)
		}
		b = &reasmBuf{mode: m.Mode, count: m.Frag.Count, started: now}
		r.bufs[k] = b
		r.perSource[s]++
	}
	if b.mode != m.Mode || b.count != m.Frag.Count {
		r.drop(k)
		return nil, fmt.Errorf("fragment %d/%d (%v) contradicts the first (%d pieces, %v)", m.Frag.Index, m.Frag.Count, m.Mode, b.count, b.mode)
	}
	if old := b.parts[m.Frag.Index]; old != nil {
		if !bytes.Equal(old, m.Data) {
			r.drop(k)
			return nil, fmt.Errorf("fragment %d/%d differs from the copy already received", m.Frag.Index, m.Frag.Count)
		}
		return nil, nil // a retransmission
	}
	if b.size+len(m.Data) > MaxMessageLen {
		r.drop(k)
		return nil, fmt.Errorf("fragments exceed %d bytes", MaxMessageLen)
	}
	b.parts[m.Frag.Index] = m.Data
	b.have++
	b.size += len(m.Data)
	if b.have < int(b.count) {
		return nil, nil
	}
	r.drop(k)
	msg := make([]byte, 0, b.size)
	for _, p := range b.parts[:b.count] {
		msg = append(msg, p...)
	}
	return msg, nil
}
