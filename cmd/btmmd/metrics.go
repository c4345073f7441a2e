package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/btmm/btmm/cmd/internal/metrics"
	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/dns/llqclient"
)

// collector exposes btmmd's state as Prometheus metrics, read at each
// scrape from the agent (kernel counters through the dataplane) and the
// LLQ client. It holds no key material.
type collector struct {
	status func(context.Context) agent.Status // the agent's Status
	llq    func() (llqclient.Status, bool)
	now    func() time.Time
}

var (
	descPeerBytes   = prometheus.NewDesc("btmm_peer_bytes_total", "Inner bytes through the tunnel to/from a peer (kernel counters).", []string{"peer", "direction"}, nil)
	descPeerPackets = prometheus.NewDesc("btmm_peer_packets_total", "Inner packets through the tunnel to/from a peer (kernel counters).", []string{"peer", "direction"}, nil)
	descPeerDrops   = prometheus.NewDesc("btmm_peer_drops_total", "Packets of a peer the kernel dropped (replay, integrity, no state).", []string{"peer"}, nil)
	descPeerKeyed   = prometheus.NewDesc("btmm_peer_keyed", "1 if the peer has SAs keyed by the current exchange.", []string{"peer"}, nil)
	descPeerKernel  = prometheus.NewDesc("btmm_peer_in_kernel", "1 if the peer's SAs, policies and route are in the kernel.", []string{"peer"}, nil)
	descPeerKeyErr  = prometheus.NewDesc("btmm_peer_keying_failing", "1 while the last keying exchange with the peer failed.", []string{"peer"}, nil)
	descPeers       = prometheus.NewDesc("btmm_peers", "The user's other hosts known from DNS.", nil, nil)
	descRegistered  = prometheus.NewDesc("btmm_registration_published", "1 while this host's records are on the server.", nil, nil)
	descRegAge      = prometheus.NewDesc("btmm_registration_age_seconds", "Seconds since the records were last published or refreshed.", nil, nil)
	descRegFail     = prometheus.NewDesc("btmm_registration_failures", "Consecutive failed registration attempts.", nil, nil)
	descLLQ         = prometheus.NewDesc("btmm_llq_questions", "Watched questions by LLQ state (llq: pushed; setup; polling: LLQ unavailable).", []string{"state"}, nil)
	descNAT         = prometheus.NewDesc("btmm_nat_external_known", "1 while the external (mapped or static) tunnel endpoint is known.", []string{"status"}, nil)
	descPeerHealth  = prometheus.NewDesc("btmm_peer_health", "1 for the peer's current health state (ok, stale, unreachable), 0 for the others.", []string{"peer", "state"}, nil)
	descKeyAttempts = prometheus.NewDesc("btmm_keying_attempts_total", "Key exchanges this host started as initiator.", nil, nil)
	descKeyFailures = prometheus.NewDesc("btmm_keying_failures_total", "Key exchanges this host started that failed, by reason (timeout, clock_skew, unknown_principal, ...).", []string{"reason"}, nil)
	descKeyRefused  = prometheus.NewDesc("btmm_keying_inits_refused_total", "Peers' INITs this host refused (answered with ERROR or ignored).", nil, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPeerBytes, descPeerPackets, descPeerDrops, descPeerKeyed, descPeerKernel, descPeerKeyErr,
		descPeers, descRegistered, descRegAge, descRegFail, descLLQ, descNAT, descPeerHealth, descKeyAttempts, descKeyFailures, descKeyRefused} {
		ch <- d
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st := c.status(ctx)
	names := map[string]string{}
	ch <- prometheus.MustNewConstMetric(descPeers, prometheus.GaugeValue, float64(len(st.Peers)))
	for _, p := range st.Peers {
		names[p.ULA.String()] = p.Name
		ch <- prometheus.MustNewConstMetric(descPeerKeyed, prometheus.GaugeValue, b2f(p.Keyed), p.Name)
		ch <- prometheus.MustNewConstMetric(descPeerKernel, prometheus.GaugeValue, b2f(p.InKernel), p.Name)
		ch <- prometheus.MustNewConstMetric(descPeerKeyErr, prometheus.GaugeValue, b2f(p.KeyingError != ""), p.Name)
		for _, state := range []string{agent.HealthOK, agent.HealthStale, agent.HealthUnreachable} {
			ch <- prometheus.MustNewConstMetric(descPeerHealth, prometheus.GaugeValue, b2f(p.Health.State == state), p.Name, state)
		}
	}
	if k := st.KeyingStats; k != nil {
		ch <- prometheus.MustNewConstMetric(descKeyAttempts, prometheus.CounterValue, float64(k.Attempts))
		ch <- prometheus.MustNewConstMetric(descKeyRefused, prometheus.CounterValue, float64(k.InitsRefused))
		for reason, n := range k.Failures {
			ch <- prometheus.MustNewConstMetric(descKeyFailures, prometheus.CounterValue, float64(n), reason)
		}
	}
	for _, s := range st.Counters {
		name := names[s.ULA.String()]
		if name == "" {
			name = s.ULA.String()
		}
		ch <- prometheus.MustNewConstMetric(descPeerBytes, prometheus.CounterValue, float64(s.TxBytes), name, "tx")
		ch <- prometheus.MustNewConstMetric(descPeerBytes, prometheus.CounterValue, float64(s.RxBytes), name, "rx")
		ch <- prometheus.MustNewConstMetric(descPeerPackets, prometheus.CounterValue, float64(s.TxPackets), name, "tx")
		ch <- prometheus.MustNewConstMetric(descPeerPackets, prometheus.CounterValue, float64(s.RxPackets), name, "rx")
		ch <- prometheus.MustNewConstMetric(descPeerDrops, prometheus.CounterValue, float64(s.Drops), name)
	}
	r := st.Register
	ch <- prometheus.MustNewConstMetric(descRegistered, prometheus.GaugeValue, b2f(r.Published))
	if !r.LastSuccess.IsZero() {
		ch <- prometheus.MustNewConstMetric(descRegAge, prometheus.GaugeValue, c.now().Sub(r.LastSuccess).Seconds())
	}
	ch <- prometheus.MustNewConstMetric(descRegFail, prometheus.GaugeValue, float64(r.Failures))
	modes := map[llqclient.Mode]int{llqclient.ModeLLQ: 0, llqclient.ModeSetup: 0, llqclient.ModePolling: 0}
	if l, ok := c.llq(); ok {
		for _, q := range l.Queries {
			modes[q.Mode]++
		}
	}
	for m, n := range modes {
		ch <- prometheus.MustNewConstMetric(descLLQ, prometheus.GaugeValue, float64(n), string(m))
	}
	ch <- prometheus.MustNewConstMetric(descNAT, prometheus.GaugeValue, b2f(st.NAT.External.IsValid()), st.NAT.Status)
}

// startMetrics serves the collector on cfg.Metrics.Listen (nothing when
// empty: metrics are off by default).
func startMetrics(ctx context.Context, cfg *Config, a *agent.Agent, llq func() (llqclient.Status, bool), log *slog.Logger) error {
	if cfg.Metrics.Listen == "" {
		return nil
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(&collector{status: a.Status, llq: llq, now: time.Now})
	return metrics.Serve(ctx, cfg.Metrics.Listen, reg, log)
}
