package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/btmm/btmm/controlplane/kernelprobe"
)

// errNotRoot: btmmd programs XFRM, routes, addresses and BPF.
var errNotRoot = errors.New("btmmd must run as root (it programs XFRM states, routes and BPF programs): run it with sudo or `systemctl start btmmd`")

// probeESP asks the running kernel for an ESP state (a seam: tests give
// the answer of a kernel without ESP on any kernel).
var probeESP = func() error { return kernelprobe.Probe(kernelprobe.ESP) }

// preflight checks what would otherwise fail late or confusingly: root, a
// second btmmd on the same control socket (whose start would remove the
// first one's kernel state), and, for the ESP dataplanes, ESP in the kernel.
// The returned lock is held for btmmd's lifetime.
func preflight(cfg *Config) (unlock func(), err error) {
	if os.Geteuid() != 0 {
		return nil, errNotRoot
	}
	unlock, err = lockPID(pidFile(cfg.ControlSocket))
	if err != nil {
		return nil, err
	}
	if cfg.Tunnel.Dataplane != "ebpf-cleartext" {
		if err := probeESP(); err != nil {
			unlock()
			return nil, fmt.Errorf("tunnel.dataplane %s needs ESP in the kernel (esp4/esp6, xfrm_user), which refused an ESP state: %w; "+
				"load the modules (modprobe -a esp4 esp6 xfrm_user) or use a kernel that has them; "+
				`tunnel.dataplane = "ebpf-cleartext" runs without ESP but WITHOUT ENCRYPTION`, cfg.Tunnel.Dataplane, err)
		}
	}
	return unlock, nil
}

// pidFile is the lock beside the control socket: /run/btmm/btmmd.sock ->
// /run/btmm/btmmd.pid.
func pidFile(sock string) string {
	return strings.TrimSuffix(sock, filepath.Ext(sock)) + ".pid"
}

// lockPID takes an exclusive flock on path and writes our pid into it. If
// another process holds it, the error names that process's pid.
func lockPID(path string) (unlock func(), err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("pid file: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("pid file: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b := make([]byte, 32)
		n, _ := f.ReadAt(b, 0)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			pid := strings.TrimSpace(string(b[:n]))
			if _, perr := strconv.Atoi(pid); perr != nil {
				pid = "unknown"
			}
			return nil, fmt.Errorf("btmmd is already running (pid %s, lock %s)", pid, path)
		}
		return nil, fmt.Errorf("pid file %s: %w", path, err)
	}
	// The pid is for the "already running" message only; the lock is what counts.
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return func() {
		os.Remove(path)
		f.Close()
	}, nil
}
