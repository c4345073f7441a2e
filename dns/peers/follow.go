package peers

import (
	"context"
	"log/slog"
	"sync"
)

// Runner is what Follow needs of an LLQ client besides Watch
// (*llqclient.Client implements it).
type Runner interface {
	Watcher
	Run(ctx context.Context) error
}

// Follow runs the LLQ client c and a Tracker over it until ctx ends, calling
// report for every event in order (report must not block for long). It is
// the shape a control plane wants as its peer input:
//
//	err := peers.Follow(ctx, llqClient, peers.Config{Domain: d, Self: self}, log, func(ev peers.Event) { ... })
//
// Keep c to read its Status. Follow returns nil after a clean shutdown.
func Follow(ctx context.Context, c Runner, cfg Config, log *slog.Logger, report func(Event)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	t := New(cfg, c, log)
	var wg sync.WaitGroup
	var runErr error
	wg.Go(func() { runErr = c.Run(ctx) })
	wg.Go(func() { t.Run(ctx) })
	for ev := range t.Events() {
		report(ev)
	}
	cancel()
	wg.Wait()
	return runErr
}
