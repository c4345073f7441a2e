package main

import (
	"context"
	"log/slog"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/natpmp"
)

// natFunc keeps the tunnel port mapped on the gateway with PCP / NAT-PMP
// (package natpmp) and reports the external endpoint to the agent.
func natFunc(log *slog.Logger) agent.NATFunc {
	return func(ctx context.Context, port uint16, report func(agent.NATReport)) error {
		req := natpmp.MappingRequest{Protocol: natpmp.UDP, InternalPort: port}
		c, err := natpmp.New(natpmp.Config{Logger: log, Mappings: []natpmp.MappingRequest{req}})
		if err != nil {
			return err
		}
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
				report(agent.NATReport{External: ext, Status: st.String()})
			}
		}
	}
}
