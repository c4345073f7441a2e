package natpmp

import (
	"bytes"
	"encoding/hex"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var nonce = [12]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}

func TestBuildGolden(t *testing.T) {
	mapUDP, err := BuildMapRequest(UDP, 4500, 4500, 3600)
	if err != nil {
		t.Fatal(err)
	}
	delTCP, err := BuildMapRequest(TCP, 22, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		got  []byte
		want string
	}{
		{"external address", BuildExternalAddressRequest(), "00 00"},
		// version 0, op 1, reserved, internal 4500, external 4500, 3600 s
		{"map udp", mapUDP, "00 01 0000 1194 1194 00000e10"},
		{"delete tcp", delTCP, "00 02 0000 0016 0000 00000000"},
		// version 2, op 1, reserved, lifetime 7200, client ::ffff:192.168.1.2,
		// nonce, proto 17, reserved, internal 4500, suggested 4501, ::ffff:0.0.0.0
		{"pcp map", BuildPCPMapRequest(netip.MustParseAddr("192.168.1.2"), PCPMap{Nonce: nonce, Protocol: UDP,
			InternalPort: 4500, ExternalPort: 4501}, 7200),
			"02 01 0000 00001c20 00000000000000000000ffff c0a80102" +
				"0102030405060708090a0b0c 11 000000 1194 1195 00000000000000000000ffff 00000000"},
		{"pcp announce", BuildPCPAnnounceRequest(netip.MustParseAddr("10.0.0.7")),
			"02 00 0000 00000000 00000000000000000000ffff 0a000007"},
	} {
		if want := unhex(t, tc.want); !bytes.Equal(tc.got, want) {
			t.Errorf("%s:\n got %x\nwant %x", tc.name, tc.got, want)
		}
	}
	if _, err := BuildMapRequest(Protocol(1), 1, 1, 1); err == nil {
		t.Error("BuildMapRequest(icmp) succeeded")
	}
}

func TestParseResponseGolden(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		want    Response
		wantErr string
	}{
		{name: "external address", in: "00 80 0000 0000012c 0b000001",
			want: Response{Op: 128, Epoch: 300, External: netip.MustParseAddr("11.0.0.1")}},
		{name: "map udp", in: "00 81 0000 0000012c 1194 1195 00000e10",
			want: Response{Op: 129, Epoch: 300, InternalPort: 4500, ExternalPort: 4501, Lifetime: 3600}},
		{name: "map tcp", in: "00 82 0000 00000001 0016 0016 00000000",
			want: Response{Op: 130, Epoch: 1, InternalPort: 22, ExternalPort: 22}},
		{name: "error short", in: "00 81 0003 00000005",
			want: Response{Op: 129, Result: ResultNetworkFailure, Epoch: 5}},
		{name: "error full length", in: "00 81 0002 00000005 1194 0000 00000000",
			want: Response{Op: 129, Result: ResultNotAuthorized, Epoch: 5}},
		{name: "truncated", in: "00 80 0000 0000", wantErr: "at least 8"},
		{name: "truncated addr", in: "00 80 0000 00000001 0b00", wantErr: "want 12"},
		{name: "truncated map", in: "00 81 0000 00000001 1194 1194", wantErr: "want 16"},
		{name: "request", in: "00 01 0000 1194 1194 00000e10", wantErr: "is a request"},
		{name: "pcp", in: "02 81 0000 00000000 00000000", wantErr: "not a NAT-PMP"},
		{name: "unknown op", in: "00 83 0000 00000000", wantErr: "unknown opcode"},
	} {
		got, err := ParseResponse(unhex(t, tc.in))
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s: err %v, want %q", tc.name, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if d := cmp.Diff(tc.want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); d != "" {
			t.Errorf("%s: (-want +got)\n%s", tc.name, d)
		}
		// Success responses marshal back to the same bytes; errors to 8.
		b, err := got.MarshalBinary()
		if err != nil {
			t.Errorf("%s: marshal: %v", tc.name, err)
		} else if in := unhex(t, tc.in); got.Result == 0 && !bytes.Equal(b, in) {
			t.Errorf("%s: marshal %x, want %x", tc.name, b, in)
		}
	}
}

