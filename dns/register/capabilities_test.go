package register

import (
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

// FuzzParseCapabilities: parse -> TXT -> parse.
func FuzzParseCapabilities(f *testing.F) {
	f.Add("txtvers=1\x00proto=1\x00dp=xfrm,ebpf\x00kport=4500\x00krb=host/a@R")
	f.Add("dev=x\x00dp=,,a, b\x00kport=1")
	f.Add("=\x00proto=0")
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
