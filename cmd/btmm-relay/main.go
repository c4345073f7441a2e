// Command btmm-relay: see the usage text below (`btmm-relay --help`).
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/btmm/btmm/cmd/internal/cli"
	ctlrelay "github.com/btmm/btmm/controlplane/relay"
	ebpfrelay "github.com/btmm/btmm/ebpf/relay"
)

const synopsis = `btmm-relay: the btmm relay (docs/paths.md): STUN binding responder and
last-resort forwarder of ESP-in-UDP between two hosts of one user, with the
forwarding done by a TC eBPF program in the kernel. It never holds ESP keys.

Usage: btmm-relay [flags]      serve until SIGINT/SIGTERM (config file: docs/paths.md)
Publish it with btmm-dnsd's [relay] section (SRV _btmm-relay._udp.<zone>).`

// Config is btmm-relay's TOML configuration.
type Config struct {
	// Listen are the STUN/control addresses; a second address (another
	// IP) lets hosts detect symmetric NATs.
	Listen []string `toml:"listen"`
	// Public is the address allocations are reported on (default: the
	// first listen address).
	Public string `toml:"public"`
	Ports  string `toml:"ports"` // allocation port range, "40000-40999"
	// KeysDir is btmm-dnsd's data_dir/keys (user keys, BIND format);
	// Zone its zone.
	KeysDir string `toml:"keys_dir"`
	Zone    string `toml:"zone"`
	// Device is the interface the kernel forwarder attaches to; empty:
	// Go forwards (slow path, for kernels without TC BPF).
	Device      string `toml:"device"`
	MaxPerUser  int    `toml:"max_per_user"`
	MaxTotal    int    `toml:"max_total"`
	MaxLifetime string `toml:"max_lifetime"`
	ByteLimit   uint64 `toml:"byte_limit"`
	// TLSListen are the TLS stream addresses for hosts whose UDP is
	// blocked (relay-tcp, usually port 443); TLSCert/TLSKey its PEM
	// certificate chain and key (required with TLSListen).
	TLSListen []string `toml:"tls_listen"`
	TLSCert   string   `toml:"tls_cert"`
	TLSKey    string   `toml:"tls_key"`
	// StatusFile, when set, is rewritten every few seconds with the
	// allocations and counters as JSON.
	StatusFile string `toml:"status_file"`
	LogLevel   string `toml:"log_level"`
}

