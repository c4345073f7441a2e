package main

import (
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/names"
)

// Defaults of the [names] section.
const (
	defaultStubAddr  = "127.0.0.77:53"
	defaultHostsFile = "/etc/hosts"
)

// runNames keeps this host and its peers resolvable by name (package
// names) until ctx ends: the stub answers from the peer table, the managed
// block in the hosts file lists the same names. At the end the block is
// removed and the stub closed; done is closed after that.
func runNames(ctx context.Context, cfg *Config, a *agent.Agent, log *slog.Logger) (done <-chan struct{}) {
	ch := make(chan struct{})
	if cfg.Names.Mode == "off" {
		close(ch)
		return ch
	}
	table := names.NewTable(cfg.Domain)
	self := cfg.Host + "." + strings.TrimSuffix(cfg.Domain, ".")
	var stub *names.Stub
	if ap, err := netip.ParseAddrPort(cfg.Names.Listen); err == nil {
		if stub, err = names.ListenStub(ap, table, log); err != nil {
			log.Warn("name stub not started; names resolve through the hosts file only", "err", err)
		} else {
			log.Info("name stub", "listen", stub.Addr, "domain", table.Domain())
		}
	}
	go func() {
		defer close(ch)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		failed := false
		for {
			st := a.Status(ctx)
			hosts := []names.Host{{Name: cfg.Host, ULA: st.ULA}}
			for _, p := range st.Peers {
				hosts = append(hosts, names.Host{Name: p.Name, ULA: p.ULA})
			}
			if table.Set(hosts) || failed {
				err := names.WriteHosts(cfg.Names.HostsFile, self, cfg.Domain, table.Hosts())
				if err != nil && !failed {
					log.Warn("hosts file not updated", "file", cfg.Names.HostsFile, "err", err)
				}
				failed = err != nil
			}
			select {
			case <-ctx.Done():
				if err := names.WriteHosts(cfg.Names.HostsFile, self, cfg.Domain, nil); err != nil {
					log.Warn("removing our block from the hosts file", "file", cfg.Names.HostsFile, "err", err)
				}
				if stub != nil {
					stub.Close()
				}
				return
			case <-tick.C:
			}
		}
	}()
	return ch
}
