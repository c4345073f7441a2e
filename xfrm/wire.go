package xfrm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/btmm/btmm/controlplane"
)

// The XFRM netlink messages this package builds or parses itself (the ones
// vishvananda/netlink does not cover): XFRM_MSG_MIGRATE, and the
// XFRM_MSG_EXPIRE / XFRM_MSG_MAPPING notifications. Layouts follow
// include/uapi/linux/xfrm.h on 64-bit Linux; integers are host order except
// SPIs and ports (network order).
const (
	msgExpire  = 0x18 // XFRM_MSG_EXPIRE
	msgMigrate = 0x21 // XFRM_MSG_MIGRATE
	msgMapping = 0x26 // XFRM_MSG_MAPPING

	grpExpire  = 2 // XFRMNLGRP_EXPIRE
	grpMapping = 8 // XFRMNLGRP_MAPPING

	attrEncap   = 4  // XFRMA_ENCAP
	attrMigrate = 17 // XFRMA_MIGRATE
	attrIfID    = 31 // XFRMA_IF_ID

	afInet  = 2
	afInet6 = 10

	sizeofSelector     = 56  // struct xfrm_selector
	sizeofUserpolicyID = 64  // struct xfrm_userpolicy_id
	sizeofUserMigrate  = 76  // struct xfrm_user_migrate
	sizeofEncapTmpl    = 24  // struct xfrm_encap_tmpl
	sizeofUsersaInfo   = 224 // struct xfrm_usersa_info
	sizeofUserExpire   = 232 // struct xfrm_user_expire (usersa_info + hard + pad)
	sizeofUserMapping  = 64  // struct xfrm_user_mapping

	encapESPInUDP = 2 // UDP_ENCAP_ESPINUDP
)

var ne = binary.NativeEndian

// nonESPMarker is RFC 3948 §2.2's four zero bytes in front of keying
// messages on the ESP-in-UDP port (where an ESP packet has its non-zero SPI).
var nonESPMarker = controlplane.NonESPMarker

// errNotKeying reports a datagram on the tunnel port that is not a keying
// message (no non-ESP marker).
var errNotKeying = errors.New("datagram lacks the RFC 3948 non-ESP marker")

// parseKeying returns the keying message carried in a datagram received on
// the tunnel socket.
func parseKeying(b []byte) ([]byte, error) {
	if len(b) < len(nonESPMarker) || [4]byte(b[:4]) != nonESPMarker {
		return nil, errNotKeying
	}
	return b[4:], nil
}

// marshalKeying prefixes a keying message with the non-ESP marker.
func marshalKeying(msg []byte) []byte {
	return append(nonESPMarker[:len(nonESPMarker):len(nonESPMarker)], msg...)
}

// putAddr writes a as an xfrm_address_t (16 bytes, IPv4 in the first four).
func putAddr(b []byte, a netip.Addr) {
	if a.Is4() {
		v := a.As4()
		copy(b, v[:])
		clear(b[4:16])
		return
	}
	v := a.As16()
	copy(b, v[:])
}

