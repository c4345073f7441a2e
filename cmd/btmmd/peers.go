package main

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"strings"
	"sync"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/dns/llqclient"
	"github.com/btmm/btmm/dns/peers"
	"github.com/btmm/btmm/dns/register"
)

// peersFunc tracks the user's other hosts with Long-Lived Queries (package
// llqclient, falling back to polling) through package peers. rebind sets the
// LLQs up again after our address changed; llq reports the LLQ client's
// state (false before it exists).
func peersFunc(cfg *Config, key *register.Key, tc *tls.Config, log *slog.Logger) (run agent.PeersFunc, rebind func(), llq func() (llqclient.Status, bool)) {
	var mu sync.Mutex
	var current *llqclient.Client
	rebind = func() {
		mu.Lock()
		defer mu.Unlock()
		if current != nil {
			current.Rebind()
		}
	}
	llq = func() (llqclient.Status, bool) {
		mu.Lock()
		defer mu.Unlock()
		if current == nil {
			return llqclient.Status{}, false
		}
		return current.Status(), true
	}
	return func(ctx context.Context, report func(agent.PeerEvent)) error {
		lc, err := llqclient.New(llqclient.Config{Server: cfg.DNS.Server, Domain: cfg.Domain, Resolver: cfg.DNS.Resolver, Key: key, TLS: tc,
			AcceptUnsigned: cfg.DNS.AcceptUnsigned}, log)
		if err != nil {
			return err
		}
		mu.Lock()
		current = lc
		mu.Unlock()
		self := cfg.Host + "." + strings.TrimSuffix(cfg.Domain, ".") + "."
		tr := peers.New(peers.Config{Domain: cfg.Domain, Self: self}, lc, log)
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		errc := make(chan error, 2)
		go func() { errc <- lc.Run(ctx) }()
		go func() { errc <- tr.Run(ctx) }()
		for ev := range tr.Events() {
			p := ev.Peer
			host, _, _ := strings.Cut(p.Name, ".")
			report(agent.PeerEvent{Removed: ev.Kind == peers.Removed, Name: host, ULA: p.ULA, Outer: p.Outer, Capabilities: p.Capabilities})
		}
		cancel()
		return errors.Join(<-errc, <-errc)
	}, rebind, llq
}
