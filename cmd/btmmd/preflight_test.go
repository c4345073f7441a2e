package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/btmm/btmm/controlplane/kernelprobe"
	"github.com/btmm/btmm/internal/testenv"
)

// TestStartWithoutESP: on a kernel without ESP btmmd's default dataplane
// refuses to start, naming the missing feature and the alternatives,
// before it touches anything. The kernel's answer is the seam probeESP
// (the error this project's development kernel gives, on any kernel); on a
// kernel that really lacks ESP the real probe is checked as well.
func TestStartWithoutESP(t *testing.T) {
	testenv.RequireRoot(t)
	refused := errors.New("probe esp: add ESP state: protocol not supported")
	check := func(t *testing.T) {
		dir := t.TempDir()
		conf := filepath.Join(dir, "btmmd.toml")
		os.WriteFile(conf, []byte("domain = \"alice.btmm.example.\"\ncontrol_socket = \""+dir+"/btmmd.sock\"\n[dns]\nkey_file = \"/nonexistent\"\n"), 0o644)
		var stdout, stderr bytes.Buffer
		code := run([]string{"-config", conf}, &stdout, &stderr)
		msg := stderr.String()
		if code != 1 || strings.Count(strings.TrimSpace(msg), "\n") != 0 {
			t.Fatalf("exit %d, want 1 with a one-line message; stderr:\n%s", code, msg)
		}
		for _, want := range []string{"tunnel.dataplane xfrm needs ESP in the kernel", "modprobe -a esp4 esp6", "ebpf-cleartext", "WITHOUT ENCRYPTION"} {
			if !strings.Contains(msg, want) {
				t.Errorf("message lacks %q: %s", want, msg)
			}
		}
		if _, err := os.Stat(filepath.Join(dir, "btmmd.pid")); !os.IsNotExist(err) {
			t.Errorf("the refused start left its pid file behind: %v", err)
		}
	}
	t.Run("refused", func(t *testing.T) {
		real := probeESP
		probeESP = func() error { return refused }
		defer func() { probeESP = real }()
		check(t)
	})
	if kernelprobe.Probe(kernelprobe.ESP) != nil {
		t.Run("this kernel", check) // no ESP here: the real probe refuses too
	}
}

// TestNotRoot: btmmd started by another user says it must run as root,
// before it reads anything else.
func TestNotRoot(t *testing.T) {
	testenv.RequireRoot(t)
	setpriv := testenv.RequireBinary(t, "setpriv", "util-linux")
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "btmmd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	conf := filepath.Join(dir, "btmmd.toml")
	os.WriteFile(conf, []byte("domain = \"alice.btmm.example.\"\n[dns]\nkey_file = \"/nonexistent\"\n"), 0o644)
	out, err := exec.Command(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", bin, "-config", conf).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "btmmd must run as root") {
		t.Fatalf("as nobody: %v\n%s", err, out)
	}
}
