package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/btmm/btmm/cmd/internal/metrics"
	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/netmon"
	"github.com/btmm/btmm/controlplane/path"
)

// Config is btmmd's configuration file (TOML). See docs/btmmd.md.
type Config struct {
	Host   string `toml:"host"`   // this host's label; default: the short hostname
	Domain string `toml:"domain"` // the user's domain, e.g. "alice.btmm.example."

	DNS struct {
		KeyFile  string `toml:"key_file"` // TSIG key in BIND syntax, mode 0600 (required)
		Zone     string `toml:"zone"`     // zone the server serves; default: domain without its first label
		Server   string `toml:"server"`   // update/LLQ server host:port; empty = discover by SRV
		Resolver string `toml:"resolver"` // resolver for discovery; empty = /etc/resolv.conf
		TLS      bool   `toml:"tls"`      // DNS over TLS to the server
		CAFile   string `toml:"ca_file"`  // CA for the server's certificate
		Lease    string `toml:"lease"`    // requested update lease, default 90m
		// AcceptUnsigned believes the server's unsigned answers and LLQ
		// events (a server that never signs, such as Apple's dnsextd);
		// default false: a response to a signed request must be signed.
		AcceptUnsigned bool `toml:"accept_unsigned"`
	} `toml:"dns"`

	Tunnel struct {
		Port      uint16 `toml:"port"`      // UDP tunnel + keying port, default 4500
		Dataplane string `toml:"dataplane"` // "xfrm" (default), "ebpf", "ebpf-cleartext" (INSECURE)
		Device    string `toml:"device"`    // eBPF: interface to attach to; default the default route's
		Keepalive string `toml:"keepalive"` // NAT keepalive interval (RFC 3948 §2.3), default 20s; "off" disables
	} `toml:"tunnel"`

	Network struct {
		Follow   *bool  `toml:"follow"`   // follow the host's own network (links, addresses, routes); default true
		Debounce string `toml:"debounce"` // collect a burst of network changes this long, default 250ms
	} `toml:"network"`

	NAT struct {
		Mode     string `toml:"mode"`     // "auto" (default: PCP, then NAT-PMP) or "off"
		External string `toml:"external"` // with mode "off": the address:port peers reach us at
	} `toml:"nat"`

	Keying struct {
		Mode      string `toml:"mode"`      // "kerberos" (default) or "psk"
		Keytab    string `toml:"keytab"`    // default /etc/krb5.keytab
		Krb5Conf  string `toml:"krb5_conf"` // default /etc/krb5.conf
		Principal string `toml:"principal"` // default host/<host>.<domain>
		Realm     string `toml:"realm"`
		PSKFile   string `toml:"psk_file"` // psk mode: shared secret, mode 0600
		// SALifetime / HardLifetime: rekey at 80% of the first; SAs that
		// reach the second (default twice the first) without a rekey are
		// removed, and a host whose principal was deleted is cut off
		// within it (docs/keying.md). Go durations, e.g. "1h".
		SALifetime   string `toml:"sa_lifetime"`
		HardLifetime string `toml:"hard_lifetime"`
		// ReplayCache keeps keying's replay cache across restarts; default
		// keying-replay beside state_file.
		ReplayCache string `toml:"replay_cache"`
		// Principals overrides the principal a peer must authenticate as,
		// by host name (default host/<host>.<domain>). Peers' TXT krb= is
		// never used.
		Principals map[string]string `toml:"principals"`
	} `toml:"keying"`

	Names struct {
		// Mode: "auto" (default): a DNS route to the stub in
		// systemd-resolved where it runs, else the hosts file block;
		// "resolved" or "hosts": only that one; "off".
		Mode      string `toml:"mode"`
		Listen    string `toml:"listen"`     // the name stub's address, default 127.0.0.77:53
		HostsFile string `toml:"hosts_file"` // default /etc/hosts
		// Search: with resolved, the domain is also a search domain
		// (`ping desk`); false: routing only (~domain). Default true.
		Search *bool `toml:"search"`
	} `toml:"names"`

	Metrics struct {
		Listen string `toml:"listen"` // Prometheus /metrics on this local ADDRESS:PORT; "" (default) = off
	} `toml:"metrics"`

	Paths struct {
		Mode       string   `toml:"mode"`       // "auto" (default: candidates, probes, relays) or "off"
		Servers    []string `toml:"servers"`    // btmm-relay/STUN ADDRESS:PORTs; empty: SRV _btmm-relay._udp.<domain>
		Preference []string `toml:"preference"` // path kinds, best first (docs/paths.md)
		Refresh    string   `toml:"refresh"`    // how often NAT behaviour and candidates are measured again (60s)
		Recheck    string   `toml:"recheck"`    // how often one STUN Binding checks between measurements that the NAT still maps us alike (15s)
		// TLSServers are the relays' TLS stream ports for relay-tcp (UDP
		// blocked): "NAME:PORT" (dialled by name) or "NAME@IPV4:PORT"
		// (dialled at the address); the certificate must name NAME. Empty:
		// SRV _btmm-relay._tcp.<domain>.
		TLSServers []string `toml:"tls_servers"`
		CAFile     string   `toml:"ca_file"` // CA for the relay's certificate; default dns.ca_file, else the system's
	} `toml:"paths"`

	// Tunnels are the tunnel path kinds (issue 15, docs/tunnels.md).
	Tunnels struct {
		// Mode: "auto" (default with paths.mode = "auto" set in the
		// file and the xfrm or ebpf dataplane) or "off" (ESP-in-UDP
		// only). ebpf-cleartext has no ESP: tunnels are refused there.
		Mode    string   `toml:"mode"`
		Kinds   []string `toml:"kinds"`    // of "ipv6", "sit", "fou" (default all three)
		FOUPort uint16   `toml:"fou_port"` // GUE port for fou, mapped like the tunnel port (default tunnel.port + 1)
	} `toml:"tunnels"`
	StateFile     string `toml:"state_file"`     // identity state, default /run/btmm/identity.json
	ControlSocket string `toml:"control_socket"` // default /run/btmm/btmmd.sock
	LogLevel      string `toml:"log_level"`      // debug, info (default), warn, error

	keepalive time.Duration // parsed Tunnel.Keepalive; negative: off
	debounce  time.Duration // parsed Network.Debounce

	path  string         // the file it was loaded from (reload reads it again)
	level *slog.LevelVar // the running log level (reload sets it)
}

