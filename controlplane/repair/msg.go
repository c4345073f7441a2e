package repair

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/mdlayher/netlink"
)

// The notifications the watchers decode: rtnetlink (include/uapi/linux/
// rtnetlink.h, if_link.h, if_addr.h, neighbour.h, pkt_sched.h) and XFRM
// (include/uapi/linux/xfrm.h) message types, headers in host byte order.
const (
	RTMNewLink    = 16
	RTMDelLink    = 17
	RTMNewAddr    = 20
	RTMDelAddr    = 21
	RTMNewRoute   = 24
	RTMDelRoute   = 25
	RTMNewNeigh   = 28
	RTMDelNeigh   = 29
	RTMNewQdisc   = 36
	RTMDelQdisc   = 37
	RTMNewTfilter = 44
	RTMDelTfilter = 45

	XfrmNewSA       = 0x10
	XfrmDelSA       = 0x11
	XfrmNewPolicy   = 0x13
	XfrmDelPolicy   = 0x14
	XfrmUpdPolicy   = 0x19
	XfrmUpdSA       = 0x1a
	XfrmFlushSA     = 0x1c
	XfrmFlushPolicy = 0x1d

	// Overrun is the type a watcher reports when the kernel dropped
	// notifications (ENOBUFS): everything must be checked again.
	Overrun = 0

	afInet  = 2
	afInet6 = 10

	rtTableMain  = 254 // RT_TABLE_MAIN
	nudPermanent = 0x80
	iffUp        = 0x1

	sizeofIfinfomsg       = 16
	sizeofIfaddrmsg       = 8
	sizeofRtmsg           = 12
	sizeofNdmsg           = 12
	sizeofTcmsg           = 20
	sizeofUsersaInfo      = 224 // struct xfrm_usersa_info
	sizeofUsersaID        = 24  // struct xfrm_usersa_id
	sizeofUserpolicyInfo  = 168 // struct xfrm_userpolicy_info
	sizeofUserpolicyID    = 64  // struct xfrm_userpolicy_id
	sizeofUserTmpl        = 64  // struct xfrm_user_tmpl
	sizeofXfrmReplayState = 12  // struct xfrm_replay_state

	xfrmaTmpl      = 5
	xfrmaSA        = 6
	xfrmaReplayVal = 10
)

// Msg is what the dataplanes need to know of one notification to tell
// whether it concerns their objects.
type Msg struct {
	Type     uint16
	Family   uint8
	Ifindex  int          // link, address, neighbour, qdisc/filter, route (RTA_OIF)
	Flags    uint32       // link: IFF_* flags
	Protocol uint8        // route: rtm_protocol
	Table    uint32       // route
	Prefix   netip.Prefix // route: destination; address: the address
	State    uint16       // neighbour: NUD_* state
	Addr     netip.Addr   // neighbour: NDA_DST; XFRM state: destination
	SPI      uint32       // XFRM state
	Reqids   []uint32     // XFRM state (one) or policy (one per template)
	// Replay is the deleted XFRM state's replay counters (XFRM_MSG_DELSA
	// carries them), nil otherwise.
	Replay *Replay
	xfrm   bool // from ParseXfrm: Type is an XFRM_MSG_*
}

// Replay is struct xfrm_replay_state.
type Replay struct{ OSeq, Seq, Bitmap uint32 }

// Deleted reports whether the message announces a deletion or flush.
func (m Msg) Deleted() bool {
	if m.xfrm {
		switch m.Type {
		case XfrmDelSA, XfrmDelPolicy, XfrmFlushSA, XfrmFlushPolicy:
			return true
		}
		return false
	}
	switch m.Type {
	case RTMDelLink, RTMDelAddr, RTMDelRoute, RTMDelNeigh, RTMDelQdisc, RTMDelTfilter:
		return true
	}
	return false
}

// Permanent reports a neighbour entry in NUD_PERMANENT state.
func (m Msg) Permanent() bool { return m.State&nudPermanent != 0 }

// Up reports a link with IFF_UP.
func (m Msg) Up() bool { return m.Flags&iffUp != 0 }

var ne = binary.NativeEndian

var errShort = errors.New("message too short")

func addrFrom(b []byte) (netip.Addr, bool) {
	a, ok := netip.AddrFromSlice(b)
	return a.Unmap(), ok
}

