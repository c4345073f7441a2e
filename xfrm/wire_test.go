package xfrm

import (
	"bytes"
	"encoding/hex"
	"net/netip"
	"testing"
)

func TestKeyingMarker(t *testing.T) {
	msg := []byte("krb-ap-req")
	b := marshalKeying(msg)
	if !bytes.Equal(b[:4], []byte{0, 0, 0, 0}) {
		t.Fatalf("marker = %x, want 00000000", b[:4])
	}
	got, err := parseKeying(b)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("parseKeying = %q, %v", got, err)
	}
	for _, bad := range [][]byte{nil, {0, 0, 0}, {0, 0, 1, 0, 'x'}, {0xff}} {
		if _, err := parseKeying(bad); err == nil {
			t.Errorf("parseKeying(%x) accepted a datagram without the marker", bad)
		}
	}
}

func FuzzKeying(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 'h', 'i'})
	f.Add([]byte{0, 0, 0, 0})
	f.Add([]byte{0x12, 0x34, 0x56, 0x78, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		msg, err := parseKeying(b)
		if err != nil {
			return
		}
		again, err := parseKeying(marshalKeying(msg))
		if err != nil || !bytes.Equal(again, msg) {
			t.Fatalf("round trip: %x -> %x, %v", msg, again, err)
		}
	})
}

func TestMigrateGolden(t *testing.T) {
	m := migration{Dir: 1,
		SelSrc: netip.MustParsePrefix("fd00::a/128"), SelDst: netip.MustParsePrefix("fd00::b/128"),
		OldSrc: netip.MustParseAddr("10.0.0.1"), OldDst: netip.MustParseAddr("10.0.0.2"),
		NewSrc: netip.MustParseAddr("10.0.0.1"), NewDst: netip.MustParseAddr("10.0.1.2"),
		Reqid: 0x6281, IfID: 7, EncapSport: 4500, EncapDport: 4501}
	b := m.marshal()
	want := sizeofUserpolicyID + 4 + sizeofUserMigrate + 4 + sizeofEncapTmpl + 4 + 4
	if len(b) != want {
		t.Fatalf("len = %d, want %d", len(b), want)
	}
	// Spot checks against struct xfrm_userpolicy_id / xfrm_user_migrate layout (little-endian host).
	for _, c := range []struct {
		name string
		off  int
		hex  string
	}{
		{"sel.daddr", 0, "fd00000000000000000000000000000b"},
		{"sel.family+prefixlens", 40, "0a008080"},
		{"dir", 60, "01"},
		{"XFRMA_MIGRATE hdr", 64, "50001100"},
		{"old_daddr", 68, "0a000002"},
		{"new_daddr", 68 + 32, "0a000102"},
		{"proto+mode", 68 + 64, "3201"},
		{"reqid", 68 + 68, "81620000"},
		{"families", 68 + 72, "02000200"},
		{"XFRMA_ENCAP hdr", 144, "1c000400"},
		{"encap type+ports", 148, "0200119411 95"},
		{"XFRMA_IF_ID", 172, "0800 1f00 07000000"},
	} {
		w, _ := hex.DecodeString(stripSpaces(c.hex))
		if got := b[c.off : c.off+len(w)]; !bytes.Equal(got, w) {
			t.Errorf("%s at %d = %x, want %x", c.name, c.off, got, w)
		}
	}
}

func stripSpaces(s string) string { return string(bytes.ReplaceAll([]byte(s), []byte(" "), nil)) }

func TestExpireMappingRoundTrip(t *testing.T) {
	for _, e := range []Event{
		{Kind: SoftExpire, SPI: 0x1001, Dst: netip.MustParseAddr("10.0.0.2"), Reqid: 0x6281},
		{Kind: HardExpire, SPI: 0xdeadbeef, Dst: netip.MustParseAddr("192.0.2.1"), Reqid: 1},
	} {
		got, err := parseExpire(marshalExpire(e))
		if err != nil {
			t.Fatal(err)
		}
		if got != e {
			t.Errorf("expire round trip: got %v, want %v", got, e)
		}
	}
	m := Event{Kind: Mapping, SPI: 0x2002, Dst: netip.MustParseAddr("10.0.0.1"), Reqid: 0x6281,
		Old: netip.MustParseAddrPort("11.0.0.2:4500"), New: netip.MustParseAddrPort("11.0.0.2:61000")}
	got, err := parseMapping(marshalMapping(m))
	if err != nil {
		t.Fatal(err)
	}
	if got != m {
		t.Errorf("mapping round trip: got %v, want %v", got, m)
	}
	if _, err := parseMapping(make([]byte, 10)); err == nil {
		t.Error("short mapping accepted")
	}
	if _, err := parseExpire(make([]byte, sizeofUserExpire)); err == nil {
		t.Error("expire with family 0 accepted")
	}
}

func FuzzExpire(f *testing.F) {
	f.Add(marshalExpire(Event{Kind: SoftExpire, SPI: 0x1001, Dst: netip.MustParseAddr("10.0.0.2"), Reqid: 7}))
	f.Add(marshalExpire(Event{Kind: HardExpire, SPI: 1, Dst: netip.MustParseAddr("fd00::1")}))
	f.Add(make([]byte, 8))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := parseExpire(b)
		if err != nil {
			return
		}
		again, err := parseExpire(marshalExpire(e))
		if err != nil || again != e {
			t.Fatalf("round trip: %v -> %v, %v", e, again, err)
		}
	})
}

func FuzzMapping(f *testing.F) {
	f.Add(marshalMapping(Event{Kind: Mapping, SPI: 0x2002, Dst: netip.MustParseAddr("10.0.0.1"),
		Old: netip.MustParseAddrPort("11.0.0.2:4500"), New: netip.MustParseAddrPort("11.0.0.2:61000")}))
	f.Add(make([]byte, 3))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := parseMapping(b)
		if err != nil {
			return
		}
		again, err := parseMapping(marshalMapping(e))
		if err != nil || again != e {
			t.Fatalf("round trip: %v -> %v, %v", e, again, err)
		}
	})
}
