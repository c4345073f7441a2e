// Command btmm-dnsd: see the usage text below (`btmm-dnsd --help`).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/btmm/btmm/cmd/internal/cli"
	"github.com/btmm/btmm/cmd/internal/metrics"
	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/dns/store"
)

const synopsis = `btmm-dnsd: the btmm rendezvous DNS server (RFC 2136 updates with TSIG,
update leases, Long-Lived Queries, DNS over TLS).

Usage:
  btmm-dnsd [flags]                          serve (config file, see docs/dnsd.md)
  btmm-dnsd [flags] adduser USER [ALGORITHM] create USER, print its TSIG key
                                             (BIND key clause; ALGORITHM hmac-sha256
                                             (default), hmac-sha512 or hmac-md5);
                                             it may change all of USER's zone
  btmm-dnsd [flags] addhost USER HOST [ALGORITHM]
                                             create a key for HOST of USER, print it;
                                             it may change only HOST's own names
  btmm-dnsd [flags] delhost USER HOST        delete HOST's key and remove its records
                                             at once (a running server is told)
  btmm-dnsd [flags] deluser USER             delete USER's and its hosts' keys and
                                             remove the user's records
  btmm-dnsd [flags] enroll [-realm R | -psk-file F] USER HOST
                                             print an enrollment bundle for a new host
                                             (btmmctl enroll installs it; see
                                             btmm-dnsd enroll -h)
  btmm-dnsd [flags] check                    report the state of the embedded store
                                             (exit status 1 when it is damaged)
  btmm-dnsd [flags] repair                   keep a copy of a damaged store's files,
                                             salvage every intact record (server stopped)`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := cli.NewFlagSet("btmm-dnsd", synopsis)
	conf := fs.String("config", "/etc/btmm/dnsd.toml", "config file (TOML)")
	debug := fs.Bool("debug", false, "log debug messages")
	if done, code := fs.Parse(args, stdout, stderr); done {
		return code
	}
	cfg, err := server.LoadConfig(*conf)
	if err != nil {
		fmt.Fprintln(stderr, "btmm-dnsd:", err)
		return 1
	}
	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	rest := fs.Args()
	if len(rest) > 0 {
		if err := admin(cfg, rest, stdout); err != nil {
			fmt.Fprintln(stderr, "btmm-dnsd:", err)
			return 1
		}
		return 0
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := serve(ctx, cfg, log); err != nil {
		fmt.Fprintln(stderr, "btmm-dnsd:", err)
		if errors.Is(err, store.ErrCorrupt) {
			fmt.Fprintln(stderr, "btmm-dnsd: nothing was changed on disk; run `btmm-dnsd check` for a report and `btmm-dnsd repair` to salvage the intact records")
		}
		return 1
	}
	return 0
}

func admin(cfg server.Config, args []string, stdout io.Writer) error {
	if cfg.Zone == "" || cfg.DataDir == "" {
		return errors.New("config: zone and data_dir are required")
	}
	if handled, err := keyCommand(cfg, args, stdout); handled {
		return err
	}
	switch {
	case args[0] == "enroll":
		return enrollCommand(cfg, args[1:], stdout, os.Stderr)
	case args[0] == "check" && len(args) == 1:
		return check(cfg, stdout)
	case args[0] == "repair" && len(args) == 1:
		return repair(cfg, stdout)
	}
	return fmt.Errorf("unknown command %q (see --help)", args)
}

func serve(ctx context.Context, cfg server.Config, log *slog.Logger) error {
	if err := metrics.CheckAddr(cfg.MetricsListen); err != nil {
		return fmt.Errorf("metrics_listen: %w", err)
	}
	m := newDNSDMetrics()
	if cfg.MetricsListen != "" {
		m.hook(&cfg)
	}
	srv, err := server.New(cfg, log)
	if err != nil {
		return err
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	if _, err := srv.Start(ctx); err != nil {
		srv.Close()
		return err
	}
	if cfg.MetricsListen != "" {
		if err := m.serve(ctx, cfg.MetricsListen, srv, log); err != nil {
			srv.Close()
			return err
		}
	}
	// systemd.go: readiness, watchdog, keys picked up without a signal.
	sdNotify(log, "READY=1\nSTATUS=serving "+cfg.Zone)
	go watchdog(ctx, log, func() bool { srv.LLQs(); return true })
	go watchKeys(ctx, keyDir(cfg.DataDir), time.Second, srv.ReloadKeys, log)
	for {
		select {
		case <-ctx.Done():
			sdNotify(log, "STOPPING=1")
			return srv.Close()
		case <-hup:
			sdNotify(log, "RELOADING=1")
			if err := srv.ReloadKeys(); err != nil {
				log.Error("reload keys", "err", err)
			} else {
				log.Info("keys reloaded")
			}
			sdNotify(log, "READY=1")
		}
	}
}
