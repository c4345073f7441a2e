package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/btmm/btmm/controlplane/keying"
)

// fillKeying checks and defaults the [keying] lifetimes, replay cache and
// principal overrides.
func (c *Config) fillKeying() error {
	var errs []string
	dur := func(name, s string) time.Duration {
		if s == "" {
			return 0
		}
		d, err := time.ParseDuration(s)
		if err != nil || d < 10*time.Second {
			errs = append(errs, fmt.Sprintf("keying.%s %q: want a Go duration of at least 10s, e.g. \"1h\"", name, s))
			return 0
		}
		return d
	}
	soft, hard := dur("sa_lifetime", c.Keying.SALifetime), dur("hard_lifetime", c.Keying.HardLifetime)
	if soft > 0 && hard > 0 && hard < soft/2 {
		errs = append(errs, fmt.Sprintf("keying.hard_lifetime %v is less than half of sa_lifetime %v", hard, soft))
	}
	if c.Keying.ReplayCache == "" {
		c.Keying.ReplayCache = filepath.Join(filepath.Dir(c.StateFile), "keying-replay")
	}
	for host, p := range c.Keying.Principals {
		if host == "" || strings.Contains(host, ".") || !strings.Contains(p, "/") {
			errs = append(errs, fmt.Sprintf("keying.principals: %q = %q: want a host label and a principal like \"host/<name>@REALM\"", host, p))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}

// keyingConfig is the key exchange's tuning from the configuration (the
// agent fills in the rest).
func keyingConfig(cfg *Config) keying.Config {
	kc := keying.Config{ReplayFile: cfg.Keying.ReplayCache}
	kc.SALifetime, _ = time.ParseDuration(cfg.Keying.SALifetime)
	kc.HardLifetime, _ = time.ParseDuration(cfg.Keying.HardLifetime)
	return kc
}

// principalFor derives the principal a peer must authenticate as from its
// host name (RFC 6281 §7.1: host/<host>.<user domain>@REALM), unless
// keying.principals names another one for that host.
func principalFor(cfg *Config) func(host string) string {
	return func(host string) string {
		if p, ok := cfg.Keying.Principals[host]; ok {
			return p
		}
		return keying.DefaultPrincipal(host, cfg.Domain, cfg.Keying.Realm)
	}
}
