package main

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/keying"
)

func TestConfigDefaultsAndErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, "c.toml")
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	c, err := loadConfig(write(`host = "a"
domain = "alice.btmm.example."
[dns]
key_file = "/k"
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.DNS.Zone != "btmm.example." || c.Tunnel.Port != 4500 || c.Tunnel.Dataplane != "xfrm" || c.NAT.Mode != "auto" ||
		c.Keying.Mode != "kerberos" || c.Keying.Keytab != "/etc/krb5.keytab" || c.ControlSocket != "/run/btmm/btmmd.sock" {
		t.Fatalf("defaults: %+v", c)
	}
	if c.Names.Mode != "auto" || c.Names.Search == nil || !*c.Names.Search || c.Names.Listen != "127.0.0.77:53" || c.Names.HostsFile != "/etc/hosts" {
		t.Fatalf("names defaults: %+v", c.Names)
	}
	for mode, ok := range map[string]bool{"auto": true, "resolved": true, "hosts": true, "off": true, "dbus": false} {
		_, err := loadConfig(write("domain = \"alice.btmm.example.\"\n[dns]\nkey_file = \"/k\"\n[names]\nmode = \"" + mode + "\"\nsearch = false\n"))
		if (err == nil) != ok {
			t.Errorf("names.mode %q: err %v", mode, err)
		}
	}
	if c.keepalive != 20*time.Second || c.debounce != 250*time.Millisecond || c.Network.Follow == nil || !*c.Network.Follow {
		t.Fatalf("roaming defaults: keepalive %v, debounce %v, follow %v", c.keepalive, c.debounce, c.Network.Follow)
	}
	c, err = loadConfig(write(`domain = "alice.btmm.example."
[dns]
key_file = "/k"
[tunnel]
keepalive = "off"
[network]
follow = false
debounce = "50ms"
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.keepalive >= 0 || *c.Network.Follow || c.debounce != 50*time.Millisecond {
		t.Fatalf("keepalive off / follow false / debounce 50ms: %v %v %v", c.keepalive, *c.Network.Follow, c.debounce)
	}

	if c.Keying.ReplayCache != "/run/btmm/keying-replay" {
		t.Errorf("replay cache default %q", c.Keying.ReplayCache)
	}
	if p := principalFor(c)("laptop"); p != "host/laptop.alice.btmm.example" {
		t.Errorf("principal of laptop: %q", p)
	}
	c, err = loadConfig(write(`host = "a"
domain = "alice.btmm.example."
[dns]
key_file = "/k"
[keying]
realm = "BTMM.EXAMPLE"
sa_lifetime = "30m"
hard_lifetime = "45m"
[keying.principals]
nas = "host/nas.example.org@OTHER"
`))
	if err != nil {
		t.Fatal(err)
	}
	if p := principalFor(c)("laptop"); p != "host/laptop.alice.btmm.example@BTMM.EXAMPLE" {
		t.Errorf("principal of laptop: %q", p)
	}
	if p := principalFor(c)("nas"); p != "host/nas.example.org@OTHER" {
		t.Errorf("principal of nas: %q", p)
	}
	if kc := keyingConfig(c); kc.SALifetime != 30*time.Minute || kc.HardLifetime != 45*time.Minute || keying.HardLimit(kc) != 46*time.Minute {
		t.Errorf("keying config %+v", kc)
	}

	for _, tc := range []struct{ name, conf, want string }{
		{"unknown key", "domain = \"a.b.\"\nbogus = 1\n[dns]\nkey_file=\"/k\"\n", "unknown keys"},
		{"no domain", "[dns]\nkey_file=\"/k\"\n", "domain is required"},
		{"no key", "domain = \"a.b.\"\n", "dns.key_file is required"},
		{"bad dataplane", "domain = \"a.b.\"\n[dns]\nkey_file=\"/k\"\n[tunnel]\ndataplane=\"wg\"\n", "tunnel.dataplane"},
		{"nat off without external", "domain = \"a.b.\"\n[dns]\nkey_file=\"/k\"\n[nat]\nmode=\"off\"\n", "nat.external"},
		{"psk without file", "domain = \"a.b.\"\n[dns]\nkey_file=\"/k\"\n[keying]\nmode=\"psk\"\n", "psk_file"},
		{"syntax", "domain = \n", "config"},
		{"bad sa_lifetime", "domain = \"a.b.\"\n[dns]\nkey_file=\"/k\"\n[keying]\nsa_lifetime=\"soon\"\n", "keying.sa_lifetime"},
		{"tiny hard_lifetime", "domain = \"a.b.\"\n[dns]\nkey_file=\"/k\"\n[keying]\nhard_lifetime=\"1s\"\n", "keying.hard_lifetime"},
		{"hard below half soft", "domain = \"a.b.\"\n[dns]\nkey_file=\"/k\"\n[keying]\nsa_lifetime=\"1h\"\nhard_lifetime=\"20m\"\n", "less than half"},
		{"bad principal override", "domain = \"a.b.\"\n[dns]\nkey_file=\"/k\"\n[keying.principals]\n\"nas.x\" = \"nas\"\n", "keying.principals"},
		{"bad keepalive", "domain = \"a.b.\"\n[dns]\nkey_file=\"/k\"\n[tunnel]\nkeepalive=\"often\"\n", "tunnel.keepalive \"often\""},
		{"keepalive too long", "domain = \"a.b.\"\n[dns]\nkey_file=\"/k\"\n[tunnel]\nkeepalive=\"2h\"\n", "between 1s and 1h"},
		{"bad debounce", "domain = \"a.b.\"\n[dns]\nkey_file=\"/k\"\n[network]\ndebounce=\"1us\"\n", "network.debounce 1µs"},
		{"follow not a bool", "domain = \"a.b.\"\n[dns]\nkey_file=\"/k\"\n[network]\nfollow=\"yes\"\n", "config"},
	} {
		_, err := loadConfig(write(tc.conf))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error mentioning %q", tc.name, err, tc.want)
		}
	}
}

