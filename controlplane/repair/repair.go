// Package repair puts back kernel state that someone else removed or changed
// under a dataplane (`ip xfrm state flush`, `ip -6 route del`, a detached
// BPF program): the dataplane's netlink watchers Kick a Loop, which re-applies
// the last desired State after a short settle time, rate-limited by a token
// bucket and logged once per burst, the way tailscale's wgengine/router
// restores deleted ip rules. It is pure Go; watch_linux.go holds the
// rtnetlink / XFRM netlink multicast watcher that feeds it.
package repair

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/btmm/btmm/controlplane"
)

// Config tunes a Loop. The zero value gives the defaults.
type Config struct {
	// Off: the dataplane neither watches nor repairs (an administrator
	// who manages the kernel state by hand; tests of Set alone).
	Off bool
	// Settle is how long after the first notification of a burst the loop
	// waits for the rest of it (a flush notifies once per object) before
	// re-applying once (default 20 ms).
	Settle time.Duration
	// Burst repairs may run back to back; after that at most one per
	// Interval (a token bucket: defaults 5 and 1 s), so a fight with
	// another program costs little. Every attempt counts, also one that
	// finds nothing to do (our own changes echoed back).
	Burst    int
	Interval time.Duration
	// Quiet ends a burst: the first repair after this long without one is
	// logged at Warn again; the others of a burst are summed up in one line
	// when it ends (default 30 s).
	Quiet time.Duration
	// Audit re-applies this often without any notification, for what the
	// kernel does not announce (a map entry deleted with bpftool, an
	// overrun notification socket). Default 30 s; negative turns it off.
	Audit  time.Duration
	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	if c.Settle <= 0 {
		c.Settle = 20 * time.Millisecond
	}
	if c.Burst <= 0 {
		c.Burst = 5
	}
	if c.Interval <= 0 {
		c.Interval = time.Second
	}
	if c.Quiet <= 0 {
		c.Quiet = 30 * time.Second
	}
	if c.Audit == 0 {
		c.Audit = 30 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Apply re-applies the desired state and returns what it had to change;
// no changes and no error means nothing was wrong.
type Apply func(ctx context.Context) ([]controlplane.Change, error)

// AuditReason is the reason the periodic audit passes to apply's trigger.
const AuditReason = "periodic audit"

// maxRetry caps the backoff of a failing repair.
const maxRetry = 30 * time.Second

// Loop runs Apply when kicked. Make one with New, start Run, call Kick from
// the watchers, read Last for status.
type Loop struct {
	cfg   Config
	apply Apply
	wake  chan struct{}

	mu     sync.Mutex
	reason string // of the first kick since the last apply
	last   controlplane.Repair
}

// New returns a Loop calling apply.
func New(apply Apply, cfg Config) *Loop {
	cfg.setDefaults()
	return &Loop{cfg: cfg, apply: apply, wake: make(chan struct{}, 1)}
}

// Kick asks for a repair; reason names what was seen ("xfrm states
// flushed"). It never blocks; kicks before the repair runs are merged.
func (l *Loop) Kick(reason string) {
	l.mu.Lock()
	if l.reason == "" {
		l.reason = reason
	}
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// Last reports the last repair (zero: none yet) and the error of the last
// attempt, if it failed.
func (l *Loop) Last() controlplane.Repair {
	l.mu.Lock()
	defer l.mu.Unlock()
	r := l.last
	r.What = append([]string(nil), r.What...)
	return r
}

// Run repairs on kicks and audits until ctx is done.
func (l *Loop) Run(ctx context.Context) {
	log := l.cfg.Logger
	tokens := float64(l.cfg.Burst)
	refilled := time.Now()
	var audit <-chan time.Time
	if l.cfg.Audit > 0 {
		t := time.NewTicker(l.cfg.Audit)
		defer t.Stop()
		audit = t.C
	}
	quiet := time.NewTimer(time.Hour)
	quiet.Stop()
	defer quiet.Stop()
	var retry <-chan time.Time
	backoff := l.cfg.Interval
	inBurst, repairs, attempts := false, 0, 0

	sleep := func(d time.Duration) bool {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			return true
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-l.wake:
		case <-retry:
			retry = nil
			l.Kick("retry of a failed repair")
		case <-audit:
			l.Kick(AuditReason)
		case <-quiet.C:
			if repairs > 1 {
				log.Info("kernel state repairs: burst over", "repairs", repairs, "attempts", attempts)
			}
			inBurst, repairs, attempts = false, 0, 0
			continue
		}
		if !sleep(l.cfg.Settle) {
			return
		}
		// Token bucket: Burst at once, then one per Interval.
		now := time.Now()
		tokens = min(float64(l.cfg.Burst), tokens+now.Sub(refilled).Seconds()/l.cfg.Interval.Seconds())
		refilled = now
		if tokens < 1 {
			wait := time.Duration((1 - tokens) * float64(l.cfg.Interval))
			if !sleep(wait) {
				return
			}
			tokens, refilled = 1, time.Now()
		}
		tokens--
		select { // kicks during the waits are part of this repair
		case <-l.wake:
		default:
		}
		l.mu.Lock()
		reason := l.reason
		l.reason = ""
		l.mu.Unlock()

		changes, err := l.apply(ctx)
		if ctx.Err() != nil {
			return
		}
		attempts++
		what := make([]string, len(changes))
		for i, c := range changes {
			what[i] = c.String()
		}
		l.mu.Lock()
		if len(changes) > 0 {
			l.last.At, l.last.What = time.Now(), what
			l.last.Count++
		}
		if err != nil {
			l.last.Err = err.Error()
		} else {
			l.last.Err = ""
		}
		l.mu.Unlock()
		if err != nil {
			retry = time.After(backoff)
			backoff = min(2*backoff, maxRetry)
		} else {
			retry, backoff = nil, l.cfg.Interval
		}
		if len(changes) == 0 && err == nil {
			continue // nothing was wrong (often our own change echoed back)
		}
		repairs++
		switch {
		case inBurst:
			log.Debug("kernel state restored again", "trigger", reason, "restored", what, "err", err)
		case len(changes) == 0:
			log.Warn("re-applying the desired kernel state failed; will retry", "trigger", reason, "err", err)
		case err != nil:
			log.Warn("kernel state changed by someone else; restored in part, will retry", "trigger", reason, "restored", what, "err", err)
		default:
			log.Warn("kernel state changed by someone else; restored", "trigger", reason, "restored", what)
		}
		inBurst = true
		quiet.Reset(l.cfg.Quiet)
	}
}

// KickOnXfrm returns a Watch callback for the XFRM SA and policy groups: it
// kicks l for flushes, lost notifications, and additions, changes and
// deletions of states and policies that carry reqid (a dataplane's tag).
func (l *Loop) KickOnXfrm(reqid uint32) func(typ uint16, body []byte) {
	return func(typ uint16, b []byte) {
		if typ == Overrun {
			l.Kick("xfrm notifications lost (socket overrun)")
			return
		}
		m, err := ParseXfrm(typ, b)
		switch {
		case err != nil:
			l.Kick("unreadable xfrm notification")
		case m.Type == XfrmFlushSA:
			l.Kick("xfrm states flushed")
		case m.Type == XfrmFlushPolicy:
			l.Kick("xfrm policies flushed")
		case slices.Contains(m.Reqids, reqid):
			what := "policy"
			if m.Type == XfrmNewSA || m.Type == XfrmUpdSA || m.Type == XfrmDelSA {
				what = fmt.Sprintf("state spi 0x%08x", m.SPI)
			}
			verb := "added or changed"
			if m.Deleted() {
				verb = "deleted"
			}
			l.Kick("xfrm " + what + " " + verb)
		}
	}
}

// KickOnRoute is the part of a dataplane's rtnetlink Watch callback that
// every dataplane shares: lost notifications (an overrun) kick l; a
// notification that does not parse is logged at Debug and dropped; the
// deletion of one of the dataplane's own routes (IPv6, main table, routing
// protocol proto) or of its ULA (when valid) kicks l. In those cases more is
// false. Otherwise it returns the parsed message and more is true: the
// dataplane looks at it for objects of its own kind (devices, qdiscs,
// neighbour entries).
func (l *Loop) KickOnRoute(typ uint16, b []byte, proto uint8, ula netip.Addr) (m Msg, more bool) {
	if typ == Overrun {
		l.Kick("rtnetlink notifications lost (socket overrun)")
		return Msg{}, false
	}
	m, err := ParseRoute(typ, b)
	if err != nil {
		l.cfg.Logger.Debug("rtnetlink notification", "err", err)
		return m, false
	}
	switch {
	case m.Type == RTMDelRoute && m.Family == afInet6 && m.Protocol == proto && m.Table == rtTableMain:
		l.Kick(fmt.Sprintf("route %v deleted", m.Prefix))
	case m.Type == RTMDelAddr && m.Family == afInet6 && ula.IsValid() && m.Prefix.Addr() == ula:
		l.Kick(fmt.Sprintf("address %v deleted", m.Prefix))
	default:
		return m, true
	}
	return m, false
}