// ParseRoute decodes an rtnetlink notification (link, address, route,
// neighbour, qdisc and filter messages; others come back with only Type).
func ParseRoute(typ uint16, b []byte) (Msg, error) {
	m := Msg{Type: typ}
	hdr, attrs := 0, true
	switch typ {
	case RTMNewLink, RTMDelLink:
		if len(b) < sizeofIfinfomsg {
			return m, fmt.Errorf("parse ifinfomsg: %w", errShort)
		}
		m.Family, m.Ifindex, m.Flags = b[0], int(int32(ne.Uint32(b[4:]))), ne.Uint32(b[8:])
		hdr, attrs = sizeofIfinfomsg, false
	case RTMNewAddr, RTMDelAddr:
		if len(b) < sizeofIfaddrmsg {
			return m, fmt.Errorf("parse ifaddrmsg: %w", errShort)
		}
		m.Family, m.Ifindex = b[0], int(ne.Uint32(b[4:]))
		hdr = sizeofIfaddrmsg
	case RTMNewRoute, RTMDelRoute:
		if len(b) < sizeofRtmsg {
			return m, fmt.Errorf("parse rtmsg: %w", errShort)
		}
		m.Family, m.Table, m.Protocol = b[0], uint32(b[4]), b[5]
		hdr = sizeofRtmsg
	case RTMNewNeigh, RTMDelNeigh:
		if len(b) < sizeofNdmsg {
			return m, fmt.Errorf("parse ndmsg: %w", errShort)
		}
		m.Family, m.Ifindex, m.State = b[0], int(int32(ne.Uint32(b[4:]))), ne.Uint16(b[8:])
		hdr = sizeofNdmsg
	case RTMNewQdisc, RTMDelQdisc, RTMNewTfilter, RTMDelTfilter:
		if len(b) < sizeofTcmsg {
			return m, fmt.Errorf("parse tcmsg: %w", errShort)
		}
		m.Family, m.Ifindex = b[0], int(int32(ne.Uint32(b[4:])))
		hdr, attrs = sizeofTcmsg, false
	default:
		return m, nil
	}
	if !attrs {
		return m, nil
	}
	ad, err := netlink.NewAttributeDecoder(b[hdr:])
	if err != nil {
		return m, fmt.Errorf("parse attributes of message type %d: %w", typ, err)
	}
	ad.ByteOrder = ne
	for ad.Next() {
		switch {
		case typ == RTMNewAddr || typ == RTMDelAddr:
			// IFA_LOCAL (2) is the address itself; IFA_ADDRESS (1) the
			// peer's on point-to-point links, else the same.
			if t := ad.Type(); t == 1 && !m.Prefix.IsValid() || t == 2 {
				if a, ok := addrFrom(ad.Bytes()); ok {
					m.Prefix = netip.PrefixFrom(a, int(b[1]))
				}
			}
		case typ == RTMNewRoute || typ == RTMDelRoute:
			switch ad.Type() {
			case 1: // RTA_DST
				if a, ok := addrFrom(ad.Bytes()); ok {
					m.Prefix = netip.PrefixFrom(a, int(b[1]))
				}
			case 4: // RTA_OIF
				m.Ifindex = int(ad.Uint32())
			case 15: // RTA_TABLE
				m.Table = ad.Uint32()
			}
		default: // neighbour
			if ad.Type() == 1 { // NDA_DST
				if a, ok := addrFrom(ad.Bytes()); ok {
					m.Addr = a
				}
			}
		}
	}
	if err := ad.Err(); err != nil {
		return m, fmt.Errorf("parse attributes of message type %d: %w", typ, err)
	}
	return m, nil
}

// ParseXfrm decodes an XFRM notification on the SA or policy groups:
// states give their destination, SPI and reqid (and, when deleted, their
// replay counters), policies the reqids of their templates.
func ParseXfrm(typ uint16, b []byte) (Msg, error) {
	m := Msg{Type: typ, xfrm: true}
	var info []byte // struct xfrm_usersa_info
	var rest []byte // attributes
	switch typ {
	case XfrmNewSA, XfrmUpdSA:
		if len(b) < sizeofUsersaInfo {
			return m, fmt.Errorf("parse xfrm_usersa_info: %w", errShort)
		}
		info, rest = b[:sizeofUsersaInfo], b[sizeofUsersaInfo:]
	case XfrmDelSA:
		if len(b) < sizeofUsersaID {
			return m, fmt.Errorf("parse xfrm_usersa_id: %w", errShort)
		}
		rest = b[sizeofUsersaID:]
	case XfrmNewPolicy, XfrmUpdPolicy:
		if len(b) < sizeofUserpolicyInfo {
			return m, fmt.Errorf("parse xfrm_userpolicy_info: %w", errShort)
		}
		rest = b[sizeofUserpolicyInfo:]
	case XfrmDelPolicy:
		if len(b) < sizeofUserpolicyID {
			return m, fmt.Errorf("parse xfrm_userpolicy_id: %w", errShort)
		}
		rest = b[sizeofUserpolicyID:]
	default:
		return m, nil // flushes carry nothing we need
	}
	ad, err := netlink.NewAttributeDecoder(rest)
	if err != nil {
		return m, fmt.Errorf("parse xfrm attributes: %w", err)
	}
	ad.ByteOrder = ne
	for ad.Next() {
		v := ad.Bytes()
		switch ad.Type() {
		case xfrmaSA:
			if len(v) < sizeofUsersaInfo {
				return m, fmt.Errorf("parse XFRMA_SA: %w", errShort)
			}
			info = v
		case xfrmaTmpl:
			if len(v)%sizeofUserTmpl != 0 {
				return m, fmt.Errorf("parse XFRMA_TMPL: %d bytes", len(v))
			}
			for t := v; len(t) >= sizeofUserTmpl; t = t[sizeofUserTmpl:] {
				m.Reqids = append(m.Reqids, ne.Uint32(t[44:]))
			}
		case xfrmaReplayVal:
			if len(v) < sizeofXfrmReplayState {
				return m, fmt.Errorf("parse XFRMA_REPLAY_VAL: %w", errShort)
			}
			m.Replay = &Replay{OSeq: ne.Uint32(v), Seq: ne.Uint32(v[4:]), Bitmap: ne.Uint32(v[8:])}
		}
	}
	if err := ad.Err(); err != nil {
		return m, fmt.Errorf("parse xfrm attributes: %w", err)
	}
	if info != nil {
		// struct xfrm_usersa_info: sel (56), id {daddr 16, spi 4, proto},
		// saddr, lft, curlft, stats, seq, reqid @208, family @212.
		m.Family = uint8(ne.Uint16(info[212:]))
		if m.Family == afInet {
			m.Addr = netip.AddrFrom4([4]byte(info[56:60]))
		} else {
			m.Addr = netip.AddrFrom16([16]byte(info[56:72]))
		}
		m.SPI = binary.BigEndian.Uint32(info[72:])
		m.Reqids = append(m.Reqids, ne.Uint32(info[208:]))
	}
	return m, nil
}
