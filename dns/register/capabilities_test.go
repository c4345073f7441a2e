package register

import (
	"net/netip"
	"slices"
	"testing"
)

func TestCapabilitiesTXT(t *testing.T) {
	c := Capabilities{Version: 1, Device: "linux/amd64 btmmd", Dataplanes: []string{"xfrm", "ebpf"}, KeyingPort: 4501, Principal: "host/laptop.alice.btmm.example@BTMM.EXAMPLE"}
	want := []string{"txtvers=1", "proto=1", "dev=linux/amd64 btmmd", "dp=xfrm,ebpf", "kport=4501", "krb=host/laptop.alice.btmm.example@BTMM.EXAMPLE"}
	if got := c.TXT(); !slices.Equal(got, want) {
		t.Errorf("TXT = %q, want %q", got, want)
	}
	back, err := ParseCapabilities(append(want, "future=1", "proto=7"))
	if err != nil || !back.Equal(c) {
		t.Errorf("parse = %+v, %v; want %+v (unknown keys ignored, first proto wins)", back, err, c)
	}
	for _, bad := range [][]string{{"txtvers=2"}, {"proto=x"}, {"kport=0"}, {"kport=70000"}} {
		if _, err := ParseCapabilities(bad); err == nil {
			t.Errorf("ParseCapabilities(%q) accepted", bad)
		}
	}
	if err := (Capabilities{Dataplanes: []string{"a,b"}}).Validate(); err == nil {
		t.Error("dataplane with a comma accepted")
	}
}

func TestCapabilitiesCandidates(t *testing.T) {
	pk := make([]byte, 32)
	pk[0], pk[31] = 0xfb, 0xff
	c := Capabilities{Version: 1, KeyingPort: 4500, ProbeKey: pk, NAT: "eim", Candidates: []Candidate{
		{"lan", netip.MustParseAddrPort("192.168.1.2:4500")},
		{"lan", netip.MustParseAddrPort("10.9.0.7:4500")},
		{"rfx", netip.MustParseAddrPort("11.1.0.2:61000")},
		{"relay", netip.MustParseAddrPort("11.0.0.1:40001")},
		{"v6", netip.MustParseAddrPort("[2001:db8::1]:4500")},
	}}
	want := []string{"txtvers=1", "proto=1", "kport=4500",
		"pk=-wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAP8", "nat=eim",
		"c-lan=192.168.1.2:4500,10.9.0.7:4500", "c-rfx=11.1.0.2:61000", "c-relay=11.0.0.1:40001",
		"c-v6=[2001:db8::1]:4500"}
	if got := c.TXT(); !slices.Equal(got, want) {
		t.Errorf("TXT =\n%q\nwant\n%q", got, want)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
	back, err := ParseCapabilities(append(want, "c-lan=1.2.3.4:5", "C-Future=[::ffff:1.2.3.4]:9"))
	if err != nil {
		t.Fatal(err)
	}
	c.Candidates = append(c.Candidates, Candidate{"future", netip.MustParseAddrPort("1.2.3.4:9")})
	if !back.Equal(c) {
		t.Errorf("parse = %+v\nwant %+v (first c-lan counts, unknown kinds kept, v4-mapped unmapped)", back, c)
	}
	// Today's records: no candidates, no probe key.
	old, err := ParseCapabilities([]string{"txtvers=1", "proto=1", "dp=xfrm", "kport=4500"})
	if err != nil || len(old.Candidates) != 0 || old.ProbeKey != nil || old.NAT != "" {
		t.Errorf("old TXT parsed as %+v, %v", old, err)
	}
	for _, bad := range [][]string{{"pk=abc"}, {"pk=" + want[3][3:] + "AA"}, {"nat=Sym metric"},
		{"c-lan="}, {"c-lan=1.2.3.4"}, {"c-lan=1.2.3.4:0"}, {"c-lan=1.2.3.4:5,,"}, {"c-=1.2.3.4:5"},
		{"c-la_n=1.2.3.4:5"}, {"c-lan=[fe80::1%eth0]:5"}} {
		if _, err := ParseCapabilities(bad); err == nil {
			t.Errorf("ParseCapabilities(%q) accepted", bad)
		}
	}
	for _, bad := range []Capabilities{
		{ProbeKey: []byte{1, 2}},
		{NAT: "a b"},
		{Candidates: []Candidate{{"LAN", netip.MustParseAddrPort("1.2.3.4:5")}}},
		{Candidates: []Candidate{{"lan", netip.AddrPort{}}}},
		{Candidates: []Candidate{{"lan", netip.MustParseAddrPort("1.2.3.4:5")}, {"lan", netip.MustParseAddrPort("1.2.3.4:5")}}},
	} {
		if err := bad.Validate(); err == nil {
			t.Errorf("Validate(%+v) accepted", bad)
		}
	}
}

// FuzzParseCapabilities: parse -> TXT -> parse.
func FuzzParseCapabilities(f *testing.F) {
	f.Add("txtvers=1\x00proto=1\x00dp=xfrm,ebpf\x00kport=4500\x00krb=host/a@R")
	f.Add("dev=x\x00dp=,,a, b\x00kport=1")
	f.Add("=\x00proto=0")
	f.Add("pk=-wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAP8\x00nat=eim\x00c-lan=1.2.3.4:5,[::1]:6\x00c-relay=9.9.9.9:40000")
	f.Fuzz(func(t *testing.T, in string) {
		c, err := ParseCapabilities(splitNUL(in))
		if err != nil {
			return
		}
		again, err := ParseCapabilities(c.TXT())
		if err != nil {
			t.Fatalf("re-parse %q: %v", c.TXT(), err)
		}
		if !again.Equal(c) {
			t.Fatalf("round trip: %+v != %+v", again, c)
		}
	})
}

func splitNUL(s string) []string {
	var out []string
	start := 0
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return append(out, s[start:])
}
