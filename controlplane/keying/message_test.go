package keying

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
	b, err := hex.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// golden messages, encoded by hand from the layout in Message's doc comment.
var golden = []struct {
	name string
	m    Message
	hex  string
}{
	{
		name: "psk INIT",
		m: Message{Type: MsgInit, Mode: ModePSK, Exchange: [8]byte{1, 2, 3, 4, 5, 6, 7, 8},
			Nonce: bytes.Repeat([]byte{0xaa}, 32), SPI: 0x1234, ULA: netip.MustParseAddr("fd00::1"),
			Proposal: []CipherID{CipherAES256GCM, CipherAES256CBCHMAC256}, Time: 0x65000000,
			X25519: bytes.Repeat([]byte{0xcc}, 32), MLKEM: bytes.Repeat([]byte{0xdd}, mlkemEKLen),
			MAC: bytes.Repeat([]byte{0xbb}, 32), MAC1: bytes.Repeat([]byte{0x11}, 16)},
		hex: `02 01 02 00 0102030405060708
			01 0020 aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
			02 0004 00001234
			03 0010 fd000000000000000000000000000001
			04 0002 0102
			06 0008 0000000065000000
			0d 0020 cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc
			0e 04a0 ` + strings.Repeat("dd", mlkemEKLen) + `
			fd 0020 bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb
			fe 0010 11111111111111111111111111111111`,
	},
	{
		name: "kerberos RESP",
		m: Message{Type: MsgResp, Mode: ModeKerberos, Exchange: [8]byte{0xff},
			Nonce: bytes.Repeat([]byte{0x01}, 32), SPI: 0xdeadbeef, ULA: netip.MustParseAddr("fdab::2"),
			Cipher: CipherAES256GCM, APRep: []byte{0x6f, 0x03, 0x30, 0x01, 0x00}, TicketEnd: 1,
			X25519: bytes.Repeat([]byte{0x03}, 32), MLKEM: bytes.Repeat([]byte{0x04}, mlkemCTLen),
			MAC: bytes.Repeat([]byte{0x02}, 32)},
		hex: `02 02 01 00 ff00000000000000
			01 0020 0101010101010101010101010101010101010101010101010101010101010101
			02 0004 deadbeef
			03 0010 fdab0000000000000000000000000002
			05 0001 01
			08 0005 6f03300100
			09 0008 0000000000000001
			0d 0020 0303030303030303030303030303030303030303030303030303030303030303
			0e 0440 ` + strings.Repeat("04", mlkemCTLen) + `
			fd 0020 0202020202020202020202020202020202020202020202020202020202020202`,
	},
	{
		name: "ERROR",
		m:    Message{Type: MsgError, Mode: ModeKerberos, Code: CodeClockSkew, Text: "skew"},
		hex:  `02 06 01 00 0000000000000000 0a 0006 0002 736b6577`,
	},
	{
		name: "DELETE",
		m: Message{Type: MsgDelete, Mode: ModeKerberos, Exchange: [8]byte{0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11},
			ULA: netip.MustParseAddr("fd00::2"), SPIs: []uint32{0x100, 0xdeadbeef}},
		hex: `02 05 01 00 1111111111111111 03 0010 fd000000000000000000000000000002 0b 0008 00000100 deadbeef`,
	},
	{
		name: "MOVED",
		m: Message{Type: MsgMoved, Mode: ModeKerberos, Exchange: [8]byte{0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22},
			ULA: netip.MustParseAddr("fd00::1"), Seq: 3, MAC: bytes.Repeat([]byte{0xcc}, 32)},
		hex: `02 07 01 00 2222222222222222
			03 0010 fd000000000000000000000000000001
			0c 0008 0000000000000003
			fd 0020 cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc`,
	},
	{
		name: "MOVED_ACK",
		m: Message{Type: MsgMovedAck, Mode: ModePSK, Exchange: [8]byte{0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22},
			ULA: netip.MustParseAddr("fd00::2"), Seq: 0x0102030405060708, MAC: bytes.Repeat([]byte{0xdd}, 32)},
		hex: `02 08 02 00 2222222222222222
			03 0010 fd000000000000000000000000000002
			0c 0008 0102030405060708
			fd 0020 dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd`,
	},
	{
		name: "bare ACK",
		m:    Message{Type: MsgAck, Mode: ModePSK},
		hex:  `02 04 02 00 0000000000000000`,
	},
	{
		name: "FRAGMENT of an INIT",
		m: Message{Type: MsgFragment, Mode: ModeKerberos, Exchange: [8]byte{9, 9, 9, 9, 9, 9, 9, 9},
			Frag: Fragment{Of: MsgInit, Index: 1, Count: 3}, Data: []byte("piece"),
			MAC1: bytes.Repeat([]byte{0x31}, 16), MAC2: bytes.Repeat([]byte{0x32}, 16)},
		hex: `02 0a 01 00 0909090909090909 11 0003 010103 12 0005 7069656365
			fe 0010 31313131313131313131313131313131 ff 0010 32323232323232323232323232323232`,
	},
	{
		name: "COOKIE",
		m:    Message{Type: MsgCookie, Mode: ModePSK, Exchange: [8]byte{7}, Cookie: bytes.Repeat([]byte{0x42}, sealedLen)},
		hex:  `02 09 02 00 0700000000000000 10 002c ` + strings.Repeat("42", sealedLen),
	},
}