func TestCheckKeyName(t *testing.T) {
	cfg := &Config{Host: "laptop", Domain: "alice.btmm.example."}
	log := slog.New(slog.DiscardHandler)
	for name, ok := range map[string]bool{
		"laptop.alice.btmm.example.":  true, // the host's own key (addhost)
		"Laptop.Alice.btmm.example":   true,
		"alice.btmm.example.":         true,  // the user's key: warned about
		"desktop.alice.btmm.example.": false, // another host's
		"bob.btmm.example.":           false,
	} {
		if err := checkKeyName(name, cfg, log); (err == nil) != ok {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// [tunnels] (issue 15): on by default only with path selection and the
// xfrm dataplane; kinds and the FOU port checked.
func TestConfigTunnels(t *testing.T) {
	dir := t.TempDir()
	load := func(s string) (*Config, error) {
		p := filepath.Join(dir, "c.toml")
		if err := os.WriteFile(p, []byte("domain = \"alice.btmm.example.\"\n[dns]\nkey_file = \"/k\"\n"+s), 0o644); err != nil {
			t.Fatal(err)
		}
		return loadConfig(p)
	}
	c, err := load("")
	if err != nil || c.Paths.Mode != "auto" || c.Tunnels.Mode != "off" || c.Tunnels.FOUPort != 0 {
		t.Fatalf("defaults: paths %q, tunnels %+v, %v (want paths auto, tunnels off: they follow an explicit paths.mode only)", c.Paths.Mode, c.Tunnels, err)
	}
	c, err = load("[paths]\nmode = \"off\"\n")
	if err != nil || c.Paths.Mode != "off" || c.Tunnels.Mode != "off" {
		t.Fatalf("paths off: paths %q, tunnels %+v, %v", c.Paths.Mode, c.Tunnels, err)
	}
	c, err = load("[tunnels]\nmode = \"auto\"\n")
	if err != nil || c.Paths.Mode != "auto" || c.Tunnels.Mode != "auto" {
		t.Fatalf("tunnels auto with the default paths.mode: paths %q, tunnels %+v, %v", c.Paths.Mode, c.Tunnels, err)
	}
	c, err = load("[paths]\nmode = \"auto\"\n")
	if err != nil || c.Tunnels.Mode != "auto" || len(c.Tunnels.Kinds) != 3 || c.Tunnels.FOUPort != 4501 {
		t.Fatalf("paths auto: tunnels %+v, %v (want auto, ipv6 sit fou, fou_port 4501)", c.Tunnels, err)
	}
	c, err = load("[paths]\nmode = \"auto\"\n[tunnel]\ndataplane = \"ebpf\"\n")
	if err != nil || c.Tunnels.Mode != "auto" || c.Tunnels.FOUPort != 4501 {
		t.Fatalf("ebpf: tunnels %+v, %v (want auto, as with xfrm: secure mode carries them)", c.Tunnels, err)
	}
	c, err = load("[paths]\nmode = \"auto\"\n[tunnel]\ndataplane = \"ebpf-cleartext\"\n")
	if err != nil || c.Tunnels.Mode != "off" {
		t.Fatalf("ebpf-cleartext: tunnels %+v, %v (want off by default)", c.Tunnels, err)
	}
	c, err = load("[paths]\nmode = \"auto\"\n[tunnels]\nkinds = [\"ipv6\"]\n")
	if err != nil || c.Tunnels.FOUPort != 0 || len(c.Tunnels.Kinds) != 1 {
		t.Fatalf("ipv6 only: tunnels %+v, %v (want no FOU port)", c.Tunnels, err)
	}
	for _, tc := range []struct{ name, conf, want string }{
		{"auto without paths", "[paths]\nmode = \"off\"\n[tunnels]\nmode = \"auto\"\n", "needs paths.mode"},
		{"auto with ebpf-cleartext", "[paths]\nmode = \"auto\"\n[tunnel]\ndataplane = \"ebpf-cleartext\"\n[tunnels]\nmode = \"auto\"\n", "a tunnel never carries cleartext ULA traffic"},
		{"bad mode", "[tunnels]\nmode = \"on\"\n", "tunnels.mode"},
		{"not a tunnel kind", "[paths]\nmode = \"auto\"\n[tunnels]\nkinds = [\"relay-udp\"]\n", "not a tunnel kind"},
		{"fou on the tunnel port", "[paths]\nmode = \"auto\"\n[tunnels]\nfou_port = 4500\n", "tunnels.fou_port 4500 is tunnel.port"},
	} {
		if _, err := load(tc.conf); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error mentioning %q", tc.name, err, tc.want)
		}
	}
}