func loadConfig(path string) (*Config, error) {
	var c Config
	md, err := toml.DecodeFile(path, &c)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		return nil, fmt.Errorf("config %s: unknown keys %v", path, und)
	}
	c.path = path
	return &c, c.fill()
}

func (c *Config) fill() error {
	var errs []error
	if c.Host == "" {
		h, err := os.Hostname()
		if err != nil {
			return err
		}
		c.Host, _, _ = strings.Cut(h, ".")
	}
	if c.Domain == "" {
		errs = append(errs, errors.New("domain is required (the user's domain, e.g. alice.btmm.example.)"))
	}
	if c.DNS.Zone == "" && c.Domain != "" {
		_, parent, ok := strings.Cut(strings.TrimSuffix(c.Domain, "."), ".")
		if !ok {
			errs = append(errs, fmt.Errorf("domain %q has no parent zone: set dns.zone", c.Domain))
		}
		c.DNS.Zone = parent + "."
	}
	if c.DNS.KeyFile == "" {
		errs = append(errs, errors.New("dns.key_file is required (TSIG key from `btmm-dnsd adduser`)"))
	}
	if c.Tunnel.Port == 0 {
		c.Tunnel.Port = 4500
	}
	switch c.Tunnel.Dataplane {
	case "":
		c.Tunnel.Dataplane = "xfrm"
	case "xfrm", "ebpf", "ebpf-cleartext":
	default:
		errs = append(errs, fmt.Errorf("tunnel.dataplane %q: want xfrm, ebpf or ebpf-cleartext", c.Tunnel.Dataplane))
	}
	switch c.Tunnel.Keepalive {
	case "":
		c.keepalive = agent.DefaultKeepalive
	case "off":
		c.keepalive = -1
	default:
		d, err := time.ParseDuration(c.Tunnel.Keepalive)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("tunnel.keepalive %q: want a duration like \"20s\", or \"off\"", c.Tunnel.Keepalive))
		case d < time.Second || d > time.Hour:
			errs = append(errs, fmt.Errorf("tunnel.keepalive %v: want between 1s and 1h (NATs drop idle UDP mappings after 30 s or more), or \"off\"", d))
		default:
			c.keepalive = d
		}
	}
	if c.Network.Follow == nil {
		yes := true
		c.Network.Follow = &yes
	}
	c.debounce = netmon.DefaultDebounce
	if c.Network.Debounce != "" {
		d, err := time.ParseDuration(c.Network.Debounce)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("network.debounce %q: want a duration like \"250ms\"", c.Network.Debounce))
		case d < 10*time.Millisecond || d > 10*time.Second:
			errs = append(errs, fmt.Errorf("network.debounce %v: want between 10ms and 10s", d))
		default:
			c.debounce = d
		}
	}
	switch c.NAT.Mode {
	case "":
		c.NAT.Mode = "auto"
	case "auto":
	case "off":
		if _, err := netip.ParseAddrPort(c.NAT.External); err != nil {
			errs = append(errs, fmt.Errorf("nat.mode off needs nat.external ADDRESS:PORT: %w", err))
		}
	default:
		errs = append(errs, fmt.Errorf("nat.mode %q: want auto or off", c.NAT.Mode))
	}
	switch c.Keying.Mode {
	case "", "kerberos":
		c.Keying.Mode = "kerberos"
		if c.Keying.Keytab == "" {
			c.Keying.Keytab = "/etc/krb5.keytab"
		}
		if c.Keying.Krb5Conf == "" {
			c.Keying.Krb5Conf = "/etc/krb5.conf"
		}
	case "psk":
		if c.Keying.PSKFile == "" {
			errs = append(errs, errors.New("keying.mode psk needs keying.psk_file"))
		}
	default:
		errs = append(errs, fmt.Errorf("keying.mode %q: want kerberos or psk", c.Keying.Mode))
	}
	switch c.Names.Mode {
	case "", "auto", "resolved", "hosts":
		if c.Names.Mode == "" {
			c.Names.Mode = "auto"
		}
		if c.Names.Search == nil {
			yes := true
			c.Names.Search = &yes
		}
		if c.Names.HostsFile == "" {
			c.Names.HostsFile = defaultHostsFile
		}
		if c.Names.Listen == "" {
			c.Names.Listen = defaultStubAddr
		} else if _, err := netip.ParseAddrPort(c.Names.Listen); err != nil {
			errs = append(errs, fmt.Errorf("names.listen: %w", err))
		}
	case "off":
	default:
		errs = append(errs, fmt.Errorf("names.mode %q: want auto, resolved, hosts or off", c.Names.Mode))
	}
	if err := metrics.CheckAddr(c.Metrics.Listen); err != nil {
		errs = append(errs, fmt.Errorf("metrics.listen: %w", err))
	}
	// Tunnel paths (issue 15) stay opt-in: they follow an explicit
	// paths.mode = "auto", not this default (fillTunnels).
	pathsExplicit := c.Paths.Mode != ""
	switch c.Paths.Mode {
	case "":
		// On by default, as a Tailscale user expects: with no relay/STUN
		// server published the checks still find LAN and direct paths.
		c.Paths.Mode = "auto"
	case "auto", "off":
	default:
		errs = append(errs, fmt.Errorf("paths.mode %q: want auto or off", c.Paths.Mode))
	}
	for _, sv := range c.Paths.Servers {
		if ap, err := netip.ParseAddrPort(sv); err != nil || !ap.Addr().Is4() {
			errs = append(errs, fmt.Errorf("paths.servers: %q is not IPv4:port", sv))
		}
	}
	for _, sv := range c.Paths.TLSServers {
		if _, err := parseStreamServer(sv); err != nil {
			errs = append(errs, fmt.Errorf("paths.tls_servers: %w", err))
		}
	}
	for name, v := range map[string]string{"refresh": c.Paths.Refresh, "recheck": c.Paths.Recheck} {
		if v == "" {
			continue
		}
		if d, err := time.ParseDuration(v); err != nil || d < time.Second {
			errs = append(errs, fmt.Errorf("paths.%s %q: want a duration >= 1s", name, v))
		}
	}
	for _, k := range c.Paths.Preference {
		if _, err := path.ParseKind(k); err != nil {
			errs = append(errs, fmt.Errorf("paths.preference: %w", err))
		}
	}
	errs = append(errs, c.fillTunnels(pathsExplicit))
	if c.StateFile == "" {
		c.StateFile = "/run/btmm/identity.json"
	}
	errs = append(errs, c.fillKeying())
	if c.ControlSocket == "" {
		c.ControlSocket = "/run/btmm/btmmd.sock"
	}
	return errors.Join(errs...)
}

