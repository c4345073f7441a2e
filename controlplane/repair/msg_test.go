package repair

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/mdlayher/netlink"
)

// Builders of kernel notifications laid out as the kernel sends them
// (include/uapi/linux/*.h, 64-bit). The live netns/VM tests check the
// parsers against the real kernel; these make golden tables and fuzz seeds.

func attrs(f func(ae *netlink.AttributeEncoder)) []byte {
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = ne
	f(ae)
	b, err := ae.Encode()
	if err != nil {
		panic(err)
	}
	return b
}

func buildRoute(typ uint16, proto uint8, dst netip.Prefix, oif uint32) []byte {
	h := make([]byte, sizeofRtmsg)
	h[0], h[1], h[4], h[5] = afInet6, byte(dst.Bits()), 254, proto
	return append(h, attrs(func(ae *netlink.AttributeEncoder) {
		ae.Bytes(1, dst.Addr().AsSlice())
		ae.Uint32(4, oif)
	})...)
}

func buildAddr(typ uint16, p netip.Prefix, ifindex uint32) []byte {
	h := make([]byte, sizeofIfaddrmsg)
	h[0], h[1] = afInet6, byte(p.Bits())
	ne.PutUint32(h[4:], ifindex)
	return append(h, attrs(func(ae *netlink.AttributeEncoder) { ae.Bytes(1, p.Addr().AsSlice()) })...)
}

func buildNeigh(typ uint16, ifindex uint32, state uint16, dst netip.Addr) []byte {
	h := make([]byte, sizeofNdmsg)
	h[0] = afInet6
	ne.PutUint32(h[4:], ifindex)
	ne.PutUint16(h[8:], state)
	return append(h, attrs(func(ae *netlink.AttributeEncoder) { ae.Bytes(1, dst.AsSlice()) })...)
}

func buildTC(ifindex uint32) []byte {
	h := make([]byte, sizeofTcmsg)
	ne.PutUint32(h[4:], ifindex)
	return h
}

func buildLink(ifindex, flags uint32) []byte {
	h := make([]byte, sizeofIfinfomsg)
	ne.PutUint32(h[4:], ifindex)
	ne.PutUint32(h[8:], flags)
	return h
}

func usersaInfo(dst netip.Addr, spi, reqid uint32) []byte {
	b := make([]byte, sizeofUsersaInfo)
	copy(b[56:], dst.AsSlice())
	binary.BigEndian.PutUint32(b[72:], spi)
	b[76] = 50
	ne.PutUint32(b[208:], reqid)
	fam := uint16(afInet6)
	if dst.Is4() {
		fam = afInet
	}
	ne.PutUint16(b[212:], fam)
	return b
}

func buildSA(typ uint16, dst netip.Addr, spi, reqid uint32, r *Replay) []byte {
	if typ != XfrmDelSA {
		return usersaInfo(dst, spi, reqid)
	}
	id := make([]byte, sizeofUsersaID)
	copy(id, dst.AsSlice())
	return append(id, attrs(func(ae *netlink.AttributeEncoder) {
		ae.Bytes(xfrmaSA, usersaInfo(dst, spi, reqid))
		if r != nil {
			v := make([]byte, sizeofXfrmReplayState)
			ne.PutUint32(v, r.OSeq)
			ne.PutUint32(v[4:], r.Seq)
			ne.PutUint32(v[8:], r.Bitmap)
			ae.Bytes(xfrmaReplayVal, v)
		}
	})...)
}

func buildPolicy(typ uint16, reqids ...uint32) []byte {
	n := sizeofUserpolicyInfo
	if typ == XfrmDelPolicy {
		n = sizeofUserpolicyID
	}
	h := make([]byte, n)
	tmpl := make([]byte, 0, len(reqids)*sizeofUserTmpl)
	for _, r := range reqids {
		t := make([]byte, sizeofUserTmpl)
		ne.PutUint32(t[44:], r)
		tmpl = append(tmpl, t...)
	}
	return append(h, attrs(func(ae *netlink.AttributeEncoder) {
		if typ == XfrmDelPolicy {
			ae.Bytes(7, make([]byte, sizeofUserpolicyInfo)) // XFRMA_POLICY
		}
		ae.Bytes(xfrmaTmpl, tmpl)
	})...)
}

var (
	ula  = netip.MustParseAddr("fd00::b")
	ula4 = netip.MustParseAddr("10.0.0.2")
)

func TestParseRouteGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		typ  uint16
		b    []byte
		want Msg
	}{
		{"route deleted", RTMDelRoute, buildRoute(RTMDelRoute, 98, netip.PrefixFrom(ula, 128), 7),
			Msg{Type: RTMDelRoute, Family: afInet6, Protocol: 98, Table: 254, Prefix: netip.PrefixFrom(ula, 128), Ifindex: 7}},
		{"address deleted", RTMDelAddr, buildAddr(RTMDelAddr, netip.PrefixFrom(ula, 128), 1),
			Msg{Type: RTMDelAddr, Family: afInet6, Prefix: netip.PrefixFrom(ula, 128), Ifindex: 1}},
		{"neighbour deleted", RTMDelNeigh, buildNeigh(RTMDelNeigh, 3, nudPermanent, ula),
			Msg{Type: RTMDelNeigh, Family: afInet6, Ifindex: 3, State: nudPermanent, Addr: ula}},
		{"filter deleted", RTMDelTfilter, buildTC(4), Msg{Type: RTMDelTfilter, Ifindex: 4}},
		{"qdisc deleted", RTMDelQdisc, buildTC(4), Msg{Type: RTMDelQdisc, Ifindex: 4}},
		{"link down", RTMNewLink, buildLink(5, 0x1000), Msg{Type: RTMNewLink, Ifindex: 5, Flags: 0x1000}},
		{"other type", 99, []byte{1, 2}, Msg{Type: 99}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseRoute(tc.typ, tc.b)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(Msg{}), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
				cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
	m, _ := ParseRoute(RTMDelRoute, buildRoute(RTMDelRoute, 98, netip.PrefixFrom(ula, 128), 7))
	if !m.Deleted() {
		t.Error("RTM_DELROUTE not a deletion")
	}
	if m, _ := ParseRoute(RTMNewLink, buildLink(5, 1)); m.Deleted() || !m.Up() {
		t.Error("RTM_NEWLINK up misread")
	}
	for _, typ := range []uint16{RTMDelLink, RTMDelAddr, RTMDelRoute, RTMDelNeigh, RTMDelQdisc} {
		if _, err := ParseRoute(typ, []byte{10}); err == nil {
			t.Errorf("type %d: short message accepted", typ)
		}
	}
}

func TestParseXfrmGolden(t *testing.T) {
	r := &Replay{OSeq: 1000, Seq: 7, Bitmap: 0xff}
	for _, tc := range []struct {
		name string
		typ  uint16
		b    []byte
		want Msg
	}{
		{"state added", XfrmNewSA, buildSA(XfrmNewSA, ula4, 0x1001, 0x6281, nil),
			Msg{Type: XfrmNewSA, Family: afInet, Addr: ula4, SPI: 0x1001, Reqids: []uint32{0x6281}, xfrm: true}},
		{"state deleted with its replay state", XfrmDelSA, buildSA(XfrmDelSA, ula, 0x1002, 0xb7e0f, r),
			Msg{Type: XfrmDelSA, Family: afInet6, Addr: ula, SPI: 0x1002, Reqids: []uint32{0xb7e0f}, Replay: r, xfrm: true}},
		{"policy updated", XfrmUpdPolicy, buildPolicy(XfrmUpdPolicy, 7, 0x6281),
			Msg{Type: XfrmUpdPolicy, Reqids: []uint32{7, 0x6281}, xfrm: true}},
		{"policy deleted", XfrmDelPolicy, buildPolicy(XfrmDelPolicy, 0x6281),
			Msg{Type: XfrmDelPolicy, Reqids: []uint32{0x6281}, xfrm: true}},
		{"states flushed", XfrmFlushSA, []byte{50, 0, 0, 0}, Msg{Type: XfrmFlushSA, xfrm: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseXfrm(tc.typ, tc.b)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(Msg{}), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
				cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
			if want := tc.typ != XfrmNewSA && tc.typ != XfrmUpdPolicy; got.Deleted() != want {
				t.Errorf("Deleted() = %v, want %v", got.Deleted(), want)
			}
		})
	}
	if _, err := ParseXfrm(XfrmNewSA, make([]byte, 100)); err == nil {
		t.Error("short xfrm_usersa_info accepted")
	}
	if _, err := ParseXfrm(XfrmDelSA, append(make([]byte, 24), 8, 0, 6, 0, 1, 2, 3, 4)); err == nil {
		t.Error("short XFRMA_SA accepted")
	}
	if _, err := ParseXfrm(XfrmNewPolicy, append(make([]byte, sizeofUserpolicyInfo), 8, 0, 5, 0, 1, 2, 3, 4)); err == nil {
		t.Error("XFRMA_TMPL of 4 bytes accepted")
	}
}

// FuzzParse: no input panics either parser, and what parses once parses
// the same again (the parsers keep no state and do not alias their input).
func FuzzParse(f *testing.F) {
	f.Add(uint16(RTMDelRoute), buildRoute(RTMDelRoute, 98, netip.PrefixFrom(ula, 128), 7))
	f.Add(uint16(RTMDelAddr), buildAddr(RTMDelAddr, netip.PrefixFrom(ula, 128), 1))
	f.Add(uint16(RTMDelNeigh), buildNeigh(RTMDelNeigh, 3, nudPermanent, ula))
	f.Add(uint16(RTMDelTfilter), buildTC(4))
	f.Add(uint16(XfrmDelSA), buildSA(XfrmDelSA, ula, 0x1002, 0xb7e0f, &Replay{OSeq: 9}))
	f.Add(uint16(XfrmNewSA), buildSA(XfrmNewSA, ula4, 0x1001, 0x6281, nil))
	f.Add(uint16(XfrmDelPolicy), buildPolicy(XfrmDelPolicy, 0x6281))
	f.Fuzz(func(t *testing.T, typ uint16, b []byte) {
		for _, parse := range []func(uint16, []byte) (Msg, error){ParseRoute, ParseXfrm} {
			m1, err1 := parse(typ, b)
			c := append([]byte(nil), b...)
			for i := range b {
				b[i] ^= 0xff // the result must not alias the input
			}
			m2, err2 := parse(typ, c)
			if (err1 == nil) != (err2 == nil) || !cmp.Equal(m1, m2, cmp.AllowUnexported(Msg{}),
				cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })) {
				t.Fatalf("type %d: %+v %v vs %+v %v", typ, m1, err1, m2, err2)
			}
			copy(b, c)
		}
	})
}