var cmpAddr = cmp.Comparer(func(a, b netip.Addr) bool { return a == b })

func TestMessageGolden(t *testing.T) {
	for _, tt := range golden {
		t.Run(tt.name, func(t *testing.T) {
			want := unhex(t, tt.hex)
			got, err := tt.m.Marshal()
			if err != nil {
				t.Fatalf("Marshal: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("Marshal:\n got %x\nwant %x", got, want)
			}
			var m Message
			if err := m.Unmarshal(want); err != nil {
				t.Fatalf("Unmarshal: %v", err)
			}
			if d := cmp.Diff(tt.m, m, cmpAddr); d != "" {
				t.Fatalf("Unmarshal (-want +got):\n%s", d)
			}
		})
	}
}

func TestMessageMalformed(t *testing.T) {
	hdr := "02 01 02 00 0102030405060708 "
	for _, tt := range []struct{ name, hex, want string }{
		{"empty", "", "truncated"},
		{"short header", "02 01 02 00 01", "truncated"},
		{"version 1", "01 01 02 00 0102030405060708", "version 1"},
		{"version 3", "03 01 02 00 0102030405060708", "version 3"},
		{"type 0", "02 00 02 00 0102030405060708", "unknown message type"},
		{"type 11", "02 0b 02 00 0102030405060708", "unknown message type"},
		{"mode 3", "02 01 03 00 0102030405060708", "unknown mode"},
		{"flags", "02 01 02 80 0102030405060708", "reserved flags"},
		{"attr header cut", hdr + "02 00", "truncated"},
		{"attr value cut", hdr + "02 0004 0000", "truncated"},
		{"out of order", hdr + "03 0010 fd000000000000000000000000000001 02 0004 00001234", "out of order"},
		{"repeated", hdr + "02 0004 00001234 02 0004 00001235", "out of order"},
		{"empty attr", hdr + "04 0000", "empty"},
		{"spi 0", hdr + "02 0004 00000000", "SPI 0"},
		{"short nonce", hdr + "01 0002 aaaa", "want [32]"},
		{"mapped ULA", hdr + "03 0010 00000000000000000000ffff0a000001", "IPv4-mapped"},
		{"cipher 0 in proposal", hdr + "04 0002 0100", "cipher 0"},
		{"time 0", hdr + "06 0008 0000000000000000", "zero"},
		{"error code 0", hdr + "0a 0002 0000", "code 0"},
		{"spi list ragged", hdr + "0b 0003 000001", "SPI list"},
		{"spi list 0", hdr + "0b 0004 00000000", "SPI 0"},
		{"seq 0", hdr + "0c 0008 0000000000000000", "sequence number 0"},
		{"short seq", hdr + "0c 0004 00000001", "want [8]"},
		{"unknown attr", hdr + "0f 0001 00", "unknown attribute"},
		{"short MAC", hdr + "fd 0004 00000000", "want [32]"},
		{"short MAC1", hdr + "fe 0004 00000000", "want [16]"},
		{"MAC2 without MAC1", hdr + "ff 0010 00000000000000000000000000000000", "MAC2 without MAC1"},
		{"MAC before MAC1 out of order", hdr + "fe 0010 00000000000000000000000000000000 fd 0020 " + strings.Repeat("00", 32), "out of order"},
		{"short X25519", hdr + "0d 0004 00000000", "want [32]"},
		{"ML-KEM odd length", hdr + "0e 0004 00000000", "want [1184 1088]"},
		{"cookie length", hdr + "10 0004 00000000", "want [44]"},
		{"fragment of an ERROR", hdr + "11 0003 060002", "only INIT and RESP"},
		{"fragment count 1", hdr + "11 0003 010001", "fragment 0 of 1"},
		{"fragment count 9", hdr + "11 0003 010009", "fragment 0 of 9"},
		{"fragment index past count", hdr + "11 0003 010303", "fragment 3 of 3"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var m Message
			err := m.Unmarshal(unhex(t, tt.hex))
			if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Unmarshal = %v, want ErrMalformed mentioning %q", err, tt.want)
			}
		})
	}
	var m Message
	big := append(unhex(t, hdr), make([]byte, MaxMessageLen)...)
	if err := m.Unmarshal(big); !errors.Is(err, ErrMalformed) {
		t.Errorf("oversized: %v", err)
	}
}