func loadConfig(path string) (*Config, ctlrelay.Config, error) {
	var c Config
	md, err := toml.DecodeFile(path, &c)
	if err != nil {
		return nil, ctlrelay.Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	if u := md.Undecoded(); len(u) > 0 {
		return nil, ctlrelay.Config{}, fmt.Errorf("config %s: unknown key %q", path, u[0].String())
	}
	rc, err := c.relayConfig()
	return &c, rc, err
}

// relayConfig checks c and reports every problem at once.
func (c *Config) relayConfig() (ctlrelay.Config, error) {
	var errs []error
	var rc ctlrelay.Config
	if len(c.Listen) == 0 {
		errs = append(errs, errors.New("listen: at least one address:port"))
	}
	for _, l := range c.Listen {
		ap, err := netip.ParseAddrPort(l)
		if err != nil || !ap.Addr().Is4() {
			errs = append(errs, fmt.Errorf("listen: %q is not IPv4:port", l))
			continue
		}
		rc.Listen = append(rc.Listen, ap)
	}
	if c.Public != "" {
		a, err := netip.ParseAddr(c.Public)
		if err != nil || !a.Is4() {
			errs = append(errs, fmt.Errorf("public: %q is not an IPv4 address", c.Public))
		}
		rc.Public = a
	}
	if c.Ports != "" {
		lo, hi, ok := strings.Cut(c.Ports, "-")
		a, err1 := strconv.ParseUint(lo, 10, 16)
		b, err2 := strconv.ParseUint(hi, 10, 16)
		if !ok || err1 != nil || err2 != nil || a == 0 || b < a {
			errs = append(errs, fmt.Errorf("ports: %q is not LOW-HIGH", c.Ports))
		}
		rc.PortMin, rc.PortMax = uint16(a), uint16(b)
	}
	if c.KeysDir == "" || c.Zone == "" {
		errs = append(errs, errors.New("keys_dir and zone are required (btmm-dnsd's data_dir/keys and zone)"))
	}
	if c.MaxLifetime != "" {
		d, err := time.ParseDuration(c.MaxLifetime)
		if err != nil || d < 30*time.Second {
			errs = append(errs, fmt.Errorf("max_lifetime: %q is not a duration >= 30s", c.MaxLifetime))
		}
		rc.MaxLifetime = d
	}
	for _, l := range c.TLSListen {
		ap, err := netip.ParseAddrPort(l)
		if err != nil || !ap.Addr().Is4() {
			errs = append(errs, fmt.Errorf("tls_listen: %q is not IPv4:port", l))
			continue
		}
		rc.StreamListen = append(rc.StreamListen, ap)
	}
	switch {
	case len(c.TLSListen) > 0 && (c.TLSCert == "" || c.TLSKey == ""):
		errs = append(errs, errors.New("tls_listen needs tls_cert and tls_key"))
	case len(c.TLSListen) > 0:
		cert, err := tls.LoadX509KeyPair(c.TLSCert, c.TLSKey)
		if err != nil {
			errs = append(errs, fmt.Errorf("tls_cert/tls_key: %w", err))
		}
		rc.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	rc.MaxPerUser, rc.MaxTotal, rc.ByteLimit = c.MaxPerUser, c.MaxTotal, c.ByteLimit
	rc.Keys = ctlrelay.DirKeys(c.KeysDir, c.Zone, 10*time.Second)
	return rc, errors.Join(errs...)
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := cli.NewFlagSet("btmm-relay", synopsis)
	conf := fs.String("config", "/etc/btmm/relay.toml", "config file (TOML)")
	if done, code := fs.Parse(args, stdout, stderr); done {
		return code
	}
	cfg, rc, err := loadConfig(*conf)
	if err != nil {
		fmt.Fprintln(stderr, "btmm-relay:", err)
		return 2
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.LogLevel)); cfg.LogLevel != "" && err != nil {
		fmt.Fprintln(stderr, "btmm-relay: log_level:", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := serve(ctx, cfg, rc, log); err != nil {
		log.Error("btmm-relay stopped", "err", err)
		return 1
	}
	return 0
}

func serve(ctx context.Context, cfg *Config, rc ctlrelay.Config, log *slog.Logger) error {
	rc.Logger = log
	if rc.PortMin == 0 {
		rc.PortMin, rc.PortMax = 40000, 40999
	}
	public := rc.Public
	if !public.IsValid() {
		public = rc.Listen[0].Addr()
	}
	var fw *ebpfrelay.Forwarder
	if cfg.Device != "" {
		var err error
		fw, err = ebpfrelay.New(ebpfrelay.Config{Device: cfg.Device, Addr: public, PortMin: rc.PortMin, PortMax: rc.PortMax,
			Logger: log.With("part", "forwarder")})
		if err != nil {
			log.Warn("kernel forwarder unavailable; Go forwards ESP (slow path)", "err", err)
		} else {
			defer fw.Close()
			rc.Forwarder = fw
			log.Info("kernel forwarder attached", "device", cfg.Device, "attach", fw.Attachment())
		}
	}
	s, err := ctlrelay.Listen(rc)
	if err != nil {
		return err
	}
	log.Info("serving", "listen", s.Addrs(), "tls", s.StreamAddrs(), "public", public, "ports", fmt.Sprintf("%d-%d", rc.PortMin, rc.PortMax))
	if cfg.StatusFile != "" {
		go writeStatus(ctx, cfg.StatusFile, s, fw, log)
	}
	return s.Serve(ctx)
}

// Status is what status_file holds.
type Status struct {
	Time        time.Time                   `json:"time"`
	Stats       ctlrelay.Stats              `json:"stats"`
	Verdicts    *ebpfrelay.Verdicts         `json:"kernel_verdicts,omitempty"`
	Allocations []ctlrelay.AllocationStatus `json:"allocations"`
}

func writeStatus(ctx context.Context, path string, s *ctlrelay.Server, fw *ebpfrelay.Forwarder, log *slog.Logger) {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		st := Status{Time: time.Now(), Stats: s.Stats(), Allocations: s.Allocations()}
		if fw != nil {
			if v, err := fw.Verdicts(); err == nil {
				st.Verdicts = &v
			}
		}
		b, _ := json.MarshalIndent(st, "", "  ")
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, b, 0o644); err == nil {
			os.Rename(tmp, path)
		} else {
			log.Warn("status file", "err", err)
		}
		select {
		case <-ctx.Done():
			os.Remove(path)
			return
		case <-t.C:
		}
	}
}
