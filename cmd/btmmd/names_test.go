package main

import (
	"encoding/hex"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
)

// TestInitNetnsHas reads this machine's /proc/1/net/if_inet6: an address
// listed there is found on its link (by index and name), and not on another.
func TestInitNetnsHas(t *testing.T) {
	b, err := os.ReadFile("/proc/1/net/if_inet6")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(strings.Split(string(b), "\n")[0])
	if len(f) != 6 {
		t.Fatalf("if_inet6: %q", b)
	}
	raw, err1 := hex.DecodeString(f[0])
	idx, err2 := strconv.ParseInt(f[1], 16, 32)
	a, ok := netip.AddrFromSlice(raw)
	if err1 != nil || err2 != nil || !ok {
		t.Fatalf("if_inet6 line %q", f)
	}
	if !initNetnsHas(a, int(idx), f[5]) {
		t.Errorf("%v on %s (%d) not found in %q", a, f[5], idx, b)
	}
	if initNetnsHas(a, int(idx)+1000, f[5]) || initNetnsHas(a, int(idx), f[5]+"x") || initNetnsHas(netip.MustParseAddr("fd00:dead::1"), int(idx), f[5]) {
		t.Error("found with another index, link name or address")
	}
}
