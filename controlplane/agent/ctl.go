package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// DefaultControlSocket is where btmmd listens for btmmctl.
const DefaultControlSocket = "/run/btmm/btmmd.sock"

// ServeControl answers btmmctl on a unix socket (mode 0600) until ctx ends:
// GET /v1/status returns Status as JSON. The socket file is removed on return.
func ServeControl(ctx context.Context, path string, a *Agent) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return fmt.Errorf("control socket %s: another btmmd is running", path)
	}
	os.Remove(path) // stale socket of a dead btmmd
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	defer os.Remove(path)
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return fmt.Errorf("control socket: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(a.Status(r.Context()))
	})
	mux.HandleFunc("POST /v1/ping", func(w http.ResponseWriter, r *http.Request) {
		seq, _ := strconv.Atoi(r.FormValue("seq"))
		timeout, err := time.ParseDuration(r.FormValue("timeout"))
		if err != nil || timeout <= 0 || timeout > time.Minute {
			timeout = 2 * time.Second
		}
		res, err := a.Ping(r.Context(), r.FormValue("peer"), seq, timeout)
		if err != nil {
			code := http.StatusInternalServerError
			if errors.Is(err, ErrNoSuchPeer) {
				code = http.StatusNotFound
			}
			http.Error(w, err.Error(), code)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(res)
	})
	// GET /v1/watch streams events, one JSON object per line, until the
	// client goes away or btmmd stops.
	mux.HandleFunc("GET /v1/watch", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		fl, _ := w.(http.Flusher)
		enc := json.NewEncoder(w)
		hello := Event{Time: time.Now(), Type: "watching", To: a.cfg.Host + "." + strings.TrimSuffix(a.cfg.Domain, ".")}
		send := func(e Event) error {
			if err := enc.Encode(e); err != nil {
				return err
			}
			if fl != nil {
				fl.Flush()
			}
			return nil
		}
		if send(hello) != nil {
			return
		}
		a.Watch(r.Context(), send)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, BaseContext: func(net.Listener) context.Context { return ctx }}
	go func() {
		<-ctx.Done()
		shut, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(shut)
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("control socket: %w", err)
	}
	return nil
}

// FetchStatus asks the btmmd listening on path for its Status.
func FetchStatus(ctx context.Context, path string) (*Status, error) {
	c := controlClient(path)
	req, err := http.NewRequestWithContext(ctx, "GET", "http://btmmd/v1/status", nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("btmmd not reachable on %s (is it running?): %w", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("btmmd: %s: %s", resp.Status, b)
	}
	var st Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return nil, fmt.Errorf("btmmd status: %w", err)
	}
	return &st, nil
}

// controlClient talks HTTP to btmmd's control socket.
func controlClient(path string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}}
}

// FetchPing asks the btmmd listening on path to ping peer once.
func FetchPing(ctx context.Context, path, peer string, seq int, timeout time.Duration) (*PingResult, error) {
	form := url.Values{"peer": {peer}, "seq": {strconv.Itoa(seq)}, "timeout": {timeout.String()}}
	req, err := http.NewRequestWithContext(ctx, "POST", "http://btmmd/v1/ping", strings.NewReader(form.Encode()))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := controlClient(path).Do(req)
	if err != nil {
		return nil, fmt.Errorf("btmmd not reachable on %s (is it running?): %w", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, errors.New(strings.TrimSpace(string(b)))
	}
	var r PingResult
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return nil, fmt.Errorf("btmmd ping: %w", err)
	}
	return &r, nil
}

// WatchEvents streams the events of the btmmd listening on path to f until
// ctx ends, btmmd stops (an error) or f returns an error.
func WatchEvents(ctx context.Context, path string, f func(Event) error) error {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://btmmd/v1/watch", nil)
	if err != nil {
		return err
	}
	resp, err := controlClient(path).Do(req)
	if err != nil {
		return fmt.Errorf("btmmd not reachable on %s (is it running?): %w", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("btmmd: %s: %s", resp.Status, b)
	}
	dec := json.NewDecoder(resp.Body)
	for {
		var e Event
		if err := dec.Decode(&e); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("btmmd stopped the event stream: %w", err)
		}
		if err := f(e); err != nil {
			return err
		}
	}
}
