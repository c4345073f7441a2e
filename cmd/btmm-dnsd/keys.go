package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/btmm/btmm/dns/server"
)

// keyCommand runs adduser, addhost, delhost and deluser. Keys are files in
// data_dir/keys (server.Users); a running server is told through its control
// socket, so a removal takes effect at once (records removed, removals
// pushed to the LLQs); with no server running the records are removed from
// the store directly.
func keyCommand(cfg server.Config, args []string, stdout io.Writer) (bool, error) {
	users := server.UsersOf(cfg)
	alg := func(n int) string {
		if len(args) == n+1 {
			return args[n]
		}
		return ""
	}
	switch {
	case args[0] == "adduser" && (len(args) == 2 || len(args) == 3):
		k, err := users.Add(args[1], alg(2))
		if err != nil {
			return true, err
		}
		notify(cfg)
		_, err = io.WriteString(stdout, k.BINDClause())
		return true, err
	case args[0] == "addhost" && (len(args) == 3 || len(args) == 4):
		k, err := users.AddHost(args[1], args[2], alg(3))
		if err != nil {
			return true, err
		}
		notify(cfg)
		_, err = io.WriteString(stdout, k.BINDClause())
		return true, err
	case args[0] == "delhost" && len(args) == 3:
		return true, remove(cfg, stdout, "delhost "+args[1]+" "+args[2], func(s *server.Server) (int, error) {
			return s.RemoveHost(args[1], args[2])
		})
	case args[0] == "deluser" && len(args) == 2:
		return true, remove(cfg, stdout, "deluser "+args[1], func(s *server.Server) (int, error) {
			return s.RemoveUser(args[1])
		})
	}
	return false, nil
}

// notify has a running server load the keys now (else it would at the
// key's first use).
func notify(cfg server.Config) {
	server.Control(cfg.DataDir, "reload")
}

// remove asks the running server to do cmd, or does it offline.
func remove(cfg server.Config, stdout io.Writer, cmd string, offline func(*server.Server) (int, error)) error {
	msg, err := server.Control(cfg.DataDir, cmd)
	if err == nil {
		_, err = fmt.Fprintln(stdout, msg)
		return err
	}
	if !errors.Is(err, server.ErrNotRunning) {
		return err
	}
	srv, err := server.New(cfg, nil)
	if err != nil {
		return fmt.Errorf("%w (if btmm-dnsd runs without its control socket, run the command again after stopping it)", err)
	}
	n, err := offline(srv)
	if cerr := srv.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "done; %d records removed (no server running)\n", n)
	return err
}
