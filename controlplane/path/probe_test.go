package path

import (
	"bytes"
	"encoding/hex"
	"errors"
	"net/netip"
	"testing"

	"github.com/btmm/btmm/dns/register"
)

func TestProbeGolden(t *testing.T) {
	key := bytes.Repeat([]byte{0x55}, 32)
	var sender [32]byte
	sender[0], sender[31] = 0xaa, 0xbb
	txid := [12]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
	for _, tc := range []struct {
		p    Probe
		want string
	}{
		{Probe{Type: Ping, Sender: sender, TxID: txid},
			"b7010100" + "aa" + "000000000000000000000000000000000000000000000000000000000000" + "bb" +
				"0102030405060708090a0b0c"},
		{Probe{Type: Pong, Sender: sender, TxID: txid, Seen: netip.MustParseAddrPort("11.1.0.2:61000")},
			"b7010200" + "aa" + "000000000000000000000000000000000000000000000000000000000000" + "bb" +
				"0102030405060708090a0b0c" + "00000000000000000000ffff0b010002" + "ee48"},
	} {
		b := tc.p.Seal(key)
		if got := hex.EncodeToString(b[:len(b)-tagLen]); got != tc.want {
			t.Errorf("%s body\n got %s\nwant %s", tc.p.Type, got, tc.want)
		}
		got, err := Open(b, func([32]byte) []byte { return key })
		if err != nil || got != tc.p {
			t.Errorf("%s: Open = %+v, %v", tc.p.Type, got, err)
		}
		if _, err := Open(b, func([32]byte) []byte { return nil }); !errors.Is(err, ErrUnknownKey) {
			t.Errorf("unknown key: %v", err)
		}
		wrong := bytes.Repeat([]byte{0x56}, 32)
		if _, err := Open(b, func([32]byte) []byte { return wrong }); !errors.Is(err, ErrBadTag) {
			t.Errorf("wrong key: %v", err)
		}
	}
	// Both ends derive the same pair key; a third party does not.
	a, _ := NewKey()
	b, _ := NewKey()
	c, _ := NewKey()
	pa, pb, pc := a.Public(), b.Public(), c.Public()
	kab, _ := a.PairKey(pb[:])
	kba, _ := b.PairKey(pa[:])
	kac, _ := a.PairKey(pc[:])
	if !bytes.Equal(kab, kba) || bytes.Equal(kab, kac) {
		t.Error("pair keys: want equal for a-b/b-a and different for a-c")
	}
}

func TestParseProbeMalformed(t *testing.T) {
	ping := (&Probe{Type: Ping}).Seal(make([]byte, 32))
	pong := (&Probe{Type: Pong}).Seal(make([]byte, 32))
	mod := func(b []byte, i int, v byte) []byte { b = bytes.Clone(b); b[i] = v; return b }
	for name, b := range map[string][]byte{
		"empty": nil, "short": ping[:20], "magic": mod(ping, 0, 0xb6), "version": mod(ping, 1, 2),
		"flags": mod(ping, 3, 1), "type": mod(ping, 2, 3), "ping as pong": mod(ping, 2, 2),
		"pong as ping": mod(pong, 2, 1), "long ping": append(bytes.Clone(ping), 0),
	} {
		if _, err := ParseProbe(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", name, err)
		}
	}
}

// FuzzProbe: parse -> seal -> parse is stable, and nothing panics.
func FuzzProbe(f *testing.F) {
	key := make([]byte, 32)
	f.Add((&Probe{Type: Ping}).Seal(key))
	f.Add((&Probe{Type: Pong, Seen: netip.MustParseAddrPort("1.2.3.4:5")}).Seal(key))
	f.Add([]byte{0xb7, 1, 2, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParseProbe(b)
		if err != nil {
			return
		}
		again, err := ParseProbe(p.Seal(key))
		if err != nil || again != p {
			t.Fatalf("round trip %+v -> %+v, %v", p, again, err)
		}
	})
}

func TestClassify(t *testing.T) {
	stun, _ := hex.DecodeString("000100002112a442" + "000102030405060708090a0b")
	for _, tc := range []struct {
		b    []byte
		want Class
	}{
		{stun, ClassSTUN},
		{append(bytes.Clone(stun), 0, 0, 0, 0), ClassKeying}, // length field disagrees
		{(&Probe{Type: Ping}).Seal(make([]byte, 32)), ClassProbe},
		{[]byte{1, 1, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8}, ClassKeying}, // keying v1 INIT header
		{nil, ClassKeying},
	} {
		if got := Classify(tc.b); got != tc.want {
			t.Errorf("Classify(%x) = %d, want %d", tc.b, got, tc.want)
		}
	}
}

func TestCandidatesFrom(t *testing.T) {
	caps := register.Capabilities{Candidates: []register.Candidate{
		{Kind: "lan", Addr: netip.MustParseAddrPort("192.168.1.2:4500")},
		{Kind: "rfx", Addr: netip.MustParseAddrPort("11.1.0.2:4500")},
		{Kind: "relay", Addr: netip.MustParseAddrPort("11.0.0.1:40000")},
		{Kind: "future", Addr: netip.MustParseAddrPort("11.5.0.1:1")},
		{Kind: "lan", Addr: netip.MustParseAddrPort("[2001:db8::1]:4500")},
	}}
	got := CandidatesFrom(netip.MustParseAddrPort("11.1.0.2:4500"), caps)
	want := []Candidate{{Kind: KindLAN, Addr: netip.MustParseAddrPort("192.168.1.2:4500"), Source: "txt"},
		{Kind: KindPunched, Addr: netip.MustParseAddrPort("11.1.0.2:4500"), Source: "txt"},
		{Kind: KindRelayUDP, Addr: netip.MustParseAddrPort("11.0.0.1:40000"), Source: "txt"}}
	if len(got) != len(want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("candidate %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	// A public host's own address listed as lan is its SRV/A: direct.
	pub := CandidatesFrom(netip.MustParseAddrPort("11.3.0.2:4500"), register.Capabilities{Candidates: []register.Candidate{
		{Kind: "lan", Addr: netip.MustParseAddrPort("11.3.0.2:4500")}}})
	if len(pub) != 1 || pub[0].Kind != KindDirect {
		t.Errorf("public host: %+v", pub)
	}
	// A private address published as SRV/A (a gateway that answered
	// nothing, the host "treated as public") stays a LAN candidate.
	priv := CandidatesFrom(netip.MustParseAddrPort("192.168.1.2:4500"), register.Capabilities{Candidates: []register.Candidate{
		{Kind: "lan", Addr: netip.MustParseAddrPort("192.168.1.2:4500")}}})
	if len(priv) != 1 || priv[0].Kind != KindLAN {
		t.Errorf("private SRV/A: %+v", priv)
	}
	// Today's records only: one direct candidate.
	old := CandidatesFrom(netip.MustParseAddrPort("11.3.0.2:4500"), register.Capabilities{Version: 1})
	if len(old) != 1 || old[0].Kind != KindDirect {
		t.Errorf("old peer: %+v", old)
	}
	for _, k := range DefaultPreference {
		if back, err := ParseKind(k.String()); err != nil || back != k {
			t.Errorf("ParseKind(%v) = %v, %v", k, back, err)
		}
	}
}