func TestParsePCPResponseGolden(t *testing.T) {
	cmpAddr := cmp.Comparer(func(a, b netip.Addr) bool { return a == b })
	for _, tc := range []struct {
		name    string
		in      string
		want    PCPResponse
		wantErr string
	}{
		{name: "map", in: "02 81 00 00 00000e10 00000064 000000000000000000000000" +
			"0102030405060708090a0b0c 11 000000 1194 1195 00000000000000000000ffff 0b000001",
			want: PCPResponse{Opcode: PCPOpMap, Lifetime: 3600, Epoch: 100, Map: PCPMap{Nonce: nonce, Protocol: UDP,
				InternalPort: 4500, ExternalPort: 4501, External: netip.MustParseAddr("11.0.0.1")}}},
		{name: "announce", in: "02 80 00 00 00000000 00000007 000000000000000000000000",
			want: PCPResponse{Opcode: PCPOpAnnounce, Epoch: 7}},
		{name: "map refused, header only", in: "02 81 00 08 00000000 00000007 000000000000000000000000",
			want: PCPResponse{Opcode: PCPOpMap, Result: PCPNoResources, Epoch: 7}},
		{name: "with option", in: "02 80 00 00 00000000 00000007 000000000000000000000000 80 00 0003 aabbcc00",
			want: PCPResponse{Opcode: PCPOpAnnounce, Epoch: 7, Options: []PCPOption{{Code: 128, Data: []byte{0xaa, 0xbb, 0xcc}}}}},
		{name: "NAT-PMP gateway refuses version", in: "00 82 0001 00000009",
			want: PCPResponse{Opcode: 2, Result: PCPUnsuppVersion, Epoch: 9}},
		{name: "NAT-PMP other", in: "00 80 0000 00000009 0b000001", wantErr: "not a PCP"},
		{name: "short", in: "02 81 00 00 00000e10", wantErr: "at least 24"},
		{name: "odd length", in: "02 80 00 00 00000000 00000007 000000000000000000000000 00", wantErr: "bad length"},
		{name: "request", in: "02 01 00 00 00000000 00000007 000000000000000000000000", wantErr: "is a request"},
		{name: "map short", in: "02 81 00 00 00000000 00000007 000000000000000000000000 01020304", wantErr: "opcode data"},
		{name: "option overrun", in: "02 80 00 00 00000000 00000007 000000000000000000000000 80 00 0009 aabbcc00",
			wantErr: "overruns"},
		{name: "version 3", in: "03 80 00 00 00000000 00000007 000000000000000000000000", wantErr: "not a PCP"},
	} {
		got, err := ParsePCPResponse(unhex(t, tc.in))
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s: err %v, want %q", tc.name, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if d := cmp.Diff(tc.want, got, cmpAddr); d != "" {
			t.Errorf("%s: (-want +got)\n%s", tc.name, d)
		}
		if tc.in[:2] != "02" || got.Result != 0 {
			continue
		}
		b, err := got.MarshalBinary()
		if err != nil {
			t.Errorf("%s: marshal: %v", tc.name, err)
		} else if in := unhex(t, tc.in); !bytes.Equal(b, in) {
			t.Errorf("%s: marshal\n %x\nwant %x", tc.name, b, in)
		}
	}
}

func TestResultCodes(t *testing.T) {
	var err error = ResultOutOfResources
	var rc ResultCode
	if !errors.As(err, &rc) || rc != ResultOutOfResources || err.Error() != "NAT-PMP result OUT_OF_RESOURCES" {
		t.Errorf("ResultCode error: %v", err)
	}
	if got := ResultCode(99).String(); got != "RESULT_99" {
		t.Errorf("ResultCode(99) = %q", got)
	}
	if got := PCPAddressMismatch.Error(); got != "PCP result ADDRESS_MISMATCH" {
		t.Errorf("PCPAddressMismatch = %q", got)
	}
	if got := PCPResult(200).String(); got != "RESULT_200" {
		t.Errorf("PCPResult(200) = %q", got)
	}
}

func FuzzParseResponse(f *testing.F) {
	for _, s := range []string{"00 80 0000 0000012c 0b000001", "00 81 0000 0000012c 1194 1195 00000e10",
		"00 82 0004 00000001", "00 80 0000"} {
		f.Add(unhex(f, s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseResponse(b)
		if err != nil {
			return
		}
		out, err := r.MarshalBinary()
		if err != nil {
			t.Fatalf("marshal %+v: %v", r, err)
		}
		r2, err := ParseResponse(out)
		if err != nil {
			t.Fatalf("reparse %x: %v", out, err)
		}
		if r != r2 {
			t.Fatalf("round trip: %+v != %+v", r, r2)
		}
	})
}

func FuzzParsePCPResponse(f *testing.F) {
	for _, s := range []string{
		"02 81 00 00 00000e10 00000064 000000000000000000000000" +
			"0102030405060708090a0b0c 11 000000 1194 1195 00000000000000000000ffff 0b000001",
		"02 80 00 00 00000000 00000007 000000000000000000000000 80 00 0003 aabbcc00",
		"02 81 00 08 00000000 00000007 000000000000000000000000",
		"00 82 0001 00000009",
	} {
		f.Add(unhex(f, s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParsePCPResponse(b)
		if err != nil {
			return
		}
		out, err := r.MarshalBinary()
		if err != nil {
			return // e.g. an error answer for an opcode we do not model
		}
		r2, err := ParsePCPResponse(out)
		if err != nil {
			t.Fatalf("reparse %x: %v", out, err)
		}
		if d := cmp.Diff(r, r2, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); d != "" {
			t.Fatalf("round trip (-first +second):\n%s", d)
		}
	})
}
