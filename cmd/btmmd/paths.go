package main

import (
	"context"
	"encoding/base64"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/controlplane/relay"
	"github.com/btmm/btmm/dns/register"
)

// pathsConfig turns [paths] into the agent's path selection (docs/paths.md):
// relay/STUN servers from the config or SRV _btmm-relay._udp.<domain>, relay
// allocations signed with the host's TSIG key.
func pathsConfig(cfg *Config, key *register.Key) (*agent.PathsConfig, error) {
	if cfg.Paths.Mode == "off" {
		return nil, nil
	}
	secret, err := base64.StdEncoding.DecodeString(key.Secret())
	if err != nil {
		return nil, fmt.Errorf("paths: TSIG key: %w", err)
	}
	pc := &agent.PathsConfig{Cred: relay.Credential{Name: key.Name, Secret: secret},
		Cleartext: cfg.Tunnel.Dataplane == "ebpf-cleartext"}
	ca := cfg.Paths.CAFile
	if ca == "" {
		ca = cfg.DNS.CAFile
	}
	if ca != "" {
		tc, err := tlsConfig(ca)
		if err != nil {
			return nil, fmt.Errorf("paths: %w", err)
		}
		pc.StreamRoots = tc.RootCAs
	}
	if len(cfg.Paths.TLSServers) > 0 {
		var ss []agent.StreamServer
		for _, s := range cfg.Paths.TLSServers {
			st, _ := parseStreamServer(s) // checked by fill
			ss = append(ss, st)
		}
		pc.StreamServers = func(context.Context) ([]agent.StreamServer, error) { return ss, nil }
	}
	pc.Refresh, _ = time.ParseDuration(cfg.Paths.Refresh) // checked by fill; "" is the default
	pc.Recheck, _ = time.ParseDuration(cfg.Paths.Recheck)
	for _, k := range cfg.Paths.Preference {
		kind, _ := path.ParseKind(k) // checked by fill
		pc.Preference = append(pc.Preference, kind)
	}
	if len(cfg.Paths.Servers) > 0 {
		var servers []netip.AddrPort
		for _, s := range cfg.Paths.Servers {
			servers = append(servers, netip.MustParseAddrPort(s))
		}
		pc.Servers = func(context.Context) ([]netip.AddrPort, error) { return servers, nil }
		if pc.StreamServers == nil {
			resolver, err := discoveryResolver(cfg)
			if err == nil {
				pc.StreamServers = agent.SRVStreamServers(resolver, cfg.Domain)
			}
		}
		return pc, nil
	}
	resolver, err := discoveryResolver(cfg)
	if err != nil {
		return nil, err
	}
	pc.Servers = agent.SRVServers(resolver, cfg.Domain)
	if pc.StreamServers == nil {
		pc.StreamServers = agent.SRVStreamServers(resolver, cfg.Domain)
	}
	return pc, nil
}

// discoveryResolver is where relays are looked up: dns.resolver, else the
// first nameserver of /etc/resolv.conf.
func discoveryResolver(cfg *Config) (string, error) {
	if cfg.DNS.Resolver != "" {
		return cfg.DNS.Resolver, nil
	}
	cc, err := dns.ClientConfigFromFile("/etc/resolv.conf")
	if err != nil || len(cc.Servers) == 0 {
		return "", fmt.Errorf("paths: no paths.servers, no dns.resolver and no nameserver in /etc/resolv.conf to find _btmm-relay._udp")
	}
	return net.JoinHostPort(cc.Servers[0], cc.Port), nil
}

// parseStreamServer reads "NAME:PORT" or "NAME@IPV4:PORT" (paths.tls_servers).
func parseStreamServer(s string) (agent.StreamServer, error) {
	name, addr, at := strings.Cut(s, "@")
	if !at {
		h, _, err := net.SplitHostPort(s)
		if err != nil || h == "" {
			return agent.StreamServer{}, fmt.Errorf("%q: want NAME:PORT or NAME@IPV4:PORT", s)
		}
		return agent.StreamServer{Name: h, Addr: s}, nil
	}
	if ap, err := netip.ParseAddrPort(addr); err != nil || !ap.Addr().Is4() || name == "" {
		return agent.StreamServer{}, fmt.Errorf("%q: want NAME:PORT or NAME@IPV4:PORT", s)
	}
	return agent.StreamServer{Name: name, Addr: addr}, nil
}
