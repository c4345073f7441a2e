package main

import (
	"testing"

	"github.com/btmm/btmm/controlplane/agent"
)

// TestParseStreamServer: [paths] tls_servers entries, NAME:PORT (dialled
// by name) or NAME@IPV4:PORT (dialled at the address); anything else is
// refused.
func TestParseStreamServer(t *testing.T) {
	for _, c := range []struct {
		in   string
		want agent.StreamServer
		ok   bool
	}{
		{"relay.btmm.example:443", agent.StreamServer{Name: "relay.btmm.example", Addr: "relay.btmm.example:443"}, true},
		{"relay.btmm.example@203.0.113.20:443", agent.StreamServer{Name: "relay.btmm.example", Addr: "203.0.113.20:443"}, true},
		{"relay.btmm.example", agent.StreamServer{}, false},
		{"relay.btmm.example@relay:443", agent.StreamServer{}, false},
		{"@203.0.113.20:443", agent.StreamServer{}, false},
		{"relay@[2001:db8::1]:443", agent.StreamServer{}, false},
		{":443", agent.StreamServer{}, false},
	} {
		got, err := parseStreamServer(c.in)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("parseStreamServer(%q) = %+v, %v; want %+v (ok %v)", c.in, got, err, c.want, c.ok)
		}
	}
}