func getAddr(b []byte, family uint16) netip.Addr {
	if family == afInet {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16([16]byte(b[:16]))
}

func family(a netip.Addr) uint16 {
	if a.Is4() {
		return afInet
	}
	return afInet6
}

// migration is one XFRM_MSG_MIGRATE request: the policy (selector and
// direction) whose template and matching SA move from Old to New outer
// addresses, with the SA's new UDP encapsulation ports.
type migration struct {
	Dir            uint8 // XFRM_POLICY_IN/OUT/FWD: 0/1/2
	SelSrc, SelDst netip.Prefix
	OldSrc, OldDst netip.Addr
	NewSrc, NewDst netip.Addr
	Reqid          uint32
	IfID           uint32
	EncapSport     uint16
	EncapDport     uint16
}

// marshal renders the message body (after the netlink header):
// xfrm_userpolicy_id, then XFRMA_MIGRATE, XFRMA_ENCAP and XFRMA_IF_ID.
func (m migration) marshal() []byte {
	b := make([]byte, sizeofUserpolicyID)
	// struct xfrm_selector
	putAddr(b[0:], m.SelDst.Addr())
	putAddr(b[16:], m.SelSrc.Addr())
	ne.PutUint16(b[40:], family(m.SelDst.Addr()))
	b[42] = byte(m.SelDst.Bits())
	b[43] = byte(m.SelSrc.Bits())
	// index (56) stays 0: find the policy by selector
	b[60] = m.Dir

	um := make([]byte, sizeofUserMigrate)
	putAddr(um[0:], m.OldDst)
	putAddr(um[16:], m.OldSrc)
	putAddr(um[32:], m.NewDst)
	putAddr(um[48:], m.NewSrc)
	um[64] = 50 // IPPROTO_ESP
	um[65] = 1  // XFRM_MODE_TUNNEL
	ne.PutUint32(um[68:], m.Reqid)
	ne.PutUint16(um[72:], family(m.OldDst))
	ne.PutUint16(um[74:], family(m.NewDst))
	b = appendAttr(b, attrMigrate, um)

	enc := make([]byte, sizeofEncapTmpl)
	ne.PutUint16(enc[0:], encapESPInUDP)
	binary.BigEndian.PutUint16(enc[2:], m.EncapSport)
	binary.BigEndian.PutUint16(enc[4:], m.EncapDport)
	b = appendAttr(b, attrEncap, enc)
	if m.IfID != 0 {
		b = appendAttr(b, attrIfID, ne.AppendUint32(nil, m.IfID))
	}
	return b
}

func appendAttr(b []byte, typ uint16, data []byte) []byte {
	l := 4 + len(data)
	b = ne.AppendUint16(b, uint16(l))
	b = ne.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// EventKind says what the kernel reported about an SA.
type EventKind int

// The kernel notifications Dataplane surfaces.
const (
	// SoftExpire: the SA reached its soft lifetime; rekey now (RFC 4301 §4.4.2.1).
	SoftExpire EventKind = iota + 1
	// HardExpire: the kernel deleted the SA.
	HardExpire
	// Mapping: an inbound ESP-in-UDP packet for the SA came from a new
	// source address or port (RFC 3948 §2: the peer's NAT mapping moved).
	Mapping
)

func (k EventKind) String() string {
	switch k {
	case SoftExpire:
		return "soft-expire"
	case HardExpire:
		return "hard-expire"
	case Mapping:
		return "mapping"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event is one kernel notification about an SA.
type Event struct {
	Kind  EventKind
	SPI   uint32
	Dst   netip.Addr // the SA's outer destination
	Reqid uint32
	// Peer is the ULA of the peer the SA belongs to, as of the last Set
	// (zero if the SPI is not one of the current desired state's).
	Peer netip.Addr
	// Old and New are the peer's outer address:port before and after a
	// Mapping event: to follow it, set Peer.Outer = New and call Set.
	Old, New netip.AddrPort
}

func (e Event) String() string {
	s := fmt.Sprintf("%s spi=0x%08x dst=%v reqid=%d", e.Kind, e.SPI, e.Dst, e.Reqid)
	if e.Peer.IsValid() {
		s += fmt.Sprintf(" peer=%v", e.Peer)
	}
	if e.Kind == Mapping {
		s += fmt.Sprintf(" %v -> %v", e.Old, e.New)
	}
	return s
}

// parseExpire decodes struct xfrm_user_expire.
func parseExpire(b []byte) (Event, error) {
	if len(b) < sizeofUsersaInfo+1 {
		return Event{}, fmt.Errorf("parse xfrm_user_expire: %d bytes, want %d", len(b), sizeofUsersaInfo+1)
	}
	fam := ne.Uint16(b[212:])
	if fam != afInet && fam != afInet6 {
		return Event{}, fmt.Errorf("parse xfrm_user_expire: family %d", fam)
	}
	e := Event{Kind: SoftExpire,
		Dst:   getAddr(b[56:], fam),
		SPI:   binary.BigEndian.Uint32(b[72:]),
		Reqid: ne.Uint32(b[208:]),
	}
	if b[sizeofUsersaInfo] != 0 {
		e.Kind = HardExpire
	}
	return e, nil
}

// marshalExpire is parseExpire's inverse (for tests and fuzzing).
func marshalExpire(e Event) []byte {
	b := make([]byte, sizeofUserExpire)
	putAddr(b[56:], e.Dst)
	binary.BigEndian.PutUint32(b[72:], e.SPI)
	b[76] = 50
	ne.PutUint32(b[208:], e.Reqid)
	ne.PutUint16(b[212:], family(e.Dst))
	if e.Kind == HardExpire {
		b[sizeofUsersaInfo] = 1
	}
	return b
}

// parseMapping decodes struct xfrm_user_mapping.
func parseMapping(b []byte) (Event, error) {
	if len(b) < sizeofUserMapping {
		return Event{}, fmt.Errorf("parse xfrm_user_mapping: %d bytes, want %d", len(b), sizeofUserMapping)
	}
	fam := ne.Uint16(b[20:])
	if fam != afInet && fam != afInet6 {
		return Event{}, fmt.Errorf("parse xfrm_user_mapping: family %d", fam)
	}
	return Event{Kind: Mapping,
		Dst:   getAddr(b[0:], fam),
		SPI:   binary.BigEndian.Uint32(b[16:]),
		Reqid: ne.Uint32(b[24:]),
		Old:   netip.AddrPortFrom(getAddr(b[28:], fam), binary.BigEndian.Uint16(b[60:])),
		New:   netip.AddrPortFrom(getAddr(b[44:], fam), binary.BigEndian.Uint16(b[62:])),
	}, nil
}

// marshalMapping is parseMapping's inverse (for tests and fuzzing).
func marshalMapping(e Event) []byte {
	b := make([]byte, sizeofUserMapping)
	putAddr(b[0:], e.Dst)
	binary.BigEndian.PutUint32(b[16:], e.SPI)
	ne.PutUint16(b[20:], family(e.Dst))
	b[22] = 50
	ne.PutUint32(b[24:], e.Reqid)
	putAddr(b[28:], e.Old.Addr())
	putAddr(b[44:], e.New.Addr())
	binary.BigEndian.PutUint16(b[60:], e.Old.Port())
	binary.BigEndian.PutUint16(b[62:], e.New.Port())
	return b
}
