package netmon

import (
	"encoding/binary"
	"testing"

	mnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// linkBody builds an RTM_NEWLINK body: ifinfomsg for index, then attrs.
func linkBody(t testing.TB, index int32, attrs ...mnl.Attribute) []byte {
	b := make([]byte, unix.SizeofIfInfomsg)
	binary.NativeEndian.PutUint32(b[4:8], uint32(index))
	if len(attrs) > 0 {
		a, err := mnl.MarshalAttributes(attrs)
		if err != nil {
			t.Fatal(err)
		}
		b = append(b, a...)
	}
	return b
}

func TestParseCarrierDowns(t *testing.T) {
	u32 := func(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }
	for _, tc := range []struct {
		name  string
		b     []byte
		index int
		downs uint32
		ok    bool
	}{
		{"count present", linkBody(t, 7, mnl.Attribute{Type: unix.IFLA_IFNAME, Data: []byte("eth0\x00")}, mnl.Attribute{Type: unix.IFLA_CARRIER_DOWN_COUNT, Data: u32(3)}), 7, 3, true},
		{"no count", linkBody(t, 7, mnl.Attribute{Type: unix.IFLA_IFNAME, Data: []byte("eth0\x00")}), 0, 0, false},
		{"count of the wrong size", linkBody(t, 7, mnl.Attribute{Type: unix.IFLA_CARRIER_DOWN_COUNT, Data: []byte{1, 2}}), 0, 0, false},
		{"short header", []byte{0, 0, 0}, 0, 0, false},
		{"truncated attribute", append(linkBody(t, 7), 8, 0, 0x30, 0), 0, 0, false},
	} {
		idx, n, ok := parseCarrierDowns(tc.b)
		if ok != tc.ok || ok && (idx != tc.index || n != tc.downs) {
			t.Errorf("%s: got (%d, %d, %v), want (%d, %d, %v)", tc.name, idx, n, ok, tc.index, tc.downs, tc.ok)
		}
	}
}

// FuzzParseCarrierDowns: any RTM_NEWLINK body from the kernel (or anything
// else) is parsed without panicking, and a count is only reported whole.
func FuzzParseCarrierDowns(f *testing.F) {
	f.Add(linkBody(f, 2, mnl.Attribute{Type: unix.IFLA_CARRIER_DOWN_COUNT, Data: []byte{1, 0, 0, 0}}))
	f.Add(linkBody(f, 1))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		idx, _, ok := parseCarrierDowns(b)
		if !ok && idx != 0 {
			t.Fatalf("index %d reported without a count", idx)
		}
	})
}
