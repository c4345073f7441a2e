package main

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/btmm/btmm/dns/server"
)

// TestMetricsHooked: the server's callbacks feed the documented metrics.
func TestMetricsHooked(t *testing.T) {
	m := newDNSDMetrics()
	var cfg server.Config
	m.hook(&cfg)
	cfg.OnUpdate(0, 3*time.Millisecond)
	cfg.OnEvents(3, time.Millisecond)
	cfg.OnLLQChange(3, 2*time.Millisecond)
	cfg.OnStoreSync(time.Millisecond)
	cfg.OnStoreSync(4 * time.Millisecond)
	want := `
# HELP btmm_dnsd_llq_events_total LLQ events sent (retransmissions included).
# TYPE btmm_dnsd_llq_events_total counter
btmm_dnsd_llq_events_total 3
# HELP btmm_dnsd_updates_total Authenticated UPDATEs answered, by result (the answer's rcode).
# TYPE btmm_dnsd_updates_total counter
btmm_dnsd_updates_total{result="NOERROR"} 1
`
	if err := testutil.GatherAndCompare(m.reg, strings.NewReader(want), "btmm_dnsd_llq_events_total", "btmm_dnsd_updates_total"); err != nil {
		t.Error(err)
	}
	for name, n := range map[string]int{"btmm_dnsd_llq_event_seconds": 1, "btmm_dnsd_store_fsync_seconds": 1, "btmm_dnsd_update_seconds": 1,
		"btmm_dnsd_llq_fanout_seconds": 1} {
		if got, err := testutil.GatherAndCount(m.reg, name); err != nil || got != n {
			t.Errorf("%s: %d series (%v)", name, got, err)
		}
	}
	mfs, _ := m.reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == "btmm_dnsd_store_fsync_seconds" && mf.GetMetric()[0].GetHistogram().GetSampleCount() != 2 {
			t.Errorf("fsync histogram: %v", mf)
		}
	}
}
