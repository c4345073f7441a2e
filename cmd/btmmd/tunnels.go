package main

import (
	"log/slog"
	"slices"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/kernelprobe"
)

// tunnelsConfig turns [tunnels] into the agent's tunnel paths
// (docs/tunnels.md): each kind configured whose kernel device exists here
// (a kind the kernel lacks is logged and left out, as is every kind
// without xfrm interfaces on the xfrm dataplane; the ebpf one needs none).
// nil: ESP-in-UDP only.
func tunnelsConfig(cfg *Config, log *slog.Logger) *agent.TunnelsConfig {
	if cfg.Tunnels.Mode != "auto" || len(cfg.Tunnels.Kinds) == 0 {
		return nil
	}
	if cfg.Tunnel.Dataplane == "ebpf-cleartext" {
		return nil // refused by the configuration check already
	}
	if err := kernelprobe.Probe(kernelprobe.XfrmIface); err != nil && cfg.Tunnel.Dataplane == "xfrm" {
		log.Warn("tunnels off: the kernel has no xfrm interfaces (the transport-mode policies need them)", "err", err)
		return nil
	}
	has := func(kind string, f kernelprobe.Feature) bool {
		if !slices.Contains(cfg.Tunnels.Kinds, kind) {
			return false
		}
		if err := kernelprobe.Probe(f); err != nil {
			log.Warn("tunnels: this kernel cannot make the device; kind left out", "kind", kind, "err", err)
			return false
		}
		return true
	}
	tc := &agent.TunnelsConfig{IPv6: has("ipv6", kernelprobe.IP6Tnl), Sit: has("sit", kernelprobe.Sit)}
	if has("fou", kernelprobe.FOU) && (tc.Sit || kernelprobe.Probe(kernelprobe.Sit) == nil) {
		tc.FOUPort = cfg.Tunnels.FOUPort
	}
	if !tc.IPv6 && !tc.Sit && tc.FOUPort == 0 {
		return nil
	}
	log.Info("tunnels", "ipv6", tc.IPv6, "sit", tc.Sit, "fou_port", tc.FOUPort)
	return tc
}
