package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/btmm/btmm/cmd/internal/metrics"
	"github.com/btmm/btmm/dns/server"
)

// dnsdMetrics are btmm-dnsd's Prometheus metrics (metrics_listen).
type dnsdMetrics struct {
	reg     *prometheus.Registry
	updates *prometheus.CounterVec
	latency prometheus.Histogram
	events  prometheus.Counter
	fanout  prometheus.Histogram
	change  prometheus.Histogram // committed change to its last LLQ event sent
	fsync   prometheus.Histogram // store fsync latency
}

func newDNSDMetrics() *dnsdMetrics {
	m := &dnsdMetrics{
		reg: prometheus.NewRegistry(),
		updates: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "btmm_dnsd_updates_total",
			Help: "Authenticated UPDATEs answered, by result (the answer's rcode)."}, []string{"result"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "btmm_dnsd_update_seconds",
			Help:    "Time from an authenticated UPDATE to its answer (includes the store's fsync).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		events: prometheus.NewCounter(prometheus.CounterOpts{Name: "btmm_dnsd_llq_events_total",
			Help: "LLQ events sent (retransmissions included)."}),
		fanout: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "btmm_dnsd_llq_fanout_seconds",
			Help:    "Time to sign and send the LLQ events of one change (or retransmission round) to all its LLQs.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16)}),
	}
	m.change = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "btmm_dnsd_llq_event_seconds",
		Help:    "Time from a committed change to the last of its LLQ events sent (first transmissions; one observation per change).",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16)})
	m.fsync = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "btmm_dnsd_store_fsync_seconds",
		Help:    "Duration of each fsync of the embedded store's log (a group commit).",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16)})
	m.reg.MustRegister(m.updates, m.latency, m.events, m.fanout, m.change, m.fsync)
	return m
}

// hook sets the server's metrics callbacks.
func (m *dnsdMetrics) hook(cfg *server.Config) {
	cfg.OnUpdate = m.observe
	cfg.OnEvents = m.observeEvents
	cfg.OnLLQChange = func(_ int, took time.Duration) { m.change.Observe(took.Seconds()) }
	cfg.OnStoreSync = func(took time.Duration) { m.fsync.Observe(took.Seconds()) }
}

// observe is server.Config.OnUpdate.
func (m *dnsdMetrics) observe(rcode int, took time.Duration) {
	result := dns.RcodeToString[rcode]
	if rcode < 0 || result == "" {
		result = "none"
	}
	m.updates.WithLabelValues(result).Inc()
	m.latency.Observe(took.Seconds())
}

// observeEvents is server.Config.OnEvents.
func (m *dnsdMetrics) observeEvents(n int, took time.Duration) {
	m.events.Add(float64(n))
	m.fanout.Observe(took.Seconds())
}

// serve adds the live server's gauges and serves everything on addr.
func (m *dnsdMetrics) serve(ctx context.Context, addr string, srv *server.Server, log *slog.Logger) error {
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "btmm_dnsd_llqs",
		Help: "Established Long-Lived Queries."}, func() float64 { return float64(srv.LLQs()) }))
	return metrics.Serve(ctx, addr, m.reg, log)
}
