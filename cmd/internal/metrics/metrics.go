// Package metrics serves a daemon's Prometheus metrics (text exposition
// format, github.com/prometheus/client_golang) on a configured local
// address. It is off unless an address is configured.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// CheckAddr validates a metrics listen address: empty (off) or a
// loopback or otherwise local ADDRESS:PORT; a wildcard is refused, so
// metrics are never exposed on every interface by a typo.
func CheckAddr(s string) error {
	if s == "" {
		return nil
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return fmt.Errorf("metrics address %q: want ADDRESS:PORT, e.g. 127.0.0.1:9477: %w", s, err)
	}
	if ap.Addr().IsUnspecified() {
		return fmt.Errorf("metrics address %q: a wildcard address exposes metrics on every interface; name one address", s)
	}
	return nil
}

// Serve serves reg (plus Go runtime and process metrics) at /metrics on
// addr until ctx ends. It returns once listening; errors after that are
// logged.
func Serve(ctx context.Context, addr string, reg *prometheus.Registry, log *slog.Logger) error {
	if err := CheckAddr(addr); err != nil || addr == "" {
		return err
	}
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		shut, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(shut)
	}()
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("metrics server stopped", "err", err)
		}
	}()
	log.Info("metrics", "listen", l.Addr().String(), "path", "/metrics")
	return nil
}