// fillTunnels checks [tunnels] and fills in its defaults.
//
// pathsExplicit: paths.mode was set in the file. Tunnels default to on only
// with an explicit paths.mode = "auto" (and ESP: xfrm or ebpf), so that
// turning path selection on by default changed nothing else. A tunnel never
// carries cleartext ULA traffic, so ebpf-cleartext has none.
func (c *Config) fillTunnels(pathsExplicit bool) error {
	t := &c.Tunnels
	switch t.Mode {
	case "":
		t.Mode = "off"
		if pathsExplicit && c.Paths.Mode == "auto" && c.Tunnel.Dataplane != "ebpf-cleartext" {
			t.Mode = "auto"
		}
	case "off":
	case "auto":
		if c.Paths.Mode != "auto" {
			return errors.New(`tunnels.mode auto needs paths.mode = "auto" (the path checks choose among the kinds)`)
		}
		if c.Tunnel.Dataplane == "ebpf-cleartext" {
			return errors.New(`tunnels.mode auto: the ebpf-cleartext dataplane has no ESP and a tunnel never carries cleartext ULA traffic (docs/tunnels.md); use tunnel.dataplane = "ebpf" or "xfrm", or tunnels.mode = "off"`)
		}
	default:
		return fmt.Errorf("tunnels.mode %q: want auto or off", t.Mode)
	}
	if t.Kinds == nil {
		t.Kinds = []string{"ipv6", "sit", "fou"}
	}
	var errs []error
	for _, k := range t.Kinds {
		if kind, err := path.ParseKind(k); err != nil || !kind.Tunnel() {
			errs = append(errs, fmt.Errorf("tunnels.kinds: %q is not a tunnel kind (want ipv6, sit or fou)", k))
		}
	}
	if slices.Contains(t.Kinds, "fou") {
		if t.FOUPort == 0 && t.Mode == "auto" {
			t.FOUPort = c.Tunnel.Port + 1
		}
		if t.FOUPort != 0 && t.FOUPort == c.Tunnel.Port {
			errs = append(errs, fmt.Errorf("tunnels.fou_port %d is tunnel.port: GUE needs a port of its own", t.FOUPort))
		}
	} else {
		t.FOUPort = 0
	}
	return errors.Join(errs...)
}