func TestMarshalRefusesBadValues(t *testing.T) {
	for name, m := range map[string]Message{
		"nonce length":  {Type: MsgInit, Mode: ModePSK, Nonce: []byte{1}},
		"mac length":    {Type: MsgInit, Mode: ModePSK, MAC: []byte{1}},
		"ipv4 ula":      {Type: MsgInit, Mode: ModePSK, ULA: netip.MustParseAddr("10.0.0.1")},
		"text no code":  {Type: MsgError, Mode: ModePSK, Text: "x"},
		"spi 0 list":    {Type: MsgDelete, Mode: ModePSK, SPIs: []uint32{0}},
		"huge":          {Type: MsgInit, Mode: ModeKerberos, APReq: make([]byte, MaxMessageLen)},
		"x25519 length": {Type: MsgInit, Mode: ModePSK, X25519: []byte{1}},
		"mlkem length":  {Type: MsgInit, Mode: ModePSK, MLKEM: []byte{1}},
		"fragment":      {Type: MsgFragment, Mode: ModePSK, Frag: Fragment{Of: MsgAck, Count: 2}},
		"mac1 length":   {Type: MsgInit, Mode: ModePSK, MAC1: []byte{1}},
	} {
		if _, err := m.Marshal(); err == nil {
			t.Errorf("%s: Marshal succeeded", name)
		}
	}
}

// FuzzMessage checks parse -> marshal -> parse: anything Unmarshal accepts
// re-encodes to the same bytes (the encoding is canonical) and parses again
// to the same message.
func FuzzMessage(f *testing.F) {
	for _, g := range golden {
		f.Add(unhex(f, g.hex))
	}
	f.Add([]byte{})
	f.Add(unhex(f, "02 01 02 00 0102030405060708 02 0004 00001234 02 0004 00001235"))
	f.Add(unhex(f, "01 01 02 00 0102030405060708 03 0010 fd000000000000000000000000000001"))
	f.Fuzz(func(t *testing.T, b []byte) {
		var m Message
		if err := m.Unmarshal(b); err != nil {
			return
		}
		out, err := m.Marshal()
		if err != nil {
			t.Fatalf("Marshal of a parsed message: %v", err)
		}
		if !bytes.Equal(out, b) {
			t.Fatalf("not canonical:\n in %x\nout %x", b, out)
		}
		var m2 Message
		if err := m2.Unmarshal(out); err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		if d := cmp.Diff(m, m2, cmpAddr); d != "" {
			t.Fatalf("re-parse differs (-first +second):\n%s", d)
		}
	})
}
