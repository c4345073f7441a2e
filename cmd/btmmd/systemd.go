package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/dns/llqclient"
)

// service ties a running btmmd to its service manager (sd_notify(3):
// READY=1, STATUS=, RELOADING=1, STOPPING=1, WATCHDOG=1; a no-op outside
// systemd) and to SIGHUP (reload).
type service struct {
	cfg   *Config
	agent *agent.Agent
	llq   func() (llqclient.Status, bool)
	log   *slog.Logger
	// reload re-reads the configuration and key files (reload.go).
	reload func() error
	// notify sends one sd_notify message; tests replace it.
	notify func(state string)
}

func newService(cfg *Config, a *agent.Agent, llq func() (llqclient.Status, bool), rl *reloader, log *slog.Logger) *service {
	s := &service{cfg: cfg, agent: a, llq: llq, log: log, reload: rl.reload}
	s.notify = func(state string) {
		if _, err := daemon.SdNotify(false, state); err != nil {
			log.Debug("sd_notify", "err", err)
		}
	}
	return s
}

// readiness says whether btmmd is ready (registered and tracking its peers:
// every LLQ established, or polling with a reason) and a one-line status.
func readiness(st *agent.Status, llq llqclient.Status, llqOK bool) (ready bool, status string) {
	r := st.Register
	if !r.Published {
		if r.LastError != "" {
			return false, fmt.Sprintf("registering as %s: %d failures, last: %s", st.Host, r.Failures, oneLine(r.LastError))
		}
		return false, "registering as " + st.Host
	}
	reg := fmt.Sprintf("registered on %s", r.Server)
	if !llqOK || len(llq.Queries) == 0 {
		return false, reg + "; starting peer tracking"
	}
	var setup int
	var polling []string
	for _, q := range llq.Queries {
		switch q.Mode {
		case llqclient.ModeSetup:
			setup++
		case llqclient.ModePolling:
			polling = append(polling, q.Reason)
		}
	}
	if setup > 0 {
		return false, fmt.Sprintf("%s; setting up LLQs (%d of %d pending)", reg, setup, len(llq.Queries))
	}
	keyed := 0
	for _, p := range st.Peers {
		if p.Keyed {
			keyed++
		}
	}
	peers := fmt.Sprintf("%d peers, %d keyed", len(st.Peers), keyed)
	switch {
	case r.LastError != "":
		return true, fmt.Sprintf("degraded: registration refresh failing (%d failures, last: %s); %s", r.Failures, oneLine(r.LastError), peers)
	case len(polling) > 0:
		return true, fmt.Sprintf("degraded: %s; polling %d of %d questions (no LLQ: %s); %s", reg, len(polling), len(llq.Queries), oneLine(polling[0]), peers)
	}
	return true, fmt.Sprintf("%s; LLQ up; %s", reg, peers)
}

// oneLine keeps STATUS= to one short line.
func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 160 {
		s = s[:157] + "..."
	}
	return s
}

// run reports readiness and status until ctx ends, answers the watchdog
// while the agent answers, and reloads on every value from hup.
func (s *service) run(ctx context.Context, hup <-chan os.Signal) {
	wd, _ := daemon.SdWatchdogEnabled(false)
	var wdTick <-chan time.Time
	if wd > 0 {
		t := time.NewTicker(wd / 3)
		defer t.Stop()
		wdTick = t.C
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	ready, last, reloadNote := false, "", ""
	update := func() {
		st, ok := s.status(ctx, 10*time.Second)
		if !ok {
			return
		}
		llq, llqOK := s.llq()
		r, status := readiness(st, llq, llqOK)
		status += reloadNote
		msg := "STATUS=" + status
		if r && !ready {
			msg = "READY=1\n" + msg
			s.log.Info("ready", "status", status)
			ready = true
		}
		if msg != last {
			s.notify(msg)
			last = msg
		}
	}
	for {
		update()
		select {
		case <-ctx.Done():
			s.notify("STOPPING=1\nSTATUS=stopping: removing records, mappings and kernel state")
			return
		case <-tick.C:
		case <-wdTick:
			// The watchdog is fed only while the agent answers a status
			// request: a wedged agent gets restarted.
			if _, ok := s.status(ctx, wd/3); ok {
				s.notify("WATCHDOG=1")
			} else {
				s.log.Warn("watchdog: the agent did not answer a status request in time")
			}
		case <-hup:
			s.notify("RELOADING=1\nSTATUS=reloading configuration")
			last, reloadNote = "", ""
			if err := s.reload(); err != nil {
				s.log.Error("reload refused, running with the previous configuration", "err", err)
				reloadNote = "; last reload refused: " + oneLine(err.Error())
			} else {
				s.log.Info("reloaded configuration and key files", "config", s.cfg.path)
			}
			s.notify("READY=1")
		}
	}
}

// status asks the agent for its status within d.
func (s *service) status(ctx context.Context, d time.Duration) (*agent.Status, bool) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	ch := make(chan agent.Status, 1)
	go func() { ch <- s.agent.Status(ctx) }()
	select {
	case st := <-ch:
		return &st, true
	case <-ctx.Done():
		return nil, false
	}
}
