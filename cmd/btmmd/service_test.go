package main

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/keying"
	"github.com/btmm/btmm/dns/llqclient"
	"github.com/btmm/btmm/dns/register"
)

func TestReadiness(t *testing.T) {
	pub := register.Status{Published: true, Server: "192.0.2.1:53"}
	llqUp := llqclient.Status{Queries: []llqclient.QueryStatus{{Mode: llqclient.ModeLLQ}, {Mode: llqclient.ModeLLQ}}}
	for _, tc := range []struct {
		name  string
		reg   register.Status
		llq   llqclient.Status
		llqOK bool
		ready bool
		want  string
	}{
		{"not registered yet", register.Status{}, llqUp, true, false, "registering as laptop"},
		{"registration failing", register.Status{Failures: 3, LastError: "dial udp: connection\nrefused"}, llqUp, true, false,
			"registering as laptop: 3 failures, last: dial udp: connection refused"},
		{"no llq client yet", pub, llqclient.Status{}, false, false, "registered on 192.0.2.1:53; starting peer tracking"},
		{"llq setting up", pub, llqclient.Status{Queries: []llqclient.QueryStatus{{Mode: llqclient.ModeLLQ}, {Mode: llqclient.ModeSetup}}}, true, false,
			"setting up LLQs (1 of 2 pending)"},
		{"up", pub, llqUp, true, true, "registered on 192.0.2.1:53; LLQ up; 0 peers, 0 keyed"},
		{"polling", pub, llqclient.Status{Queries: []llqclient.QueryStatus{{Mode: llqclient.ModePolling, Reason: "server answered without LLQ option"}}}, true, true,
			"degraded: registered on 192.0.2.1:53; polling 1 of 1 questions (no LLQ: server answered without LLQ option)"},
		{"refresh failing", register.Status{Published: true, Server: "s", Failures: 2, LastError: "timeout"}, llqUp, true, true,
			"degraded: registration refresh failing (2 failures, last: timeout)"},
	} {
		ready, got := readiness(&agent.Status{Host: "laptop", Register: tc.reg}, tc.llq, tc.llqOK)
		if ready != tc.ready || !strings.Contains(got, tc.want) || strings.Contains(got, "\n") {
			t.Errorf("%s: readiness = %v, %q; want %v, containing %q", tc.name, ready, got, tc.ready, tc.want)
		}
	}
}

const testKey = `key "alice.btmm.example" {
	algorithm hmac-sha256;
	secret "%s";
};
`

// TestReload: a reload applies the runtime keys (log level, TSIG secret,
// PSK) together, and refuses a change to anything else, or a broken key
// file, without changing anything.
func TestReload(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	keyFile := write("alice.key", strings.Replace(testKey, "%s", "b25lb25lb25lb25l", 1))
	pskFile := write("psk", strings.Repeat("p", 40))
	conf := func(extra string) string {
		return "host = \"laptop\"\ndomain = \"alice.btmm.example.\"\nlog_level = \"info\"\n" + extra +
			"[dns]\nkey_file = \"" + keyFile + "\"\n[keying]\nmode = \"psk\"\npsk_file = \"" + pskFile + "\"\n"
	}
	cfgPath := write("btmmd.toml", conf(""))
	cfg, err := loadConfig(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := register.LoadKeyFile(keyFile, "")
	psk, _ := keying.LoadPSK(pskFile)
	r := &reloader{cfg: cfg, level: new(slog.LevelVar), key: key, auth: psk}

	// Runtime changes: all applied.
	write("btmmd.toml", strings.Replace(conf(""), `"info"`, `"debug"`, 1))
	write("alice.key", strings.Replace(testKey, "%s", "dHdvdHdvdHdvdHdv", 1))
	write("psk", strings.Repeat("q", 48))
	if err := r.reload(); err != nil {
		t.Fatalf("reload: %v", err)
	}
	if r.level.Level() != slog.LevelDebug || key.Secret() != "dHdvdHdvdHdvdHdv" || psk.String() != "psk([48 bytes redacted])" {
		t.Fatalf("after reload: level %v, secret rotated %v, %s", r.level.Level(), key.Secret() == "dHdvdHdvdHdvdHdv", psk)
	}

	for _, tc := range []struct {
		name, conf, key, want string
		is                    error
	}{
		{"fixed keys changed", strings.Replace(conf("[tunnel]\nport = 4501\n"), "laptop", "desk", 1), "", "host, tunnel.port cannot change while btmmd runs", errNeedsRestart},
		{"broken config", "domain = ", "", "reload: config", nil},
		{"unreadable key", conf(""), "key broken", "dns.key_file", nil},
		{"other key name", conf(""), strings.Replace(strings.Replace(testKey, "%s", "dGhyZWV0aHJlZQ==", 1), "alice", "bob", 1), "new key name or algorithm", errNeedsRestart},
	} {
		write("btmmd.toml", strings.Replace(tc.conf, `"info"`, `"warn"`, 1))
		if tc.key != "" {
			write("alice.key", tc.key)
		}
		err := r.reload()
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "nothing changed") || (tc.is != nil && !errors.Is(err, tc.is)) {
			t.Errorf("%s: reload = %v, want an error with %q and \"nothing changed\"", tc.name, err, tc.want)
		}
		if r.level.Level() != slog.LevelDebug || key.Secret() != "dHdvdHdvdHdvdHdv" || r.cfg.Host != "laptop" {
			t.Errorf("%s: a refused reload changed something (level %v, host %s)", tc.name, r.level.Level(), r.cfg.Host)
		}
		write("alice.key", strings.Replace(testKey, "%s", "dHdvdHdvdHdvdHdv", 1))
	}
}

func TestAlreadyRunning(t *testing.T) {
	p := filepath.Join(t.TempDir(), "btmmd.pid")
	unlock, err := lockPID(p)
	if err != nil {
		t.Fatal(err)
	}
	_, err = lockPID(p)
	want := "btmmd is already running (pid " + strconv.Itoa(os.Getpid()) + ", lock " + p + ")"
	if err == nil || err.Error() != want {
		t.Fatalf("second lock: %v, want %q", err, want)
	}
	unlock()
	unlock2, err := lockPID(p)
	if err != nil {
		t.Fatalf("lock after unlock: %v", err)
	}
	unlock2()
	if pidFile("/run/btmm/btmmd.sock") != "/run/btmm/btmmd.pid" {
		t.Fatal(pidFile("/run/btmm/btmmd.sock"))
	}
}
