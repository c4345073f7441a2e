package server

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// The control socket, DataDir/control.sock (mode 0600, in the 0700 data
// directory), lets the admin commands act on a running server at once: one
// line in, one line out.
//
//	reload              re-read the keys (as SIGHUP); removed keys are dropped with their records
//	delhost USER HOST   remove a host's key, its LLQs and its records
//	deluser USER        remove a user's and its hosts' keys, LLQs and records
//
// The answer is "ok ..." or "error ...".

// ErrNotRunning is returned by Control when no server listens on the data
// directory's control socket.
var ErrNotRunning = errors.New("server: no btmm-dnsd running on this data directory")

// ControlSocket returns the control socket's path for a data directory.
func ControlSocket(dataDir string) string { return filepath.Join(dataDir, "control.sock") }

// Control sends one command to the server running on dataDir and returns
// its answer (without "ok "); an "error" answer is returned as an error.
func Control(dataDir, command string) (string, error) {
	c, err := net.DialTimeout("unix", ControlSocket(dataDir), 2*time.Second)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return "", ErrNotRunning
		}
		return "", fmt.Errorf("server: control socket: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err := io.WriteString(c, command+"\n"); err != nil {
		return "", fmt.Errorf("server: control socket: %w", err)
	}
	line, err := bufio.NewReader(io.LimitReader(c, 4096)).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("server: control socket: no answer: %w", err)
	}
	line = strings.TrimSpace(line)
	if msg, ok := strings.CutPrefix(line, "ok"); ok {
		return strings.TrimSpace(msg), nil
	}
	return "", fmt.Errorf("btmm-dnsd: %s", strings.TrimPrefix(line, "error "))
}

// startControl listens on the control socket until the server stops.
func (s *Server) startControl() error {
	path := ControlSocket(s.cfg.DataDir)
	os.Remove(path) // a stale socket: we hold the data directory's lock
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("server: control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("server: control socket: %w", err)
	}
	context.AfterFunc(s.life, func() {
		ln.Close()
		os.Remove(path)
	})
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.control(c)
		}
	}()
	return nil
}

func (s *Server) control(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	line, err := bufio.NewReader(io.LimitReader(c, 1024)).ReadString('\n')
	if err != nil {
		return
	}
	f := strings.Fields(line)
	reply := func(format string, args ...any) { fmt.Fprintf(c, format+"\n", args...) }
	var n int
	switch {
	case len(f) == 1 && f[0] == "reload":
		err = s.ReloadKeys()
		if err == nil {
			reply("ok keys reloaded")
			return
		}
	case len(f) == 3 && f[0] == "delhost":
		if n, err = s.RemoveHost(f[1], f[2]); err == nil {
			s.log.Info("host removed", "user", f[1], "host", f[2], "records", n)
			reply("ok removed host %s of %s and its %d records", f[2], f[1], n)
			return
		}
	case len(f) == 2 && f[0] == "deluser":
		if n, err = s.RemoveUser(f[1]); err == nil {
			s.log.Info("user removed", "user", f[1], "records", n)
			reply("ok removed user %s and its %d records", f[1], n)
			return
		}
	default:
		err = fmt.Errorf("unknown command %q", strings.TrimSpace(line))
	}
	reply("error %s", strings.ReplaceAll(err.Error(), "\n", " "))
}
