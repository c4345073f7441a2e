package main

import (
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"sync"

	"github.com/jcmturner/gokrb5/v8/keytab"

	"github.com/btmm/btmm/controlplane/keying"
	"github.com/btmm/btmm/dns/register"
)

// runtimeKeys are the configuration keys a reload (SIGHUP) applies; a change
// to any other key is refused as a whole, so a reload never half-applies.
var runtimeKeys = []string{"log_level", "dns.key_file", "keying.keytab", "keying.psk_file"}

// errNeedsRestart is returned when the new configuration changes what only
// a restart can change.
var errNeedsRestart = errors.New("cannot change while btmmd runs (restart it: systemctl restart btmmd)")

// reloader re-reads btmmd's configuration and key files.
type reloader struct {
	mu    sync.Mutex
	cfg   *Config
	level *slog.LevelVar
	key   *register.Key // the running TSIG key (rotated in place)
	auth  keying.Auth   // *keying.PSK or *keying.Kerberos (rotated in place)
}

// reload loads the configuration file again and applies it: all of it or,
// on any error, nothing.
func (r *reloader) reload() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	next, err := loadConfig(r.cfg.path)
	if err != nil {
		return fmt.Errorf("reload: %w; nothing changed", err)
	}
	if fixed := changedKeys(r.cfg, next, runtimeKeys); len(fixed) > 0 {
		return fmt.Errorf("reload: %s %w; nothing changed", strings.Join(fixed, ", "), errNeedsRestart)
	}
	// Load everything first, apply only when all of it loaded.
	var level slog.Level
	if next.LogLevel != "" {
		if err := level.UnmarshalText([]byte(next.LogLevel)); err != nil {
			return fmt.Errorf("reload: log_level: %w; nothing changed", err)
		}
	}
	key, err := register.LoadKeyFile(next.DNS.KeyFile, "")
	if err != nil {
		return fmt.Errorf("reload: dns.key_file: %w; nothing changed", err)
	}
	if key.Name != r.key.Name || key.Algorithm != r.key.Algorithm {
		return fmt.Errorf("reload: dns.key_file: key %s (%s) replaces %s (%s): a new key name or algorithm %w; nothing changed",
			key.Name, key.Algorithm, r.key.Name, r.key.Algorithm, errNeedsRestart)
	}
	var apply func()
	switch a := r.auth.(type) {
	case *keying.PSK:
		psk, err := keying.LoadPSK(next.Keying.PSKFile)
		if err != nil {
			return fmt.Errorf("reload: keying.psk_file: %w; nothing changed", err)
		}
		apply = func() { a.Rotate(psk) }
	case *keying.Kerberos:
		kt, err := keytab.Load(next.Keying.Keytab)
		if err != nil {
			return fmt.Errorf("reload: keying.keytab %s: %w; nothing changed", next.Keying.Keytab, err)
		}
		apply = func() { a.SetKeytab(kt) }
	default:
		apply = func() {}
	}
	if err := r.key.Rotate(key); err != nil { // cannot fail: name and algorithm checked
		return fmt.Errorf("reload: %w; nothing changed", err)
	}
	apply()
	r.level.Set(level)
	r.cfg = next
	return nil
}

// changedKeys lists the dotted TOML keys whose values differ between a and
// b, except those in allowed.
func changedKeys(a, b *Config, allowed []string) []string {
	var out []string
	var walk func(prefix string, x, y reflect.Value)
	walk = func(prefix string, x, y reflect.Value) {
		t := x.Type()
		for i := range t.NumField() {
			f := t.Field(i)
			tag, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
			if !f.IsExported() || tag == "" || tag == "-" {
				continue
			}
			name := prefix + tag
			if f.Type.Kind() == reflect.Struct {
				walk(name+".", x.Field(i), y.Field(i))
				continue
			}
			if !slices.Contains(allowed, name) && !reflect.DeepEqual(x.Field(i).Interface(), y.Field(i).Interface()) {
				out = append(out, name)
			}
		}
	}
	walk("", reflect.ValueOf(a).Elem(), reflect.ValueOf(b).Elem())
	return out
}
