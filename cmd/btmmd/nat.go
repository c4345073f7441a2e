package main

import (
	"context"
	"log/slog"
	"strings"
	"sync"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/natpmp"
)

// natFunc keeps the tunnel port mapped on the gateway with PCP / NAT-PMP
// (package natpmp) and reports the external endpoint to the agent.
// rediscover makes the running client look for the gateway again at once
// (after this host's network changed).
//
// fouPort (0: none) is mapped beside it (issue 15: the GUE port of fou
// tunnels) and reported as NATReport.FOU.
func natFunc(log *slog.Logger, fouPort uint16) (run agent.NATFunc, rediscover func()) {
	var mu sync.Mutex
	var current *natpmp.Client
	rediscover = func() {
		mu.Lock()
		defer mu.Unlock()
		if current != nil {
			current.Rediscover()
		}
	}
	return func(ctx context.Context, port uint16, report func(agent.NATReport)) error {
		reqs := []natpmp.MappingRequest{{Protocol: natpmp.UDP, InternalPort: port}}
		if fouPort != 0 {
			reqs = append(reqs, natpmp.MappingRequest{Protocol: natpmp.UDP, InternalPort: fouPort})
		}
		c, err := natpmp.New(natpmp.Config{Logger: log, Mappings: reqs})
		if err != nil {
			return err
		}
		mu.Lock()
		current = c
		mu.Unlock()
		defer func() {
			mu.Lock()
			current = nil
			mu.Unlock()
		}()
		updates, unsubscribe := c.Subscribe()
		defer unsubscribe()
		done := make(chan error, 1)
		go func() { done <- c.Run(ctx) }()
		for {
			select {
			case err := <-done:
				return err
			case st, ok := <-updates:
				if !ok {
					return <-done
				}
				ext, _ := st.Endpoint(natpmp.UDP, port)
				r := agent.NATReport{External: ext, Status: natStatus(st), BehindNAT: behindNAT(st)}
				if fouPort != 0 {
					r.FOU, _ = st.Endpoint(natpmp.UDP, fouPort)
				}
				report(r)
			}
		}
	}, rediscover
}

// behindNAT: is our tunnel port behind a NAT (so keepalives are needed)?
// Only a public address, or no gateway on a public address, says no.
func behindNAT(st natpmp.Status) bool {
	switch st.State {
	case natpmp.StatePublic:
		return false
	case natpmp.StateNoGateway:
		return natpmp.IsPrivate(st.Local) || natpmp.IsCGNAT(st.Local)
	}
	return true
}

// natStatus is the NAT side's state for btmmctl status. Without an IPv4
// default route (an IPv6-only host) there is nothing to map, which is no
// failure: natpmp looks again quietly every RetryInterval, and peers reach
// this host at its c-v6 endpoint (docs/tunnels.md).
func natStatus(st natpmp.Status) string {
	if st.State == natpmp.StateFailed && strings.Contains(st.Detail, natpmp.ErrNoRoute.Error()) {
		return "no IPv4 default route: no NAT mapping and no IPv4 endpoint published (IPv6-only: peers reach this host at its c-v6 endpoint)"
	}
	return st.String()
}
