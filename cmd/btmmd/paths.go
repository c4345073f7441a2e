package main

import (
	"context"
	"encoding/base64"
	"fmt"
	"net"
	"net/netip"
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
	pc := &agent.PathsConfig{Cred: relay.Credential{Name: key.Name, Secret: secret}}
	pc.Refresh, _ = time.ParseDuration(cfg.Paths.Refresh) // checked by fill; "" is the default
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
		return pc, nil
	}
	resolver := cfg.DNS.Resolver
	if resolver == "" {
		cc, err := dns.ClientConfigFromFile("/etc/resolv.conf")
		if err != nil || len(cc.Servers) == 0 {
			return nil, fmt.Errorf("paths: no paths.servers, no dns.resolver and no nameserver in /etc/resolv.conf to find _btmm-relay._udp")
		}
		resolver = net.JoinHostPort(cc.Servers[0], cc.Port)
	}
	pc.Servers = agent.SRVServers(resolver, cfg.Domain)
	return pc, nil
}
