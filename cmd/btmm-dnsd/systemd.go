package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// sdNotify sends one sd_notify(3) message (a no-op outside systemd).
func sdNotify(log *slog.Logger, state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.Debug("sd_notify", "err", err)
	}
}

// watchdog feeds systemd's watchdog (WatchdogSec=) while alive answers.
func watchdog(ctx context.Context, log *slog.Logger, alive func() bool) {
	wd, _ := daemon.SdWatchdogEnabled(false)
	if wd <= 0 {
		return
	}
	t := time.NewTicker(wd / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if alive() {
				sdNotify(log, "WATCHDOG=1")
			}
		}
	}
}

// watchKeys calls reload whenever the set of files in dir (names, sizes,
// modification times) changes, so keys made by `btmm-dnsd adduser` (or
// removed by deluser) are live within a second, without a signal.
func watchKeys(ctx context.Context, dir string, every time.Duration, reload func() error, log *slog.Logger) {
	last := dirState(dir)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := dirState(dir)
		if slices.Equal(now, last) {
			continue
		}
		if err := reload(); err != nil {
			log.Error("reload keys after a change in the key directory", "dir", dir, "err", err)
			continue // try again at the next tick
		}
		log.Info("keys reloaded: key directory changed", "dir", dir)
		last = now
	}
}

func dirState(dir string) []string {
	ents, _ := os.ReadDir(dir)
	var out []string
	for _, e := range ents {
		info, err := e.Info()
		if err != nil {
			continue
		}
		out = append(out, fmt.Sprintf("%s %d %d", e.Name(), info.Size(), info.ModTime().UnixNano()))
	}
	return out
}

// keyDir is where `btmm-dnsd adduser` stores keys (server.NewUsers).
func keyDir(dataDir string) string { return filepath.Join(dataDir, "keys") }
